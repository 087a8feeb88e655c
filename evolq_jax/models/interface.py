"""The model interface: what calibrate, search, landscape, evaluate and export
know about a model, and nothing more.

A family (ViT/DeiT, Swin, LeViT, ...) is one module under `models/` that
defines a `Family`:
  - its presets (frozen `ModelConfig` subclasses, timm's names) and the
    preprocessing they name (`Transform`s);
  - its Linen module, built as `module(config=cfg, mode=..., quant=qcfg,
    rules=...)`, called as `module.apply({"params": p}, x, aq,
    first_unit=0, last_unit=None)`: `first_unit=b` takes the activations
    entering unit b (the prefix cache) instead of images, `last_unit=e`
    returns the activations after units [first_unit, e) instead of logits;
  - its ordered searchable units (`Unit`: an attention module and the layers
    that run with it) and the named quantized layers inside each;
  - its quantization points as data (`act_rules`: the FQ-ViT rules for its
    point names);
  - a shape-based memory estimate of one candidate;
  - the checkpoint converter's name table (timm -> Flax) and an optional
    `prepare` step on converted params (e.g. BatchNorm folding).

Every quantization point is marked in the module with `self.qpoint(name, x,
aq)` (the `QuantPoint` mixin): in "calib" mode it records x, in the quant
modes it fake-quantizes x by the point's rule. Weights are quantized outside
the module: it only sees (already fake-quantized) params.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from evolq_jax.quant import markers
from evolq_jax.quant.log2 import log2_fake_quant
from evolq_jax.quant.recipe import QuantConfig, rule_for
from evolq_jax.quant.uniform import fake_quant, fake_quant_ste

MODES = ("fp", "calib", "quant", "quant_ste", "quant_drop", "int")
QUANT_MODES = ("quant", "quant_ste", "quant_drop", "int")
QDROP_KEEP = 0.5  # QDrop: each activation keeps its quantization with this probability
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Transform:
  """A named preprocessing (timm's defaults for its models): resize the short
  side to img_size / crop_pct, center-crop img_size, normalize by mean/std.
  A family lists the ones its presets name (`Family.transforms`)."""
  name: str
  crop_pct: float
  interpolation: str  # "bicubic" | "bilinear"
  mean: tuple
  std: tuple


_TRANSFORMS: dict = {}  # name -> Transform, filled by the families as they are defined


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """What every preset has: a name, its input and its classes."""
  name: str
  img_size: int = 224
  in_chans: int = 3
  num_classes: int = 1000
  preprocess: str = "deit"  # a key of TRANSFORMS

  @property
  def transform(self) -> dict:
    """This preset's preprocessing (its family's Transform named `preprocess`), as a
    dict: crop_pct, interpolation, mean, std."""
    if self.preprocess not in _TRANSFORMS:
      raise ValueError(f"model {self.name!r}: preprocess={self.preprocess!r} is unknown: "
                       f"expected one of {sorted(_TRANSFORMS)} (a new one is a Transform in "
                       "its family's `transforms`).")
    t = dataclasses.asdict(_TRANSFORMS[self.preprocess])
    del t["name"]
    return t

  def check_images(self, shape):
    want = (self.img_size, self.img_size, self.in_chans)
    if len(shape) != 4 or tuple(shape[1:]) != want:
      raise ValueError(
          f"images of shape {tuple(shape)} do not fit model {self.name!r}: expected "
          f"(batch, {want[0]}, {want[1]}, {want[2]}) NHWC. Resize/convert the images "
          "with the model's transform (evolq_jax.data.transforms).")


@dataclasses.dataclass(frozen=True)
class Layer:
  """A quantized linear layer of a unit: its short name, param path and group
  ('attn': inside the attention module, the paper's search set; 'mlp': the rest)."""
  name: str
  path: tuple
  group: str = "attn"


@dataclasses.dataclass(frozen=True)
class Unit:
  """One searchable unit, in forward order. `path`: the param/point subtree
  that holds its layers and activation points."""
  index: int
  path: tuple
  layers: tuple  # of Layer, in forward order

  @property
  def name(self) -> str:
    return "/".join(self.path)


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  module: Any                    # Linen module class
  presets: tuple                 # ModelConfig instances
  units: Callable                # cfg -> tuple[Unit]
  act_rules: Callable            # QuantConfig -> tuple[ActRule]
  candidate_bytes: Callable      # (cfg, unit index, loss batch, itemsize) -> bytes
  timm_table: tuple = ()         # (timm regex, flax template, conversion) rows
  prepare: Optional[Callable] = None  # (flat converted params, cfg) -> flat params
  transforms: tuple = ()         # the Transforms its presets name (ModelConfig.preprocess)
  # cfg -> one key per unit: equal keys = the same function of the unit's own subtrees,
  # so consecutive ones share compiled programs (segments.py); None = a unit of its own
  unit_kinds: Optional[Callable] = None
  # (cfg, representative unit, position (traced int32)) -> extra keyword arguments of the
  # module's call that runs one unit of a shared segment: what its units' keys leave to
  # the position (a Swin block's window shift alternates); None = none
  segment_kwargs: Optional[Callable] = None
  # patterns of its first and last quantized layers (the stem or patch embedding, the
  # classifier heads): what QuantConfig.keep_ends_8bit keeps at 8-bit weights
  end_layers: tuple = ()

  def __post_init__(self):  # a family's preprocessing is known by name once it exists
    for t in self.transforms:
      if _TRANSFORMS.get(t.name, t) != t:
        raise ValueError(f"family {self.name!r}: Transform {t.name!r} is already defined "
                         f"otherwise ({_TRANSFORMS[t.name]}): give it another name.")
      _TRANSFORMS[t.name] = t


class NamedLayerNorm(nn.Module):
  """nn.LayerNorm's params and values, computed as one named equation."""
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,))
    bias = self.param("bias", nn.initializers.zeros, (d,))
    return markers.layer_norm(x, scale, bias, self.epsilon)


