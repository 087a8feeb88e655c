"""Static configuration: the quantization recipe (hashable, lives outside pytrees)."""
from __future__ import annotations

import dataclasses

from evolq_jax.quant.bits import BitSpec
from evolq_jax.quant.observers import check_observer


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
    # Building the specs validates the bit widths with a clear message.
    self.w_spec, self.a_spec, self.prob_spec  # noqa: B018
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
