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
  bias_correction: match per-channel mean/std of quantized weights.
  w_signed: signed symmetric weight grid instead of unsigned with zero point.
  """
  w_bits: int = 8
  a_bits: int = 8
  w_observer: str = "minmax"
  a_observer: str = "omse"
  ptf: bool = True
  log2_softmax: bool = False
  prob_bits: int = 4
  bias_correction: bool = False
  w_signed: bool = False

  def __post_init__(self):
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

  @property
  def a_spec(self) -> BitSpec:
    return BitSpec(self.a_bits)

  @property
  def prob_spec(self) -> BitSpec:
    return BitSpec(self.prob_bits)

  @property
  def name(self) -> str:
    return f"W{self.w_bits}A{self.a_bits}"


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
                             log2_softmax=False, bias_correction=True, w_signed=False)
