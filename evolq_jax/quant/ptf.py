"""FQ-ViT's Power-of-Two Factor (PTF) for LayerNorm inputs.

One layer-wise scale s8 from the global range, one shared zero point, and per
channel a factor 2^k (k in 0..3) on s8 / 8, chosen per channel by MSE on the
last calibration batch. Inter-channel variation of the residual stream is then
absorbed by the factor while the integer arithmetic stays a shift.
"""
from __future__ import annotations

import jax.numpy as jnp

from evolq_jax.quant.bits import BitSpec
from evolq_jax.quant.uniform import EPS, fake_quant

PTF_FACTORS = 4  # k in {0, 1, 2, 3}


def ptf_qparams(ch_min, ch_max, x_last, spec: BitSpec):
  """Per-channel stats (C,) and last batch (..., C) -> (scale (C,), zero_point ())."""
  lo = jnp.minimum(jnp.min(ch_min), 0.0)
  hi = jnp.maximum(jnp.max(ch_max), 0.0)
  s8 = jnp.maximum((hi - lo) / (spec.qmax - spec.qmin), EPS)
  zero_point = jnp.clip(spec.qmin - jnp.round(lo / s8), spec.qmin, spec.qmax)
  s1 = s8 / 2 ** (PTF_FACTORS - 1)
  x = x_last.reshape(-1, x_last.shape[-1]).astype(jnp.float32)
  errors = jnp.stack([
      jnp.mean(jnp.square(x - fake_quant(x, s1 * 2 ** k, zero_point, spec)), axis=0)
      for k in range(PTF_FACTORS)])  # (factors, C)
  scale = s1 * jnp.exp2(jnp.argmin(errors, axis=0).astype(jnp.float32))
  return scale, zero_point
