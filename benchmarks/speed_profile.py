"""The profile of speed.py's mode (c): XLA cost analysis, a jax.profiler op-time
breakdown by category and a chunk sweep at one block."""
from __future__ import annotations

import collections
import glob
import re
import tempfile
import time

import jax
from speed_common import QCFG, TEMPERATURE, forward_flops, population, timed

from evolq_jax.search import SearchConfig, prefix_activations, searched_scales
from evolq_jax.search.fitness import scoring_args, segment_fitness


CATEGORIES = ("linear matmuls", "attention matmuls", "activation fake-quant", "softmax",
              "gelu", "layernorm", "weight re-quant, loss, copies")


def _category(op_name: str, is_dot: bool) -> str:
  if is_dot:
    linear = re.search(r"/(qkv|proj|fc1|fc2|head|patch_embed)/", op_name)
    return "linear matmuls" if linear else "attention matmuls"
  if "VisionTransformer" not in op_name:
    return "weight re-quant, loss, copies"
  for key, cat in (("qpoint", "activation fake-quant"), ("softmax", "softmax"),
                   ("gelu", "gelu"), ("erf", "gelu"), ("LayerNorm", "layernorm"),
                   ("norm", "layernorm")):
    if key in op_name:
      return cat
  return "weight re-quant, loss, copies"


def hlo_computations(hlo_text: str) -> dict:
  """Computation name -> its instruction lines, from a compiled program's HLO text."""
  bodies, current = {}, None
  for line in hlo_text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m:
      current = m.group(1)
      bodies[current] = []
    elif current:
      bodies[current].append(line)
  return bodies


def hlo_categories(hlo_text: str) -> dict:
  """HLO instruction name -> category, from each instruction's metadata op_name."""
  bodies = hlo_computations(hlo_text)
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", line)
    if not m:
      continue
    op = re.search(r'op_name="([^"]*)"', line)
    op_name = op.group(1) if op else ""
    called = re.search(r"calls=%?([\w.\-]+)", line)
    body = "\n".join(bodies.get(called.group(1), [])) if called else ""
    is_dot = bool(re.search(r"= [^=]*\b(dot|convolution)\(", line + "\n" + body)) or \
        "ynn_fusion" in m.group(1) or "gemm" in line
    if not op_name and body:  # a fusion without metadata: take its first op's
      inner = re.search(r'op_name="([^"]*)"', body)
      op_name = inner.group(1) if inner else ""
    out[m.group(1)] = _category(op_name, is_dot)
  return out


def profile_run(exe, call, hlo_text):
  """Trace one call; -> (wall s, busy s, {category: op-seconds summed over threads})."""
  cats = hlo_categories(hlo_text)
  logdir = tempfile.mkdtemp(prefix="evolq_speed_prof_")
  jax.profiler.start_trace(logdir)
  t = time.perf_counter()
  call()
  wall = time.perf_counter() - t
  jax.profiler.stop_trace()
  from jax.profiler import ProfileData
  pd = ProfileData.from_file(max(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)))
  per_cat, spans = collections.Counter(), []
  for plane in pd.planes:
    for line in plane.lines:
      for ev in line.events:
        cat = cats.get(ev.name)
        if cat is None or ev.name.startswith(("while", "call", "conditional")):
          continue  # containers and host events: their children are counted
        per_cat[cat] += ev.duration_ns / 1e9
        spans.append((ev.start_ns, ev.start_ns + ev.duration_ns))
  busy, end = 0.0, -1
  for a, b in sorted(spans):  # union of op intervals: time some op was running
    if b > end:
      busy += (b - max(a, end)) / 1e9
      end = b
  return wall, busy, dict(per_cat)


def available_bytes() -> int:
  """MemAvailable of /proc/meminfo (Linux); elsewhere a large number (no check)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 1 << 62


def profile_cached(cfg, ctx, block, pop_size, loss_batch, log):
  """XLA cost analysis, an op-time breakdown and a chunk sweep of (c) at one block."""
  scfg = SearchConfig(loss_batch=loss_batch)
  tokens = prefix_activations(cfg, QCFG, ctx["params"], ctx["qparams"], ctx["images"], block,
                              loss_batch)
  v0, lay = searched_scales(cfg, QCFG, ctx["qparams"], block, scfg.space)
  pb = population(v0, pop_size, block)
  static, args_ = scoring_args(cfg, QCFG, block, lay, "infonce", TEMPERATURE, loss_batch,
                               ctx["params"], ctx["fq"], ctx["qparams"], tokens, ctx["fp_ref"])
  sweep = {}
  for chunk in sorted({1, 3, pop_size}):
    exe = segment_fitness.lower(*static, chunk, pb, *args_).compile()
    temp = exe.memory_analysis().temp_size_in_bytes
    if temp > 0.7 * available_bytes():  # would swap or be OOM-killed: not a speed figure
      sweep[chunk] = {"skipped": f"XLA temp {temp / 2 ** 20:.0f} MiB > 70% of available memory",
                      "xla_temp_mib": temp / 2 ** 20}
      log(f"profile block {block} chunk {chunk}: {sweep[chunk]}")
      continue
    exe(pb, *args_).block_until_ready()
    sweep[chunk] = {"seconds_per_candidate":
                    timed(lambda e=exe: e(pb, *args_).block_until_ready()) / pop_size,
                    "xla_temp_mib": temp / 2 ** 20}
    log(f"profile block {block} chunk {chunk}: {sweep[chunk]}")
  best = min((c for c in sweep if "seconds_per_candidate" in sweep[c]),
             key=lambda c: sweep[c]["seconds_per_candidate"])
  exe = segment_fitness.lower(*static, best, pb, *args_).compile()
  cost = exe.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  wall, busy, per_cat = profile_run(exe, lambda: exe(pb, *args_).block_until_ready(),
                                    exe.as_text())
  total = sum(per_cat.values()) or 1.0
  analytic = forward_flops(cfg, block) * ctx["images"].shape[0]
  return {"block": block, "chunk_sweep": sweep, "chunk_profiled": best, "wall_s": wall,
          "ops_busy_s": busy, "idle_fraction": max(0.0, 1 - busy / wall),
          "op_seconds": per_cat,
          "op_fraction": {k: v / total for k, v in sorted(per_cat.items(), key=lambda i: -i[1])},
          "xla_cost_flops_per_loop_body": float(cost.get("flops", 0)),
          "xla_cost_bytes_accessed_per_loop_body": float(cost.get("bytes accessed", 0)),
          "analytic_matmul_flops_per_candidate": analytic}

