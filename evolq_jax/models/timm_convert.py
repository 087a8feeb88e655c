"""timm ViT / DeiT state dicts -> Flax params: one table of names plus transposes."""
from __future__ import annotations

import re

import numpy as np
from flax import traverse_util

from evolq_jax.models.presets import ViTConfig

# (timm regex, flax name template, how to convert the array)
_TABLE = [
    (r"cls_token", "cls_token", "same"),
    (r"pos_embed", "pos_embed", "same"),
    (r"patch_embed\.proj\.weight", "patch_embed/kernel", "conv"),
    (r"patch_embed\.proj\.bias", "patch_embed/bias", "same"),
    (r"blocks\.(\d+)\.(norm1|norm2)\.weight", "blocks_{0}/{1}/scale", "same"),
    (r"blocks\.(\d+)\.(norm1|norm2)\.bias", "blocks_{0}/{1}/bias", "same"),
    (r"blocks\.(\d+)\.(attn|mlp)\.(qkv|proj|fc1|fc2)\.weight", "blocks_{0}/{1}/{2}/kernel", "dense"),
    (r"blocks\.(\d+)\.(attn|mlp)\.(qkv|proj|fc1|fc2)\.bias", "blocks_{0}/{1}/{2}/bias", "same"),
    (r"norm\.weight", "norm/scale", "same"),
    (r"norm\.bias", "norm/bias", "same"),
    (r"head\.weight", "head/kernel", "dense"),
    (r"head\.bias", "head/bias", "same"),
]
_CONVERT = {
    "same": lambda a: a,
    "dense": lambda a: a.T,                         # (out, in) -> (in, out)
    "conv": lambda a: a.transpose(2, 3, 1, 0),      # (out, c, kh, kw) -> (kh, kw, c, out)
}


def timm_to_flax_flat(state: dict, cfg: ViTConfig) -> dict:
  """{timm name: array} -> {'/'-joined flax name: float32 array}.

  Unknown timm names are kept under their own name, so the shape check that
  follows reports them as unexpected instead of dropping them silently.
  """
  out = {}
  for key, value in state.items():
    value = np.asarray(value, np.float32)
    for pattern, template, how in _TABLE:
      m = re.fullmatch(pattern, key)
      if m:
        out[template.format(*m.groups())] = _CONVERT[how](value)
        break
    else:
      out[key] = value
  return out


def from_timm_state_dict(state_dict, cfg: ViTConfig):
  """A timm state dict (torch tensors or numpy arrays) -> checked Flax params."""
  from evolq_jax.models.checkpoint import check_against
  nested = sorted(k for k, v in state_dict.items() if isinstance(v, dict))
  if nested:
    raise ValueError(
        f"state_dict entries {nested} are dicts, not tensors: this looks like a "
        f"training checkpoint; pass its state dict (e.g. checkpoint[{nested[0]!r}]).")
  # .float(): torch cannot export bfloat16 tensors to numpy.
  arrays = {k: (v.detach().cpu().float().numpy() if hasattr(v, "detach") else np.asarray(v))
            for k, v in state_dict.items()}
  flat = timm_to_flax_flat(arrays, cfg)
  check_against(flat, cfg, "state_dict")
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
