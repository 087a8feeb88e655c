"""What the accuracy grid runs: the methods, and per test bed the order of
(settings, methods) groups, the budget curves and the targets.

A method is (start, SearchConfig overrides, budget shape):
  start:  "reference" = init-reference (the reference run script's start),
          "reference-ends8" = the same with the first and last layers at 8-bit
          weights (the reconstruction papers' layout),
          "best" = the no-search baseline with the lowest calibration loss
          (among the fully quantized ones);
  shape:  None = the grid's budget (passes x generations x children candidate
          evaluations per unit, plus its start) in the method family's own
          settings; or a dict of settings whose "passes": "equal" is solved so
          that the total number of evaluations matches the grid's budget; or
          "wall:<method>" = the given gradient method at the wall time of
          the paper's tournament (measured in the same grid, seed 0).
"""
from __future__ import annotations

import math

# std of U(-r, r) is r / sqrt(3): this relative radius has evosax's sigma = 0.02 as its std
SIGMA_AS_RADIUS = 0.02 * math.sqrt(3)
# W3A4's calibration loss fell at each step up from 0.03 to 0.3, so 1.0 bounds the sweep
# from above; 0.003 and 0.01 ran before the last-step fix (e8a3ed0) and were below 0.03.
ADAM_LRS = (0.03, 0.1, 0.3, 1.0)

SEARCHES = {
    "evolq-infonce": ("reference", {}, None),
    "evolq-infonce-from-best": ("best", {}, None),
    "grad-adam": ("reference", {"strategy": "adam"}, None),
    "grad-adam-from-best": ("best", {"strategy": "adam"}, None),
    "random-search": ("reference", {"strategy": "random"}, None),
    "evolq-mse": ("reference", {"loss": "mse"}, None),
    "evolq-kl": ("reference", {"loss": "kl"}, None),
    "evolq-cosine": ("reference", {"loss": "cosine"}, None),
    "grad-sgd": ("reference", {"strategy": "sgd"}, None),
    "sep-cma-es": ("reference", {"strategy": "Sep_CMA_ES"}, None),
    "snes": ("reference", {"strategy": "SNES"}, None),
    "evolq-infonce-attn+mlp": ("reference", {"layers": ("attn", "mlp")}, None),
    # beyond the paper: the block's activation scales too (W4A4 loses most to them)
    "evolq-infonce-acts": ("reference", {"acts": True}, None),
    # the CIFAR-10 test bed's comparisons (issue 12)
    "evolq-parallel4": ("reference", {}, {"children": 4, "generations": 1, "passes": "equal"}),
    "evolq-relative": ("reference", {"step": "relative", "radius": SIGMA_AS_RADIUS}, None),
    "random-relative": ("reference", {"strategy": "random", "step": "relative",
                                      "radius": SIGMA_AS_RADIUS}, None),
    "sep-cma-es-eq": ("reference", {"strategy": "Sep_CMA_ES"},
                      {"popsize": 4, "generations": 3, "passes": "equal"}),
    "snes-eq": ("reference", {"strategy": "SNES"},
                {"popsize": 4, "generations": 3, "passes": "equal"}),
    **{f"grad-adam-lr{lr:g}": ("reference", {"strategy": "adam", "lr": lr}, None)
       for lr in ADAM_LRS},
    "grad-adam-wall": ("reference", {"strategy": "adam"}, "wall:grad-adam"),
    # beyond the sweep: a fresh Adam at every unit visit moves each scale by ~exp(+-lr) at
    # its first step, so at a constant rate the later passes keep nothing; the cosine
    # schedule starts at the sweep's pick on W3A4's calibration loss (0.3) and falls to ~0
    "grad-adam-cosine": ("reference", {"strategy": "adam", "lr": 0.3, "lr_schedule": "cosine"},
                         None),
    # the other way out: Adam's moments and step count carried from one visit of a unit to
    # its next (search.carry_optimizer), at the sweep's pick
    "grad-adam-carry": ("reference", {"strategy": "adam", "lr": 0.3, "carry_optimizer": True},
                        None),
    # block reconstruction with learned rounding (issue 31): one pass from the first unit at
    # its own budget (search.recon_iters Adam steps a unit), not the grid's
    "adaround": ("reference", {"strategy": "adaround"}, None),
    "adaround-qdrop": ("reference", {"strategy": "adaround", "qdrop": True, "recon_acts": True},
                       None),
    # the layout of the reconstruction papers: first and last layers at 8-bit weights
    "adaround-qdrop-ends8": ("reference-ends8", {"strategy": "adaround", "qdrop": True,
                                                 "recon_acts": True}, None),
    "evolq-infonce-ends8": ("reference-ends8", {}, None),
    "evolq-infonce-4x": ("reference", {}, {"passes": "4x"}),
    # Sep-CMA-ES: the evosax strategy with the lowest mean W3A4 calibration loss at 1x
    "sep-cma-es-eq-4x": ("reference", {"strategy": "Sep_CMA_ES"},
                         {"popsize": 4, "generations": 3, "passes": "4x"}),
}

# Methods that run other methods in sequence, each at its own budget, the second from the
# first's result (its learned rounding, its scales): does reconstruction leave anything for
# Evol-Q's scale search, and does reconstruction still help after it? A stacked method
# starts where its first stage starts; its record sums the stages' candidates and seconds.
STACKED = {
    "adaround-qdrop+evolq": ("adaround-qdrop", "evolq-infonce"),
    "evolq+adaround-qdrop": ("evolq-infonce", "adaround-qdrop"),
}
SEARCHES.update({name: SEARCHES[stages[0]] for name, stages in STACKED.items()})


