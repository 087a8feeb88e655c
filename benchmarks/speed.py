"""Speed: the engine against the reference's way of working and the machine's limit.

  python benchmarks/speed.py [--models M ...] [--calib-images 1000] [--population 15]
      [--loss-batch 100] [--seq-candidates 15] [--memory-mb 0] [--no-bf16] [--no-torch]
      [--search-models vit_fixture_patch4_28 vit_cifar10_patch4_32] [--search-images 1000]
      [--search-passes 10]
      [--int-images 256] [--int-batch 64]
  ->  benchmarks/results/{--name}.json (+ docs/results/{--name}.md)

Per model, side by side in one process (random weights and images: speed does
not depend on them; W4A8, min/max observers):
  (a) sequential: one candidate at a time, full quantized forward, jitted;
  (b) the population vmapped (lax.map in chunks), full forward;
  (c) the population vmapped + prefix caching (the engine's population_fitness),
      every block of one pass;
  (d) (c) computing in bfloat16;
  (e) the reference's way in PyTorch: timm's model, every Linear's weight
      fake-quantized per channel and its input per tensor on every call, one
      candidate at a time, eager fp32 (speed_torch.py);
  (f) inference in images/s: the fp32 forward, the fake-quant forward and the
      exported integer model (W8A8), and an int8 vs fp32 matmul (speed_integer.py).
Times of (a)-(e) exclude compilation (reported apart). FLOPs are counted
analytically (matmuls and convolutions, 2 per multiply-add); the peak is a
2048^2 fp32 matmul measured in the same run. Then whole searches at the paper's
budget on each of --search-models, measured end to end, compilation included,
and the engine's search cold and warm in a fresh persistent cache
(speed_search.py). Run it on an idle machine: the load average at the start is
recorded, and a warning is printed (and recorded) when it is above --max-load.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import git_commit, write_results
from speed_common import (QCFG, TEMPERATURE, PeakRSS, device_peak_mib, forward_flops,
                          full_loss_fn, matmul_peak, mode_record, population, xla_mib)
from speed_integer import matmul_int8_vs_fp32, run_integer_modes
from speed_profile import profile_cached
from speed_search import run_search_modes

from evolq_jax.calibrate import calibrate
from evolq_jax.models import get_preset, init_params, load_params, quantize_params
from evolq_jax.pipeline import bundled_checkpoint
from evolq_jax.search import prefix_activations, searched_scales
from evolq_jax.search import SearchConfig
from evolq_jax.search import fitness as fit_mod
from evolq_jax.search.fitness import reference_logits, scoring_args, segment_fitness


# --- the JAX modes --------------------------------------------------------------

def to_bf16(tree):
  return jax.tree.map(lambda a: a.astype(jnp.bfloat16)
                      if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def chunk_for(args_, memory_mb, pop, compile_one):
  """The chunk that the engine's memory budget would pick (0 = whole population)."""
  if not memory_mb:
    return 0
  per = compile_one().memory_analysis().temp_size_in_bytes
  return fit_mod.chunk_for_budget(memory_mb, per, fit_mod.tree_bytes(args_) +
                                  fit_mod.tree_bytes(pop), pop.shape[0])