def _keep_last(_, new):
  return new


class QuantPoint(nn.Module):
  """Mixin: `self.qpoint(name, x, aq)` marks a quantization point.

  Modes: "fp" passes x through, "calib" records it, "quant"/"quant_ste"
  fake-quantize it, "int" fake-quantizes it through a named mark that the
  integer backends (evolq_jax.integer) turn into integer codes. "quant_drop"
  (QDrop, for reconstruction) is "quant_ste" with each value's quantization
  dropped at random (kept with probability QDROP_KEEP; rng stream "qdrop").

  `rules` (the recipe's ActRules) pick the quantizer by the point's path;
  `aq` is this module's subtree of QParams.acts.
  """
  mode: str = "fp"
  quant: Optional[QuantConfig] = None
  rules: tuple = ()
  named_ops: bool = False  # export traces: LayerNorm, softmax, GELU, Hardswish as named ops

  def qpoint(self, name: str, x, aq):
    if self.mode == "calib":
      self.sow("stats", name, x, init_fn=lambda: None, reduce_fn=_keep_last)
    elif self.mode == "int":  # the same values, through named marks (quant/markers.py)
      rule = rule_for(self.rules, "/".join(self.path + (name,)))
      if rule.quantizer == "log2":
        return markers.act_log2(x, self.quant.prob_bits)
      return markers.act_qdq(x, aq[name]["scale"], aq[name]["zero_point"], self.quant.a_bits)
    elif self.mode in ("quant", "quant_ste", "quant_drop"):
      ste = self.mode != "quant"
      rule = rule_for(self.rules, "/".join(self.path + (name,)))
      if rule.quantizer == "log2":
        y = log2_fake_quant(x, self.quant.prob_spec)
        y = x + jax.lax.stop_gradient(y - x) if ste else y
      else:
        q = aq[name]
        y = (fake_quant_ste if ste else fake_quant)(x, q["scale"], q["zero_point"],
                                                    self.quant.a_spec)
      if self.mode == "quant_drop":
        y = jnp.where(jax.random.bernoulli(self.make_rng("qdrop"), QDROP_KEEP, x.shape), y, x)
      return y
    return x

  def sub(self, aq, name):
    return None if aq is None else aq[name]

  def child_kw(self) -> dict:
    """Keyword arguments that pass mode, quant config and rules to a child."""
    return dict(mode=self.mode, quant=self.quant, rules=self.rules, named_ops=self.named_ops)

  # float ops: as Flax computes them, or (named_ops) one named equation each, what an
  # export writes as one op (quant/markers.py); the values are the same
  def layer_norm(self, epsilon: float, name: str):
    """The LayerNorm module `name` (params scale, bias, as nn.LayerNorm's)."""
    return (NamedLayerNorm if self.named_ops else nn.LayerNorm)(epsilon, name=name)

  def softmax(self, x):
    return markers.softmax(x) if self.named_ops else nn.softmax(x, axis=-1)

  def gelu(self, x):
    return markers.gelu(x) if self.named_ops else nn.gelu(x, approximate=False)

  def hard_swish(self, x):
    return markers.hard_swish(x) if self.named_ops else nn.hard_swish(x)

  def check_mode(self, aq):
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r} is unknown: expected one of {MODES}.")
    if self.mode in QUANT_MODES and (aq is None or self.quant is None):
      raise ValueError("mode='quant' needs activation qparams and a QuantConfig: "
                       "run evolq_jax.calibrate first.")


def check_unit_range(cfg, units, first_unit: int, last_unit):
  n = len(units)
  stop = n if last_unit is None else last_unit
  if not 0 <= first_unit <= stop <= n:
    raise ValueError(f"units [{first_unit}, {stop}) are out of range: model {cfg.name!r} "
                     f"has units 0..{n - 1}.")
