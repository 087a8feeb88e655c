"""The quantization recipe as data: the bit setting and knobs (`QuantConfig`)
and, per activation quantization point, which quantizer and observer it uses
and whether a search may move its scale (`ActRule`, matched by path like
qwix's rules).

A model family names its special points (the LayerNorm inputs that take PTF,
the attention probabilities that may take log2) as regular expressions;
`fqvit_rules` turns them and a QuantConfig into the FQ-ViT layout. calibrate,
the model's forward, the search space and export all read the same rules.
"""
from __future__ import annotations

import dataclasses
import functools
import re

from evolq_jax.quant.bits import BitSpec
from evolq_jax.quant.observers import check_observer

QUANTIZERS = ("uniform", "ptf", "log2")

# Named starts: the QuantConfig fields a recipe sets when the config leaves them
# unset (None). Fields set explicitly always win over the recipe.
RECIPES = {
    # Evol-Q's run script (`--ptf --quant-method omse --bias-corr`): FQ-ViT's
    # layout with each weight channel's mean and std matched to the FP weights.
    "reference": dict(bias_correction=True),
    # FQ-ViT's plain start: the same layout and observers, no bias correction.
    "fqvit": dict(bias_correction=False),
}


def parse_bits(setting: str) -> tuple[int, int]:
  """'W4A8' -> (4, 8): the one parser of bit settings."""
  m = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", (setting or "").strip())
  if not m:
    raise ValueError(f"bit setting {setting!r} is not of the form W<bits>A<bits>, e.g. W4A8.")
  return int(m.group(1)), int(m.group(2))


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How the model is fully quantized (FQ-ViT layout).

  w_bits: weight bits of every linear layer (per output channel, uniform).
  a_bits: activation bits (per tensor, uniform; PTF per channel on LN inputs).
  w_observer / a_observer: minmax | ema | percentile | omse.
  ptf: Power-of-Two Factor on the residual stream (LayerNorm inputs).
  log2_softmax: attention probabilities through the log2 quantizer at
    `prob_bits` instead of a_bits uniform.
  bias_correction: match per-channel mean/std of quantized weights; None =
    the recipe's (on for "reference", off for "fqvit").
  w_signed: signed symmetric weight grid instead of unsigned with zero point.
  recipe: the named start (RECIPES) that fills the fields left at None:
    "reference" (default; Evol-Q's start, bias correction on) | "fqvit".
  layer_bits: per-layer weight bits, ((pattern, bits), ...): a layer whose
    '/'-joined param path fully matches a pattern (the first that does) takes
    its bits instead of w_bits (mixed precision; e.g. (("head", 8),)).
  keep_ends_8bit: the model's first and last layers at 8-bit weights, as
    BRECQ, QDrop and their successors quantize (the family names them; a run
    config resolves them, the library with models.resolve_quant).
  end_layers: the patterns of those layers, filled by the resolution.
  """
  w_bits: int = 8
  a_bits: int = 8
  w_observer: str = "minmax"
  a_observer: str = "omse"
  ptf: bool = True
  log2_softmax: bool = False
  prob_bits: int = 4
  bias_correction: bool | None = None
  w_signed: bool = False
  recipe: str = "reference"
  layer_bits: tuple = ()
  keep_ends_8bit: bool = False
  end_layers: tuple = ()

  def __post_init__(self):
    try:
      pairs = tuple((str(p), int(b)) for p, b in self.layer_bits)
      ok = all(isinstance(p, str) and not isinstance(b, bool)
               for p, b in self.layer_bits)
    except (TypeError, ValueError):
      ok = False
    if not ok:
      raise ValueError(f"quant.layer_bits={self.layer_bits!r}: expected ((pattern, bits), ...), "
                       "e.g. (('head', 8), ('blocks_0/.*', 4)).")
    for pattern, bits in pairs:
      try:
        BitSpec(bits)
        re.compile(pattern)
      except (ValueError, re.error) as e:
        raise ValueError(f"quant.layer_bits entry {(pattern, bits)!r}: {e}") from None
    object.__setattr__(self, "layer_bits", pairs)
    object.__setattr__(self, "end_layers", tuple(str(p) for p in self.end_layers))
    if self.recipe not in RECIPES:
      raise ValueError(f"quant.recipe={self.recipe!r} is unknown: expected one of "
                       f"{sorted(RECIPES)} (e.g. --set quant.recipe=fqvit for FQ-ViT's plain "
                       "start).")
    for name, value in RECIPES[self.recipe].items():
      if getattr(self, name) is None:
        object.__setattr__(self, name, value)
    for name in ("w_bits", "a_bits", "prob_bits"):
      try:
        BitSpec(getattr(self, name))
      except ValueError as e:
        raise ValueError(f"quant.{name}: {e}") from None
    check_observer(self.w_observer, "w_observer")
    check_observer(self.a_observer, "a_observer")

  @property
  def w_spec(self) -> BitSpec:
    return BitSpec(self.w_bits, signed=self.w_signed)

  def w_spec_of(self, path) -> BitSpec:
    """The weight grid of the layer at `path` (a tuple of keys or a '/'-joined string)."""
    return layer_spec(self.w_spec, self.weight_rules, path)

  @property
  def weight_rules(self) -> tuple:
    """((pattern, bits), ...) in the order they apply: the 8-bit ends, then layer_bits."""
    if self.keep_ends_8bit and not self.end_layers:
      raise ValueError("quant.keep_ends_8bit=True needs the model's first and last layers: "
                       "resolve the QuantConfig with evolq_jax.models.resolve_quant(cfg, qcfg) "
                       "(run configs do this themselves).")
    ends = tuple((p, 8) for p in self.end_layers) if self.keep_ends_8bit else ()
    return ends + self.layer_bits

  @property
  def a_spec(self) -> BitSpec:
    return BitSpec(self.a_bits)

  @property
  def prob_spec(self) -> BitSpec:
    return BitSpec(self.prob_bits)

  @property
  def name(self) -> str:
    return f"W{self.w_bits}A{self.a_bits}"


@functools.lru_cache(maxsize=8192)
def _rule_bits(rules: tuple, name: str):
  return next((bits for pattern, bits in rules if re.fullmatch(pattern, name)), None)


def rule_bits(rules: tuple, path):
  """The bits of the first (pattern, bits) rule matching the layer's path, or None."""
  return _rule_bits(tuple(rules), path if isinstance(path, str) else "/".join(path))


def layer_spec(spec: BitSpec, rules: tuple, path) -> BitSpec:
  """`spec` at the bits of the first (pattern, bits) rule matching the layer's path."""
  bits = rule_bits(rules, path)
  return spec if bits is None else dataclasses.replace(spec, bits=bits)


@dataclasses.dataclass(frozen=True)
class ActRule:
  """Activation points whose '/'-joined path fully matches `pattern`.

  quantizer: uniform (per tensor, a_bits) | ptf (per-channel power-of-two
    factors of one scale, a_bits) | log2 (prob_bits, no scale).
  observer: "" = QuantConfig.a_observer (PTF always uses min/max).
  searchable: whether `search.acts` may move this point's scale.
  """
  pattern: str
  quantizer: str = "uniform"
  observer: str = ""
  searchable: bool = True

  def __post_init__(self):
    if self.quantizer not in QUANTIZERS:
      raise ValueError(f"quantizer={self.quantizer!r} is unknown: expected one of {QUANTIZERS}.")


def fqvit_rules(qcfg: QuantConfig, residual: str = "", probs: str = "") -> tuple:
  """FQ-ViT's layout: `residual` points (LayerNorm inputs) take PTF when
  qcfg.ptf, `probs` points the log2 quantizer when qcfg.log2_softmax; every
  other point is uniform with qcfg.a_observer. Residual points are never
  searched (their scale structure is fixed by design), nor are log2 points."""
  rules = []
  if residual:
    rules.append(ActRule(residual, "ptf" if qcfg.ptf else "uniform",
                         "minmax" if qcfg.ptf else "", searchable=False))
  if probs and qcfg.log2_softmax:
    rules.append(ActRule(probs, "log2", searchable=False))
  rules.append(ActRule(".*"))
  return tuple(rules)


@functools.lru_cache(maxsize=4096)
def rule_for(rules: tuple, path: str) -> ActRule:
  """The first rule whose pattern fully matches `path` (e.g. 'blocks_0/attn/probs')."""
  for rule in rules:
    if re.fullmatch(rule.pattern, path):
      return rule
  raise ValueError(f"no quantization rule matches point {path!r}: the recipe's patterns are "
                   f"{[r.pattern for r in rules]}; end it with a catch-all rule ActRule('.*').")


def observer_of(rule: ActRule, qcfg: QuantConfig) -> str:
  return rule.observer or qcfg.a_observer


def reference_init(qcfg: QuantConfig) -> QuantConfig:
  """The Evol-Q reference's starting point at qcfg's bits ("init-reference"):
  what its run script (`--ptf --quant-method omse --bias-corr`, FQ-ViT config
  of the e2e mode) computes: min/max per-channel unsigned weights with bias
  correction (each output channel's mean and std matched to the FP weights,
  on every re-quantization), OMSE activations, PTF on LayerNorm inputs,
  uniform uint8 softmax."""
  return dataclasses.replace(qcfg, w_observer="minmax", a_observer="omse", ptf=True,
                             log2_softmax=False, bias_correction=True, w_signed=False,
                             recipe="reference")
