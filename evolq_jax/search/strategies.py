"""Search strategies behind one evosax-like interface (fitness is minimized).

  state = strategy.init(key, scales0, fitness0)
  x, state = strategy.ask(key, state)                 # (lambda, D) search points
  scales = strategy.to_scales(state, x)               # (lambda, D) scale vectors
  state, metrics = strategy.tell(key, x, fitness, state, grad)

`grad` is d fitness / d x (through to_scales), given only to strategies with
`needs_grad` (the Adam/SGD baselines, `gradient.py`); the others get None.

`evolq` is the paper's tournament search, made generation-parallel: each
generation breeds `children` (lambda) children scored in one batched pass;
children=1 is the reference's steady-state cycle. Every evosax algorithm is
wrapped the same way, searching in a parameterization relative to the unit's
starting scales (log by default) so that step sizes are relative.

`adaround` is of another family: block reconstruction with learned rounding
(search/reconstruct.py), one pass from the first unit; the engine runs it in
place of ask/tell.

Every strategy name is a `Method` in REGISTRY (as evosax registers its
algorithms): its family, the check of the settings it reads, how it is built
from a SearchConfig, how many evaluations a generation costs, and whether its
last step is scored after the loop. A new strategy is one `register` call.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from evolq_jax.search import gradient

TOURNAMENT = ("evolq", "random")
EVOSAX = ("Sep_CMA_ES", "CMA_ES", "SNES", "Open_ES", "SimpleGA", "xNES", "PGPE", "MA_ES")
GRADIENT = gradient.METHODS
PARAMS = ("log", "relative")
STEPS = ("absolute", "relative")


def _identity(state, x):
  return x


class Strategy(NamedTuple):
  init: Callable
  ask: Callable
  tell: Callable
  population_size: int
  to_scales: Callable = _identity
  needs_grad: bool = False


def paper_radius(w_bits: int) -> float:
  """The reference's absolute perturbation radius r: 1e-3 at 3/4 bits, 1e-4 at 8."""
  return 1e-4 if w_bits >= 8 else 1e-3


# --- the paper's tournament search -------------------------------------------

class EvolQState(NamedTuple):
  pool: jax.Array      # (M, D)
  fitness: jax.Array   # (M,)


def evolq(pool_size: int = 15, tournament: int = 10, children: int = 1,
          radius: float = 1e-3, relative: bool = False) -> Strategy:
  """The paper's tournament search (settings checked by its registry entry)."""
  _check_radius(radius)

  def init(key, scales0, fitness0):
    return EvolQState(jnp.tile(scales0[None], (pool_size, 1)),
                      jnp.full((pool_size,), fitness0, jnp.float32))

  def ask(key, state):
    k_pick, k_noise = jax.random.split(key)
    picks = jax.random.randint(k_pick, (children, tournament), 0, pool_size)  # with replacement
    winners = picks[jnp.arange(children), jnp.argmin(state.fitness[picks], axis=1)]
    parents = state.pool[winners]
    return _mutate(k_noise, parents, radius, relative), state

  def tell(key, population, fitness, state, grad=None):
    pool = jnp.concatenate([state.pool, population])
    fit = jnp.concatenate([state.fitness, fitness])
    keep = jnp.argsort(fit, stable=True)[:pool_size]  # the worst are dropped
    return EvolQState(pool[keep], fit[keep]), {"pool_best": fit[keep][0]}

  return Strategy(init, ask, tell, children)


def _check_radius(radius: float) -> None:
  """The step the tournament strategies are built with: the engine turns
  search.radius=0 into the paper's r before building."""
  if not radius > 0:
    raise ValueError(f"search.radius={radius!r} must be > 0 (the paper: 1e-3 at 3/4-bit, "
                     "1e-4 at 8-bit; 0 picks those).")


def _mutate(key, parents, radius: float, relative: bool):
  """|parent + U(-r, r)| (the paper's absolute step), or |parent * (1 + U(-r, r))|."""
  noise = jax.random.uniform(key, parents.shape, minval=-radius, maxval=radius)
  return jnp.abs(parents * (1.0 + noise) if relative else parents + noise)


