"""Per-layer weight bit widths under a size budget (mixed precision).

A candidate gives every quantized layer a width from `bits.choices`; its size
is the average weight bits weighted by parameter count, which must stay at or
under `bits.w_budget` (and its BOPs, weight bits x activation bits x MACs,
under `bits.bops_budget` when set). Candidates over budget are repaired: a
random layer (drawn by parameter count) goes down one width until it fits.

Fitness is the search's loss (infoNCE by default) of the whole quantized
model against the FP logits on `bits.images` calibration images, each layer's
weights quantized at its width with min/max per-channel scales (and bias
correction when the recipe has it). The widths are traced values, not
compile-time constants, so a whole population is scored by one jitted,
vmapped program (in chunks of `bits.chunk` candidates).

Methods (`bits.method`):
  evolq        the paper's tournament over discrete choices: a pool, children
               bred from tournament winners by moving genes one width up or
               down, the worst dropped. Its first pool: the uniform assignment,
               the sensitivity fill and its mutants (bits.start=sensitivity,
               the default; random feasible assignments, bits.start=random,
               are nearly all useless);
  SimpleGA     evosax's GA on a continuous vector rounded to choice indices;
  sensitivity  HAWQ-like without the Hessian: each layer's loss increase when
               it alone goes down a width (all others at the widest choice),
               then a greedy fill by loss increase per bit saved;
  uniform      the widest single width within the budget;
  random       one random feasible assignment.
Layers the recipe pins keep their width and count in the budget: the 8-bit first
and last layers of quant.keep_ends_8bit (the papers' layout), and any layer that
quant.layer_bits names. The activations keep quant.a_bits (per-point activation
widths are not built).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from evolq_jax.losses import LOSSES, loss_batches
from evolq_jax.models.cost import layer_macs
from evolq_jax.models.forward import model_for
from evolq_jax.quant.bits import check_bits
from evolq_jax.quant.recipe import rule_bits
from evolq_jax.quant.uniform import dequantize, range_qparams
from evolq_jax.quant.weights import bias_correct, kernel_paths
from evolq_jax.search.fitness import forward_loss

METHODS = ("evolq", "SimpleGA", "sensitivity", "uniform", "random")
# The tournament's first pool, besides the uniform assignment: the sensitivity fill
# and its mutants, or random feasible assignments.
STARTS = ("sensitivity", "random")


@dataclasses.dataclass(frozen=True)
class BitsConfig:
  """The `bits.*` section: per-layer weight widths under a budget (0 = off)."""
  w_budget: float = 0.0       # average weight bits, weighted by parameter count; 0 = off
  choices: tuple = (2, 3, 4, 6, 8)
  bops_budget: float = 0.0    # G bit-operations per image (w bits x a bits x MACs); 0 = none
  method: str = "evolq"
  start: str = "sensitivity"  # the tournament's first pool: "sensitivity" or "random"
  generations: int = 20
  popsize: int = 16           # children per generation (evolq), lambda (SimpleGA)
  pool: int = 16              # the tournament's pool
  tournament: int = 4
  sigma: float = 0.5          # SimpleGA's mutation std, in choice indices
  images: int = 256           # calibration images the candidates are scored on
  loss_batch: int = 32
  chunk: int = 4              # candidates vmapped at once

  def __post_init__(self):
    object.__setattr__(self, "choices", tuple(sorted(set(self.choices))))
    for b in self.choices:
      check_bits(b, "bits.choices entry")
    if self.method not in METHODS:
      raise ValueError(f"bits.method={self.method!r} is unknown: expected one of {METHODS}.")
    if self.start not in STARTS:
      raise ValueError(f"bits.start={self.start!r} is unknown: expected one of {STARTS}.")
    if self.w_budget and not min(self.choices) <= self.w_budget:
      raise ValueError(f"bits.w_budget={self.w_budget!r} is below the narrowest choice "
                       f"{min(self.choices)}: no assignment fits; raise it or add narrower "
                       "bits.choices.")
    if self.w_budget < 0 or self.bops_budget < 0:
      raise ValueError(f"bits.w_budget={self.w_budget!r} and bits.bops_budget="
                       f"{self.bops_budget!r} must be >= 0 (0 = off / no limit).")
    for name in ("generations", "popsize", "images", "loss_batch", "chunk", "tournament"):
      if getattr(self, name) < 1:
        raise ValueError(f"bits.{name}={getattr(self, name)!r} must be >= 1.")
    if self.pool < 2:
      raise ValueError(f"bits.pool={self.pool!r} must be >= 2.")

  @property
  def on(self) -> bool:
    return self.w_budget > 0


def width_rules(bits: dict, w_bits: int) -> tuple:
  """QuantConfig.layer_bits for a width per layer ('/'-joined path -> bits; a
  BitsResult's, or one a summary recorded): the layers not at `w_bits`."""
  return tuple((re.escape(p), b) for p, b in sorted(bits.items()) if b != w_bits)


@dataclasses.dataclass
class BitsResult:
  """The chosen width per layer ('/'-joined path -> bits) and what it costs."""
  bits: dict
  method: str
  avg_bits: float
  size_bytes: int          # sum of params x bits / 8 (the widths' own size)
  export_code_bytes: int   # the export's packing: 2 codes a byte at <= 4 bits, else 1
  bops: float              # G bit-operations per image
  fitness: float
  evaluated: int
  seconds: float
  history: list = dataclasses.field(default_factory=list)

  def rules(self, w_bits: int) -> tuple:
    """QuantConfig.layer_bits for these widths (the layers not at `w_bits`)."""
    return width_rules(self.bits, w_bits)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


# --- the weights at traced widths ---------------------------------------------

def fake_quant_at(w, lo, hi, bits, signed: bool = False):
  """min/max per-channel fake quantization at a traced width (what calibrate_weights
  with the minmax observer then quantize_kernel compute at a static one)."""
  if signed:
    qmin, qmax = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1.0
  else:
    qmin, qmax = 0.0, 2.0 ** bits - 1.0
  scale, zp = range_qparams(lo, hi, qmin, qmax, signed)
  return dequantize(jnp.clip(jnp.round(w / scale) + zp, qmin, qmax), scale, zp)


def channel_ranges(params, paths) -> tuple:
  """Per layer: (min, max) of each output channel of its kernel."""
  flat = traverse_util.flatten_dict(params)
  out = []
  for path in paths:
    w = jnp.asarray(flat[path + ("kernel",)])
    axes = tuple(range(w.ndim - 1))
    out.append((jnp.min(w, axes), jnp.max(w, axes)))
  return tuple(out)


@functools.partial(jax.jit, static_argnums=tuple(range(7)))
def _population_loss(cfg, qcfg, paths, loss, temperature, loss_batch, chunk, widths, params,
                     ranges, acts, images, fp_ref):
  """Losses (P,) of P width assignments (P, L) (float widths, one per layer of `paths`),
  vmapped over `chunk` candidates at a time."""
  model = model_for(cfg, "quant", qcfg)
  flat = traverse_util.flatten_dict(params)

  def one(width):
    out = dict(flat)
    for i, path in enumerate(paths):
      w = flat[path + ("kernel",)]
      w_hat = fake_quant_at(w, ranges[i][0], ranges[i][1], width[i], qcfg.w_signed)
      out[path + ("kernel",)] = bias_correct(w, w_hat) if qcfg.bias_correction else w_hat
    p = traverse_util.unflatten_dict(out)
    return forward_loss(lambda x: model.apply({"params": p}, x, acts), images, fp_ref, loss,
                        temperature, loss_batch)

  return jax.lax.map(one, widths, batch_size=min(chunk, widths.shape[0]))


# --- budgets and repair ----------------------------------------------------------

def pinned_bits(qcfg, path) -> float:
  """The width the recipe's weight rules (quant.keep_ends_8bit's ends, then
  quant.layer_bits) give the layer at `path`, or NaN where no rule names it."""
  bits = rule_bits(qcfg.weight_rules, path)
  return np.nan if bits is None else float(bits)


class Problem:
  """The layers, their sizes and MACs, the budget, and the jitted scorer."""

  def __init__(self, cfg, qcfg, bcfg: BitsConfig, params, acts, images, fp_ref, loss="infonce",
               temperature: float = 3.0):
    if loss not in LOSSES:
      raise ValueError(f"loss={loss!r} is unknown: expected one of {LOSSES}.")
    self.cfg, self.qcfg, self.bcfg = cfg, qcfg, bcfg
    self.paths = tuple(kernel_paths(params))
    flat = traverse_util.flatten_dict(params)
    self.counts = np.array([np.size(flat[p + ("kernel",)]) for p in self.paths], np.float64)
    macs = layer_macs(cfg)
    self.macs = np.array([macs.get(p, 0) for p in self.paths], np.float64)
    self.choices = np.array(bcfg.choices, np.float64)
    # layers the recipe pins (quant.keep_ends_8bit's ends, quant.layer_bits): kept at
    # their width, counted in the budget, never moved (NaN = chosen by the search)
    self.pinned = np.array([pinned_bits(qcfg, p) for p in self.paths], np.float64)
    self.free = np.isnan(self.pinned)
    n = min(bcfg.images, len(images))
    loss_batches(n, bcfg.loss_batch)  # enough images for one loss batch
    self.args = (params, channel_ranges(params, self.paths), acts, jnp.asarray(images[:n]),
                 jnp.asarray(fp_ref[:n]))
    self.static = (cfg, qcfg, self.paths, loss, temperature, bcfg.loss_batch, bcfg.chunk)
    self.evaluated = 0
    self._check_reachable()

  def _check_reachable(self):
    narrowest = np.zeros(len(self.paths), int)
    if not np.any(self.free):
      raise ValueError("bits.w_budget is set, but the recipe pins every layer's width "
                       "(quant.layer_bits / quant.keep_ends_8bit): nothing is left to choose.")
    pins = (f" with the pinned layers ({int(np.sum(~self.free))}, quant.keep_ends_8bit / "
            "quant.layer_bits) at their widths" if not np.all(self.free) else "")
    if self.avg_bits(narrowest) > self.bcfg.w_budget + 1e-9:
      raise ValueError(f"bits.w_budget={self.bcfg.w_budget} is below the smallest average "
                       f"width, {self.avg_bits(narrowest):.3f}: every searched layer at "
                       f"{self.bcfg.choices[0]} bits{pins}. Raise it.")
    if not self.feasible(narrowest):
      raise ValueError(f"bits.bops_budget={self.bcfg.bops_budget} G is below the BOPs of every "
                       f"layer at {self.bcfg.choices[0]} bits{pins} "
                       f"({self.bops(narrowest):.3g} G): raise it.")

  def widths(self, idx) -> np.ndarray:
    return np.where(self.free, self.choices[np.asarray(idx)], self.pinned)

  def avg_bits(self, idx) -> float:
    return float(np.sum(self.widths(idx) * self.counts) / np.sum(self.counts))

  def bops(self, idx) -> float:
    return float(np.sum(self.widths(idx) * self.qcfg.a_bits * self.macs) / 1e9)

  def feasible(self, idx) -> bool:
    ok = self.avg_bits(idx) <= self.bcfg.w_budget + 1e-9
    return ok and (not self.bcfg.bops_budget or self.bops(idx) <= self.bcfg.bops_budget + 1e-9)

  def repair(self, idx, rng) -> np.ndarray:
    """Lower random layers (drawn by parameter count) one width until idx fits."""
    idx = np.array(idx, int)
    while not self.feasible(idx):
      above = np.flatnonzero((idx > 0) & self.free)
      weight = self.counts[above] / np.sum(self.counts[above])
      idx[rng.choice(above, p=weight)] -= 1
    return idx

  def score(self, population) -> np.ndarray:
    """Losses of a population of choice-index vectors (P, L)."""
    widths = jnp.asarray(self.widths(np.atleast_2d(population)), jnp.float32)
    self.evaluated += widths.shape[0]
    return np.asarray(_population_loss(*self.static, widths, *self.args))

  def result(self, idx, method, fitness, seconds, history) -> BitsResult:
    idx = np.asarray(idx)
    w = self.widths(idx)
    return BitsResult(
        bits={"/".join(p): int(b) for p, b in zip(self.paths, w)}, method=method,
        avg_bits=self.avg_bits(idx), size_bytes=int(math.ceil(np.sum(self.counts * w) / 8)),
        export_code_bytes=int(np.sum(np.where(w <= 4, np.ceil(self.counts / 2), self.counts))),
        bops=self.bops(idx), fitness=float(fitness), evaluated=self.evaluated, seconds=seconds,
        history=history)


# --- the methods -----------------------------------------------------------------

def uniform_index(problem: Problem) -> np.ndarray:
  """All layers at the widest single choice that fits (the narrowest if none does)."""
  n = len(problem.paths)
  for i in reversed(range(len(problem.choices))):
    idx = np.full(n, i)
    if problem.feasible(idx):
      return idx
  return np.zeros(n, int)


def _mutate(problem: Problem, parent: np.ndarray, rng) -> np.ndarray:
  """Each free layer moves one width up or down with probability 2 / free layers (at
  least one moves), then the budget is repaired."""
  free = np.flatnonzero(problem.free)  # the layers no rule pins
  n = len(free)
  child = parent.copy()
  moved = rng.random(n) < 2.0 / n
  moved[rng.integers(n)] = True
  child[free[moved]] += rng.choice((-1, 1), int(moved.sum()))
  return problem.repair(np.clip(child, 0, len(problem.choices) - 1), rng)


def _tournament(problem: Problem, rng, bar, seed: np.ndarray | None = None) -> tuple:
  """The tournament over choice indices. Its first pool: the uniform assignment,
  then `seed` (the sensitivity fill) and its mutants, or without a seed random
  feasible assignments."""
  b, n = problem.bcfg, len(problem.paths)
  if seed is None:
    rest = [problem.repair(rng.integers(0, len(problem.choices), n), rng)
            for _ in range(b.pool - 1)]
  else:
    rest = [seed] + [_mutate(problem, seed, rng) for _ in range(b.pool - 2)]
  pool = np.stack([uniform_index(problem)] + rest)
  fit = problem.score(pool)
  history = []
  for g in range(b.generations):
    picks = rng.integers(0, b.pool, (b.popsize, b.tournament))
    parents = pool[picks[np.arange(b.popsize), np.argmin(fit[picks], axis=1)]]
    children = np.stack([_mutate(problem, parent, rng) for parent in parents])
    f = problem.score(children)
    pool, fit = np.concatenate([pool, children]), np.concatenate([fit, f])
    keep = np.argsort(fit, kind="stable")[:b.pool]
    pool, fit = pool[keep], fit[keep]
    history.append({"generation": g, "best": float(fit[0]), "gen_min": float(f.min()),
                    "gen_mean": float(f.mean()), "evaluated": problem.evaluated})
    bar.update(1)
    bar.set_postfix(best=f"{fit[0]:.4f}")
  return pool[0], float(fit[0]), history


def _simple_ga(problem: Problem, rng, bar, seed: int) -> tuple:
  import evosax.algorithms as algorithms
  import optax
  b, n = problem.bcfg, len(problem.paths)
  hi = len(problem.choices) - 1
  es = algorithms.SimpleGA(population_size=b.popsize, solution=jnp.zeros((n,)),
                           std_schedule=optax.constant_schedule(b.sigma))
  params = es.default_params
  key = jax.random.key(seed)
  start = np.stack([uniform_index(problem)] + [problem.repair(rng.integers(0, hi + 1, n), rng)
                                                for _ in range(b.popsize - 1)])
  f0 = problem.score(start)
  state = es.init(key, jnp.asarray(start, jnp.float32), jnp.asarray(f0), params)
  best_i = int(np.argmin(f0))
  best, best_f, history = start[best_i], float(f0[best_i]), []
  for g in range(b.generations):
    key, k_ask, k_tell = jax.random.split(key, 3)
    z, state = es.ask(k_ask, state, params)
    idx = np.stack([problem.repair(np.clip(np.round(np.asarray(v)), 0, hi).astype(int), rng)
                    for v in z])
    f = problem.score(idx)
    state, _ = es.tell(k_tell, z, jnp.asarray(f), state, params)
    i = int(np.argmin(f))
    if f[i] < best_f:
      best, best_f = idx[i], float(f[i])
    history.append({"generation": g, "best": best_f, "gen_min": float(f.min()),
                    "gen_mean": float(f.mean()), "evaluated": problem.evaluated})
    bar.update(1)
    bar.set_postfix(best=f"{best_f:.4f}")
  return best, best_f, history


def sensitivity_deltas(problem: Problem) -> np.ndarray:
  """(L, choices) loss increase when layer i alone is at choice c, the others at the
  widest (0 at the widest): (choices - 1) x L + 1 evaluations, budget-independent."""
  n, top = len(problem.paths), len(problem.choices) - 1
  base = np.full(n, top)
  singles = [(i, c) for i in np.flatnonzero(problem.free) for c in range(top)]
  pop = np.stack([base] + [np.where(np.arange(n) == i, c, base) for i, c in singles])
  fits = problem.score(pop)
  delta = np.zeros((n, top + 1))
  for (i, c), f in zip(singles, fits[1:]):
    delta[i, c] = f - fits[0]
  return delta


def sensitivity(problem: Problem, delta=None) -> tuple:
  """-> (the greedy fill's indices, {'/'-path: {bits: loss increase}}): from all layers
  at the widest, lower the layer whose next width down costs the least loss per bit
  saved, until the budget holds. delta: sensitivity_deltas' (computed if None)."""
  n, top = len(problem.paths), len(problem.choices) - 1
  delta = sensitivity_deltas(problem) if delta is None else delta
  idx = np.full(n, top)
  while not problem.feasible(idx):
    above = np.flatnonzero((idx > 0) & problem.free)
    cost = [(delta[i, idx[i] - 1] - delta[i, idx[i]])
            / (problem.counts[i] * (problem.choices[idx[i]] - problem.choices[idx[i] - 1]))
            for i in above]
    idx[above[int(np.argmin(cost))]] -= 1
  table = {"/".join(p): {int(problem.choices[c]): float(delta[i, c]) for c in range(top)}
           for i, p in enumerate(problem.paths) if problem.free[i]}
  return idx, table


def _deltas(problem: Problem, cache: dict | None) -> np.ndarray:
  """sensitivity_deltas, kept in `cache` (choose_bits' `deltas`) across calls."""
  if cache is None:
    return sensitivity_deltas(problem)
  if "table" not in cache:
    cache["table"] = sensitivity_deltas(problem)
  return cache["table"]


def choose_bits(cfg, qcfg, bcfg: BitsConfig, params, acts, images, fp_ref, seed: int = 0,
                loss: str = "infonce", temperature: float = 3.0, progress: bool = True,
                deltas: dict | None = None) -> BitsResult:
  """The per-layer widths of `bcfg.method` under the budget (see the module doc).
  deltas: a dict that keeps the sensitivity table across calls of one model and
  setting (it does not depend on the budget)."""
  if not bcfg.on:
    raise ValueError("bits.w_budget is 0 (off): set it, e.g. --set bits.w_budget=4.5.")
  start = time.time()
  problem = Problem(cfg, qcfg, bcfg, params, acts, images, fp_ref, loss, temperature)
  rng = np.random.default_rng(seed)
  history, extra = [], {}
  with tqdm(total=bcfg.generations if bcfg.method in ("evolq", "SimpleGA") else 0,
            disable=not progress, desc=f"bits ({bcfg.method})") as bar:
    if bcfg.method == "evolq":
      seed_idx = None
      if bcfg.start == "sensitivity":
        seed_idx, _ = sensitivity(problem, _deltas(problem, deltas))
      idx, fit, history = _tournament(problem, rng, bar, seed_idx)
    elif bcfg.method == "SimpleGA":
      idx, fit, history = _simple_ga(problem, rng, bar, seed)
    else:
      if bcfg.method == "sensitivity":
        idx, extra = sensitivity(problem, _deltas(problem, deltas))
      elif bcfg.method == "uniform":
        idx = uniform_index(problem)
      else:
        idx = problem.repair(rng.integers(0, len(problem.choices), len(problem.paths)), rng)
      fit = float(problem.score(idx[None])[0])
  out = problem.result(idx, bcfg.method, fit, time.time() - start, history)
  if extra:
    out.history = [{"sensitivity": extra}]
  return out
