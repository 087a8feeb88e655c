"""The block-wise search: passes over the attention blocks, last to first.

For each block: cache the prefix tokens, score the current scales, run the
strategy for `generations` generations (ask -> population fitness -> tell),
and keep the best candidate only if it beats the current scales (block-level
elitism: calibration fitness never gets worse). An orbax checkpoint is written
after every block, so a killed run resumes to the same result.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from evolq_jax.config import QuantConfig
from evolq_jax.losses import LOSSES, batched_loss
from evolq_jax.models.forward import quantize_params, quantized_logits
from evolq_jax.models.presets import ViTConfig
from evolq_jax.search import checkpoint as ckpt
from evolq_jax.search.fitness import (in_batches, population_scorer, prefix_activations,
                                      reference_logits)
from evolq_jax.search.gradient import GRADIENT_METHODS, gradient_block_search
from evolq_jax.search.space import SearchSpace, block_scales, set_block_scales
from evolq_jax.search.strategies import STRATEGIES, make_strategy, paper_radius


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """The search's settings; defaults are the reference's (P=10, K=3, pool 15)."""
  strategy: str = "evolq"
  loss: str = "infonce"
  temperature: float = 3.0
  passes: int = 10
  generations: int = 3
  population: int = 15
  tournament: int = 10
  children: int = 1
  radius: float = 0.0        # 0: the paper's r for the weight bits
  sigma: float = 0.02        # evosax / gradient: relative step size
  param: str = "log"
  layers: tuple = ("qkv", "proj")
  acts: bool = False
  loss_batch: int = 100
  chunk: int = 0             # candidates vmapped at once; 0 = the whole population
  memory_mb: float = 0.0     # > 0: pick chunk so a device's scoring fits in this many MiB
  devices: int = 0           # population split over jax.devices()[:devices]; 0 = all, 1 = off

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(self.layers))  # hashable: a jit static arg
    if self.strategy not in STRATEGIES + GRADIENT_METHODS:
      raise ValueError(f"search.strategy={self.strategy!r} is unknown: expected one of "
                       f"{STRATEGIES + GRADIENT_METHODS}.")
    if self.loss not in LOSSES:
      raise ValueError(f"search.loss={self.loss!r} is unknown: expected one of {LOSSES}.")
    if not self.temperature > 0:
      raise ValueError(f"search.temperature={self.temperature!r} must be > 0 (paper: 3.0).")
    if self.population < 2:
      raise ValueError(f"search.population={self.population} must be >= 2 (paper: 15).")
    if self.radius < 0:
      raise ValueError(f"search.radius={self.radius!r} must be >= 0 (0 = the paper's r).")
    if self.chunk < 0 or self.memory_mb < 0 or self.devices < 0:
      raise ValueError(f"search.chunk={self.chunk}, search.memory_mb={self.memory_mb} and "
                       f"search.devices={self.devices} must be >= 0 (0 = default).")
    if self.chunk and self.memory_mb:
      raise ValueError(f"search.chunk={self.chunk} and search.memory_mb={self.memory_mb} are "
                       "both set: give a fixed chunk or a memory budget to choose it, not both.")
    for name in ("passes", "generations", "children", "loss_batch"):
      if getattr(self, name) < 1:
        raise ValueError(f"search.{name}={getattr(self, name)!r} must be >= 1.")
    SearchSpace(self.layers, self.acts)

  @property
  def space(self) -> SearchSpace:
    return SearchSpace(self.layers, self.acts)


@dataclasses.dataclass
class SearchResult:
  """qparams: the result (the held-out pick when a held-out split was given,
  else the last pass). selected_pass: 0 = the FQ-ViT init, p = after pass p.
  holdout: per pass (init first) {"pass", "holdout_top1", "fitness", "fixed",
  "broken", "p_value"}: images the pass gets right that the init got wrong and
  the reverse, and the sign test's p-value of that split."""
  qparams: object
  history: list
  fitness_init: float
  fitness_final: float
  candidates: int
  seconds: float
  selected_pass: int = -1
  holdout: list = dataclasses.field(default_factory=list)
  last_qparams: object = None


def calibration_fitness(cfg: ViTConfig, qcfg: QuantConfig, params, qparams, images, fp_ref,
                        scfg: SearchConfig, batch_size: int = 100) -> float:
  """The search's loss for the whole quantized model (full forward)."""
  q = in_batches(lambda x: _quantized(cfg, qcfg, params, qparams, x), images, batch_size)
  return float(batched_loss(scfg.loss, q, fp_ref, scfg.loss_batch, scfg.temperature))