def random_search(children: int = 1, radius: float = 1e-3, relative: bool = False) -> Strategy:
  """The no-selection baseline: every child is |start + U(-r, r)|, the same
  mutation as `evolq`'s but always around the block's starting scales."""
  _check_radius(radius)

  def init(key, scales0, fitness0):
    return scales0

  def ask(key, state):
    return _mutate(key, jnp.tile(state[None], (children, 1)), radius, relative), state

  def tell(key, population, fitness, state, grad=None):
    return state, {}

  return Strategy(init, ask, tell, children)


# --- evosax algorithms ---------------------------------------------------------

class WrappedState(NamedTuple):
  inner: Any
  scales0: jax.Array


def _encode(param, scales, scales0):
  return jnp.log(scales / scales0) if param == "log" else scales / scales0 - 1.0


def _decode(param, z, scales0):
  return scales0 * (jnp.exp(z) if param == "log" else jnp.abs(1.0 + z))


def evosax_strategy(name: str, population_size: int, num_dims: int, sigma: float = 0.02,
                    param: str = "log") -> Strategy:
  """An evosax algorithm on z, with scales = scales0 * exp(z) (or * (1 + z))."""
  import evosax.algorithms as algorithms  # settings checked by its registry entry
  cls = getattr(algorithms, name)
  dummy = jnp.zeros((num_dims,))
  population_based = name == "SimpleGA"
  if population_based:
    es = cls(population_size=population_size, solution=dummy,
             std_schedule=optax.constant_schedule(sigma))
  elif name in ("Open_ES", "PGPE"):
    es = cls(population_size=population_size, solution=dummy,
             std_schedule=optax.constant_schedule(sigma), optimizer=optax.adam(sigma))
  elif name == "SNES":
    es = cls(population_size=population_size, solution=dummy, optimizer=optax.sgd(1.0))
  else:
    es = cls(population_size=population_size, solution=dummy)
  params = es.default_params
  if hasattr(params, "std_init"):
    params = params.replace(std_init=sigma)

  def init(key, scales0, fitness0):
    if population_based:
      pop = jnp.zeros((population_size, num_dims))
      inner = es.init(key, pop, jnp.full((population_size,), fitness0), params)
    else:
      inner = es.init(key, jnp.zeros((num_dims,)), params)
    return WrappedState(inner, scales0)

  def ask(key, state):
    z, inner = es.ask(key, state.inner, params)
    return _decode(param, z, state.scales0), WrappedState(inner, state.scales0)

  def tell(key, population, fitness, state, grad=None):
    z = _encode(param, population, state.scales0)
    inner, metrics = es.tell(key, z, fitness, state.inner, params)
    return WrappedState(inner, state.scales0), metrics

  return Strategy(init, ask, tell, population_size)


# --- the registry ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Method:
  """What a strategy name owns (the engine and SearchConfig ask it, by name)."""
  name: str
  family: str               # "tournament" | "evosax" | "gradient" | "reconstruction"
  build: Optional[Callable]  # (scfg, num_dims, radius) -> Strategy; None: not ask/tell
  check: Callable           # scfg -> None; a ValueError names the search.* field
  per_generation: Callable  # scfg -> candidates scored per generation
  scores_last_step: bool = False  # its last update is scored once more after the loop
  # "last_first": passes over the units from the last (Evol-Q); "first_last": one pass
  # from the first, each unit learned on its reconstructed predecessors' outputs
  order: str = "last_first"


REGISTRY: dict = {}


def register(method: Method) -> Method:
  REGISTRY[method.name] = method
  return method


def method(name: str) -> Method:
  if name not in REGISTRY:
    raise ValueError(f"search.strategy={name!r} is unknown: expected one of {tuple(REGISTRY)}.")
  return REGISTRY[name]


def _at_least(scfg, minimum: int, *names) -> None:
  for name in names:
    if getattr(scfg, name) < minimum:
      raise ValueError(f"search.{name}={getattr(scfg, name)!r} must be >= {minimum}"
                       + (" (paper: 15)." if name == "pool" else "."))


def _check_tournament(scfg) -> None:
  _at_least(scfg, 2, "pool")
  _at_least(scfg, 1, "tournament", "children")
  if scfg.radius < 0:
    raise ValueError(f"search.radius={scfg.radius!r} must be >= 0 (0 = the paper's r).")
  if scfg.step not in STEPS:
    raise ValueError(f"search.step={scfg.step!r} is unknown: expected one of {STEPS}.")
  if scfg.step == "relative" and scfg.radius == 0:
    raise ValueError("search.step='relative' needs search.radius > 0, a fraction of each "
                     "scale (e.g. 0.0346: a uniform step with the std of evosax's sigma=0.02).")


