"""Scoring candidates: prefix caching, the population fitness and the whole
model's calibration loss.

While unit b is searched, everything before b is fixed, so the quantized
activations entering b on the calibration set (`prefix_activations`) are
computed once; a candidate only runs units b..end and the head. A population of scale
vectors is scored in one jitted call: vmapped over candidates, in chunks of
`chunk` candidates (lax.map) to bound memory, and over calibration batches in
sequence (the loss's own batches). `population_scorer` picks the chunk from a
memory budget and splits the population over devices (`sharding.py`).

Units that compute the same function share their programs (models/segments.py):
the scoring and prefix programs are compiled once per segment of such units,
with the unit's position traced (`unit_inputs` renames its trees).
"""
from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from evolq_jax.evaluate import batched
from evolq_jax.losses import batched_loss, get_loss, loss_batches
from evolq_jax.models import segments
from evolq_jax.models.forward import fp_logits, model_for, quantize_params, quantized_logits
from evolq_jax.models.registry import family_of
from evolq_jax.qparams import QParams
from evolq_jax.quant.recipe import QuantConfig
from evolq_jax.quant.weights import quantize_kernel
from evolq_jax.search import sharding
from evolq_jax.search.space import replace_leaf, set_scales


# The batch of every whole-model and prefix forward the search runs, and the pipeline's
# evaluation: one batch shape, one compiled program each.
FORWARD_BATCH = 100


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _prefix(cfg, qcfg, unit, fq_params, acts, images):
  return model_for(cfg, "quant", qcfg).apply({"params": fq_params}, images, acts,
                                             last_unit=unit)


def _unit_apply(model, cfg, rep: int):
  """(local params, local acts, x, position) -> x through the segment representative
  `rep`, as the unit at `position` (traced) of its segment (Family.segment_kwargs)."""
  extra = family_of(cfg).segment_kwargs or (lambda cfg, rep, position: {})
  return lambda p, a, x, pos: model.apply({"params": p}, x, a, first_unit=rep,
                                          last_unit=rep + 1, **extra(cfg, rep, pos))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _segment_prefix(cfg, qcfg, seg, position, fq_params, acts, stack_fq, stack_acts, images):
  """The activations entering the unit at `position` of a shared segment: the units
  before the segment, then the segment's units before `position` (one program per
  segment, the position traced)."""
  model = model_for(cfg, "quant", qcfg)
  x = images if seg[0] == 0 else model.apply({"params": fq_params}, images, acts,
                                             last_unit=seg[0])
  return segments.run_segment(_unit_apply(model, cfg, seg[0]), cfg, seg, x, stack_fq, stack_acts,
                              lambda i: i < position)


def in_batches(fn, images, batch_size):
  """fn over images in batches, on the device (evaluate.batched, unpadded)."""
  return batched(fn, images, batch_size, host=False, pad=False)


def prefix_activations(cfg, qcfg: QuantConfig, params, qparams, images, unit: int,
                       batch_size: int = FORWARD_BATCH):
  """Quantized activations entering unit `unit` (images if unit == 0)."""
  if unit == 0:
    return jnp.asarray(images)
  fq = quantize_params(qcfg, params, qparams)
  return segment_prefix(cfg, qcfg, unit_inputs(cfg, unit, (), params, fq, qparams, qcfg),
                        images, batch_size)


def segment_prefix(cfg, qcfg: QuantConfig, inputs, images, batch_size: int = FORWARD_BATCH):
  """prefix_activations from unit_inputs' (seg, layout, arrays): the quantized params
  and the segment's stacks built for scoring, not built again."""
  seg, _, a = inputs
  if not segments.shared(seg):
    if seg[0] == 0:
      return jnp.asarray(images)
    return in_batches(lambda x: _prefix(cfg, qcfg, seg[0], a["rest_fq"], a["rest_acts"], x),
                      images, batch_size)
  return in_batches(lambda x: _segment_prefix(cfg, qcfg, seg, a["position"], a["rest_fq"],
                                              a["rest_acts"], a["stack_fq"], a["stack_acts"],
                                              x), images, batch_size)


# The whole model's forwards, jitted once for the package: the pipeline's evaluation
# (pipeline.predict), the FP reference, the whole-model loss and the held-out pick run
# these two functions, by default in batches of FORWARD_BATCH images, so that they share
# one compiled program per config and batch shape (a real model's full forward takes
# seconds to compile).
fp_forward = jax.jit(fp_logits, static_argnums=0)
quantized_forward = jax.jit(quantized_logits, static_argnums=(0, 1))