def run_jax_modes(cfg, n_images, pop_size, seq, loss_batch, memory_mb, chunk_opt, bf16, peak,
                  log, profile):
  params = init_params(cfg, jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (n_images, cfg.img_size, cfg.img_size,
                                                 cfg.in_chans))
  n_cal = min(n_images, 100)
  qparams = calibrate(cfg, QCFG, params, np.asarray(images[:n_cal]), batch_size=n_cal,
                      progress=False)
  fp_ref = reference_logits(cfg, params, images, loss_batch).block_until_ready()
  scfg = SearchConfig(loss_batch=loss_batch)
  out = {}
  # (a), (b) perturb block 0: with a later block, XLA hoists the blocks before it out of
  # (b)'s jitted population loop (loop-invariant code motion, prefix caching by itself)
  first = 0
  vec0, layout = searched_scales(cfg, QCFG, qparams, first, scfg.space)
  pop = population(vec0, pop_size, 0)
  full_flops = forward_flops(cfg) * n_images

  fq = quantize_params(QCFG, params, qparams)
  ctx = {"params": params, "qparams": qparams, "images": images, "fp_ref": fp_ref, "fq": fq}
  if profile or chunk_opt < 0:
    out["profile"] = profile_cached(cfg, ctx, cfg.depth // 2, pop_size, loss_batch, log)
  if chunk_opt < 0:  # the chunk the profile's sweep found fastest
    chunk_opt = out["profile"]["chunk_profiled"]
  data = (params, qparams, images, fp_ref)

  # (a) one at a time, full forward
  f = full_loss_fn(cfg, first, layout, loss_batch)
  t = time.perf_counter()
  a_exe = jax.jit(f).lower(vec0, *data).compile()
  compile_a = time.perf_counter() - t
  a_exe(pop[0], *data).block_until_ready()  # first call (allocations) out of the timing
  with PeakRSS() as m:
    t = time.perf_counter()
    fit_a = [float(a_exe(v, *data)) for v in pop[:seq]]  # float(): the reference syncs
    secs = time.perf_counter() - t
  out["a_sequential_full"] = mode_record(secs, seq, full_flops, peak, m.mib, xla_mib(a_exe),
                                         compile_a)
  log(f"(a) {out['a_sequential_full']['seconds_per_candidate']:.3f} s/candidate")

  # (b) population vmapped, full forward
  def pop_full(chunk):
    return jax.jit(lambda p, *d: jax.lax.map(lambda v: f(v, *d), p,
                                             batch_size=chunk or p.shape[0]))
  chunk_b = chunk_opt or chunk_for(data, memory_mb, pop,
                                   lambda: pop_full(1).lower(pop[:1], *data).compile())
  t = time.perf_counter()
  b_exe = pop_full(chunk_b).lower(pop, *data).compile()
  compile_b = time.perf_counter() - t
  b_exe(pop, *data).block_until_ready()
  with PeakRSS() as m:
    t = time.perf_counter()
    fit_b = np.asarray(b_exe(pop, *data))
    secs = time.perf_counter() - t
  out["b_population_full"] = mode_record(secs, pop_size, full_flops, peak, m.mib, xla_mib(b_exe),
                                         compile_b, chunk=chunk_b or pop_size)
  out["b_population_full"]["max_abs_diff_vs_a"] = float(np.max(np.abs(fit_b[:seq] - fit_a)))
  log(f"(b) {out['b_population_full']['seconds_per_candidate']:.3f} s/candidate")

  # (c) and (d): every block of a pass, with prefix caching
  variants = [("c_population_cached", params, fq, qparams, False)]
  if bf16:
    variants.append(("d_population_cached_bf16", to_bf16(params), to_bf16(fq),
                     qparams.replace(acts=to_bf16(qparams.acts)), True))
  blocks = {}
  for name, p_, fq_, qp_, low in variants:
    rows, tot_s, tot_flops, rss, xla, comp = [], 0.0, 0, 0.0, 0.0, 0.0
    for b in reversed(range(cfg.depth)):
      t = time.perf_counter()
      tokens = prefix_activations(cfg, QCFG, params, qparams, images, b, loss_batch)
      tokens.block_until_ready()
      prefix_s = time.perf_counter() - t
      if low:
        tokens = tokens.astype(jnp.bfloat16)
      v0, lay = searched_scales(cfg, QCFG, qparams, b, scfg.space)
      pb = population(v0, pop_size, b)
      static, args_ = scoring_args(cfg, QCFG, b, lay, "infonce", TEMPERATURE, loss_batch, p_,
                                   fq_, qp_, tokens, fp_ref)
      chunk = chunk_opt or chunk_for(
          args_, memory_mb, pb, lambda s=static, p=pb, a=args_: segment_fitness.lower(
              *s, 1, p[:1], *a).compile())
      t = time.perf_counter()
      exe = segment_fitness.lower(*static, chunk, pb, *args_).compile()
      comp += time.perf_counter() - t
      exe(pb, *args_).block_until_ready()
      with PeakRSS() as m:
        t = time.perf_counter()
        fit = np.asarray(exe(pb, *args_))
        secs = time.perf_counter() - t
      flops = forward_flops(cfg, b) * n_images
      rows.append({"block": b, "seconds_per_candidate": secs / pop_size, "prefix_s": prefix_s,
                   "chunk": chunk or pop_size, "gflop_per_candidate": flops / 1e9,
                   "fitness": fit.tolist()})
      tot_s, tot_flops = tot_s + secs, tot_flops + flops * pop_size
      rss, xla = max(rss, m.mib), max(xla, xla_mib(exe))
      log(f"{name} block {b}: {secs / pop_size:.3f} s/candidate (chunk {chunk or pop_size})")
    n_cand = pop_size * cfg.depth
    out[name] = mode_record(tot_s, n_cand, tot_flops / n_cand, peak, rss, xla, comp,
                            blocks=rows)
    blocks[name] = rows
  if bf16:
    diffs, agree, rel = [], 0, []
    for rc, rd in zip(blocks["c_population_cached"], blocks["d_population_cached_bf16"]):
      fc, fd = np.asarray(rc["fitness"]), np.asarray(rd["fitness"])
      diffs.append(np.max(np.abs(fc - fd)))
      rel.append(np.max(np.abs(fc - fd)) / max(np.ptp(fc), 1e-12))
      agree += int(np.argmin(fc) == np.argmin(fd))
    out["d_population_cached_bf16"]["fitness_vs_fp32"] = {
        "max_abs_diff": float(max(diffs)), "max_diff_over_population_spread": float(max(rel)),
        "blocks_with_same_best_candidate": f"{agree}/{cfg.depth}",
        "typical_fitness": float(np.mean(blocks["c_population_cached"][0]["fitness"]))}
  return out, ctx


# --- report -----------------------------------------------------------------------

MODES = [("a_sequential_full", "(a) sequential, full forward"),
         ("b_population_full", "(b) population vmapped, full forward"),
         ("c_population_cached", "(c) population vmapped + prefix cache"),
         ("d_population_cached_bf16", "(d) = (c) in bf16"),
         ("e_reference_torch", "(e) reference way, PyTorch eager")]


def page(payload) -> str:
  m = payload["machine"]
  lines = ["# Speed: population fitness vs the reference's way", "",
           (f"git commit `{payload['git_commit']}`; device **{m['device']}** "
           f"({m['cpu_count']} CPU cores visible, jax {jax.__version__}); fp32 matmul peak "
           f"(2048², measured before / after the run): {m['peak_before']:.0f} / "
           f"{m['peak_after']:.0f} GFLOP/s, the higher one used; load average at start / end "
           f"{m['load_start']} / {m['load_end']}. Command: `{payload['command']}`."), "",
           ("Times exclude compilation; a candidate = one scale vector scored on all calibration "
           "images; FLOPs = matmul FLOPs counted analytically."), ""]
  for note in payload.get("run_notes", []):  # caveats added after a run, by hand
    lines += [f"> {note}", ""]
  for model, res in payload["models"].items():
    s = res["settings"]
    lines += [f"## {model}", "",
              (f"{s['calib_images']} calibration images (loss batch {s['loss_batch']}), "
              f"population {s['population']}, {s['seq_candidates']} candidates timed one at a "
              f"time; W4A8."), "",
              ("| mode | s / candidate | candidates / s | × vs (a) | GFLOP / cand. | GFLOP/s | "
              "of peak | peak RSS MiB | XLA buffers MiB | compile s |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    base = res["a_sequential_full"]["seconds_per_candidate"]
    for key, label in MODES:
      r = res.get(key)
      if r is None:
        continue
      lines.append(f"| {label} | {r['seconds_per_candidate']:.4f} | "
                   f"{r['candidates_per_second']:.2f} | {base / r['seconds_per_candidate']:.2f} "
                   f"| {r['gflop_per_candidate']:.2f} | {r['gflop_s']:.1f} | "
                   f"{100 * r['fraction_of_peak']:.1f}% | {r['peak_rss_mib']:.0f} | "
                   f"{r['xla_buffers_mib']:.0f} | {r['compile_s']:.1f} |")
    lines.append("")
    if "d_population_cached_bf16" in res:
      d = res["d_population_cached_bf16"]["fitness_vs_fp32"]
      lines += [(f"bf16 vs fp32 fitness: max |Δ| {d['max_abs_diff']:.4g} (fitness ≈ "
                f"{d['typical_fitness']:.3g}), {d['max_diff_over_population_spread']:.2f}× the "
                f"population's spread at worst; same best candidate in "
                f"{d['blocks_with_same_best_candidate']} blocks."), ""]
    ratios = res["ratios"]
    lines += ["Ratios (per candidate): " + ", ".join(f"{k} **{v:.2f}×**" for k, v in ratios.items())
              + ".", ""]
    if "f_integer" in res:
      f = res["f_integer"]
      lines += [f"(f) inference, {f['setting']}, batch {f['batch']}, images per second: fp32 "
                f"{f['fp32']['images_per_second']:.1f}, fake-quant "
                f"{f['fake_quant']['images_per_second']:.1f}, integer "
                f"{f['integer']['images_per_second']:.1f}: integer / fp32 "
                f"**{f['int8_vs_fp32']:.2f}×**, integer / fake-quant "
                f"{f['int8_vs_fake_quant']:.2f}×.", ""]
    if "profile" in res:
      p = res["profile"]
      lines += [f"Profile of (c) at block {p['block']} (chunk {p['chunk_profiled']}, "
                f"jax.profiler trace, op time summed over threads): "
                + ", ".join(f"{k} {100 * v:.0f}%" for k, v in p["op_fraction"].items())
                + f"; no op running for {100 * p['idle_fraction']:.0f}% of the "
                f"{p['wall_s']:.2f} s wall time. Chunk sweep (s / candidate): "
                + ", ".join(f"chunk {c}: {v['seconds_per_candidate']:.3f} "
                            f"({v['xla_temp_mib']:.0f} MiB XLA temp)"
                            if "seconds_per_candidate" in v else
                            f"chunk {c}: not run ({v['skipped']})"
                            for c, v in p["chunk_sweep"].items()) + ".", ""]
  for search_res in (payload.get("searches") or {"": payload["search"]} if "search" in payload
                     else {}).values():
    lines += search_markdown(search_res)
  if "int8_matmul" in m:
    mm = m["int8_matmul"]
    lines += [f"2048² matmul in this run: int8 → int32 {mm['int8_gop_s']:.0f} GOP/s, fp32 "
              f"{mm['fp32_gflop_s']:.0f} GFLOP/s ({mm['int8_over_fp32']:.2f}×).", ""]
  lines += NOTES.splitlines()
  gpu = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "speed_gpu.md")
  lines += ["", "## On a GPU", "",
            "Results on a lent GPU: [speed_gpu.md](speed_gpu.md)." if os.path.exists(gpu) else
            "`benchmarks/gpu_speed.sh` runs this benchmark for deit_tiny and deit_small with "
            "1,000 calibration images on a lent GPU (no network; writes speed_gpu.md/json). "
            "**It has not been run yet**: no GPU was lent to the session that wrote it, so "
            "(b)/(a) on a GPU, where vmapping the population is expected to pay, is still "
            "unmeasured."]
  return "\n".join(lines) + "\n"


SEARCH_MODES = [("engine_children_1", "engine, 1 child per cycle (the reference's schedule)"),
                ("engine_generation_parallel", "engine, the cycle's children in one call"),
                ("sequential_full_forward", "sequential loop, jitted full forward"),
                ("reference_torch", "reference's way, PyTorch eager")]


def search_markdown(s) -> list:
  e1 = s["engine_children_1"]["seconds"]
  lines = [f"## Whole search at the paper's budget, measured ({s['model']})", "",
           (f"{s['passes']} passes × {s['generations']} cycles, "
            f"{s['engine_children_1']['candidate_evaluations']} candidate evaluations, "
            f"{s['calib_images']} calibration images, {s['quant']}; wall time of each search "
            f"call, compilation included (FQ-ViT calibration before it: "
            f"{s['calibration_s']:.1f} s, not counted)."), "",
           "| way | seconds | evaluations | × vs engine (1 child) | calibration loss start → end |",
           "|---|---|---|---|---|"]
  pc = s.get("persistent_cache", {})
  rows = SEARCH_MODES + [(f"persistent_cache/{k}", f"engine, 1 child, {k} persistent cache")
                         for k in pc]
  for key, label in rows:
    r = pc.get(key.split("/")[1]) if key.startswith("persistent_cache/") else s.get(key)
    if not isinstance(r, dict):
      continue
    lines.append(f"| {label} | {r['seconds']:.1f} | {r['candidate_evaluations']} | "
                 f"{r['seconds'] / e1:.2f} | {r['fitness_start']:.4f} → {r['fitness_final']:.4f} |")
  # (records from before compile-once hold no compile counts)
  compiled = [(label, s[key]["compile"]) for key, label in SEARCH_MODES[:2]
              if "compile" in s.get(key, {})] + [
      (f"{k} persistent cache", pc[k]["compile"]) for k in ("cold", "warm") if k in pc]
  if compiled:
    lines += ["", "| engine search | XLA programs compiled | read from the cache | "
              "compile s (incl. reads) | trace s |", "|---|---|---|---|---|"]
    lines += [f"| {label} | {c['compilations']} | {c['cache_hits']} | {c['compile_seconds']:.1f} "
              f"| {c['trace_seconds']:.1f} |" for label, c in compiled]
  lines += ["", "Ratios: " + ", ".join(f"{k} **{v:.2f}×**" for k, v in s["ratios"].items()) + ".",
            "(The PyTorch model has random weights: its loss values are not comparable.)", ""]
  return lines


NOTES = """
## Where the time of (c) goes, and what changed because of it

- XLA's CPU backend runs the linear-layer matmuls as library (XNNPACK) calls; the
  attention matmuls (batched 197x64 @ 64x197 per head) and the elementwise work
  around them are XLA's own code. The trace above sums each op's time over the
  worker threads.
- Activation fake-quant (divide, round, clip, multiply at every quantization
  point: 11 per block) is the largest non-matmul cost: it is memory-bound work over
  every activation tensor, including the (heads, 197, 197) attention logits and
  probabilities, and XLA fuses it with the neighbouring elementwise ops but not
  into the matmuls. That, not host overhead (the idle fraction), is what keeps (c)
  well below the matmul peak on CPU. Lifting it means integer / fused
  quantize-matmul kernels (or a GPU, where the same elementwise work is cheap
  relative to bandwidth) - not more vmapping.
- The chunk sweep is the change the profile led to: on CPU, vmapping the whole
  population multiplies the live activations (XLA temp grows with the chunk) and
  runs slower per candidate than scoring one candidate at a time inside the same
  jitted call. So the benchmark picks the chunk from the sweep (`--chunk -1`), and
  the engine gained `search.memory_mb` (chunk from a memory budget, via XLA's
  memory analysis of a one-candidate program) beside `search.chunk`; on CPU,
  `search.chunk=1` is the fast setting. The default (whole population) is kept for
  accelerators.
- The modes run one after another in one process; the load average at the start
  (above) says whether the machine was idle. The load at the end counts the
  benchmark's own 2 threads. Contention from another job moves single readings by
  tens of percent: rerun when the start load is not under 1.
"""


def summary(payload, args) -> dict:
  """The headline ratios: per candidate from deit_tiny (else the first model), the whole
  search from the measured end-to-end runs, (f) per model."""
  models, search_res = payload["models"], payload.get("search") or {}
  searches = payload.get("searches") or {}
  name = "deit_tiny_patch16_224" if "deit_tiny_patch16_224" in models else next(iter(models))
  res = models[name]
  ratios = search_res.get("ratios", {})
  return {
      "model": name, "calib_images": args.calib_images,
      "cached_vs_sequential": res["ratios"]["cached_vs_sequential"],
      "cached_vs_reference": res["ratios"].get("cached_vs_reference"),
      "cached_fraction_of_peak": res["c_population_cached"]["fraction_of_peak"],
      "population_full_vs_sequential": res["ratios"]["population_full_vs_sequential"],
      "search_model": search_res.get("model"),
      "search_vs_reference_end_to_end": ratios.get("engine_vs_reference"),
      "search_parallel_vs_reference_end_to_end": ratios.get("generation_parallel_vs_reference"),
      "search_vs_sequential_end_to_end": ratios.get("engine_vs_sequential"),
      "search_vs_reference_end_to_end_cifar10": searches.get(
          "vit_cifar10_patch4_32", {}).get("ratios", {}).get("engine_vs_reference"),
      "warm_compile_fraction": (search_res.get("persistent_cache") or {}).get(
          "warm_compile_fraction"),
      "int8_vs_fp32": res.get("f_integer", {}).get("int8_vs_fp32"),
      "int8_vs_fp32_by_model": {k: r["f_integer"]["int8_vs_fp32"] for k, r in models.items()
                                if "f_integer" in r},
      "load_start": payload["machine"]["load_start"],
      "idle_at_start": payload["machine"]["idle_at_start"],
      "device": payload["machine"]["device"], "git_commit": payload["git_commit"]}


def search_inputs(cfg, n_images):
  """The search's params and calibration images: the fixture's bundled weights and
  training images; other models random (speed does not depend on them)."""
  from evolq_jax.data import load_split
  source = {"vit_fixture_patch4_28": "bundled", "vit_cifar10_patch4_32": "cifar10"}
  if cfg.name in source:
    images, _ = load_split({"source": source[cfg.name]}, "train", cfg, limit=n_images, seed=0)
    return load_params(bundled_checkpoint(cfg.name), cfg), images
  images = jax.random.normal(jax.random.key(1), (n_images, cfg.img_size, cfg.img_size,
                                                 cfg.in_chans))
  return init_params(cfg, jax.random.key(0)), np.asarray(images)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", nargs="+",
                  default=["deit_tiny_patch16_224", "vit_fixture_patch4_28"])
  ap.add_argument("--calib-images", type=int, default=1000)
  ap.add_argument("--loss-batch", type=int, default=100)
  ap.add_argument("--population", type=int, default=15)
  ap.add_argument("--seq-candidates", type=int, default=0,
                  help="candidates timed in (a) and (e); 0 = the population")
  ap.add_argument("--chunk", type=int, default=-1,
                  help="candidates vmapped at once in (b)-(d): -1 = the fastest of the "
                  "profile's sweep, 0 = the whole population (or --memory-mb's choice)")
  ap.add_argument("--memory-mb", type=float, default=0,
                  help="with --chunk 0: memory budget (MiB) that picks the chunk of (b)-(d)")
  ap.add_argument("--no-bf16", action="store_true")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--no-profile", action="store_true")
  ap.add_argument("--search-models", nargs="+",
                  default=["vit_fixture_patch4_28", "vit_cifar10_patch4_32"],
                  help="models of the end-to-end searches (the fixtures: their bundled weights "
                  "and training images)")
  ap.add_argument("--search-images", type=int, default=1000)
  ap.add_argument("--search-passes", type=int, default=10)
  ap.add_argument("--search-generations", type=int, default=3)
  ap.add_argument("--search-chunk", type=int, default=1,
                  help="search.chunk of the engine's searches (1: fastest on CPU)")
  ap.add_argument("--no-search", action="store_true")
  ap.add_argument("--int-images", type=int, default=256, help="(f): images timed per model")
  ap.add_argument("--int-batch", type=int, default=64)
  ap.add_argument("--int-reps", type=int, default=3)
  ap.add_argument("--no-int", action="store_true")
  ap.add_argument("--max-load", type=float, default=1.0,
                  help="warn (and record) when the 1-minute load average at the start is above")
  ap.add_argument("--name", default="speed")
  ap.add_argument("--render", action="store_true",
                  help="only rewrite {name}.md from an existing {name}.json")
  args = ap.parse_args()
  if args.render:
    import json

    from common import RESULTS
    with open(os.path.join(RESULTS, f"{args.name}.json")) as f:
      payload = json.load(f)
    write_results(args.name, payload, page(payload))
    return
  def log(msg):
    print(msg, file=sys.stderr, flush=True)

  seq = args.seq_candidates or args.population
  dev = jax.devices()[0]
  peak_before = matmul_peak()
  machine = {"device": f"{dev.platform}: {dev.device_kind}", "devices": len(jax.devices()),
             "cpu_count": os.cpu_count(), "peak_before": peak_before,
             "load_start": [round(v, 2) for v in os.getloadavg()]}
  machine["idle_at_start"] = machine["load_start"][0] <= args.max_load
  if not machine["idle_at_start"]:
    log(f"WARNING: load average {machine['load_start']} is above {args.max_load}: this machine "
        "is not idle, so the timings are not final figures.")
  log(f"matmul peak {peak_before:.0f} GFLOP/s on {machine['device']}")
  models = {}
  for name in args.models:
    cfg = get_preset(name)
    lb = min(args.loss_batch, args.calib_images)
    res, ctx = run_jax_modes(cfg, args.calib_images, args.population, seq, lb, args.memory_mb,
                             args.chunk, not args.no_bf16, peak_before, log,
                             not args.no_profile)
    res["settings"] = {"calib_images": args.calib_images, "loss_batch": lb,
                       "population": args.population, "seq_candidates": seq,
                       "memory_mb": args.memory_mb, "quant": QCFG.name}
    if not args.no_torch:
      try:
        from speed_torch import build_reference, time_candidates
        res["e_reference_torch"] = time_candidates(
            cfg, build_reference(cfg, ctx["images"], lb), seq, peak_before, log)
      except ImportError as e:
        log(f"(e) skipped: {e}")
    if not args.no_int:
      res["f_integer"] = run_integer_modes(cfg, ctx["params"], args.int_images, args.int_batch,
                                           args.int_reps, log)
    c = res["c_population_cached"]["seconds_per_candidate"]
    res["ratios"] = {"cached_vs_sequential": res["a_sequential_full"]["seconds_per_candidate"] / c,
                     "population_full_vs_sequential":
                     res["a_sequential_full"]["seconds_per_candidate"]
                     / res["b_population_full"]["seconds_per_candidate"]}
    if "e_reference_torch" in res:
      res["ratios"]["cached_vs_reference"] = res["e_reference_torch"]["seconds_per_candidate"] / c
      res["ratios"]["sequential_vs_reference"] = (
          res["e_reference_torch"]["seconds_per_candidate"]
          / res["a_sequential_full"]["seconds_per_candidate"])
    res["device_peak_mib"] = device_peak_mib()
    models[name] = res
  searches = {}
  for name in ([] if args.no_search else args.search_models):
    cfg = get_preset(name)
    params, images = search_inputs(cfg, args.search_images)
    searches[name] = run_search_modes(cfg, params, images, args.search_passes,
                                      args.search_generations, min(args.loss_batch, len(images)),
                                      args.search_chunk, not args.no_torch, log)
  if not args.no_int:
    machine["int8_matmul"] = matmul_int8_vs_fp32()
  machine["peak_after"] = matmul_peak()
  machine["load_end"] = [round(v, 2) for v in os.getloadavg()]
  peak = max(peak_before, machine["peak_after"])
  for res in models.values():  # fractions against the higher of the two peak readings
    for key, _ in MODES:
      if key in res:
        res[key]["fraction_of_peak"] = res[key]["gflop_s"] / peak
  payload = {"git_commit": git_commit(), "command": "python " + " ".join(sys.argv),
             "machine": {**machine, "peak_gflop_s": peak}, "models": models}
  if searches:
    payload["search"] = next(iter(searches.values()))  # the headline model's
    payload["searches"] = searches
  payload["summary"] = summary(payload, args)
  write_results(args.name, payload, page(payload))


if __name__ == "__main__":
  main()

