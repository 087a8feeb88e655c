"""Scoring candidates: prefix caching and the population fitness.

While block b is searched, everything before b is fixed, so the quantized
tokens entering b on the calibration set (`prefix_activations`) are computed
once; a candidate only runs blocks b..end and the head. A population of scale
vectors is scored in one jitted call: vmapped over candidates, in chunks of
`chunk` candidates (lax.map) to bound memory, and over calibration batches in
sequence (the loss's own batches). `population_scorer` picks the chunk from a
memory budget and splits the population over devices (`sharding.py`).
"""
from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from evolq_jax.config import QuantConfig
from evolq_jax.losses import get_loss, loss_batches
from evolq_jax.models.forward import fp_logits, model_for, quantize_params
from evolq_jax.models.presets import ViTConfig
from evolq_jax.quant.weights import quantize_kernel
from evolq_jax.search import sharding
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
    kernel = quantize_kernel(raw["kernel"], q["scale"], q["zero_point"], qcfg.w_spec,
                             qcfg.bias_correction, ste)
    # in fq_params' dtype: bf16 compute keeps bf16 kernels (a no-op in float32)
    kernel = kernel.astype(fq_params[name][sub][layer]["kernel"].dtype)
    out[name][sub] = {**out[name][sub], layer: {**raw, "kernel": kernel}}
  return out


def candidate_forward(cfg, qcfg, block, layout, vec, params, fq_params, qparams, ste=False):
  """-> fn(prefix tokens) -> logits of the model with block `block`'s searched
  scales set to `vec` (its kernels re-quantized once, here)."""
  qp = set_block_scales(qparams, block, vec, layout)
  p = requantize_block(qcfg, params, fq_params, qp, block, layout, ste)
  model = model_for(cfg, "quant_ste" if ste else "quant", qcfg)
  return lambda x: model.apply({"params": p}, x, qp.acts, first_block=block)


def candidate_loss(cfg, qcfg, block, layout, loss, temperature, loss_batch, vec, params,
                   fq_params, qparams, tokens, fp_ref, ste=False):
  """Loss of one candidate scale vector, from the cached prefix tokens."""
  forward = candidate_forward(cfg, qcfg, block, layout, vec, params, fq_params, qparams, ste)
  loss_fn = get_loss(loss)
  n = loss_batches(tokens.shape[0], loss_batch)
  xs = tokens[:n * loss_batch].reshape((n, loss_batch) + tokens.shape[1:])
  ks = fp_ref[:n * loss_batch].reshape(n, loss_batch, -1)

  def one_batch(args):
    x, k = args
    return loss_fn(forward(x), k, temperature)

  return jnp.mean(jax.lax.map(one_batch, (xs, ks)))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7),
                   static_argnames=("mesh",))
def population_fitness(cfg: ViTConfig, qcfg: QuantConfig, block: int, layout, loss: str,
                       temperature: float, loss_batch: int, chunk: int, population, params,
                       fq_params, qparams, tokens, fp_ref, mesh=None):
  """Losses (P,) of a population (P, D) of block-`block` scale vectors.

  Candidates are vmapped `chunk` at a time (chunk >= P: all at once). With a
  `mesh` (sharding.population_mesh), each device scores P / devices of them,
  `chunk` at a time; the other arrays must already be on every device.
  """
  one = functools.partial(candidate_loss, cfg, qcfg, block, layout, loss, temperature,
                          loss_batch)

  def local(pop, params, fq_params, qparams, tokens, fp_ref):
    def f(v):
      return one(v, params, fq_params, qparams, tokens, fp_ref)

    p = pop.shape[0]
    return jax.lax.map(f, pop, batch_size=min(chunk, p) if chunk > 0 else p)

  run = sharding.sharded_over_population(local, mesh)
  return run(population, params, fq_params, qparams, tokens, fp_ref)


def tree_bytes(tree) -> int:
  return sum(int(np.prod(jnp.shape(a))) * jnp.result_type(a).itemsize
             for a in jax.tree.leaves(tree))