def reference_logits(cfg, params, images, batch_size: int = FORWARD_BATCH):
  """Full-precision logits on the calibration set: computed once per run."""
  return in_batches(lambda x: fp_forward(cfg, params, x), images, batch_size)


def calibration_fitness(cfg, qcfg: QuantConfig, params, qparams, images, fp_ref, scfg,
                        batch_size: int = FORWARD_BATCH) -> float:
  """The search's loss for the whole quantized model (full forward)."""
  q = in_batches(lambda x: quantized_forward(cfg, qcfg, params, qparams, x), images, batch_size)
  return float(batched_loss(scfg.loss, q, fp_ref, scfg.loss_batch, scfg.temperature))


def requantize(qcfg: QuantConfig, params, fq_params, qparams, layout, ste: bool = False):
  """fq_params with the layout's searched kernels re-quantized from qparams' scales."""
  out = fq_params
  for kind, path, _ in layout:
    if kind != "weights":
      continue
    q, raw, fq = (qparams.weights, params, fq_params)
    for k in path:
      q, raw, fq = q[k], raw[k], fq[k]
    kernel = quantize_kernel(raw["kernel"], q["scale"], q["zero_point"], qcfg.w_spec_of(path),
                             qcfg.bias_correction, ste, q.get("rounding"))
    # in fq_params' dtype: bf16 compute keeps bf16 kernels (a no-op in float32)
    out = replace_leaf(out, tuple(path), {**raw, "kernel": kernel.astype(fq["kernel"].dtype)})
  return out


def unit_inputs(cfg, unit: int, layout, params, fq_params, qparams, qcfg=None):
  """-> (segment, local layout, arrays): what the scoring programs of unit `unit`'s
  segment take (models/segments.py). In a shared segment the unit's own trees
  and layout are renamed to the segment's first unit and its position is an
  array, so that all the segment's units run one compiled program; the
  segment's units are stacked for the scan. Build once per unit visit. qcfg: the
  QuantConfig, whose per-layer bits split segments (None: uniform bits)."""
  seg = segments.segment_of(cfg, unit, qcfg)
  lay = tuple((kind, segments.local_path(cfg, unit, seg, path), shape)
              for kind, path, shape in layout)
  loc = functools.partial(segments.local, cfg=cfg, unit=unit, seg=seg)
  arrays = {"position": segments.position(unit, seg),
            "params": loc(params), "fq_params": loc(fq_params),
            "qparams": QParams(loc(qparams.weights), loc(qparams.acts)),
            "stack_fq": segments.stacked(fq_params, cfg, seg),
            "stack_acts": segments.stacked(qparams.acts, cfg, seg),
            "rest_fq": fq_params, "rest_acts": qparams.acts}
  return seg, lay, arrays


def segment_forward(cfg, qcfg, seg, layout, vec, arrays, ste=False):
  """-> fn(prefix activations) -> logits of the model with the unit's searched scales
  set to `vec` (its kernels re-quantized once, here); arrays: unit_inputs'."""
  qp = set_scales(arrays["qparams"], vec, layout)
  p = requantize(qcfg, arrays["params"], arrays["fq_params"], qp, layout, ste)
  model = model_for(cfg, "quant_ste" if ste else "quant", qcfg)
  if not segments.shared(seg):
    return lambda x: model.apply({"params": p}, x, qp.acts, first_unit=seg[0])
  apply_unit = _unit_apply(model, cfg, seg[0])

  def forward(x):
    x = apply_unit(p, qp.acts, x, arrays["position"])
    x = segments.run_segment(apply_unit, cfg, seg, x, arrays["stack_fq"],
                             arrays["stack_acts"], lambda i: i > arrays["position"])
    return model.apply({"params": arrays["rest_fq"]}, x, arrays["rest_acts"],
                       first_unit=seg[1])
  return forward


def candidate_forward(cfg, qcfg, unit, layout, vec, params, fq_params, qparams, ste=False):
  """-> fn(prefix activations) -> logits of the model with unit `unit`'s
  searched scales set to `vec`."""
  seg, lay, arrays = unit_inputs(cfg, unit, layout, params, fq_params, qparams, qcfg)
  return segment_forward(cfg, qcfg, seg, lay, vec, arrays, ste)


