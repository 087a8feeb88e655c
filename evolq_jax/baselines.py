"""No-search baselines the search must beat, besides the FQ-ViT init itself.

clip_ratio: every weight scale times one number, the number picked from a grid
by calibration fitness (never by test accuracy). Shrinking min/max scales clips
outliers and refines the grid for the bulk of the weights, which at 3-4 bits can
be worth as much as a short search.
"""
from __future__ import annotations

import numpy as np

from evolq_jax.search.engine import calibration_fitness

DEFAULT_RATIOS = tuple(np.round(np.arange(0.70, 1.0001, 0.025), 3))


def scale_weight_scales(qparams, ratio: float):
  """QParams with every weight scale (all layers, all channels) times `ratio`."""
  def scale(tree):
    if "scale" in tree:
      return {**tree, "scale": tree["scale"] * ratio}
    return {k: scale(v) for k, v in tree.items()}
  return qparams.replace(weights=scale(qparams.weights))


def clip_ratio(cfg, qcfg, params, qparams, images, fp_ref, scfg, ratios=DEFAULT_RATIOS):
  """-> (qparams at the best ratio, best ratio, {ratio: calibration fitness})."""
  if not ratios or min(ratios) <= 0:
    raise ValueError(f"clip ratios {ratios!r} must be a non-empty list of positive numbers.")
  fits = {float(r): calibration_fitness(cfg, qcfg, params, scale_weight_scales(qparams, r),
                                        images, fp_ref, scfg) for r in ratios}
  best = min(fits, key=lambda r: (fits[r], abs(r - 1.0)))  # ties: the smaller change
  return scale_weight_scales(qparams, best), best, fits
