"""The gradient baselines as strategies: the same loss over the same scales,
minimized with optax (Adam or SGD) through the straight-through estimator.

Scales are optimized in log space (scale = scale0 * exp(z)), starting at z = 0.
Each generation is one step: its forward (+ backward) counts as one candidate
evaluation. The engine gives `tell` the gradient of the loss w.r.t. z.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

METHODS = ("adam", "sgd")


class GradState(NamedTuple):
  z: jax.Array          # (D,) log-scale offsets
  opt_state: Any
  scales0: jax.Array    # (D,)


def to_scales(state: GradState, z):
  return state.scales0 * jnp.exp(z)


def optax_strategy(name: str, lr: float):
  """-> (init, ask, tell) of the optax baseline `name` at learning rate `lr`."""
  if name not in METHODS:
    raise ValueError(f"gradient method {name!r} is unknown: expected one of {METHODS}.")
  tx = optax.adam(lr) if name == "adam" else optax.sgd(lr)

  def init(key, scales0, fitness0):
    z = jnp.zeros_like(scales0)
    return GradState(z, tx.init(z), scales0)

  def ask(key, state):
    return state.z[None], state

  def tell(key, x, fitness, state, grad=None):
    updates, opt_state = tx.update(grad[0], state.opt_state, state.z)
    return GradState(optax.apply_updates(state.z, updates), opt_state, state.scales0), {}

  return init, ask, tell
