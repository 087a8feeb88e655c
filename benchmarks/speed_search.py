"""Whole searches at the paper's budget, measured end to end (speed.py's search
section; this replaces the per-block extrapolation of earlier versions).

Budget: P passes over the blocks (last to first), 1 + K evaluations per block
(the block's start + K children): 10 x 6 x 4 = 240 on the fixture. Four ways,
each timed from its call to its return, compilation included:
  engine, children=1     evolq_jax.search() with generations=K, children=1 (the reference's
                         schedule: one child per cycle);
  engine, generation-parallel   generations=1, children=K: the same evaluations,
                         the K children of a block scored in one batched call;
  sequential loop        the same tournament (evolq_jax's strategy), each candidate
                         scored by a jitted full quantized forward, one at a time;
  reference, PyTorch     speed_torch.search_end_to_end (the reference's way).
The FQ-ViT calibration before a search is the same for all and timed apart; JAX's
compilation caches are cleared before each way, so each pays its own compilation
(the package's persistent caches are off for them). Then the engine's search twice
more in a fresh persistent cache (evolq_jax/cache.py): cold (it compiles and fills
the cache) and warm (in-memory caches cleared: it reads its programs and the FP
logits back, as a second run in a new process would); each way records what it
compiled (compilation.CompileLog).
"""
from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from speed_common import QCFG, full_loss_fn

from evolq_jax import cache
from evolq_jax.calibrate import calibrate
from evolq_jax.compilation import CompileLog
from evolq_jax.search import SearchConfig, make_strategy, search, searched_scales, set_scales
from evolq_jax.search.fitness import reference_logits
from evolq_jax.search.strategies import paper_radius


def engine_search(cfg, params, qparams, images, passes, generations, children, loss_batch,
                  chunk) -> dict:
  jax.clear_caches()  # every way pays its own compilation
  scfg = SearchConfig(passes=passes, generations=generations, children=children,
                      loss_batch=loss_batch, chunk=chunk)
  t = time.perf_counter()
  with CompileLog() as log:
    r = search(cfg, QCFG, params, qparams, images, scfg, seed=0, progress=False)
  return {"seconds": time.perf_counter() - t, "candidate_evaluations": r.candidates,
          "fitness_start": r.fitness_init, "fitness_final": r.fitness_final,
          "generations": generations, "children": children, "chunk": chunk,
          "compile": log.summary()}


def cold_and_warm(cfg, params, qparams, images, passes, generations, loss_batch, chunk) -> dict:
  """The engine's search (children=1) in a fresh persistent cache, twice."""
  with tempfile.TemporaryDirectory() as folder:
    cache.disable()  # drops any cache folder JAX holds, so that the one below is used
    os.environ[cache.ENV] = folder
    cache.enable_xla_cache()
    try:
      cold = engine_search(cfg, params, qparams, images, passes, generations, 1, loss_batch,
                           chunk)
      warm = engine_search(cfg, params, qparams, images, passes, generations, 1, loss_batch,
                           chunk)
    finally:
      cache.disable()
  return {"cold": cold, "warm": warm,
          "warm_compile_fraction": warm["compile"]["compile_seconds"]
          / cold["compile"]["compile_seconds"],
          "warm_vs_cold": cold["seconds"] / warm["seconds"]}


