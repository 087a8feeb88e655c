"""Fitness losses between quantized logits q and full-precision logits k.

All take (N, C) arrays and return a scalar; lower is better. `info_nce` is the
paper's: rows L2-normalized, logits = q @ k.T / T, cross-entropy with the
diagonal as labels (negatives = the other images of the batch), times 2T.
Jittable and vmappable.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

LOSSES = ("infonce", "mse", "kl", "cosine")


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def info_nce(q, k, temperature: float = 3.0):
  sim = _normalize(q) @ _normalize(k).T / temperature
  labels = jnp.arange(q.shape[0])
  return 2 * temperature * optax.softmax_cross_entropy_with_integer_labels(sim, labels).mean()


def mse(q, k, temperature=None):
  return jnp.mean(jnp.square(q - k))


def kl(q, k, temperature: float = 1.0):
  """KL(softmax(k) || softmax(q)), the FP distribution as the target."""
  log_p = jax.nn.log_softmax(k, -1)
  return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(q, -1)), -1))


def cosine(q, k, temperature=None):
  return 1.0 - jnp.mean(jnp.sum(_normalize(q) * _normalize(k), -1))


def get_loss(name: str):
  if name not in LOSSES:
    raise ValueError(f"loss={name!r} is unknown: expected one of {LOSSES}.")
  return {"infonce": info_nce, "mse": mse, "kl": kl, "cosine": cosine}[name]


def loss_batches(rows: int, batch_size: int) -> int:
  """How many whole loss batches `rows` calibration images make (at least one)."""
  if rows < batch_size:
    raise ValueError(f"search.loss_batch={batch_size} is more than the {rows} calibration "
                     "images: lower search.loss_batch or raise calib.num_images.")
  return rows // batch_size


def batched_loss(name: str, q, k, batch_size: int, temperature: float = 3.0):
  """Mean of the loss over consecutive batches of `batch_size` rows.

  infoNCE's negatives come from within each batch, so the batch size is part
  of the loss's definition (100 in the reference).
  """
  fn = get_loss(name)
  n = loss_batches(q.shape[0], batch_size)
  qb = q[:n * batch_size].reshape(n, batch_size, -1)
  kb = k[:n * batch_size].reshape(n, batch_size, -1)
  return jnp.mean(jax.vmap(lambda a, b: fn(a, b, temperature))(qb, kb))
