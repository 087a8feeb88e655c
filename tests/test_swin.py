"""Swin Transformer: parity with timm on random (perturbed) weights, the
converter (timm and original checkpoints, presets' shapes, safetensors), the
FQ-ViT layout (test_families checks the quantized modes, the prefix forward and
the population fitness on every family). `evolq search` end to end on a registered
non-ViT preset and generated JPEGs is tests/test_levit.py's (the CLI is the same for
every family)."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import traverse_util

from evolq_jax.config import QuantConfig
from evolq_jax.models import calibration_stats, fp_logits, get_preset, load_params, units
from evolq_jax.models.convert import expected_shapes, from_timm_state_dict, timm_to_flax_flat
from evolq_jax.models.swin import act_rules, shift_mask
from evolq_jax.quant.recipe import rule_for

from conftest import calibrated_shapes, import_timm

PRESETS = ("swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
           "swin_base_patch4_window7_224")
# timm's own Swin code at a small size: stage 0 (8x8 grid, window 4) has a shifted block,
# stage 1 (patch merging, then a 4x4 grid) is one unshifted window; 3 units.
TINY_KW = dict(img_size=16, patch_size=2, window_size=4, embed_dim=16, depths=(2, 1),
               num_heads=(1, 2), num_classes=10)
TINY = dataclasses.replace(get_preset(PRESETS[0]), name="swin_tiny_test", **TINY_KW)
QCFG = QuantConfig(w_bits=4, a_bits=8)
N = 8


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def _timm_tiny():
  """A timm Swin at TINY's size, weights perturbed so the logits are O(1):
  LayerNorm scales around 1, non-zero biases, O(1) bias tables."""
  timm = import_timm()
  import torch
  torch.manual_seed(0)
  model = timm.create_model(PRESETS[0], pretrained=False, **TINY_KW).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for key, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in key and key.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif p.ndim == 1:
        p.copy_(0.2 * noise)
      elif key.endswith("relative_position_bias_table"):
        p.copy_(0.5 * noise)
      else:
        p.copy_(noise / float(np.prod(p.shape[1:])) ** 0.5)
  return model


@pytest.fixture(scope="module")
def timm_tiny():
  model = _timm_tiny()
  return model, from_timm_state_dict(model.state_dict(), TINY)


def _images(n, seed=0, size=16):
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def test_swin_logits_match_timm(timm_tiny):
  import torch
  model, params = timm_tiny
  x = _images(2)
  with torch.no_grad():
    want = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  got = np.asarray(jax.jit(lambda p, x: fp_logits(TINY, p, x))(params, x))
  scale, diff = float(np.abs(want).max()), float(np.abs(got - want).max())
  assert scale > 1.0, scale  # the check only means something if the logits are not ~0
  assert diff < 1e-4 * scale, (diff, scale)
  assert np.abs(want[0] - want[1]).max() > 10 * diff  # no broadcast bug across images


def test_swin_shift_mask_matches_timm():
  import_timm()
  from timm.models.swin_transformer import SwinTransformerBlock
  block = SwinTransformerBlock(dim=8, input_resolution=(8, 8), num_heads=2, window_size=4,
                               shift_size=2)
  np.testing.assert_array_equal(shift_mask(8, 4, 2), block.attn_mask.numpy())


@pytest.mark.parametrize("name", PRESETS)
def test_swin_preset_shapes_match_timm(name):
  """Every converted key and shape of the real presets (timm on the meta device:
  shapes only, zero-stride arrays, no weights in memory)."""
  timm = import_timm()
  cfg = get_preset(name)
  sd = timm.create_model(name, pretrained=False, device="meta").state_dict()
  flat = timm_to_flax_flat({k: np.broadcast_to(np.float32(0), tuple(v.shape))
                            for k, v in sd.items()}, cfg)
  assert {k: v.shape for k, v in flat.items()} == expected_shapes(cfg)
  assert len(units(cfg)) == sum(cfg.depths)
  assert cfg.transform["crop_pct"] == 0.9 and cfg.transform["mean"] == (0.485, 0.456, 0.406)


def test_swin_original_checkpoint_layout_converts_the_same(timm_tiny):
  """The original (Microsoft) checkpoints: patch merging at the end of stage i,
  `head.*`, the index and mask buffers stored."""
  import re
  import torch
  model, params = timm_tiny
  old = {}
  for k, v in model.state_dict().items():
    k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample",
               k).replace("head.fc.", "head.")
    old[k] = v
  old["layers.0.blocks.1.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
  old["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
  got, want = _flat(from_timm_state_dict(old, TINY)), _flat(params)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_swin_timm_safetensors_round_trip(tmp_path, timm_tiny):
  from safetensors.torch import save_file
  model, params = timm_tiny
  path = tmp_path / "swin_tiny_test.safetensors"
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
  got, want = _flat(load_params(str(path), TINY)), _flat(params)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  sd = model.state_dict()
  np.testing.assert_array_equal(got["layers_1/downsample/reduction/kernel"],
                                sd["layers.1.downsample.reduction.weight"].numpy().T)


def test_swin_bad_image_size_is_a_clear_error():
  with pytest.raises(ValueError, match="stage 0 has a 50x50 grid, window 7"):
    dataclasses.replace(get_preset(PRESETS[0]), img_size=200)


# ------------------------------------------------------------ quantized modes --

def test_swin_layout(timm_tiny):
  """The FQ-ViT points and PTF placement (the calibrated scales' shapes, traced;
  test_families and test_onnx run the quantized modes)."""
  params, x = timm_tiny[1], _images(N, seed=1)
  qparams = calibrated_shapes(TINY, QCFG, params, x)
  s = jax.jit(lambda p, x: calibration_stats(TINY, p, x)[1]["stats"])(params, x)
  assert jax.tree.structure(jax.tree.map(lambda a: 0, s)) == jax.tree.structure(
      jax.tree.map(lambda d: 0, qparams.acts, is_leaf=lambda d: "scale" in d))
  assert set(s) == {"patch_embed", "norm_out", "pool_out", "head_out"} | {
      f"layers_{i}" for i in range(2)}
  assert set(s["patch_embed"]) == {"proj_out", "norm_out"}
  assert set(s["layers_1"]) == {"downsample", "blocks_0"}
  assert set(s["layers_1"]["downsample"]) == {"norm_out", "reduction_out"}
  assert set(s["layers_0"]["blocks_1"]) == {"norm1_out", "attn", "resid1", "norm2_out", "mlp",
                                            "resid2"}
  assert set(s["layers_0"]["blocks_1"]["attn"]) == {
      "qkv_out", "qk", "bias_table", "logits", "probs", "context", "proj_out"}
  # the logits point sees the bias but not the -100 shift mask
  assert float(s["layers_0"]["blocks_1"]["attn"]["logits"].min()) > -50
  rules = act_rules(QCFG)
  ptf = sorted(k for k in _flat(qparams.acts) if k.endswith("/scale")
               and rule_for(rules, k[:-len("/scale")]).quantizer == "ptf")
  assert len(ptf) == 2 * 3 + 1 and "layers_1/downsample/reduction_out/scale" in ptf
  assert qparams.acts["layers_0"]["blocks_0"]["resid1"]["scale"].shape == (16,)  # per channel
  assert np.shape(qparams.acts["patch_embed"]["norm_out"]["scale"]) == ()  # uniform, as the ref
  assert [tuple(l.name for l in u.layers) for u in units(TINY)][1:3] == [
      ("qkv", "proj", "fc1", "fc2"), ("reduction", "qkv", "proj", "fc1", "fc2")]
