"""timm state dicts -> Flax params, for any family: its name table plus
transposes, its optional `prepare` step (e.g. BatchNorm folding), and one
check that names every missing, unexpected or mis-shaped key."""
from __future__ import annotations

import re

import jax
import numpy as np
from flax import traverse_util

from evolq_jax.models.forward import model_for
from evolq_jax.models.registry import family_of

CONVERSIONS = {
    "same": lambda a: a,
    "dense": lambda a: a.T,                          # (out, in) -> (in, out)
    "conv": lambda a: a.transpose(2, 3, 1, 0),       # (out, c, kh, kw) -> (kh, kw, c, out)
}


def timm_to_flax_flat(state: dict, cfg) -> dict:
  """{timm name: array} -> {'/'-joined flax name: float32 array}.

  Unknown timm names are kept under their own name, so the shape check that
  follows reports them as unexpected instead of dropping them silently.
  """
  fam = family_of(cfg)
  out = {}
  for key, value in state.items():
    value = np.asarray(value, np.float32)
    for pattern, template, how in fam.timm_table:
      m = re.fullmatch(pattern, key)
      if m:
        out[template.format(*m.groups())] = CONVERSIONS[how](value)
        break
    else:
      out[key] = value
  return fam.prepare(out, cfg) if fam.prepare else out


def expected_shapes(cfg) -> dict:
  """'/'-joined Flax param names -> shapes, for `cfg`."""
  shapes = jax.eval_shape(
      lambda: model_for(cfg).init(
          jax.random.key(0), np.zeros((1, cfg.img_size, cfg.img_size, cfg.in_chans),
                                      np.float32)))["params"]
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


def check_against(flat: dict, cfg, source: str) -> None:
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


def unflatten(flat: dict):
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def from_timm_state_dict(state_dict, cfg):
  """A timm state dict (torch tensors or numpy arrays) -> checked Flax params."""
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
  return unflatten(flat)
