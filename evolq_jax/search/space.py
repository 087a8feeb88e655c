"""The search space: which scales of one unit are searched, as one flat vector.

Paper default: the per-channel weight scales of the linear layers inside the
unit's attention module (group "attn": ViT's qkv, proj; LeViT's q, kv, proj
too). Configurable: more layers by group ("mlp") or short name ("fc1"), and
the unit's per-tensor activation scales that the recipe marks searchable
(PTF residual points and log2 probabilities are not: their structure is
fixed by design), and a subset of the units (the paper searches them all).
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax import traverse_util

from evolq_jax.models.forward import act_rules, units
from evolq_jax.models.interface import Unit
from evolq_jax.quant.recipe import rule_for

GROUPS = ("attn", "mlp")
PAPER_LAYERS = ("attn",)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  layers: tuple = PAPER_LAYERS
  acts: bool = False
  units: tuple = ()  # unit indices (-1 = the last); () = every unit

  def __post_init__(self):
    if not self.layers or not all(isinstance(l, str) and l for l in self.layers):
      raise ValueError(f"search.layers={tuple(self.layers)!r}: expected a non-empty tuple of "
                       f"layer groups {GROUPS} or layer names such as 'qkv', 'fc1' (the paper "
                       f"searches {PAPER_LAYERS}).")
    if not isinstance(self.units, tuple) or not all(
        isinstance(u, int) and not isinstance(u, bool) for u in self.units):
      raise ValueError(f"search.units={self.units!r}: expected a tuple of unit indices, "
                       "e.g. (-2, -1) for the last two units, or () for all of them.")

  def unit_layers(self, unit: Unit) -> tuple:
    """The unit's searched layers: `layers` in order, each group in forward order."""
    out = []
    for entry in self.layers:
      picked = [l for l in unit.layers if entry in (l.group, l.name)]
      out += [l for l in picked if l not in out]
    return tuple(out)

  def check(self, units) -> None:
    """Every entry must name a group or a layer of some unit."""
    known = {n for u in units for l in u.layers for n in (l.name, l.group)}
    bad = [e for e in self.layers if e not in known]
    if bad:
      raise ValueError(f"search.layers entries {bad} name no layer of this model: expected "
                       f"groups or layer names among {sorted(known)}.")

  def searched_units(self, units) -> tuple:
    """Indices of the units holding a selected layer, in forward order. A unit
    without one (a LeViT downsampling unit has q, kv, proj but no qkv) is
    skipped; with `units` set, only the units it names are searched."""
    self.check(units)
    if not self.units:
      return tuple(u.index for u in units if self.unit_layers(u))
    n = len(units)
    bad = [i for i in self.units if not -n <= i < n]
    if bad:
      raise ValueError(f"search.units entries {bad} are out of range: this model has {n} units, "
                       f"0 to {n - 1} (or -{n} to -1 from the end).")
    wanted = sorted({i % n for i in self.units})
    empty = [i for i in wanted if not self.unit_layers(units[i])]
    if empty:
      raise ValueError(f"search.units: unit(s) {empty} hold none of search.layers="
                       f"{self.layers}: drop them or select their layers.")
    return tuple(wanted)

  def act_points(self, unit: Unit, acts: dict, rules: tuple) -> list:
    """Paths of the unit's searchable activation points, in sorted path order."""
    if not self.acts:
      return []
    sub = acts
    for k in unit.path:
      sub = sub[k]
    points = sorted({p[:-1] for p in traverse_util.flatten_dict(sub)})
    return [unit.path + p for p in points
            if rule_for(rules, "/".join(unit.path + p)).searchable]


def get_path(tree, path):
  """tree[path[0]][path[1]]..."""
  for k in path:
    tree = tree[k]
  return tree


def replace_leaf(tree: dict, path, value):
  """Copy of `tree` with the entry at `path` replaced by `value` (pure)."""
  if len(path) == 1:
    return {**tree, path[0]: value}
  return {**tree, path[0]: replace_leaf(tree[path[0]], path[1:], value)}


def unit_scales(qparams, unit: Unit, space: SearchSpace, rules: tuple = ()):
  """-> (vector (D,), layout) of the unit's searched scales.

  layout: ((kind "weights" | "acts", full path, shape), ...), as set_scales reads it.
  """
  parts, layout = [], []
  layers = space.unit_layers(unit)
  if not layers:
    raise ValueError(f"search.layers={space.layers!r} selects no layer of unit {unit.name!r} "
                     f"(its layers: {[l.name for l in unit.layers]}).")
  for layer in layers:
    s = get_path(qparams.weights, layer.path)["scale"]
    parts.append(s.reshape(-1))
    layout.append(("weights", layer.path, s.shape))
  for path in space.act_points(unit, qparams.acts, rules):
    s = get_path(qparams.acts, path)["scale"]
    parts.append(s.reshape(-1))
    layout.append(("acts", path, s.shape))
  return jnp.concatenate(parts), tuple(layout)


def split_vector(vec, layout):
  """A flat vector -> list of (kind, path, array) following `layout`."""
  out, i = [], 0
  for kind, path, shape in layout:
    n = math.prod(shape)
    out.append((kind, path, vec[i:i + n].reshape(shape)))
    i += n
  return out


def _set_scale(tree: dict, path, scale):
  """Copy of `tree` with tree[path...]["scale"] = scale."""
  if not path:
    return {**tree, "scale": scale}
  return {**tree, path[0]: _set_scale(tree[path[0]], path[1:], scale)}


def set_scales(qparams, vec, layout):
  """QParams with the scales named by `layout` replaced by `vec` (pure)."""
  trees = {"weights": qparams.weights, "acts": qparams.acts}
  for kind, path, value in split_vector(vec, layout):
    trees[kind] = _set_scale(trees[kind], tuple(path), value)
  return qparams.replace(**trees)


def searched_scales(cfg, qcfg, qparams, unit: int, space: SearchSpace):
  """unit_scales for unit index `unit` of model `cfg` under qcfg's recipe."""
  return unit_scales(qparams, units(cfg)[unit], space, act_rules(cfg, qcfg))
