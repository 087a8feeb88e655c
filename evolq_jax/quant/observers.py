"""Observers: running statistics over calibration batches -> (scale, zero_point).

Each observer is a pair of pure functions over a small state dict:
  state = update(name, state, x, channelwise)   # once per calibration batch
  scale, zp = finalize(name, state, x_last, spec, channelwise)
`channelwise` keeps one statistic per entry of the last axis (output channels
of a weight, hidden channels of an activation); otherwise one per tensor.
`x_last` is the last calibration batch (or the weight itself), which omse, ptf
search on, as FQ-ViT does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from evolq_jax.quant.bits import BitSpec
from evolq_jax.quant.uniform import fake_quant, mse, qparams_from_range

OBSERVERS = ("minmax", "ema", "percentile", "omse")
EMA_SIGMA = 0.01          # FQ-ViT's EMA observer step
PERCENTILE_ALPHA = 0.99999  # FQ-ViT's percentile observer
PERCENTILE_SIGMA = 0.1
OMSE_STEPS = 90           # shrink ratios 1.00, 0.99, ..., 0.11


def check_observer(name: str, what: str = "observer") -> str:
  if name not in OBSERVERS:
    raise ValueError(f"{what}={name!r} is unknown: expected one of {OBSERVERS}.")
  return name


def _axes(x, channelwise):
  return tuple(range(x.ndim - 1)) if channelwise else None


def _batch_range(name, x, channelwise):
  axes = _axes(x, channelwise)
  if name == "percentile":
    flat = x.reshape(-1, x.shape[-1]) if channelwise else x.reshape(-1)
    axis = 0 if channelwise else None
    return (jnp.quantile(flat, 1 - PERCENTILE_ALPHA, axis=axis),
            jnp.quantile(flat, PERCENTILE_ALPHA, axis=axis))
  return jnp.min(x, axis=axes), jnp.max(x, axis=axes)


def init_state(shape=()):
  """An empty state; `shape` is () per tensor or (channels,) per channel."""
  return {"min": jnp.full(shape, jnp.inf, jnp.float32),
          "max": jnp.full(shape, -jnp.inf, jnp.float32),
          "count": jnp.zeros((), jnp.int32),
          "nonfinite": jnp.zeros((), jnp.int32)}


def update(name: str, state, x, channelwise: bool = False):
  """Fold one batch `x` into the observer state."""
  lo, hi = _batch_range(name, x.astype(jnp.float32), channelwise)
  first = state["count"] == 0
  if name in ("minmax", "omse"):
    new_lo, new_hi = jnp.minimum(state["min"], lo), jnp.maximum(state["max"], hi)
  else:
    sigma = EMA_SIGMA if name == "ema" else PERCENTILE_SIGMA
    new_lo = jnp.where(first, lo, state["min"] + sigma * (lo - state["min"]))
    new_hi = jnp.where(first, hi, state["max"] + sigma * (hi - state["max"]))
  # min/max reductions may skip NaN on some backends: count them explicitly.
  nonfinite = state["nonfinite"] + jnp.sum(~jnp.isfinite(x)).astype(jnp.int32)
  return {"min": new_lo, "max": new_hi, "count": state["count"] + 1, "nonfinite": nonfinite}


def _omse(state, x, spec, channelwise):
  """Shrink [min, max] by the ratio (of OMSE_STEPS) with the lowest MSE on x."""
  axes = _axes(x, channelwise)
  ratios = 1.0 - 0.01 * jnp.arange(OMSE_STEPS, dtype=jnp.float32)

  def err(r):
    s, z = qparams_from_range(state["min"] * r, state["max"] * r, spec)
    return mse(x, fake_quant(x, s, z, spec), axes)

  errors = jax.lax.map(err, ratios)  # (steps,) or (steps, channels)
  best = ratios[jnp.argmin(errors, axis=0)]
  return qparams_from_range(state["min"] * best, state["max"] * best, spec)


def finalize(name: str, state, x_last, spec: BitSpec, channelwise: bool = False):
  """Observer state (+ last batch) -> (scale, zero_point)."""
  if name == "omse":
    return _omse(state, x_last.astype(jnp.float32), spec, channelwise)
  return qparams_from_range(state["min"], state["max"], spec)


def observe(name: str, x, spec: BitSpec, channelwise: bool = False):
  """One-shot observer on a single tensor (weights)."""
  check_observer(name)
  state = update(name, init_state(x.shape[-1:] if channelwise else ()), x, channelwise)
  return finalize(name, state, x, spec, channelwise)