def sequential_search(cfg, params, qparams, images, passes, generations, loss_batch) -> dict:
  """The tournament with one jitted full forward per candidate (no population, no cache)."""
  jax.clear_caches()
  t = time.perf_counter()
  images = jnp.asarray(images)
  fp_ref = reference_logits(cfg, params, images, loss_batch)
  scfg = SearchConfig(loss_batch=loss_batch)
  radius = paper_radius(QCFG.w_bits)
  key, evals, f_start, scores, strategies = jax.random.key(0), 0, None, {}, {}
  for _ in range(passes):
    for b in reversed(range(cfg.depth)):
      vec0, layout = searched_scales(cfg, QCFG, qparams, b, scfg.space)
      if b not in scores:  # compiled once per block, as the engine's scorer is
        scores[b] = jax.jit(full_loss_fn(cfg, b, layout, loss_batch))
      score, dims = scores[b], int(vec0.shape[0])
      if dims not in strategies:
        s = make_strategy("evolq", dims, pool=15, tournament=10, children=1, radius=radius)
        strategies[dims] = s._replace(init=jax.jit(s.init), ask=jax.jit(s.ask),
                                      tell=jax.jit(s.tell))
      strategy = strategies[dims]
      f0 = float(score(vec0, params, qparams, images, fp_ref))
      evals += 1
      f_start = f0 if f_start is None else f_start
      key, k = jax.random.split(key)
      state = strategy.init(k, vec0, jnp.float32(f0))
      best, best_f = vec0, f0
      for _ in range(generations):
        key, k_ask, k_tell = jax.random.split(key, 3)
        x, state = strategy.ask(k_ask, state)
        child = strategy.to_scales(state, x)
        f = float(score(child[0], params, qparams, images, fp_ref))  # float(): one at a time
        evals += 1
        state, _ = strategy.tell(k_tell, x, jnp.asarray([f], jnp.float32), state, None)
        if f < best_f:
          best, best_f = child[0], f
      qparams = set_scales(qparams, best, layout)
  return {"seconds": time.perf_counter() - t, "candidate_evaluations": evals,
          "fitness_start": f_start, "fitness_final": best_f}


def run_search_modes(cfg, params, images, passes, generations, loss_batch, chunk, torch_ok,
                     log) -> dict:
  cache.disable()  # each way below pays its own compilation and FP logits
  t = time.perf_counter()
  qparams = calibrate(cfg, QCFG, params, np.asarray(images), batch_size=loss_batch,
                      progress=False)
  out = {"model": cfg.name, "calib_images": int(len(images)), "passes": passes,
         "generations": generations, "quant": QCFG.name,
         "calibration_s": time.perf_counter() - t}
  out["engine_children_1"] = engine_search(cfg, params, qparams, images, passes, generations, 1,
                                           loss_batch, chunk)
  log(f"search: engine children=1 {out['engine_children_1']['seconds']:.1f} s")
  out["engine_generation_parallel"] = engine_search(cfg, params, qparams, images, passes, 1,
                                                    generations, loss_batch, chunk)
  log(f"search: engine generation-parallel {out['engine_generation_parallel']['seconds']:.1f} s")
  out["sequential_full_forward"] = sequential_search(cfg, params, qparams, images, passes,
                                                     generations, loss_batch)
  log(f"search: sequential loop {out['sequential_full_forward']['seconds']:.1f} s")
  if torch_ok:
    try:
      from speed_torch import build_reference, search_end_to_end
      t = time.perf_counter()
      ref = build_reference(cfg, images, loss_batch)
      setup = time.perf_counter() - t
      out["reference_torch"] = {**search_end_to_end(cfg, ref, passes, generations,
                                                    paper_radius(QCFG.w_bits)),
                                "setup_s": setup, "weights": "random (timm init)"}
      log(f"search: PyTorch reference {out['reference_torch']['seconds']:.1f} s")
    except ImportError as e:
      log(f"search: PyTorch reference skipped: {e}")
  out["persistent_cache"] = cold_and_warm(cfg, params, qparams, images, passes, generations,
                                          loss_batch, chunk)
  log(f"search: engine in a fresh persistent cache: cold "
      f"{out['persistent_cache']['cold']['seconds']:.1f} s, warm "
      f"{out['persistent_cache']['warm']['seconds']:.1f} s")
  e1 = out["engine_children_1"]["seconds"]
  out["ratios"] = {
      "engine_vs_sequential": out["sequential_full_forward"]["seconds"] / e1,
      "generation_parallel_vs_children_1": e1 / out["engine_generation_parallel"]["seconds"],
      "warm_vs_cold": out["persistent_cache"]["warm_vs_cold"]}
  if "reference_torch" in out:
    ref_s = out["reference_torch"]["seconds"]
    out["ratios"]["engine_vs_reference"] = ref_s / e1
    out["ratios"]["generation_parallel_vs_reference"] = (
        ref_s / out["engine_generation_parallel"]["seconds"])
  return out