_quantized = jax.jit(quantized_logits, static_argnums=(0, 1))  # compiled once per config


@functools.lru_cache(maxsize=64)
def _jitted_strategy(scfg: SearchConfig, num_dims: int, radius: float):
  s = make_strategy(scfg.strategy, num_dims, population=scfg.population,
                    tournament=scfg.tournament, children=scfg.children, radius=radius,
                    sigma=scfg.sigma, param=scfg.param)
  return s._replace(init=jax.jit(s.init), ask=jax.jit(s.ask), tell=jax.jit(s.tell))


def search_block(cfg, qcfg, scfg: SearchConfig, params, qparams, images, fp_ref, block: int,
                 key, on_generation: Optional[Callable] = None):
  """Search one block's scales. -> (qparams, records, candidates evaluated)."""
  tokens = prefix_activations(cfg, qcfg, params, qparams, images, block)
  fq = quantize_params(qcfg, params, qparams)
  vec0, layout = block_scales(qparams, block, scfg.space, qcfg.log2_softmax)
  score = population_scorer(cfg, qcfg, scfg, block, layout, params, fq, qparams, tokens, fp_ref)
  f0 = float(score(vec0[None])[0])
  if scfg.strategy in GRADIENT_METHODS:
    best_vec, records, n = gradient_block_search(
        cfg, qcfg, scfg, params, fq, qparams, tokens, fp_ref, block, layout, vec0, f0,
        on_generation)
  else:
    radius = scfg.radius or paper_radius(qcfg.w_bits)
    best_vec, records, n = _evolve(scfg, radius, score, vec0, f0, key, on_generation)
  return set_block_scales(qparams, block, best_vec, layout), records, n + 1


def _evolve(scfg, radius, score, vec0, f0, key, on_generation):
  strategy = _jitted_strategy(scfg, int(vec0.shape[0]), float(radius))
  key, k_init = jax.random.split(key)
  state = strategy.init(k_init, vec0, jnp.float32(f0))
  best_vec, best_f, records, n = vec0, f0, [], 0
  for g in range(scfg.generations):
    key, k_ask, k_tell = jax.random.split(key, 3)
    pop, state = strategy.ask(k_ask, state)
    fit = score(pop)
    state = strategy.tell(k_tell, pop, fit, state)
    fit_np = np.asarray(fit)
    n += len(fit_np)
    i = int(np.argmin(fit_np))
    if fit_np[i] < best_f:  # elitism: only a strictly better candidate replaces
      best_vec, best_f = pop[i], float(fit_np[i])
    rec = {"generation": g, "best": best_f, "gen_min": float(fit_np.min()),
           "gen_mean": float(fit_np.mean()), "start": f0, "evaluated": n + 1}
    records.append(rec)
    if on_generation:
      on_generation(rec)
  return best_vec, records, n


def holdout_correct(cfg: ViTConfig, qcfg: QuantConfig, params, qparams, holdout,
                    batch_size: int = 500) -> np.ndarray:
  """Per held-out image: does the quantized model get it right? (bool (N,))"""
  x, y = holdout
  logits = in_batches(lambda b: _quantized(cfg, qcfg, params, qparams, b), jnp.asarray(x),
                      batch_size)
  return np.asarray(jnp.argmax(logits, -1)) == np.asarray(y)


def sign_test(fixed: int, broken: int) -> float:
  """One-sided exact McNemar / sign test: P(at least `fixed` of the fixed+broken
  changed images go the right way | no real difference)."""
  n = fixed + broken
  return sum(math.comb(n, k) for k in range(fixed, n + 1)) / 2 ** n if n else 1.0


def _pick(records: list, alpha: float) -> int:
  """The pass to keep: the best held-out top-1 among the passes significantly
  better than the init (sign test p < alpha; alpha >= 1: no test); else 0."""
  ok = [r for r in records[1:] if alpha >= 1 or r["p_value"] < alpha]
  best = max(ok, key=lambda r: r["holdout_top1"], default=records[0])  # first max: earliest
  return best["pass"] if best["holdout_top1"] > records[0]["holdout_top1"] else 0


