"""Uniform affine fake quantization: per tensor or per output channel (last axis).

Conventions (FQ-ViT's): q = clip(round(x / scale) + zero_point, qmin, qmax) and
x_hat = (q - zero_point) * scale. `scale` is a scalar (per tensor) or a vector
of length x.shape[-1] (per channel); zero points are integers stored as floats.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from evolq_jax.quant.bits import BitSpec

EPS = 1e-8


def qparams_from_range(lo, hi, spec: BitSpec):
  """Scale and zero point covering [lo, hi] (widened to include 0).

  Args:
    lo, hi: arrays of equal shape (scalar or per channel).
  Returns:
    (scale, zero_point), same shape as lo.
  """
  return range_qparams(lo, hi, spec.qmin, spec.qmax, spec.signed)


def range_qparams(lo, hi, qmin, qmax, signed: bool = False):
  """qparams_from_range on the grid [qmin, qmax], which may be traced values (the
  mixed-precision search scores widths as data: search/bits.py)."""
  lo = jnp.minimum(lo, 0.0)
  hi = jnp.maximum(hi, 0.0)
  if signed:  # symmetric grid around 0
    scale = jnp.maximum(jnp.maximum(-lo, hi) / ((qmax - qmin) / 2), EPS)
    zero_point = jnp.zeros_like(scale)
  else:
    scale = jnp.maximum((hi - lo) / (qmax - qmin), EPS)
    zero_point = jnp.clip(qmin - jnp.round(lo / scale), qmin, qmax)
  return scale, zero_point


def quantize(x, scale, zero_point, spec: BitSpec, rounding=None):
  """Real values -> integer grid (returned as floats). rounding: None = to nearest;
  else an array like x of 0/1, learned per value (AdaRound): floor(x / scale) + rounding."""
  q = jnp.round(x / scale) if rounding is None else jnp.floor(x / scale) + rounding
  return jnp.clip(q + zero_point, spec.qmin, spec.qmax)


def dequantize(q, scale, zero_point):
  return (q - zero_point) * scale


def fake_quant(x, scale, zero_point, spec: BitSpec, rounding=None):
  """quantize then dequantize; gradients are zero almost everywhere."""
  return dequantize(quantize(x, scale, zero_point, spec, rounding), scale, zero_point)


def _round_ste(x):
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def fake_quant_ste(x, scale, zero_point, spec: BitSpec, rounding=None):
  """fake_quant with a straight-through estimator for round (LSQ-style).

  Values equal fake_quant's; gradients flow to x inside the clip range and to
  scale everywhere, which is what gradient baselines over scales need.
  """
  v = x / scale
  q = _round_ste(v) if rounding is None else v + jax.lax.stop_gradient(jnp.floor(v) + rounding - v)
  q = jnp.clip(q + zero_point, spec.qmin, spec.qmax)
  return (q - zero_point) * scale


def mse(x, y, axes=None):
  return jnp.mean(jnp.square(x - y), axis=axes)
