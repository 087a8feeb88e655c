"""Param trees to and from `.safetensors` files.

Files written here hold the Flax tree with '/'-joined keys. Files with timm's
'.'-joined names (`blocks.0.attn.qkv.weight`) are converted on load, so one
call reads both. Reading needs no torch, except for a torch state dict
(`.pth` / `.pt`, read with `torch.load(weights_only=True)`: tensors only).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from evolq_jax.models.convert import check_against, timm_to_flax_flat, unflatten


def save_params(path: str, params, metadata: dict | None = None) -> None:
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}, path,
            metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_params(path: str, cfg):
  """A `.safetensors` file (Flax or timm layout) -> param tree checked against cfg."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist.")
  if os.path.isdir(path):
    raise ValueError(f"checkpoint {path!r} is a folder: expected a .safetensors file, e.g. "
                     f"{os.path.join(path, 'model.safetensors')!r}.")
  flat = _torch_state_dict(path) if path.endswith((".pth", ".pt")) else _read_safetensors(path)
  if any("/" in k for k in flat):
    flat = {k: v.astype(np.float32) for k, v in flat.items()}
  else:
    flat = timm_to_flax_flat(flat, cfg)
  check_against(flat, cfg, path)
  return unflatten(flat)


WRAPPERS = ("state_dict", "model", "model_ema")  # keys a training checkpoint nests weights under


def _torch_state_dict(path: str) -> dict:
  try:
    import torch
  except ImportError:
    raise ImportError(f"checkpoint {path!r} is a torch state dict: reading it needs torch "
                      "(pip install -e '.[test]'), or convert it once to .safetensors.") from None
  state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
  for wrapper in WRAPPERS:  # training checkpoints nest the weights (DeiT's .pth: "model")
    if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
      state = state[wrapper]
      break
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
    raise ValueError(f"checkpoint {path!r} is not a state dict of tensors (top level: {keys}): "
                     f"expected name -> tensor, or one nested under {WRAPPERS}; save "
                     "model.state_dict() or convert it to .safetensors.")
  return {k: v.detach().float().numpy() for k, v in state.items()}


def _read_safetensors(path: str) -> dict:
  from safetensors import SafetensorError
  try:
    return load_file(path)
  except (SafetensorError, OSError) as e:  # e.g. a truncated download
    raise ValueError(f"checkpoint {path!r} is not a readable .safetensors file "
                     f"({str(e).splitlines()[0] if str(e) else type(e).__name__}): it may be "
                     "truncated; copy or convert it again.") from None
