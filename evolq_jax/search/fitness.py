"""Scoring candidates: prefix caching and the population fitness.

While block b is searched, everything before b is fixed, so the quantized
tokens entering b on the calibration set (`prefix_activations`) are computed
once; a candidate only runs blocks b..end and the head. A population of scale
vectors is scored in one jitted call: vmapped over candidates, in chunks of
`chunk` candidates (lax.map) to bound memory, and over calibration batches in
sequence (the loss's own batches).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from evolq_jax.config import QuantConfig
from evolq_jax.losses import get_loss
from evolq_jax.models.forward import fp_logits, model_for, quantize_params
from evolq_jax.models.presets import ViTConfig
from evolq_jax.quant.weights import quantize_kernel
from evolq_jax.search.space import set_block_scales


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _prefix(cfg, qcfg, block, fq_params, acts, images):
  return model_for(cfg, "quant", qcfg).apply({"params": fq_params}, images, acts,
                                             last_block=block)


def in_batches(fn, images, batch_size):
  return jnp.concatenate([fn(images[i:i + batch_size])
                          for i in range(0, len(images), batch_size)])


def prefix_activations(cfg: ViTConfig, qcfg: QuantConfig, params, qparams, images, block: int,
                       batch_size: int = 100):
  """Quantized tokens (N, T, D) entering block `block` (images if block == 0)."""
  if block == 0:
    return jnp.asarray(images)
  fq = quantize_params(qcfg, params, qparams)
  return in_batches(lambda x: _prefix(cfg, qcfg, block, fq, qparams.acts, x), images, batch_size)


_fp = jax.jit(fp_logits, static_argnums=0)


def reference_logits(cfg: ViTConfig, params, images, batch_size: int = 100):
  """Full-precision logits on the calibration set: computed once per run."""
  return in_batches(lambda x: _fp(cfg, params, x), images, batch_size)


def requantize_block(qcfg: QuantConfig, params, fq_params, qparams, block: int, layout,
                     ste: bool = False):
  """fq_params with block's searched kernels re-quantized from qparams' scales."""
  name = f"blocks_{block}"
  out = {**fq_params, name: dict(fq_params[name])}
  for kind, path, _ in layout:
    if kind != "weights":
      continue
    sub, layer = path
    q = qparams.weights[name][sub][layer]
    raw = params[name][sub][layer]
    out[name][sub] = {**out[name][sub], layer: {
        **raw, "kernel": quantize_kernel(raw["kernel"], q["scale"], q["zero_point"],
                                         qcfg.w_spec, qcfg.bias_correction, ste)}}
  return out


def candidate_loss(cfg, qcfg, block, layout, loss, temperature, loss_batch, vec, params,
                   fq_params, qparams, tokens, fp_ref, ste=False):
  """Loss of one candidate scale vector, from the cached prefix tokens."""
  qp = set_block_scales(qparams, block, vec, layout)
  p = requantize_block(qcfg, params, fq_params, qp, block, layout, ste)
  model = model_for(cfg, "quant", qcfg)
  loss_fn = get_loss(loss)
  n = tokens.shape[0] // loss_batch
  xs = tokens[:n * loss_batch].reshape((n, loss_batch) + tokens.shape[1:])
  ks = fp_ref[:n * loss_batch].reshape(n, loss_batch, -1)

  def one_batch(args):
    x, k = args
    q = model.apply({"params": p}, x, qp.acts, first_block=block)
    return loss_fn(q, k, temperature)

  return jnp.mean(jax.lax.map(one_batch, (xs, ks)))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7))
def population_fitness(cfg: ViTConfig, qcfg: QuantConfig, block: int, layout, loss: str,
                       temperature: float, loss_batch: int, chunk: int, population, params,
                       fq_params, qparams, tokens, fp_ref):
  """Losses (P,) of a population (P, D) of block-`block` scale vectors.

  Candidates are vmapped `chunk` at a time (chunk >= P: all at once).
  """
  one = functools.partial(candidate_loss, cfg, qcfg, block, layout, loss, temperature,
                          loss_batch)
  f = lambda v: one(v, params, fq_params, qparams, tokens, fp_ref)  # noqa: E731
  p = population.shape[0]
  return jax.lax.map(f, population, batch_size=min(chunk, p) if chunk > 0 else p)
