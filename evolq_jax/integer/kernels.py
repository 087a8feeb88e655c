"""Integer kernels that every family's integer forward is built from.

Tensors between layers are integer codes (uint8 for uniform / PTF points)
with their quantizer (`ActQ`). A linear layer (`IntLinear`) multiplies codes
in int8 on int8 weights with `lax.dot_general(..., preferred_element_type=int32)`:

  codes u in [0, 2^bits - 1] become int8 operands a = u - shift (shift = 128
  when 2^bits - 1 > 127, else 0), so u - z = a + (shift - z) with an integer
  offset. The exact product sum_k (a_k + a_off)(b_kj + b_off_j) is
  a @ b + b_off * sum_k a_k + a_off * sum_k b_kj + K a_off b_off, in int32.

The int32 accumulator is rescaled in float32 (input scale x weight scale per
output channel, + bias correction's input-sum term + bias) and quantized onto
the next point's grid. LayerNorm, softmax, GELU and residual additions run in
float32 on dequantized codes, as FQ-ViT's reference does; PTF codes are
dequantized with an integer shift ((u - z) << k) and one scale.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import struct
from jax import lax


@struct.dataclass
class ActQ:
  """One activation quantizer. uniform: scale (), zero_point () int32; ptf: scale is
  the base, exponent (C,) int32; log2: no arrays (codes are exponents, 2^bits = 0)."""
  scale: Any = None
  zero_point: Any = None
  exponent: Any = None
  kind: str = struct.field(pytree_node=False, default="uniform")
  bits: int = struct.field(pytree_node=False, default=8)


@struct.dataclass
class IntLinear:
  """One linear layer: int8 operand w (K, N) (conv kernels keep their shape),
  codes - zero point = w + w_offset; float32 scale, bias (N,) and, with bias
  correction, sum_coef (N,), the coefficient of the input's sum."""
  w: Any
  w_offset: Any
  scale: Any
  bias: Any
  sum_coef: Any = None


def shift_for(bits: int) -> int:
  """What to subtract from unsigned codes of `bits` bits so they fit int8."""
  return 128 if 2 ** bits - 1 > 127 else 0


def operand(codes, bits: int):
  """Unsigned codes -> int8 matmul operand."""
  return (codes.astype(jnp.int32) - shift_for(bits)).astype(jnp.int8)


def offset(q: ActQ):
  """Integer offset that turns an operand back into codes - zero point."""
  return shift_for(q.bits) - q.zero_point


# --- quantizers --------------------------------------------------------------------

def _ptf_scale(q: ActQ):
  return jnp.ldexp(q.scale, q.exponent)


def quantize(x, q: ActQ):
  """Float -> codes on q's grid (uint8; int32 exponents for log2), as fake_quant rounds."""
  if q.kind == "log2":
    e = jnp.round(-jnp.log2(jnp.maximum(x, 1e-30)))
    return jnp.where(e >= 2 ** q.bits, 2 ** q.bits, jnp.clip(e, 0, 2 ** q.bits - 1)
                     ).astype(jnp.int32)
  scale = _ptf_scale(q) if q.kind == "ptf" else q.scale
  u = jnp.clip(jnp.round(x / scale) + q.zero_point.astype(x.dtype), 0, 2 ** q.bits - 1)
  return u.astype(jnp.uint8)


def dequantize(u, q: ActQ):
  """Codes -> float32 values."""
  if q.kind == "log2":
    return jnp.where(u >= 2 ** q.bits, 0.0, jnp.ldexp(jnp.ones(u.shape, jnp.float32), -u))
  centered = u.astype(jnp.int32) - q.zero_point
  if q.kind == "ptf":  # FQ-ViT's integer PTF: a shift per channel, one scale
    return jnp.left_shift(centered, q.exponent).astype(jnp.float32) * q.scale
  return centered.astype(jnp.float32) * q.scale


# --- integer matmuls ---------------------------------------------------------------