def segment_loss(cfg, qcfg, seg, layout, loss, temperature, loss_batch, vec, arrays, tokens,
                 fp_ref, ste=False):
  """Loss of one candidate scale vector, from the cached prefix activations."""
  forward = segment_forward(cfg, qcfg, seg, layout, vec, arrays, ste)
  return forward_loss(forward, tokens, fp_ref, loss, temperature, loss_batch, checkpoint=ste)


def forward_loss(forward, inputs, fp_ref, loss, temperature, loss_batch, checkpoint=False):
  """The loss of forward(inputs) against fp_ref, averaged over consecutive loss batches,
  one batch's activations alive at a time (lax.map). checkpoint: through a gradient,
  recompute each batch's activations rather than keep them all."""
  loss_fn = get_loss(loss)
  n = loss_batches(inputs.shape[0], loss_batch)
  xs = inputs[:n * loss_batch].reshape((n, loss_batch) + inputs.shape[1:])
  ks = fp_ref[:n * loss_batch].reshape(n, loss_batch, -1)

  def one_batch(args):
    x, k = args
    return loss_fn(forward(x), k, temperature)

  if checkpoint:
    one_batch = jax.checkpoint(one_batch)
  return jnp.mean(jax.lax.map(one_batch, (xs, ks)))


def candidate_loss(cfg, qcfg, unit, layout, loss, temperature, loss_batch, vec, params,
                   fq_params, qparams, tokens, fp_ref, ste=False):
  """Loss of one candidate scale vector of unit `unit` (segment_loss, per unit)."""
  seg, lay, arrays = unit_inputs(cfg, unit, layout, params, fq_params, qparams, qcfg)
  return segment_loss(cfg, qcfg, seg, lay, loss, temperature, loss_batch, vec, arrays, tokens,
                      fp_ref, ste)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7))
def candidate_value_and_grad(cfg, qcfg, seg, layout, loss, temperature, loss_batch, to_scales,
                             x, state, arrays, tokens, fp_ref):
  """(loss (1,), d loss / d x (1, D)) of one search point x (1, D) whose scales are
  to_scales(state, x), through the straight-through estimator (unit_inputs' seg,
  layout and arrays)."""
  def f(x):
    return segment_loss(cfg, qcfg, seg, layout, loss, temperature, loss_batch,
                        to_scales(state, x)[0], arrays, tokens, fp_ref, ste=True)
  value, grad = jax.value_and_grad(f)(x)
  return value[None], grad


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6, 7),
                   static_argnames=("mesh",))
def segment_fitness(cfg, qcfg: QuantConfig, seg, layout, loss: str, temperature: float,
                    loss_batch: int, chunk: int, population, arrays, tokens, fp_ref, mesh=None):
  """Losses (P,) of a population (P, D) of scale vectors of the unit that
  unit_inputs gave (seg, layout, arrays): one compiled program per segment.

  Candidates are vmapped `chunk` at a time (chunk >= P: all at once). With a
  `mesh` (sharding.population_mesh), each device scores P / devices of them,
  `chunk` at a time; the other arrays must already be on every device.
  """
  one = functools.partial(segment_loss, cfg, qcfg, seg, layout, loss, temperature, loss_batch)

  def local(pop, arrays, tokens, fp_ref):
    def f(v):
      return one(v, arrays, tokens, fp_ref)

    p = pop.shape[0]
    return jax.lax.map(f, pop, batch_size=min(chunk, p) if chunk > 0 else p)

  run = sharding.sharded_over_population(local, mesh)
  return run(population, arrays, tokens, fp_ref)


def scoring_args(cfg, qcfg, unit: int, layout, loss: str, temperature: float, loss_batch: int,
                 params, fq_params, qparams, tokens, fp_ref) -> tuple:
  """-> (static, args) of unit `unit`'s scoring program: segment_fitness(*static, chunk,
  population, *args), segment_fitness.lower(...) and candidate_bytes(static, args)."""
  seg, lay, arrays = unit_inputs(cfg, unit, layout, params, fq_params, qparams, qcfg)
  return (cfg, qcfg, seg, lay, loss, temperature, loss_batch), (arrays, tokens, fp_ref)


