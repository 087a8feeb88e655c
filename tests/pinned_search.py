"""Tiny W3A8 fixture searches whose results are pinned bit for bit
(tests/data/pinned_w3a8.npz), so that refactors provably change no number.

  python tests/pinned_search.py   # rewrite the pins (only when a change is meant to move them)
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np

from evolq_jax.config import apply_overrides, load_config

PIN_FILE = os.path.join(os.path.dirname(__file__), "data", "pinned_w3a8.npz")
CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "fixture_w3a8.py")
# name -> --set overrides; each a tiny budget on 200 calibration images.
RUNS = {
    "evolq": ["search.passes=1", "search.generations=2", "search.children=3"],
    "adam": ["search.strategy='adam'", "search.passes=1", "search.generations=2",
             "search.children=1"],
    "acts_mlp": ["search.passes=1", "search.generations=1", "search.children=4",
                 "search.acts=True", "search.layers=('qkv','proj','fc1','fc2')"],
}
# the last two of the fixture's 6 units: every program a search builds, at a third of the compiles
COMMON = ["quant.recipe='fqvit'", "calib.num_images=200", "search.loss_batch=100",
          "search.units=(-2,-1)"]


@functools.lru_cache(maxsize=1)
def _calibrated():
  """The runs' common start (COMMON: the same model, images and recipe), calibrated once
  per process, without evaluating. -> (cfg, qcfg, params, calibration images, QParams)."""
  from evolq_jax.config import quant_config
  from evolq_jax.pipeline import calibrate_on_split, load_model
  c = apply_overrides(load_config(CONFIG), COMMON)
  qcfg = quant_config(c)
  cfg, params = load_model(c)
  calib, _, qparams = calibrate_on_split(c, cfg, qcfg, params, progress=False)
  return cfg, qcfg, params, calib, qparams


def pinned_run(name: str) -> dict:
  """-> flat {key: array} of one run's fitness history and final QParams."""
  from evolq_jax.config import quant_config, search_config
  from evolq_jax.search import search
  c = apply_overrides(load_config(CONFIG), COMMON + RUNS[name])
  cfg, qcfg, params, calib, qparams = _calibrated()
  assert quant_config(c) == qcfg  # RUNS change the search only
  result = search(cfg, qcfg, params, qparams, calib, search_config(c), seed=c.seed,
                  progress=False)
  out = {"fitness": np.asarray([[h["best"], h["gen_min"], h["gen_mean"]]
                                for h in result.history], np.float64),
         "fitness_init_final": np.asarray([result.fitness_init, result.fitness_final])}
  leaves = jax.tree_util.tree_flatten_with_path(result.qparams)[0]
  for path, leaf in leaves:
    out["qparams" + jax.tree_util.keystr(path, simple=True, separator="/")] = np.asarray(leaf)
  return out


if __name__ == "__main__":
  os.makedirs(os.path.dirname(PIN_FILE), exist_ok=True)
  np.savez_compressed(PIN_FILE, **{f"{name}:{k}": v for name in RUNS
                                   for k, v in pinned_run(name).items()})
  print(f"wrote {PIN_FILE}")
