"""Units that compute the same function share one compiled program.

A search scores each unit with a program of its own (the unit's candidates,
then the rest of the model), and compiling those programs was most of a short
search's time: 12 programs on a 6-block ViT. Yet every block after the first
of a ViT computes the same function of its params, activation qparams and
input; so do the repeated blocks of a LeViT stage and of an EfficientNet stage.

A family says which of its units are interchangeable (`Family.unit_kinds`:
one hashable key per unit; None = a unit of its own, such as the first one,
which holds the stem). Consecutive units with the same key form a *segment*.
Inside a segment the unit's position `j` is a traced argument, not a constant:
  - the unit's own subtree of params and qparams is passed under the names of
    the segment's first unit (its *representative*), so every unit of the
    segment feeds the same program;
  - the segment's units run as one `lax.scan` over their stacked subtrees,
    each step under a `lax.cond` on its position (before j: the prefix; after
    j: the suffix).
A unit whose key is None, or a segment of one unit, is a segment of its own:
its programs are the plain forward with the unit index static, as before.

The contract a family signs with a key: a unit with a key reads only its
own params and qparams subtrees (`Unit.path`), and units with equal keys give
the same outputs when handed each other's subtrees (same structure, shapes,
quantization rules and static settings), up to what the family derives from the
traced position (`Family.segment_kwargs`: a Swin stage's blocks alternate window
shifts, so its blocks after the first are one segment, the shift a traced flag).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from evolq_jax.models.registry import family_of


def unit_kinds(cfg, qcfg=None) -> tuple:
  """One key per unit (Family.unit_kinds); with a QuantConfig whose layers take
  their own bits, a key also holds its unit's weight bits, so that units at
  different bits never share a program."""
  fam = family_of(cfg)
  unit_list = fam.units(cfg)
  n = len(unit_list)
  kinds = tuple(fam.unit_kinds(cfg)) if fam.unit_kinds else (None,) * n
  if len(kinds) != n:
    raise ValueError(f"family {fam.name!r}: unit_kinds gives {len(kinds)} keys for the "
                     f"{n} units of {cfg.name!r}.")
  if qcfg is not None and qcfg.weight_rules:
    kinds = tuple(None if k is None else
                  (k, tuple(qcfg.w_spec_of(layer.path).bits for layer in u.layers))
                  for k, u in zip(kinds, unit_list))
  return kinds


def segments(cfg, qcfg=None) -> tuple:
  """((start, stop), ...) covering the units in order: maximal runs of equal keys."""
  kinds, out, start = unit_kinds(cfg, qcfg), [], 0
  for i in range(1, len(kinds) + 1):
    if i == len(kinds) or kinds[i] is None or kinds[i] != kinds[start]:
      out.append((start, i))
      start = i
  return tuple(out)


def segment_of(cfg, unit: int, qcfg=None) -> tuple:
  """The (start, stop) of the segment holding `unit`."""
  return next(s for s in segments(cfg, qcfg) if s[0] <= unit < s[1])


def shared(seg) -> bool:
  return seg[1] - seg[0] > 1


def subtree(tree: dict, path: tuple):
  for k in path:
    tree = tree[k]
  return tree


def nest(path: tuple, value) -> dict:
  for k in reversed(path):
    value = {k: value}
  return value


def local(tree: dict, cfg, unit: int, seg) -> dict:
  """Unit `unit`'s subtree under its segment representative's names (a segment of
  one: the whole tree)."""
  if not shared(seg):
    return tree
  us = family_of(cfg).units(cfg)
  return nest(us[seg[0]].path, subtree(tree, us[unit].path))


def local_path(cfg, unit: int, seg, path: tuple) -> tuple:
  """A path inside unit `unit` (params or points), renamed as `local` renames."""
  if not shared(seg):
    return tuple(path)
  us = family_of(cfg).units(cfg)
  own = us[unit].path
  if tuple(path[:len(own)]) != own:
    raise ValueError(f"path {path} is not inside unit {unit} ({'/'.join(own)}).")
  return us[seg[0]].path + tuple(path[len(own):])


def stacked(tree: dict, cfg, seg):
  """The segment's units' subtrees stacked on a leading axis (None for a segment of one)."""
  if not shared(seg):
    return None
  us = family_of(cfg).units(cfg)
  return jax.tree.map(lambda *leaves: jnp.stack(leaves),
                      *[subtree(tree, us[i].path) for i in range(*seg)])


def run_segment(apply_unit, cfg, seg, x, stack_params, stack_acts, active):
  """x through the segment's units i (position i - start) for which active(position) is
  true, in order: one lax.scan, each step the representative's program under lax.cond.

  apply_unit(params, acts, x, position) applies the representative to its local trees,
  as the unit at `position`."""
  rep = family_of(cfg).units(cfg)[seg[0]].path

  def step(x, item):
    pos, p, a = item
    x = jax.lax.cond(active(pos), lambda x: apply_unit(nest(rep, p), nest(rep, a), x, pos),
                     lambda x: x, x)
    return x, None

  positions = jnp.arange(seg[1] - seg[0], dtype=jnp.int32)
  return jax.lax.scan(step, x, (positions, stack_params, stack_acts))[0]


def position(unit: int, seg) -> np.int32:
  """The unit's position in its segment: a traced argument of the shared programs."""
  return np.int32(unit - seg[0])
