"""timm -> Flax conversion: logits parity with timm, and checkpoint files."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from evolq_jax.models import VisionTransformer, get_preset
from evolq_jax.models.checkpoint import load_params, save_params
from evolq_jax.models.convert import from_timm_state_dict

from conftest import import_timm

DEIT = ("deit_tiny_patch16_224", "deit_small_patch16_224")


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def _timm_model(name: str, perturb: bool):
  """A random timm model in eval mode; `perturb` rescales every weight so the
  logits are O(1..10) rather than timm's near-zero init (zero biases, 1e-2 head)."""
  timm = import_timm()
  import torch
  torch.manual_seed(0)
  model = timm.create_model(name, pretrained=False).eval()
  if perturb:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
      for key, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key == "norm.weight":
          p.copy_(1.0 + 0.2 * noise)         # LayerNorm scales around 1
        elif p.ndim == 1:
          p.copy_(0.2 * noise)               # non-zero biases
        else:
          fan_in = int(np.prod(p.shape[1:])) if p.ndim in (2, 4) else 1
          std = (1.0 / fan_in) ** 0.5 if p.ndim in (2, 4) else 0.5
          p.copy_(std * noise)
  return model


def _images(cfg, n=2, seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((n, cfg.img_size, cfg.img_size, cfg.in_chans)).astype(np.float32)


def _timm_logits(model, images_nhwc):
  import torch
  with torch.no_grad():
    return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def _flax_logits(cfg, params, images_nhwc):
  return np.asarray(VisionTransformer(config=cfg).apply({"params": params}, images_nhwc))


@pytest.mark.parametrize("name", DEIT)
@pytest.mark.parametrize("perturb", [False, True], ids=["timm_init", "perturbed"])
def test_logits_match_timm(name, perturb):
  cfg = get_preset(name)
  model = _timm_model(name, perturb)
  params = from_timm_state_dict(model.state_dict(), cfg)
  images = _images(cfg)
  want = _timm_logits(model, images)
  got = _flax_logits(cfg, params, images)
  assert got.shape == want.shape == (2, cfg.num_classes)
  scale = float(np.abs(want).max())
  if perturb:  # the check only means something if the logits are not ~0
    assert scale > 1.0, scale
  diff = float(np.abs(got - want).max())
  print(f"{name} perturb={perturb}: max|timm|={scale:.4g} max|diff|={diff:.3g}")
  assert diff < 1e-4 * max(1.0, scale), (diff, scale)
  # The two images must give different logits (guards against a broadcast bug).
  assert np.abs(want[0] - want[1]).max() > 10 * diff


def test_timm_safetensors_file_matches_state_dict(tmp_path):
  from safetensors.torch import save_file
  name = "deit_tiny_patch16_224"
  cfg = get_preset(name)
  sd = _timm_model(name, perturb=True).state_dict()
  path = tmp_path / "deit_tiny_timm.safetensors"
  save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
  from_file, from_sd = _flat(load_params(str(path), cfg)), _flat(from_timm_state_dict(sd, cfg))
  assert sorted(from_file) == sorted(from_sd)
  for k in from_sd:
    assert from_file[k].dtype == np.float32, k
    np.testing.assert_array_equal(from_file[k], from_sd[k], err_msg=k)
  # The file route is also laid out as Flax wants it (spot check a transpose).
  np.testing.assert_array_equal(from_file["blocks_0/attn/qkv/kernel"],
                                sd["blocks.0.attn.qkv.weight"].numpy().T)


def test_flax_layout_round_trip(tmp_path):
  cfg = get_preset("vit_fixture_patch4_28")
  params = VisionTransformer(config=cfg).init(
      jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  path = tmp_path / "sub" / "fixture.safetensors"
  save_params(str(path), params, metadata={"model": cfg.name, "step": 3})
  loaded = load_params(str(path), cfg)
  want, got = _flat(params), _flat(loaded)
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].shape == want[k].shape, k
    np.testing.assert_array_equal(got[k], np.asarray(want[k]), err_msg=k)
  images = _images(cfg, seed=1)
  np.testing.assert_array_equal(_flax_logits(cfg, loaded, images),
                                _flax_logits(cfg, params, images))
  from safetensors import safe_open
  with safe_open(str(path), "np") as f:
    assert f.metadata() == {"model": cfg.name, "step": "3"}


# ------------------------------------------------------------------ errors --

@pytest.fixture(scope="module")
def fixture_flat():
  cfg = get_preset("vit_fixture_patch4_28")
  params = VisionTransformer(config=cfg).init(
      jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  return cfg, {k: np.asarray(v) for k, v in _flat(params).items()}


def _save_flat(path, flat):
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}, str(path))
  return str(path)


