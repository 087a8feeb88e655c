"""Param trees to and from `.safetensors` files.

Files written here hold the Flax tree with '/'-joined keys. Files with timm's
'.'-joined names (`blocks.0.attn.qkv.weight`) are converted on load, so one
call reads both. Reading needs no torch.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from evolq_jax.models.presets import ViTConfig


def save_params(path: str, params, metadata: dict | None = None) -> None:
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}, path,
            metadata={k: str(v) for k, v in (metadata or {}).items()})


def expected_shapes(cfg: ViTConfig) -> dict:
  """'/'-joined Flax param names -> shapes, for `cfg`."""
  from evolq_jax.models.vit import VisionTransformer
  shapes = jax.eval_shape(
      lambda: VisionTransformer(config=cfg).init(
          jax.random.key(0), np.zeros((1, cfg.img_size, cfg.img_size, cfg.in_chans),
                                      np.float32)))["params"]
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


def check_against(flat: dict, cfg: ViTConfig, source: str) -> None:
  """Raise one error naming every missing, unexpected or mis-shaped key."""
  want = expected_shapes(cfg)
  missing = sorted(set(want) - set(flat))
  unexpected = sorted(set(flat) - set(want))
  bad = sorted(f"{k}: file {tuple(flat[k].shape)} vs model {want[k]}"
               for k in set(want) & set(flat) if tuple(flat[k].shape) != want[k])
  if missing or unexpected or bad:
    lines = [f"checkpoint {source!r} does not match model {cfg.name!r}:"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", bad)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:8])
                     + (" ..." if len(items) > 8 else ""))
    lines.append("  Check that the checkpoint was trained for this preset (model=...).")
    raise ValueError("\n".join(lines))


def load_params(path: str, cfg: ViTConfig):
  """A `.safetensors` file (Flax or timm layout) -> param tree checked against cfg."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist.")
  flat = load_file(path)
  if any("/" in k for k in flat):
    flat = {k: v.astype(np.float32) for k, v in flat.items()}
  else:
    from evolq_jax.models.timm_convert import timm_to_flax_flat
    flat = timm_to_flax_flat(flat, cfg)
  check_against(flat, cfg, path)
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