def int_matmul(a, b, a_off, b_off):
  """Exact sum_k (a[..., i, k] + a_off) * (b[..., k, j] + b_off[j]) in int32.

  a: int8 (..., n, K); b: int8 (K, m) or (..., K, m) with a's batch dims;
  a_off: int32 scalar; b_off: int32 scalar or (m,).
  -> (acc int32 (..., n, m), row sums sum_k (a + a_off) int32 (..., n, 1)).
  """
  k = a.shape[-1]
  if b.ndim == 2:
    dims = (((a.ndim - 1,), (0,)), ((), ()))
  else:
    batch = tuple(range(a.ndim - 2))
    dims = (((a.ndim - 1,), (b.ndim - 2,)), (batch, batch))
  ab = lax.dot_general(a, b, dims, preferred_element_type=jnp.int32)
  a_sum = jnp.sum(a, axis=-1, keepdims=True, dtype=jnp.int32)
  b_sum = jnp.sum(b, axis=-2, dtype=jnp.int32)
  if b.ndim > 2:
    b_sum = b_sum[..., None, :]
  acc = ab + a_sum * b_off + a_off * b_sum + k * a_off * b_off
  return acc, a_sum + k * a_off


def act_matmul(a, aq: ActQ, b, bq: ActQ):
  """Codes a (..., n, K) times codes b (..., K, m), both uniform -> float32 values."""
  acc, _ = int_matmul(operand(a, aq.bits), operand(b, bq.bits), offset(aq), offset(bq))
  return acc.astype(jnp.float32) * (aq.scale * bq.scale)


def linear(u, q: ActQ, layer: IntLinear):
  """Codes u (..., K) on a uniform grid through an integer layer -> float32 (..., N)."""
  if q.kind != "uniform":
    raise ValueError(f"a linear layer's input quantizer is {q.kind!r}: the integer kernel takes "
                     "uniform per-tensor inputs (dequantize and requantize first).")
  w = layer.w.reshape(-1, layer.w.shape[-1])
  acc, a_sum = int_matmul(operand(u, q.bits), w, offset(q), layer.w_offset)
  y = acc.astype(jnp.float32) * (q.scale * layer.scale)
  if layer.sum_coef is not None:  # bias correction's mean term: t * sum_k x_k
    y = y + a_sum.astype(jnp.float32) * (q.scale * layer.sum_coef)
  return y + layer.bias


def pixels_from_images(images, grid: dict):
  """uint8 pixels pass through; normalized float images go back onto the pixel
  grid (exact for images normalized from uint8 pixels)."""
  if images.dtype == jnp.uint8:
    return images
  return jnp.clip(jnp.round(images / grid["scale"] + grid["zero_point"]), 0, 255
                  ).astype(jnp.uint8)


def pixel_linear(pixels, grid: dict, layer: IntLinear):
  """uint8 pixels (..., K, C) through a layer whose kernel is (..., C, N) (K entries
  per input channel) -> float32 (..., N). Each input channel has its own pixel
  scale and a non-integer zero point z: it gets its own int8 matmul (a batch
  dimension) with the integer zero point round(z); the fraction left,
  z - round(z), is a per-output constant term."""
  c, n = layer.w.shape[-2], layer.w.shape[-1]
  w = layer.w.reshape(-1, c, n).transpose(1, 0, 2)                   # (C, K, N)
  k = w.shape[1]
  lead = pixels.shape[:-2]
  a = jnp.moveaxis(pixels.reshape((-1,) + pixels.shape[-2:]), -1, 0)  # (C, M, K)
  z_int = jnp.round(grid["zero_point"]).astype(jnp.int32)[:, None, None]
  frac = (grid["zero_point"] - jnp.round(grid["zero_point"]))[:, None, None]
  acc, p_sum = int_matmul(operand(a, 8), w, shift_for(8) - z_int, layer.w_offset)
  w_sum = (jnp.sum(w, axis=1, dtype=jnp.int32) + k * layer.w_offset)[:, None, :]  # (C, 1, N)
  y = (acc.astype(jnp.float32) - frac * w_sum.astype(jnp.float32)) * layer.scale
  if layer.sum_coef is not None:
    y = y + (p_sum.astype(jnp.float32) - frac * k) * layer.sum_coef
  y = jnp.sum(grid["scale"][:, None, None] * y, axis=0) + layer.bias
  return y.reshape(lead + (n,))
