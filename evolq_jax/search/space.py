"""The search space: which scales of one block are searched, as one flat vector.

Paper default: the per-channel weight scales of the attention's `qkv` and
`proj`. Configurable: add the MLP's `fc1` / `fc2`, and the block's per-tensor
activation scales (PTF residual points and log2 probabilities excluded: their
structure is fixed by design).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from evolq_jax.models.vit import PROB_POINT, RESIDUAL_POINTS

LAYERS = {"qkv": ("attn", "qkv"), "proj": ("attn", "proj"),
          "fc1": ("mlp", "fc1"), "fc2": ("mlp", "fc2")}
PAPER_LAYERS = ("qkv", "proj")


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  layers: tuple = PAPER_LAYERS
  acts: bool = False

  def __post_init__(self):
    bad = [l for l in self.layers if l not in LAYERS]
    if bad or not self.layers:
      raise ValueError(f"search.layers={tuple(self.layers)!r}: expected a non-empty subset of "
                       f"{tuple(LAYERS)} (the paper searches {PAPER_LAYERS}).")

  def act_points(self, block_acts: dict, log2_softmax: bool):
    """(sub-module, point) pairs of the block's searchable activation scales."""
    if not self.acts:
      return []
    out = []
    for key, val in sorted(block_acts.items()):
      if "scale" in val:
        if key not in RESIDUAL_POINTS:
          out.append((None, key))
      else:
        out += [(key, p) for p in sorted(val)
                if not (p == PROB_POINT and log2_softmax)]
    return out


def _get(tree, path):
  for k in path:
    if k is not None:
      tree = tree[k]
  return tree


def block_scales(qparams, block: int, space: SearchSpace, log2_softmax: bool = False):
  """-> (vector (D,), layout) of block `block`'s searched scales."""
  name = f"blocks_{block}"
  parts, layout = [], []
  for layer in space.layers:
    s = qparams.weights[name][LAYERS[layer][0]][LAYERS[layer][1]]["scale"]
    parts.append(s.reshape(-1))
    layout.append(("weights", LAYERS[layer], s.shape))
  for sub, point in space.act_points(qparams.acts[name], log2_softmax):
    s = _get(qparams.acts[name], (sub, point))["scale"]
    parts.append(s.reshape(-1))
    layout.append(("acts", (sub, point), s.shape))
  return jnp.concatenate(parts), tuple(layout)


def split_vector(vec, layout):
  """A flat vector -> list of (kind, path, array) following `layout`."""
  out, i = [], 0
  for kind, path, shape in layout:
    n = 1
    for d in shape:
      n *= d
    out.append((kind, path, vec[i:i + n].reshape(shape)))
    i += n
  return out


def _set_scale(tree: dict, path, scale):
  """Copy of `tree` with tree[path...]["scale"] = scale (None keys skipped)."""
  path = tuple(k for k in path if k is not None)
  if not path:
    return {**tree, "scale": scale}
  return {**tree, path[0]: _set_scale(tree[path[0]], path[1:], scale)}


def set_block_scales(qparams, block: int, vec, layout):
  """QParams with block `block`'s searched scales replaced by `vec` (pure)."""
  name = f"blocks_{block}"
  trees = {"weights": qparams.weights, "acts": qparams.acts}
  for kind, path, value in split_vector(vec, layout):
    trees[kind] = _set_scale(trees[kind], (name,) + tuple(path), value)
  return qparams.replace(**trees)
