"""Bit specifications: the integer grid a quantizer maps onto."""
from __future__ import annotations

import dataclasses

MIN_BITS, MAX_BITS = 2, 8


@dataclasses.dataclass(frozen=True)
class BitSpec:
  """An integer grid of `bits` bits, signed (two's complement) or unsigned."""
  bits: int
  signed: bool = False

  def __post_init__(self):
    if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
      raise ValueError(
          f"bits={self.bits!r} is not supported: expected an integer in "
          f"[{MIN_BITS}, {MAX_BITS}] (the paper uses 3, 4 and 8). "
          "Set w_bits / a_bits to a value in that range.")

  @property
  def qmin(self) -> int:
    return -(2 ** (self.bits - 1)) if self.signed else 0

  @property
  def qmax(self) -> int:
    return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

  @property
  def levels(self) -> int:
    return 2 ** self.bits


def uint(bits: int) -> BitSpec:
  return BitSpec(bits, signed=False)


def sint(bits: int) -> BitSpec:
  return BitSpec(bits, signed=True)