def stages(method: str) -> tuple:
  """The methods a grid method runs, in order: itself, or a STACKED sequence."""
  return STACKED.get(method, (method,))


# The Fashion-MNIST fixture's grid (its budget: --passes 2 --generations 2 --children 4).
FIXTURE_PLAN = [
    (("W3A8",), ("evolq-infonce", "evolq-infonce-from-best", "grad-adam", "random-search",
                 "evolq-mse", "evolq-kl", "evolq-cosine")),
    (("W4A8",), ("evolq-infonce", "evolq-infonce-from-best", "grad-adam")),
    (("W8A8", "W4A4"), ()),
    (("W3A8",), ("grad-sgd", "sep-cma-es", "snes", "evolq-infonce-attn+mlp", "random-search",
                 "grad-adam-from-best")),
    (("W4A8",), ("grad-adam-from-best", "random-search")),
    (("W8A8", "W4A4"), ("evolq-infonce", "evolq-infonce-from-best", "grad-adam")),
    (("W4A4",), ("evolq-infonce-acts",)),
]
FIXTURE_CURVES = {("W3A8", "grad-adam"), ("W3A8", "evolq-infonce"), ("W4A8", "grad-adam"),
                  ("W4A8", "evolq-infonce")}

# The CIFAR-10 test bed (the reference's budget: --passes 10 --generations 3 --children 1).
# "HARD" is the setting where init-reference loses most while keeping >= 50 % top-1.
REGIME = ("W8A8", "W4A8", "W3A8", "W4A4", "W3A4", "W2A8")
# W8A4 is a diagnostic, never the hard setting: against W4A8 it splits W4A4's
# loss into what the activations cost (out of a weight-scale search's reach)
# and what the weights cost.
DIAGNOSTIC = ("W8A4",)
# HARD comes first in each group (the targets are read where quantization loses
# most), and the cheap tournament-vs-random pair before the Adam sweep (an Adam
# run costs 3-4 tournament runs on a CPU).
CIFAR10_PLAN = [
    (REGIME + DIAGNOSTIC, ()),
    (("HARD", "W3A8"), ("evolq-infonce", "random-search")),
    (("HARD", "W3A8"), tuple(f"grad-adam-lr{lr:g}" for lr in ADAM_LRS)),
    (("HARD", "W3A8"), ("evolq-parallel4", "evolq-relative", "random-relative", "snes-eq",
                        "sep-cma-es-eq", "grad-adam-wall")),
    (("HARD", "W3A8"), ("evolq-mse", "evolq-kl", "evolq-cosine", "evolq-infonce-acts")),
    (("HARD", "W3A8"), ("evolq-infonce-4x", "sep-cma-es-eq-4x")),
    (("HARD",), ("grad-adam-cosine",)),
    (("HARD",), ("grad-adam-carry",)),
    (("HARD", "W4A4"), ("adaround", "adaround-qdrop", "adaround-qdrop-ends8")),
    (("HARD",), tuple(STACKED)),
]
CIFAR10_CURVES = {(s, m) for s in ("W3A8", "HARD")
                  for m in ("evolq-infonce", "grad-adam-wall", "evolq-infonce-4x",
                            "sep-cma-es-eq-4x")}

# EfficientNet-Lite0 on the ImageNet sample (issue 13; the reference's budget: --passes 10
# --generations 3 --children 1 --holdout 100): the tournament, SNES at equal evaluations
# (the best evosax strategy of the earlier grid) and Adam through the STE.
LITE_SEARCHES = ("evolq-infonce", "snes-eq", "grad-adam")
# The 4-bit settings, where init-reference loses 20-30 points, come first; W6A6 and
# W8A8 (within the interval of FP) last.
RECONSTRUCTION = ("adaround", "adaround-qdrop", "adaround-qdrop-ends8")
EFFICIENTNET_PLAN = [
    (("W8A8", "W6A6", "W4A8", "W4A4"), ()),
    (("W4A8", "W4A4"), LITE_SEARCHES),
    (("W6A6", "W8A8"), LITE_SEARCHES),
    (("W4A4", "W4A8"), RECONSTRUCTION),
    # Adam's rate on Lite0 (issue 30: 0.02, grad-adam's default, to 0.3) and its state
    # carried across visits at the CIFAR-10 sweep's pick; about 2.3 h a run here
    (("W4A8",), ("grad-adam-lr0.1", "grad-adam-lr0.3", "grad-adam-carry")),
]
EFFICIENTNET_CURVES = {(s, "evolq-infonce") for s in ("W4A8", "W4A4")}

PLANS = {"fixture": (FIXTURE_PLAN, FIXTURE_CURVES), "cifar10": (CIFAR10_PLAN, CIFAR10_CURVES),
         "efficientnet": (EFFICIENTNET_PLAN, EFFICIENTNET_CURVES)}


def hardest_setting(init_top1: dict, floor: float = 50.0):
  """{setting: init-reference test top-1} -> the lowest one still >= floor (None: none)."""
  ok = {s: t for s, t in init_top1.items() if t >= floor}
  return min(ok, key=ok.get) if ok else None


def evaluations(passes: int, units: int, generations: int, width: int) -> int:
  """Candidate evaluations of a search: every unit visit scores its start,
  then `generations` generations of `width` candidates."""
  return passes * units * (1 + generations * width)


def equal_passes(total: int, units: int, generations: int, width: int) -> int:
  """The passes whose evaluations come closest to `total` (at least 1)."""
  return max(1, round(total / (units * (1 + generations * width))))
