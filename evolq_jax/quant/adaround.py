"""AdaRound's learned rounding (Nagel et al., ICML 2020), as pure functions.

A weight w with scale s rounds to floor(w / s) + h(V), where V is one real
variable per weight and h the rectified sigmoid, clip(sigmoid(V) (zeta - gamma)
+ gamma, 0, 1) with gamma = -0.1, zeta = 1.1, which reaches 0 and 1 exactly.
V starts where h(V) equals the weight's fractional part (the nearest rounding
is where h >= 0.5). The regularizer sum(1 - |2 h(V) - 1|^beta) pushes every
h to 0 or 1 as beta is annealed from 20 down to 2, after a warm-up of 20% of
the iterations without it (BRECQ's and QDrop's schedule). At the end each
weight rounds up where h(V) >= 0.5, i.e. V >= 0.

The learned choice is stored as 0/1 per weight (int8) in the layer's QParams
entry ("rounding"), which the fake-quant model, the integer export and the
ONNX export all read (quant/uniform.quantize).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from evolq_jax.quant.bits import BitSpec

GAMMA, ZETA = -0.1, 1.1
BETA_START, BETA_END, WARMUP = 20.0, 2.0, 0.2


def rectified_sigmoid(v):
  return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


@jax.jit  # one program whatever the inputs' kind: numpy's division may round otherwise
def init_v(w, scale):
  """V with h(V) = the fractional part of w / scale (inside the open interval of h)."""
  rest = w / scale - jnp.floor(w / scale)
  return -jnp.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def soft_quant(w, scale, zero_point, spec: BitSpec, v):
  """The kernel at the soft rounding h(V) (differentiable in V)."""
  q = jnp.clip(jnp.floor(w / scale) + rectified_sigmoid(v) + zero_point, spec.qmin, spec.qmax)
  return (q - zero_point) * scale


def hard_rounding(v):
  """The learned 0/1 per weight (int8): round up where h(V) >= 0.5."""
  return (v >= 0).astype(jnp.int8)


def rounding_loss(vs, beta):
  """sum over every V of 1 - |2 h(V) - 1|^beta."""
  return sum(jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta) for v in vs)


def beta_at(step, iters: int):
  """The annealed beta: 20 during the warm-up, then linearly to 2 at the last step."""
  rel = jnp.clip((step - WARMUP * iters) / jnp.maximum((1.0 - WARMUP) * iters, 1.0), 0.0, 1.0)
  return BETA_END + (BETA_START - BETA_END) * (1.0 - rel)


def regularizer_on(step, iters: int):
  """0 during the warm-up, 1 after it."""
  return (step >= WARMUP * iters).astype(jnp.float32)


@jax.jit
def nearest_rounding(w, scale):
  """The 0/1 per weight that to-nearest rounding takes (floor + it == round)."""
  return (jnp.round(w / scale) - jnp.floor(w / scale)).astype(jnp.int8)


def with_rounding(params, qparams):
  """QParams whose every layer holds a "rounding" entry: kept where it has one, else
  the nearest rounding at its current scale, which quantizes to the same values."""
  flat = traverse_util.flatten_dict(params)
  wq = traverse_util.flatten_dict(qparams.weights)
  out = dict(wq)
  for path in dict.fromkeys(p[:-1] for p in wq):
    if path + ("rounding",) not in wq:
      out[path + ("rounding",)] = nearest_rounding(flat[path + ("kernel",)], wq[path + ("scale",)])
  return qparams.replace(weights=traverse_util.unflatten_dict(out))


def hard_fraction(vs) -> float:
  """Share of the rounding variables whose h(V) is exactly 0 or 1."""
  hard = sum(int(np.sum(np.isin(np.asarray(rectified_sigmoid(v)), (0.0, 1.0)))) for v in vs)
  return hard / max(sum(int(np.size(v)) for v in vs), 1)
