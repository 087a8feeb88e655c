"""FQ-ViT's log2 quantizer for attention probabilities (values in [0, 1]).

q = clip(round(-log2 p), 0, 2^b - 1) and p_hat = 2^-q; values whose exponent
falls past the grid (round(-log2 p) >= 2^b) are set to zero, as in FQ-ViT.
"""
from __future__ import annotations

import jax.numpy as jnp

from evolq_jax.quant.bits import BitSpec


def log2_fake_quant(p, spec: BitSpec):
  exponent = jnp.round(-jnp.log2(jnp.maximum(p, 1e-30)))
  underflow = exponent >= 2 ** spec.bits
  exponent = jnp.clip(exponent, 0, 2 ** spec.bits - 1)
  # ldexp gives exact powers of two (exp2 is off by an ulp on some backends)
  return jnp.where(underflow, 0.0, jnp.ldexp(jnp.ones_like(p), -exponent.astype(jnp.int32)))
