"""Choosing among the search's passes on held-out training images (never the
calibration set, never test data): the FQ-ViT init counts as pass 0, and a
pass replaces it only when a one-sided sign test on the images where the two
disagree says its gain is more than noise."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from evolq_jax.search.fitness import _quantized, in_batches


def holdout_correct(cfg, qcfg, params, qparams, holdout, batch_size: int = 500) -> np.ndarray:
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


def pass_record(pass_index: int, correct, init_correct, fitness: float) -> dict:
  """One pass's held-out record, compared with the init's per-image results."""
  fixed, broken = int(np.sum(correct & ~init_correct)), int(np.sum(init_correct & ~correct))
  return {"pass": pass_index, "holdout_top1": 100.0 * float(correct.mean()), "fitness": fitness,
          "fixed": fixed, "broken": broken, "p_value": sign_test(fixed, broken)}


def pick(records: list, alpha: float) -> int:
  """The pass to keep: the best held-out top-1 among the passes significantly
  better than the init (sign test p < alpha; alpha >= 1: no test); else 0."""
  ok = [r for r in records[1:] if alpha >= 1 or r["p_value"] < alpha]
  best = max(ok, key=lambda r: r["holdout_top1"], default=records[0])  # first max: earliest
  return best["pass"] if best["holdout_top1"] > records[0]["holdout_top1"] else 0
