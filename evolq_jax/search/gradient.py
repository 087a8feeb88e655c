"""The gradient baselines as strategies: the same loss over the same scales,
minimized with optax (Adam or SGD) through the straight-through estimator.

Scales are optimized in log space (scale = scale0 * exp(z)), starting at z = 0.
Each generation is one step: its forward (+ backward) counts as one candidate
evaluation. The engine gives `tell` the gradient of the loss w.r.t. z.

By default every unit visit starts a fresh optimizer, so Adam's first step moves every
scale by about exp(+-lr); with a constant rate the later passes may keep
nothing (CIFAR-10 W3A4, lr 0.3: nothing after pass 5 of 10). `pass_lr` lowers
the rate over the passes (schedule "cosine": from lr at the first pass to near
0 at the last); there it kept improving to the last pass but ended behind the
constant rate (docs/results.md, the CIFAR-10 reading). `search.carry_optimizer` keeps
the optimizer's state from one visit of a unit to its next instead (engine.py).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

METHODS = ("adam", "sgd")
# schedule -> the rate's factor at the fraction of passes done (SearchConfig checks the name)
_SCHEDULES = {"constant": lambda done: 1.0,
              "cosine": lambda done: 0.5 * (1.0 + math.cos(math.pi * done))}
LR_SCHEDULES = tuple(_SCHEDULES)


class GradState(NamedTuple):
  z: jax.Array          # (D,) log-scale offsets
  opt_state: Any
  scales0: jax.Array    # (D,)


def to_scales(state: GradState, z):
  return state.scales0 * jnp.exp(z)


def pass_lr(lr: float, schedule: str, p: int, passes: int) -> float:
  """The learning rate of pass p (0-based) of `passes` under `schedule`."""
  return lr * _SCHEDULES[schedule](p / passes)


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