def _one_child(scfg, instead: str) -> None:
  if scfg.children != 1:
    raise ValueError(f"search.children={scfg.children} applies to the tournament strategies "
                     f"{TOURNAMENT}; {scfg.strategy!r} takes {instead}")


def _check_evosax(scfg) -> None:
  _one_child(scfg, "search.popsize (its lambda).")
  _at_least(scfg, 2, "popsize")
  if not scfg.sigma > 0:
    raise ValueError(f"search.sigma={scfg.sigma!r} must be > 0 (relative step size, e.g. 0.02).")
  if scfg.param not in PARAMS:
    raise ValueError(f"search.param={scfg.param!r} is unknown: expected one of {PARAMS}.")


def _check_gradient(scfg) -> None:
  _one_child(scfg, "one step a generation: set search.generations.")
  if not scfg.lr > 0:
    raise ValueError(f"search.lr={scfg.lr!r} must be > 0.")
  if scfg.lr_schedule not in gradient.LR_SCHEDULES:
    raise ValueError(f"search.lr_schedule={scfg.lr_schedule!r} is unknown: expected one of "
                     f"{gradient.LR_SCHEDULES} (cosine lowers search.lr over the passes).")


register(Method("evolq", "tournament",
                lambda s, dims, radius: evolq(s.pool, s.tournament, s.children, radius,
                                              s.step == "relative"),
                _check_tournament, lambda s: s.children))
register(Method("random", "tournament",
                lambda s, dims, radius: random_search(s.children, radius, s.step == "relative"),
                _check_tournament, lambda s: s.children))
for _name in EVOSAX:
  register(Method(_name, "evosax",
                  lambda s, dims, radius, _name=_name: evosax_strategy(_name, s.popsize, dims,
                                                                       s.sigma, s.param),
                  _check_evosax, lambda s: s.popsize))
for _name in GRADIENT:
  register(Method(_name, "gradient",
                  lambda s, dims, radius, _name=_name: Strategy(
                      *gradient.optax_strategy(_name, s.lr), population_size=1,
                      to_scales=gradient.to_scales, needs_grad=True),
                  _check_gradient, lambda s: 1, scores_last_step=True))


def _check_reconstruction(scfg) -> None:
  for name in ("recon_iters", "recon_batch"):
    if getattr(scfg, name) < 1:
      raise ValueError(f"search.{name}={getattr(scfg, name)!r} must be >= 1 (the papers: "
                       "20,000 steps per block on batches of 32 images).")
  if not scfg.round_lr > 0:
    raise ValueError(f"search.round_lr={scfg.round_lr!r} must be > 0 (AdaRound: 1e-3).")


register(Method("adaround", "reconstruction", None, _check_reconstruction,
                lambda s: 1, order="first_last"))
STRATEGIES = tuple(REGISTRY)


def build(scfg, num_dims: int, radius: float) -> Strategy:
  """The strategy `scfg.strategy` with scfg's settings, on num_dims scales."""
  m = method(scfg.strategy)
  if m.build is None:
    raise ValueError(f"search.strategy={scfg.strategy!r} ({m.family}) is not an ask/tell "
                     "strategy over scales: the engine runs it on its own.")
  return m.build(scfg, num_dims, radius)


def make_strategy(name: str, num_dims: int, *, pool: int = 15, tournament: int = 10,
                  children: int = 1, radius: float = 1e-3, relative: bool = False,
                  popsize: int = 15, sigma: float = 0.02, param: str = "log",
                  lr: float = 0.02) -> Strategy:
  """A strategy by name with explicit settings (the registry's, without a SearchConfig)."""
  settings = _Settings(name, pool, tournament, children, radius,
                       "relative" if relative else "absolute", popsize, sigma, param, lr)
  m = method(name)
  m.check(settings)  # the same checks as a SearchConfig's
  return m.build(settings, num_dims, radius)


class _Settings(NamedTuple):
  strategy: str
  pool: int
  tournament: int
  children: int
  radius: float
  step: str
  popsize: int
  sigma: float
  param: str
  lr: float
  lr_schedule: str = "constant"
