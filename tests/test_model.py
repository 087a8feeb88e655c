"""The Linen ViT: three modes from one definition, block-wise composition, input checks."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evolq_jax.calibrate import calibrate, weights_for
from evolq_jax.config import QuantConfig
from evolq_jax.models import (fp_logits, get_preset, init_params, model_for, quantized_logits)
from evolq_jax.quant.weights import kernel_paths

# test_search's model and calibration shapes (2 blocks, 40 images in one batch): the same
# programs
CFG = dataclasses.replace(get_preset("vit_fixture_patch4_28"), depth=2)


@pytest.fixture(scope="module")
def setup():
  params = init_params(CFG, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (40, 28, 28, 1))
  qcfg = QuantConfig(w_bits=4, a_bits=8)
  qparams = calibrate(CFG, qcfg, params, np.asarray(x), batch_size=len(x), progress=False)
  return params, x, qcfg, qparams


def test_calib_mode_sows_every_quantization_point(setup):
  params, x, _, qparams = setup
  logits, stats = model_for(CFG, "calib").apply({"params": params}, x, mutable=["stats"])
  np.testing.assert_allclose(logits, fp_logits(CFG, params, x), atol=1e-6)
  s = stats["stats"]
  assert set(s) == {"patch_out", "embed", "norm_out", "head_out"} | {f"blocks_{i}" for i in range(2)}
  assert set(s["blocks_0"]) == {"norm1_out", "resid1", "norm2_out", "resid2", "attn", "mlp"}
  assert set(s["blocks_0"]["attn"]) == {"qkv_out", "logits", "probs", "context", "proj_out"}
  assert set(s["blocks_0"]["mlp"]) == {"gelu_out", "fc2_out"}
  assert s["blocks_0"]["attn"]["logits"].shape == (40, 4, 50, 50)
  # QParams.acts mirrors the stats tree; QParams.weights covers every kernel
  assert jax.tree.structure(jax.tree.map(lambda a: 0, s)) == jax.tree.structure(
      jax.tree.map(lambda d: 0, qparams.acts, is_leaf=lambda d: "scale" in d))
  weight_layers = {tuple(k.key for k in path[:-1])
                   for path, _ in jax.tree_util.tree_flatten_with_path(qparams.weights)[0]}
  assert weight_layers == set(kernel_paths(params))
  assert len(weight_layers) == 2 + 4 * 2  # patch_embed, head, qkv/proj/fc1/fc2 per block


def test_residual_points_get_ptf_channel_scales(setup):
  _, _, _, qparams = setup
  assert qparams.acts["blocks_1"]["resid1"]["scale"].shape == (96,)
  assert qparams.acts["blocks_1"]["attn"]["qkv_out"]["scale"].shape == ()
  assert qparams.weights["blocks_1"]["attn"]["qkv"]["scale"].shape == (288,)


def test_quant_mode_changes_outputs_and_8bit_is_closer_than_4bit(setup):
  params, x, qcfg, qparams = setup
  fp = fp_logits(CFG, params, x)
  q4 = quantized_logits(CFG, qcfg, params, qparams, x)
  assert float(jnp.max(jnp.abs(q4 - fp))) > 1e-3
  q8cfg = QuantConfig(w_bits=8, a_bits=8)
  qp8 = weights_for(params, q8cfg, qparams)  # A8 both: the same activation scales
  q8 = quantized_logits(CFG, q8cfg, params, qp8, x)
  err8, err4 = float(jnp.mean(jnp.abs(q8 - fp))), float(jnp.mean(jnp.abs(q4 - fp)))
  assert err8 < err4  # (closeness to FP is tested on the trained fixture)


@pytest.mark.parametrize("split", [1, 2])
def test_prefix_and_suffix_compose_to_the_full_forward(setup, split):
  params, x, qcfg, qparams = setup
  tokens = fp_logits(CFG, params, x, last_unit=split)
  assert tokens.shape == (40, 50, 96)
  np.testing.assert_allclose(fp_logits(CFG, params, tokens, first_unit=split),
                             fp_logits(CFG, params, x), atol=1e-5)
  qt = quantized_logits(CFG, qcfg, params, qparams, x, last_unit=split)
  np.testing.assert_allclose(quantized_logits(CFG, qcfg, params, qparams, qt, first_unit=split),
                             quantized_logits(CFG, qcfg, params, qparams, x), atol=1e-5)


def test_log2_softmax_option_changes_probabilities(setup):
  params, x, _, _ = setup
  q = QuantConfig(log2_softmax=True)
  qp = calibrate(CFG, q, params, np.asarray(x), len(x), progress=False)
  out = quantized_logits(CFG, q, params, qp, x)
  ref = quantized_logits(CFG, QuantConfig(), params, qp, x)
  assert not np.allclose(out, ref)


@pytest.mark.parametrize("shape", [(2, 32, 32, 1), (2, 28, 28, 3), (28, 28, 1), (2, 1, 28, 28)])
def test_wrong_image_shape_is_a_clear_error(setup, shape):
  params = setup[0]
  with pytest.raises(ValueError, match=r"expected \(batch, 28, 28, 1\) NHWC"):
    fp_logits(CFG, params, jnp.zeros(shape))


def test_quant_mode_without_qparams_is_an_error(setup):
  params, x, _, _ = setup
  with pytest.raises(ValueError, match="calibrate"):
    model_for(CFG, "quant", QuantConfig()).apply({"params": params}, x)


def test_unknown_model_name():
  with pytest.raises(ValueError, match="'deit_huge'.*deit_tiny_patch16_224"):
    get_preset("deit_huge")


def test_presets_match_timm_shapes():
  for name, (dim, heads) in {"deit_tiny_patch16_224": (192, 3), "deit_small_patch16_224": (384, 6),
                             "deit_base_patch16_224": (768, 12),
                             "vit_base_patch16_224": (768, 12)}.items():
    cfg = get_preset(name)
    assert (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.num_patches) == (dim, heads, 12, 196)


def test_forward_cost_counts_every_matmul_of_every_family():
  """models/cost.py against independent counts: the ViT formula by hand, and the
  MACs the Swin and LeViT papers state for their models."""
  from evolq_jax.models import get_preset
  from evolq_jax.models.cost import forward_cost, forward_flops, layer_macs
  cfg = get_preset("vit_fixture_patch4_28")
  t, d, h = cfg.num_patches + 1, cfg.embed_dim, cfg.mlp_hidden
  block = 2 * t * d * (3 * d + d + 2 * h) + 2 * 2 * t * t * d  # 4 linears + q@k^T + probs@v
  embed = 2 * cfg.num_patches * cfg.patch_size ** 2 * cfg.in_chans * d
  head = 2 * d * cfg.num_classes
  assert forward_cost(cfg)["units"] == (block,) * cfg.depth
  assert forward_flops(cfg) == embed + cfg.depth * block + head
  assert forward_flops(cfg, 4) == 2 * block + head
  macs = layer_macs(cfg)
  assert macs[("blocks_0", "attn", "qkv")] == t * d * 3 * d and macs[("head",)] == d * 10
  assert len(macs) == 2 + 4 * cfg.depth
  # Swin-T: 4.5 GMACs (Liu et al., 2021); LeViT-128S: 305 M (Graham et al., 2021)
  for name, gmacs in (("swin_tiny_patch4_window7_224", 4.5), ("levit_128s", 0.305)):
    assert forward_flops(get_preset(name)) / 2e9 == pytest.approx(gmacs, rel=0.01), name
  # EfficientNet-Lite0: its depthwise convolutions count (one grouped conv each)
  lite = get_preset("efficientnet_lite0")
  assert forward_flops(lite) / 2 == sum(layer_macs(lite).values())