def estimated_candidate_bytes(cfg: ViTConfig, block: int, loss_batch: int, itemsize: int = 4):
  """Shape-based guess of one candidate's live activations: one loss batch
  through blocks block..end (residual, qkv, attention logits and probs, MLP),
  in case the backend gives no memory analysis."""
  t, d, h = cfg.num_patches + 1, cfg.embed_dim, cfg.num_heads
  per_token = 8 * d + 4 * h * t + 2 * cfg.mlp_hidden
  return itemsize * loss_batch * t * per_token * (cfg.depth - block)


_candidate_bytes_memo: dict = {}


def candidate_bytes(static: tuple, args: tuple) -> int:
  """Bytes of XLA temporaries that scoring one candidate needs.

  static: population_fitness's static args up to loss_batch (cfg ... loss_batch);
  args: (params, fq_params, qparams, tokens, fp_ref). From XLA's memory
  analysis of a one-candidate program (compiled once per block and shapes),
  else the shape-based estimate.
  """
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                          args)
  leaves, treedef = jax.tree.flatten(abstract)
  key = static + (treedef, tuple((a.shape, str(a.dtype)) for a in leaves))
  if key not in _candidate_bytes_memo:
    cfg, block, loss_batch = static[0], static[2], static[6]
    dim = sum(math.prod(shape) for kind, _, shape in static[3])
    vec = jax.ShapeDtypeStruct((1, dim), jnp.float32)
    try:
      analysis = population_fitness.lower(*static, 1, vec, *abstract).compile().memory_analysis()
      n = int(analysis.temp_size_in_bytes)
    except (AttributeError, NotImplementedError):  # no memory analysis on this backend
      n = 0
    itemsize = jnp.result_type(args[3]).itemsize
    _candidate_bytes_memo[key] = n or estimated_candidate_bytes(cfg, block, loss_batch, itemsize)
  return _candidate_bytes_memo[key]


def chunk_for_budget(memory_mb: float, per_candidate: int, fixed: int, population: int) -> int:
  """Largest chunk of candidates (<= population) whose temporaries, on top of
  `fixed` bytes of inputs, fit in memory_mb MiB; at least 1."""
  room = memory_mb * 2 ** 20 - fixed
  if room < per_candidate:
    warnings.warn(f"search.memory_mb={memory_mb:g} leaves room for no candidate: inputs take "
                  f"{fixed / 2 ** 20:.0f} MiB and one candidate about "
                  f"{per_candidate / 2 ** 20:.0f} MiB; scoring one at a time. Lower "
                  "search.loss_batch (or use fewer calibration images) to fit.", stacklevel=2)
    return 1
  return int(max(1, min(population, room // per_candidate)))


def population_scorer(cfg: ViTConfig, qcfg: QuantConfig, scfg, block: int, layout, params,
                      fq_params, qparams, tokens, fp_ref):
  """-> score(population (P, D)) -> losses (P,), following scfg.chunk /
  scfg.memory_mb (chunk size) and scfg.devices (population split over devices).

  The arrays are put on the devices once here, not on every call.
  """
  mesh = sharding.population_mesh(scfg.devices)
  args = sharding.replicate((params, fq_params, qparams, tokens, fp_ref), mesh)
  static = (cfg, qcfg, block, layout, scfg.loss, scfg.temperature, scfg.loss_batch)
  n_dev = 1 if mesh is None else mesh.size
  chunks = {}

  def score(population):
    p = population.shape[0]
    if p not in chunks:
      chunks[p] = scfg.chunk
      if scfg.memory_mb:
        per_device = -(-p // n_dev)
        fixed = tree_bytes(args) + tree_bytes(population)
        chunks[p] = chunk_for_budget(scfg.memory_mb, candidate_bytes(static, args), fixed,
                                     per_device)
    if mesh is None:
      return population_fitness(*static, chunks[p], population, *args)
    fit = population_fitness(*static, chunks[p], sharding.replicate(population, mesh), *args, mesh=mesh)
    return jnp.asarray(np.asarray(fit))  # back on the default device, beside the strategy

  score.chunks = chunks  # population size -> chunk used (for reports and tests)
  return score
