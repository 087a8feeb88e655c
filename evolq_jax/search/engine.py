"""The unit-wise search: passes over the model's searchable units, last to first.

For each unit: cache the prefix activations, score the current scales, run
the strategy for `generations` generations (ask -> fitness -> tell), and keep
the best candidate only if it beats the current scales (unit-level elitism:
calibration fitness never gets worse). The loop's state is typed
(search/state.py); what happens around each unit (the held-out pick, progress,
the caller's callback, an orbax checkpoint after every unit, so that a killed
run resumes to the same result) are hooks (search/hooks.py).
"""
from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evolq_jax import cache
from evolq_jax.models.forward import quantize_params, units
from evolq_jax.quant import adaround
from evolq_jax.quant.recipe import QuantConfig
from evolq_jax.search import checkpoint as ckpt
from evolq_jax.search import reconstruct, selection
from evolq_jax.search.fitness import (calibration_fitness, gradient_scorer, population_scorer,
                                      reference_logits, segment_prefix, unit_inputs)
from evolq_jax.search.gradient import pass_lr
from evolq_jax.search.hooks import Hook, default_hooks
from evolq_jax.search.settings import SearchConfig, SearchResult
from evolq_jax.search.space import searched_scales, set_scales
from evolq_jax.search.state import EngineState, Run
from evolq_jax.search.strategies import build, paper_radius


@functools.lru_cache(maxsize=64)
def _jitted_strategy(scfg: SearchConfig, num_dims: int, radius: float):
  s = build(scfg, num_dims, radius)
  return s._replace(init=jax.jit(s.init), ask=jax.jit(s.ask), tell=jax.jit(s.tell))


def search_block(cfg, qcfg, scfg: SearchConfig, params, qparams, images, fp_ref, unit: int,
                 key, on_generation: Optional[Callable] = None, carry: Optional[list] = None):
  """Search one unit's scales. -> (qparams, records, candidates evaluated, carry).

  carry: a gradient method's optimizer state at the end of this unit's previous
  visit (its leaves as lists, as returned here; None: a fresh optimizer). The
  returned carry is this visit's final state (None for other strategies)."""
  vec0, layout = searched_scales(cfg, qcfg, qparams, unit, scfg.space)
  # the unit's trees and its segment's stacks, once for the prefix and both scorers
  inputs = unit_inputs(cfg, unit, layout, params, quantize_params(qcfg, params, qparams), qparams,
                       qcfg)
  tokens = segment_prefix(cfg, qcfg, inputs, images)
  score = population_scorer(cfg, qcfg, scfg, inputs, tokens, fp_ref)
  strategy = _jitted_strategy(scfg, int(vec0.shape[0]),
                              float(scfg.radius or paper_radius(qcfg.w_bits)))
  grad_score = (gradient_scorer(cfg, qcfg, scfg, inputs, tokens, fp_ref, strategy.to_scales)
                if strategy.needs_grad else None)
  # A gradient method's first step starts at z = 0, the unit's own scales: its loss is
  # the start's, so the start is not scored apart. Its last update is scored after the
  # loop instead, so that every step counts: generations steps + 1 evaluations, the
  # same count as a search's start + generations x population.
  f0 = None if grad_score else float(score(vec0[None])[0])
  key, k_init = jax.random.split(key)
  state = strategy.init(k_init, vec0, jnp.float32(0.0 if f0 is None else f0))
  if carry is not None and grad_score:  # z = 0 is the unit's scales now; the moments go on
    leaves, tree = jax.tree.flatten(state.opt_state)
    state = state._replace(opt_state=jax.tree.unflatten(
        tree, [jnp.asarray(v, l.dtype) for v, l in zip(carry, leaves)]))
  best_vec, best_f, records, n = vec0, f0, [], 0 if grad_score else 1

  def keep(g, scales, fit):
    nonlocal best_vec, best_f
    fit_np = np.asarray(fit)
    i = int(np.argmin(fit_np))
    if fit_np[i] < best_f:  # elitism: only a strictly better candidate replaces
      best_vec, best_f = scales[i], float(fit_np[i])
    rec = {"generation": g, "best": best_f, "gen_min": float(fit_np.min()),
           "gen_mean": float(fit_np.mean()), "start": f0, "evaluated": n}
    records.append(rec)
    if on_generation:
      on_generation(rec)

  for g in range(scfg.generations):
    key, k_ask, k_tell = jax.random.split(key, 3)
    x, state = strategy.ask(k_ask, state)
    scales = strategy.to_scales(state, x)
    fit, grad = grad_score(x, state) if grad_score else (score(scales), None)
    if f0 is None:  # z = 0: the start's loss
      f0 = best_f = float(np.asarray(fit)[0])
    state, _ = strategy.tell(k_tell, x, fit, state, grad)
    n += len(fit)
    keep(g, scales, fit)
  if grad_score:  # the last step's result
    x, _ = strategy.ask(key, state)
    scales = strategy.to_scales(state, x)
    fit = score(scales)
    n += 1
    keep(scfg.generations, scales, fit)
    carry = [np.asarray(leaf).tolist() for leaf in jax.tree.leaves(state.opt_state)]
  return set_scales(qparams, best_vec, layout), records, n, carry if grad_score else None


