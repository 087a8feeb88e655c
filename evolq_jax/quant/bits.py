"""Bit specifications: the integer grid a quantizer maps onto."""
from __future__ import annotations

import dataclasses

MIN_BITS, MAX_BITS = 2, 8


def check_bits(value, field: str = "bits") -> int:
  """`value` if it is a supported bit width; else a ValueError naming `field`."""
  if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
    raise ValueError(
        f"{field}={value!r} is not supported: expected an integer in [{MIN_BITS}, {MAX_BITS}] "
        f"(the paper uses 3, 4 and 8); set {field} to a value in that range.")
  return value


@dataclasses.dataclass(frozen=True)
class BitSpec:
  """An integer grid of `bits` bits, signed (two's complement) or unsigned."""
  bits: int
  signed: bool = False

  def __post_init__(self):
    check_bits(self.bits)

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