def search(cfg: ViTConfig, qcfg: QuantConfig, params, qparams, images, scfg: SearchConfig,
           seed: int = 0, workdir: Optional[str] = None, resume: bool = False,
           progress: bool = True, holdout=None, holdout_alpha: float = 0.05,
           on_block: Optional[Callable] = None) -> SearchResult:
  """Evol-Q: `scfg.passes` passes over the blocks (last to first).

  holdout: optional (images, labels) of training images that are not the
    calibration set. After every pass the quantized model is scored on them;
    the result is the best pass among those whose gain over the FQ-ViT init
    (pass 0) passes a one-sided sign test on the images they disagree on
    (p < holdout_alpha; 1.0 = no test), else the init. A 2,000-image split
    cannot tell a 0.1-point change from noise, so without the test the pick
    can land below the init on fresh data. The search itself always
    continues from the last pass.
  on_block: optional callback(qparams, record) after every block, e.g. for a
    budget curve; record has pass, block, candidates and fitness.
  """
  if scfg.radius == 0:
    scfg = dataclasses.replace(scfg, radius=paper_radius(qcfg.w_bits))
  start_time = time.time()
  images = jnp.asarray(images)
  if len(images) < scfg.loss_batch:
    raise ValueError(f"{len(images)} calibration images are fewer than search.loss_batch="
                     f"{scfg.loss_batch}.")
  fp_ref = reference_logits(cfg, params, images)
  schedule = [(p, b) for p in range(scfg.passes) for b in reversed(range(cfg.depth))]
  state = {"position": 0, "history": [], "candidates": 0, "elapsed": 0.0,
           "fitness_init": None, "holdout": [], "selected_pass": 0}
  selected = qparams_init = qparams
  if resume and workdir:
    restored = ckpt.restore(workdir, qparams)
    if restored is not None:
      qparams, selected, state = restored
  if state["fitness_init"] is None:
    state["fitness_init"] = calibration_fitness(cfg, qcfg, params, qparams, images, fp_ref, scfg)
  if holdout is not None:
    init_correct = holdout_correct(cfg, qcfg, params, qparams_init, holdout)
    if not state["holdout"]:
      state["holdout"] = [{"pass": 0, "holdout_top1": 100.0 * float(init_correct.mean()),
                           "fitness": state["fitness_init"], "fixed": 0, "broken": 0,
                           "p_value": 1.0}]
  bar = tqdm(total=len(schedule) * scfg.generations, initial=state["position"] * scfg.generations,
             disable=not progress, desc="search")
  for step in range(state["position"], len(schedule)):
    p, b = schedule[step]
    bar.set_description(f"pass {p + 1}/{scfg.passes} block {b}")

    def on_generation(rec):
      bar.update(1)
      bar.set_postfix(best=f"{rec['best']:.4f}")

    key = jax.random.fold_in(jax.random.key(seed), step)
    qparams, records, n = search_block(cfg, qcfg, scfg, params, qparams, images, fp_ref, b, key,
                                       on_generation)
    for rec in records:  # "evaluated" counts this block's candidates, its start included
      state["history"].append({"pass": p, "block": b, **rec,
                               "candidates": state["candidates"] + rec.pop("evaluated")})
    state["candidates"] += n
    state["position"] = step + 1
    if holdout is not None and b == 0:  # a pass ends with block 0
      correct = holdout_correct(cfg, qcfg, params, qparams, holdout)
      fixed, broken = int(np.sum(correct & ~init_correct)), int(np.sum(init_correct & ~correct))
      state["holdout"].append({"pass": p + 1, "holdout_top1": 100.0 * float(correct.mean()),
                               "fitness": state["history"][-1]["best"], "fixed": fixed,
                               "broken": broken, "p_value": sign_test(fixed, broken)})
      top1 = state["holdout"][-1]["holdout_top1"]
      pick = _pick(state["holdout"], holdout_alpha)
      if pick != state["selected_pass"]:
        selected = qparams if pick == p + 1 else qparams_init
        state["selected_pass"] = pick
      if progress:
        bar.write(f"pass {p + 1}: held-out top-1 {top1:.2f} (selected: pass "
                  f"{state['selected_pass']})")
    if on_block:
      on_block(qparams, {"pass": p, "block": b, "candidates": state["candidates"],
                         "fitness": state["history"][-1]["best"]})
    if workdir:
      ckpt.save(workdir, qparams, {**state, "elapsed": state["elapsed"] + time.time() - start_time},
                selected)
  bar.close()
  result = selected if holdout is not None else qparams
  final = calibration_fitness(cfg, qcfg, params, result, images, fp_ref, scfg)
  return SearchResult(result, state["history"], state["fitness_init"], final,
                      state["candidates"], time.time() - start_time,
                      state["selected_pass"] if holdout is not None else scfg.passes,
                      state["holdout"], qparams)