def reconstruct_block(cfg, qcfg, scfg: SearchConfig, params, qparams, images, fp_ref,
                      unit: int, key, on_generation: Optional[Callable] = None, carry=None):
  """One unit of a reconstruction strategy (search/reconstruct.py), reported like a
  search's unit: one record whose `best` is the whole model's calibration loss after
  it (no elitism: reconstruction minimizes its own loss). -> (qparams, records, steps,
  None): each unit is visited once, so nothing carries."""
  out, rec, n = reconstruct.reconstruct_unit(cfg, qcfg, scfg, params, qparams, images, unit,
                                             key, on_chunk=on_generation)
  fit = calibration_fitness(cfg, qcfg, params, out, images, fp_ref, scfg)
  record = {"generation": n, "best": fit, "gen_min": fit, "gen_mean": fit, "start": None,
            "evaluated": n, "reconstruction": rec}
  return out, [record], n, None


def unit_schedule(scfg: SearchConfig, order: tuple) -> list:
  """(pass, unit) in the order the strategy visits them: passes from the last unit
  (Evol-Q), or one pass from the first (reconstruction)."""
  if scfg.method.order == "first_last":
    return [(0, b) for b in order]
  return [(p, b) for p in range(scfg.passes) for b in reversed(order)]


def search(cfg, qcfg: QuantConfig, params, qparams, images, scfg: SearchConfig,
           seed: int = 0, workdir: Optional[str] = None, resume: bool = False,
           progress: bool = True, holdout=None, holdout_alpha: float = 0.05,
           holdout_rule: str = "last_unless_worse",
           on_unit: Optional[Callable] = None, hooks: Sequence[Hook] = (),
           on_block: Optional[Callable] = None) -> SearchResult:
  """Evol-Q: `scfg.passes` passes over the model's units (last to first); a
  reconstruction strategy (adaround): one pass, first to last.

  holdout: optional (images, labels) of training images that are not the
    calibration set. After every pass the quantized model is scored on them,
    and `holdout_rule` picks the result among the init (pass 0) and the passes
    with a one-sided sign test at `holdout_alpha` on the images they disagree
    on (selection.py): by default the last pass unless it is significantly
    worse than the init. The search itself always continues from the last pass.
  on_unit: optional callback(qparams, record) after every unit, e.g. for a
    budget curve; record has pass, unit, candidates and fitness. (on_block: its
    old name, deprecated.)
  hooks: more hooks (search/hooks.py), called after the default ones (held-out
    pick, progress, on_unit, checkpoint) around every unit.
  The result's `seconds` counts the time of earlier, interrupted parts of a
  resumed run too (up to their last checkpoint).
  """
  if scfg.radius == 0:
    scfg = dataclasses.replace(scfg, radius=paper_radius(qcfg.w_bits))
  selection.check_rule(holdout_rule)
  if on_block is not None:
    warnings.warn("search(on_block=...) is renamed on_unit=...", DeprecationWarning, stacklevel=2)
    on_unit = on_unit or on_block
  began = time.time()
  images = jnp.asarray(images)
  if len(images) < scfg.loss_batch:
    raise ValueError(f"{len(images)} calibration images are fewer than search.loss_batch="
                     f"{scfg.loss_batch}.")
  space, unit_list = scfg.space, units(cfg)
  recon = scfg.family == "reconstruction"
  if recon:  # every unit (or search.units), whatever its layers
    groups = tuple(dict.fromkeys(l.group for u in unit_list for l in u.layers))
    space = dataclasses.replace(space, layers=groups, acts=False)
  order = space.searched_units(unit_list)
  fp_ref = cache.fp_logits(cfg, params, images, lambda: reference_logits(cfg, params, images))
  schedule = unit_schedule(scfg, order)
  n_passes = schedule[-1][0] + 1
  pass_end = schedule[len(schedule) // n_passes - 1][1]  # a pass's last unit
  if recon:  # learned 0/1 per weight, from to-nearest
    qparams = adaround.with_rounding(params, qparams)
  run = Run(qparams, qparams, qparams, EngineState(), began)
  if resume and workdir:
    restored = ckpt.restore(workdir, qparams)
    if restored is not None:
      run.qparams, run.selected, saved = restored
      run.state = EngineState.from_json(saved)
  state = run.state
  if state.fitness_init is None:
    state.fitness_init = calibration_fitness(cfg, qcfg, params, run.qparams, images, fp_ref,
                                             scfg)
  scorer = functools.partial(selection.holdout_correct, cfg, qcfg, params)
  hooks = [*default_hooks(scorer, holdout, holdout_alpha, holdout_rule, n_passes, progress,
                          on_unit, workdir), *hooks]
  per_unit = (reconstruct.chunks(scfg) if recon
              else scfg.generations + scfg.method.scores_last_step)  # + its last step's score
  visit = reconstruct_block if recon else search_block
  for h in hooks:
    h.start(run, schedule, per_unit)

  def on_generation(rec):
    for h in hooks:
      h.on_generation(run, rec)

  for step in range(state.position, len(schedule)):
    p, b = schedule[step]
    for h in hooks:
      h.before_unit(run, p, b)
    key = jax.random.fold_in(jax.random.key(seed), step)
    pass_cfg = dataclasses.replace(scfg, lr=pass_lr(scfg.lr, scfg.lr_schedule, p, scfg.passes))
    run.qparams, records, n, carry = visit(cfg, qcfg, pass_cfg, params, run.qparams, images,
                                           fp_ref, b, key, on_generation,
                                           state.optimizer.get(str(b)))
    if scfg.carry_optimizer and carry is not None:
      state.optimizer[str(b)] = carry
    for rec in records:  # "evaluated" counts this unit's evaluations so far, its start included
      state.history.append({"pass": p, "unit": b, **rec,
                            "candidates": state.candidates + rec.pop("evaluated")})
    state.candidates += n
    state.position = step + 1
    for h in hooks:
      h.after_unit(run, p, b, b == pass_end)
  for h in hooks:
    h.end(run)
  result = run.selected if holdout is not None else run.qparams
  final = calibration_fitness(cfg, qcfg, params, result, images, fp_ref, scfg)
  return SearchResult(result, state.history, state.fitness_init, final, state.candidates,
                      run.seconds(), state.selected_pass if holdout is not None else n_passes,
                      state.holdout, run.qparams)
