"""The gradient baseline: the same loss over the same scales, minimized with
optax (Adam or SGD) through the straight-through estimator.

Scales are optimized in log space (scale = scale0 * exp(z)), starting at z = 0.
The budget is counted like the search's: each step's forward (+ backward)
counts as one candidate evaluation, `generations * children` steps per block.
The best evaluated point is kept (same elitism as the search).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from evolq_jax.search.fitness import candidate_loss

GRADIENT_METHODS = ("adam", "sgd")


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _loss_and_grad(cfg, qcfg, block, layout, loss, temperature, loss_batch, z, vec0, params,
                   fq, qparams, tokens, fp_ref):
  def f(z):
    return candidate_loss(cfg, qcfg, block, layout, loss, temperature, loss_batch,
                          vec0 * jnp.exp(z), params, fq, qparams, tokens, fp_ref, ste=True)
  return jax.value_and_grad(f)(z)


def gradient_block_search(cfg, qcfg, scfg, params, fq, qparams, tokens, fp_ref, block, layout,
                          vec0, f0, on_generation=None):
  """-> (best scale vector, per-generation records, evaluations)."""
  tx = optax.adam(scfg.sigma) if scfg.strategy == "adam" else optax.sgd(scfg.sigma)
  z = jnp.zeros_like(vec0)
  opt_state = tx.init(z)
  best_vec, best_f, records, n = vec0, f0, [], 0
  for g in range(scfg.generations):
    values = []
    for _ in range(scfg.children):
      value, grad = _loss_and_grad(cfg, qcfg, block, layout, scfg.loss, scfg.temperature,
                                   scfg.loss_batch, z, vec0, params, fq, qparams, tokens, fp_ref)
      value = float(value)
      n += 1
      values.append(value)
      if value < best_f:
        best_vec, best_f = vec0 * jnp.exp(z), value
      updates, opt_state = tx.update(grad, opt_state, z)
      z = optax.apply_updates(z, updates)
    rec = {"generation": g, "best": best_f, "gen_min": min(values),
           "gen_mean": sum(values) / len(values), "start": f0, "evaluated": n + 1}
    records.append(rec)
    if on_generation:
      on_generation(rec)
  return best_vec, records, n
