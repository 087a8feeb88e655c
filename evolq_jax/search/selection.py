"""Choosing among the search's passes on held-out training images (never the
calibration set, never test data); the init counts as pass 0. Two rules:

- "last_unless_worse" (the default): keep the last pass unless a one-sided
  sign test on the images where it and the init disagree says it is worse than
  the init (then keep the init). docs/results/pick_study.md is the
  evidence: over the committed grids, the last pass scored higher on test than
  the best held-out pass in 49 searches and lower in 21 (p = 0.0005).
- "best_significant": the best held-out pass among those whose gain over the
  init passes the sign test, else the init (the default before the study).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from evolq_jax.search.fitness import FORWARD_BATCH, in_batches, quantized_forward


def holdout_correct(cfg, qcfg, params, qparams, holdout,
                    batch_size: int = FORWARD_BATCH) -> np.ndarray:
  """Per held-out image: does the quantized model get it right? (bool (N,))"""
  x, y = holdout
  logits = in_batches(lambda b: quantized_forward(cfg, qcfg, params, qparams, b), jnp.asarray(x),
                      batch_size)
  return np.asarray(jnp.argmax(logits, -1)) == np.asarray(y)


def sign_test(fixed: int, broken: int) -> float:
  """One-sided exact McNemar / sign test: P(at least `fixed` of the fixed+broken
  changed images go the right way | no real difference)."""
  n = fixed + broken
  return sum(math.comb(n, k) for k in range(fixed, n + 1)) / 2 ** n if n else 1.0


def pass_record(pass_index: int, correct, init_correct, fitness: float) -> dict:
  """One pass's held-out record, compared with the init's per-image results."""
  fixed, broken = int(np.sum(correct & ~init_correct)), int(np.sum(init_correct & ~correct))
  return {"pass": pass_index, "holdout_top1": 100.0 * float(correct.mean()), "fitness": fitness,
          "fixed": fixed, "broken": broken, "p_value": sign_test(fixed, broken)}


RULES = ("last_unless_worse", "best_significant")


def check_rule(rule: str) -> None:
  if rule not in RULES:
    raise ValueError(f"holdout.rule={rule!r} is unknown: expected one of {RULES}.")


def pick(records: list, alpha: float, rule: str = "last_unless_worse") -> int:
  """The pass to keep, from the init's (records[0]) and each pass's held-out record.

  last_unless_worse: the last pass, unless it broke significantly more
    held-out images than it fixed (sign test p < alpha; alpha >= 1: no test,
    the last pass is kept); then 0.
  best_significant: the best held-out top-1 among the passes significantly
    better than the init (p < alpha; alpha >= 1: no test); else 0."""
  check_rule(rule)
  if rule == "last_unless_worse":
    last = records[-1]
    worse = alpha < 1 and sign_test(last["broken"], last["fixed"]) < alpha
    return 0 if worse else last["pass"]
  ok = [r for r in records[1:] if alpha >= 1 or r["p_value"] < alpha]
  best = max(ok, key=lambda r: r["holdout_top1"], default=records[0])  # first max: earliest
  return best["pass"] if best["holdout_top1"] > records[0]["holdout_top1"] else 0