def test_missing_key_is_named(tmp_path, fixture_flat):
  cfg, flat = fixture_flat
  flat = dict(flat)
  del flat["blocks_3/mlp/fc1/bias"]
  with pytest.raises(ValueError, match=r"missing.*blocks_3/mlp/fc1/bias"):
    load_params(_save_flat(tmp_path / "m.safetensors", flat), cfg)


def test_unexpected_key_is_named(tmp_path, fixture_flat):
  cfg, flat = fixture_flat
  flat = dict(flat, **{"blocks_0/attn/extra": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected.*blocks_0/attn/extra"):
    load_params(_save_flat(tmp_path / "u.safetensors", flat), cfg)


def test_misshaped_key_is_named(tmp_path, fixture_flat):
  cfg, flat = fixture_flat
  flat = dict(flat)
  flat["head/bias"] = np.zeros(11, np.float32)
  with pytest.raises(ValueError, match=r"mis-shaped.*head/bias.*\(11,\).*\(10,\)"):
    load_params(_save_flat(tmp_path / "s.safetensors", flat), cfg)


def test_timm_state_dict_errors_are_named():
  timm = import_timm()
  import torch
  torch.manual_seed(0)
  sd = timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict()
  tiny, small = get_preset("deit_tiny_patch16_224"), get_preset("deit_small_patch16_224")
  # Every tensor of a tiny checkpoint is mis-shaped for small; the message names them.
  with pytest.raises(ValueError, match="mis-shaped") as err:
    from_timm_state_dict(sd, small)
  assert "deit_small_patch16_224" in str(err.value)
  assert "blocks_0/attn/proj/bias: file (192,) vs model (384,)" in str(err.value)
  # A missing timm key is reported under its Flax name.
  sd_missing = {k: v for k, v in sd.items() if k != "blocks.11.norm2.weight"}
  with pytest.raises(ValueError, match=r"missing.*blocks_11/norm2/scale"):
    from_timm_state_dict(sd_missing, tiny)
  # An unknown timm key is reported under its own name, not dropped.
  sd_extra = dict(sd, **{"head_dist.weight": torch.zeros(1000, 192)})
  with pytest.raises(ValueError, match=r"unexpected.*head_dist\.weight"):
    from_timm_state_dict(sd_extra, tiny)


def test_timm_file_for_wrong_preset_is_named(tmp_path):
  from safetensors.torch import save_file
  timm = import_timm()
  sd = timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict()
  path = tmp_path / "tiny.safetensors"
  save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
  with pytest.raises(ValueError, match=r"mis-shaped.*cls_token|mis-shaped.*blocks_0"):
    load_params(str(path), get_preset("deit_small_patch16_224"))


def test_nonexistent_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.safetensors"):
    load_params(str(tmp_path / "nope.safetensors"), get_preset("vit_fixture_patch4_28"))


def test_half_precision_timm_weights_convert_to_float32(tmp_path):
  """bf16 / fp16 timm weights (state dict or file) load as float32 params."""
  from safetensors.torch import save_file
  import torch
  cfg = get_preset("deit_tiny_patch16_224")
  sd = _timm_model(cfg.name, perturb=True).state_dict()
  for dtype in (torch.bfloat16, torch.float16):
    half = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    want = _flat(from_timm_state_dict({k: v.float() for k, v in half.items()}, cfg))
    path = tmp_path / f"{dtype}.safetensors".replace("torch.", "")
    save_file(half, str(path))
    for route, got in (("state_dict", from_timm_state_dict(half, cfg)),
                       ("file", load_params(str(path), cfg))):
      got = _flat(got)
      assert sorted(got) == sorted(want), (dtype, route)
      for k in want:
        assert got[k].dtype == np.float32, (dtype, route, k)
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{dtype} {route} {k}")


def test_wrapped_training_checkpoint_is_a_clear_error():
  timm = import_timm()
  sd = timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict()
  with pytest.raises(ValueError, match=r"\['model'\].*checkpoint\['model'\]"):
    from_timm_state_dict({"model": sd, "epoch": 3}, get_preset("deit_tiny_patch16_224"))


def test_torch_checkpoint_file_nested_or_not_loads(tmp_path):
  """A .pth is read tensors-only; DeiT's training checkpoints nest the weights
  under "model" and load the same; anything else is a clear error."""
  import torch
  cfg = get_preset("deit_tiny_patch16_224")
  sd = _timm_model(cfg.name, perturb=True).state_dict()
  want = _flat(from_timm_state_dict(sd, cfg))
  for name, obj in (("plain.pth", sd), ("nested.pth", {"model": sd, "epoch": torch.tensor(3)})):
    torch.save(obj, tmp_path / name)
    got = _flat(load_params(str(tmp_path / name), cfg))
    assert sorted(got) == sorted(want), name
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name} {k}")
  torch.save([1, 2], tmp_path / "list.pth")
  with pytest.raises(ValueError, match=r"list.pth.*not a state dict of tensors.*'model'"):
    load_params(str(tmp_path / "list.pth"), cfg)
