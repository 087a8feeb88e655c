"""The search's settings and its result. Each method family has its own named
fields, so no field means two things:

  all:        strategy, loss, temperature, units, layers, acts
  searches:   passes, generations                      (every family but reconstruction)
  tournament: pool, tournament, children, radius, step (evolq, random)
  evosax:     popsize, sigma, param                    (Sep_CMA_ES, SNES, ...)
  gradient:   lr, lr_schedule, carry_optimizer         (adam, sgd: one step a generation)
  reconstruction: recon_iters, recon_batch, round_lr, qdrop, recon_acts
                                                       (adaround: one pass, first unit first;
                                                       layers and acts are not read)
  scoring:    loss_batch, chunk, memory_mb, devices
"""
from __future__ import annotations

import dataclasses

from evolq_jax.losses import LOSSES
from evolq_jax.search.space import SearchSpace
from evolq_jax.search.strategies import method

# Fields of earlier versions -> what replaced them (for a clear error).
RENAMED = {
    "population": "search.pool (the tournament's pool, evolq) or search.popsize (an evosax "
                  "strategy's lambda)",
}


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """The search's settings; defaults are the reference's (P=10, K=3, pool 15)."""
  strategy: str = "evolq"
  loss: str = "infonce"
  temperature: float = 3.0
  passes: int = 10
  generations: int = 3       # per block; a gradient method takes one step a generation
                             # (and scores its last step's result once more)
  layers: tuple = ("attn",)  # groups ("attn", "mlp") or layer names ("qkv", "fc1", ...)
  acts: bool = False         # also the unit's searchable activation scales
  units: tuple = ()          # indices of the units to search (-1 = the last); () = all (paper)
  # tournament (evolq, random)
  pool: int = 15
  tournament: int = 10
  children: int = 1
  radius: float = 0.0        # 0: the paper's r for the weight bits (absolute step)
  step: str = "absolute"     # absolute: |s + U(-r, r)| (paper); relative: |s * (1 + U(-r, r))|
  # evosax
  popsize: int = 15
  sigma: float = 0.02        # relative step size (in `param` space)
  param: str = "log"
  # gradient (adam, sgd)
  lr: float = 0.02           # in log-scale space: scale = scale0 * exp(z)
  lr_schedule: str = "constant"  # over passes: constant | cosine (lr -> ~0 at the last pass)
  # keep the optimizer's state (Adam's moments and step count) from one visit of a unit to
  # its next, instead of a fresh optimizer at every visit
  carry_optimizer: bool = False
  # reconstruction (adaround): Adam steps per unit on random batches of recon_batch
  # calibration images (the papers: 20,000 x 32 per block on a GPU)
  recon_iters: int = 1000
  recon_batch: int = 32
  # Adam on the rounding variables. AdaRound: 1e-3 over 20,000 steps; Adam moves each
  # variable about lr a step, so 1e-2 over our 1,000 lets them travel as far (10 vs 20)
  round_lr: float = 1e-2
  qdrop: bool = False        # QDrop: drop activation quantization at random while learning
  recon_acts: bool = False   # also learn the unit's activation step sizes (LSQ-style)
  # scoring
  loss_batch: int = 100
  chunk: int = 0             # candidates vmapped at once; 0 = the whole population
  memory_mb: float = 0.0     # > 0: pick chunk so a device's scoring fits in this many MiB
  devices: int = 0           # population split over jax.devices()[:devices]; 0 = all, 1 = off

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(self.layers))  # hashable: a jit static arg
    if isinstance(self.units, list):
      object.__setattr__(self, "units", tuple(self.units))
    strategy = method(self.strategy)  # an unknown name: a ValueError listing the known ones
    if self.loss not in LOSSES:
      raise ValueError(f"search.loss={self.loss!r} is unknown: expected one of {LOSSES}.")
    if not self.temperature > 0:
      raise ValueError(f"search.temperature={self.temperature!r} must be > 0 (paper: 3.0).")
    if self.chunk < 0 or self.memory_mb < 0 or self.devices < 0:
      raise ValueError(f"search.chunk={self.chunk}, search.memory_mb={self.memory_mb} and "
                       f"search.devices={self.devices} must be >= 0 (0 = default).")
    if self.chunk and self.memory_mb:
      raise ValueError(f"search.chunk={self.chunk} and search.memory_mb={self.memory_mb} are "
                       "both set: give a fixed chunk or a memory budget to choose it, not both.")
    for name in ("passes", "generations", "loss_batch"):
      if getattr(self, name) < 1:
        raise ValueError(f"search.{name}={getattr(self, name)!r} must be >= 1.")
    strategy.check(self)  # the settings the strategy reads: its own checks
    SearchSpace(self.layers, self.acts, self.units)  # checks them

  @property
  def space(self) -> SearchSpace:
    return SearchSpace(self.layers, self.acts, self.units)

  @property
  def method(self):
    """The strategy's registry entry (strategies.REGISTRY)."""
    return method(self.strategy)

  @property
  def family(self) -> str:
    return self.method.family

  @property
  def evaluations_per_generation(self) -> int:
    return self.method.per_generation(self)


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