def population_fitness(cfg, qcfg: QuantConfig, unit: int, layout, loss: str,
                       temperature: float, loss_batch: int, chunk: int, population, params,
                       fq_params, qparams, tokens, fp_ref, mesh=None):
  """Losses (P,) of a population (P, D) of unit-`unit` scale vectors (segment_fitness;
  the search builds unit_inputs once per unit visit instead)."""
  static, args = scoring_args(cfg, qcfg, unit, layout, loss, temperature, loss_batch, params,
                              fq_params, qparams, tokens, fp_ref)
  return segment_fitness(*static, chunk, population, *args, mesh=mesh)


def tree_bytes(tree) -> int:
  """Bytes of the tree's arrays, each counted once (a tree may hold one array twice)."""
  leaves = {id(a): a for a in jax.tree.leaves(tree)}.values()
  return sum(int(np.prod(jnp.shape(a))) * jnp.result_type(a).itemsize for a in leaves)


def estimated_candidate_bytes(cfg, unit: int, loss_batch: int, itemsize: int = 4):
  """The family's shape-based guess of one candidate's live activations (one
  loss batch through units unit..end), in case the backend gives no memory
  analysis."""
  return family_of(cfg).candidate_bytes(cfg, unit, loss_batch, itemsize)


_candidate_bytes_memo: dict = {}


def candidate_bytes(static: tuple, args: tuple) -> int:
  """Bytes of XLA temporaries that scoring one candidate needs.

  static: segment_fitness's static args up to loss_batch (cfg, qcfg, seg, layout,
  loss, temperature, loss_batch); args: (arrays, tokens, fp_ref) (unit_inputs'
  arrays). From XLA's memory analysis of a one-candidate program (compiled
  once per segment and shapes), else the shape-based estimate (for the
  segment's first unit, its longest suffix).
  """
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                          args)
  leaves, treedef = jax.tree.flatten(abstract)
  key = static + (treedef, tuple((a.shape, str(a.dtype)) for a in leaves))
  if key not in _candidate_bytes_memo:
    cfg, seg, loss_batch = static[0], static[2], static[6]
    dim = sum(math.prod(shape) for kind, _, shape in static[3])
    vec = jax.ShapeDtypeStruct((1, dim), jnp.float32)
    try:
      analysis = segment_fitness.lower(*static, 1, vec, *abstract).compile().memory_analysis()
      n = int(analysis.temp_size_in_bytes)
    except (AttributeError, NotImplementedError):  # no memory analysis on this backend
      n = 0
    itemsize = jnp.result_type(args[1]).itemsize
    _candidate_bytes_memo[key] = n or estimated_candidate_bytes(cfg, seg[0], loss_batch,
                                                                itemsize)
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


def population_scorer(cfg, qcfg: QuantConfig, scfg, inputs, tokens, fp_ref):
  """-> score(population (P, D)) -> losses (P,) of the unit that unit_inputs gave
  (`inputs`), following scfg.chunk / scfg.memory_mb (chunk size) and scfg.devices
  (population split over devices).

  The arrays are put on the devices once here, not on every call.
  """
  mesh = sharding.population_mesh(scfg.devices)
  seg, lay, arrays = inputs
  static = (cfg, qcfg, seg, lay, scfg.loss, scfg.temperature, scfg.loss_batch)
  args = sharding.replicate((arrays, tokens, fp_ref), mesh)
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
      return segment_fitness(*static, chunks[p], population, *args)
    fit = segment_fitness(*static, chunks[p], sharding.replicate(population, mesh), *args,
                          mesh=mesh)
    return jnp.asarray(np.asarray(fit))  # back on the default device, beside the strategy

  score.chunks = chunks  # population size -> chunk used (for reports and tests)
  return score


def gradient_scorer(cfg, qcfg: QuantConfig, scfg, inputs, tokens, fp_ref, to_scales):
  """-> value_and_grad(x (1, D), state) -> (losses (1,), grads (1, D)) for a
  strategy that needs gradients (one candidate, straight-through estimator);
  inputs: unit_inputs'."""
  seg, lay, arrays = inputs
  static = (cfg, qcfg, seg, lay, scfg.loss, scfg.temperature, scfg.loss_batch, to_scales)

  def value_and_grad(x, state):
    return candidate_value_and_grad(*static, x, state, arrays, tokens, fp_ref)

  return value_and_grad
