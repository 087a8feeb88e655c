"""How many memory passes activation fake-quant costs in a unit's scoring program, as XLA
compiles it: a census of the compiled program's fusions, and optionally their time.

  python benchmarks/fake_quant_passes.py                 # census only (any machine state)
  python benchmarks/fake_quant_passes.py --time          # + seconds per candidate (idle!)
  ->  benchmarks/results/fake_quant_passes.json (+ docs/results/fake_quant_passes.md)

Each quantization point is a chain of elementwise ops (divide, round, add, clamp,
subtract, multiply; `quant/uniform.py`) that XLA fuses with its neighbours. The census
sorts every fusion holding such ops (their metadata names a `qpoint`) by what it shares
a pass with: a matmul or reduction in a library (YNNPACK) fusion, other elementwise or
reduce ops in an XLA loop fusion, or nothing (a pass of its own). It also counts the
scalars XLA writes out as full tensors for a library fusion that takes them as operands
(`wrapped_broadcast`), passes that exist only because of the fusion choice. Variants:
XLA's CPU defaults, and the same program with YNNPACK's reduce fusion off
(`xla_cpu_experimental_ynn_fusion_type`, set per compile), which takes the softmax and
its probabilities' quantization back into XLA's own loop fusions.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time

import jax
import numpy as np
from common import git_commit, write_results
from speed_common import QCFG, TEMPERATURE
from speed_profile import hlo_computations

from evolq_jax.calibrate import calibrate
from evolq_jax.models import get_preset, init_params, quantize_params
from evolq_jax.search import SearchConfig, prefix_activations, searched_scales
from evolq_jax.search.fitness import reference_logits, scoring_args, segment_fitness

NAME = "fake_quant_passes"
# model -> (unit scored, calibration images, loss batch)
MODELS = {"vit_fixture_patch4_28": (3, 128, 32), "deit_tiny_patch16_224": (6, 32, 16)}
# variant -> compiler options of the scoring program
VARIANTS = {
    "xla_defaults": None,
    "ynn_reduce_off": {"xla_cpu_experimental_ynn_fusion_type":
                       "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                       "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"},
}
POP = 4


def _elements(shape: str) -> int:
  dims = re.match(r"\w+\[([\d,]*)\]", shape)
  return int(np.prod([int(d) for d in dims.group(1).split(",") if d])) if dims else 0


def census(hlo: str) -> dict:
  """Fusions holding fake-quant ops, by what they share their pass with, and the
  scalars written out as tensors (counts and elements written per loop iteration)."""
  bodies = hlo_computations(hlo)
  counts, elements = collections.Counter(), collections.Counter()
  pattern = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (\S+) fusion\(.*kind=(k\w+), "
                       r"calls=%?([\w.\-]+)")
  for lines in bodies.values():
    for line in lines:
      m = pattern.match(line)
      if not m:
        continue
      shape, kind, called = m.groups()
      body = bodies.get(called, [])
      names = [n for b in body for n in re.findall(r'op_name="([^"]*)"', b)]
      if "wrapped_broadcast" in called:
        if any("qpoint" in n for n in names + re.findall(r'op_name="([^"]*)"', line)):
          counts["scalar written out as a tensor"] += 1
          elements["scalar written out as a tensor"] += _elements(shape)
        continue
      if not any("qpoint" in n for n in names):
        continue
      if kind == "kCustom":
        key = "in a library (YNNPACK) fusion"
      elif all("qpoint" in n for n in names):
        key = "a pass of its own"
      else:
        key = "with other ops in an XLA fusion"
      counts[key] += 1
      elements[key] += _elements(shape)
  return {"fusions": dict(counts), "elements_written": dict(elements)}


def _setup(name: str):
  unit, n, lb = MODELS[name]
  cfg = get_preset(name)
  params = init_params(cfg, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (n, cfg.img_size, cfg.img_size, cfg.in_chans))
  qparams = calibrate(cfg, QCFG, params, x, batch_size=n, progress=False)
  tokens = prefix_activations(cfg, QCFG, params, qparams, x, unit, lb)
  v0, layout = searched_scales(cfg, QCFG, qparams, unit, SearchConfig(loss_batch=lb).space)
  pop = v0[None] * jax.random.uniform(jax.random.key(2), (POP, v0.shape[0]), minval=0.9,
                                      maxval=1.1)
  static, args = scoring_args(cfg, QCFG, unit, layout, "infonce", TEMPERATURE, lb, params,
                              quantize_params(QCFG, params, qparams), qparams, tokens,
                              reference_logits(cfg, params, x))
  return segment_fitness.lower(*static, 1, pop, *args), pop, args


def measure(name: str, reps: int, timing: bool, log) -> dict:
  lowered, pop, args = _setup(name)
  unit, n, lb = MODELS[name]
  out = {"unit": unit, "images": n, "loss_batch": lb, "population": POP, "variants": {}}
  exes = {}
  for v, opts in VARIANTS.items():
    exes[v] = lowered.compile(compiler_options=opts) if opts else lowered.compile()
    out["variants"][v] = census(exes[v].as_text())
    log(f"{name} {v}: {out['variants'][v]['fusions']}")
  fits = {v: np.asarray(e(pop, *args)) for v, e in exes.items()}
  out["same_fitness_bits"] = bool(np.array_equal(*fits.values()))
  out["max_rel_fitness_diff"] = float(np.max(np.abs(np.subtract(*fits.values()))
                                             / np.abs(fits["xla_defaults"])))
  if timing:
    out["load_before"] = [round(v, 2) for v in os.getloadavg()]
    seconds = {v: [] for v in exes}
    for _ in range(reps):  # interleaved, so drifts of the machine hit both
      for v, e in exes.items():
        t = time.perf_counter()
        e(pop, *args).block_until_ready()
        seconds[v].append((time.perf_counter() - t) / POP)
    out["load_after"] = [round(v, 2) for v in os.getloadavg()]
    for v in exes:
      out["variants"][v]["seconds_per_candidate"] = float(np.median(seconds[v]))
    out["ynn_reduce_off_speedup"] = (out["variants"]["xla_defaults"]["seconds_per_candidate"]
                                     / out["variants"]["ynn_reduce_off"]["seconds_per_candidate"])
    log(f"{name}: YNNPACK's reduce fusion off runs {out['ynn_reduce_off_speedup']:.3f}x "
        "the defaults' speed")
  return out


def page(payload: dict) -> str:
  lines = ["# Activation fake-quant in a unit's scoring program", "",
           f"Written by `benchmarks/fake_quant_passes.py` (git commit "
           f"`{payload['git_commit']}`; `{payload['command']}`). Fusions of the compiled "
           "program (one candidate at a time, the search's CPU default) that hold fake-quant "
           "ops, by what they share their memory pass with; elements written per loop "
           "iteration in brackets.", ""]
  keys = ("in a library (YNNPACK) fusion", "with other ops in an XLA fusion",
          "a pass of its own", "scalar written out as a tensor")
  lines += ["| model (unit) | XLA variant | " + " | ".join(keys) + " | s per candidate |",
            "|---|---|" + "---|" * (len(keys) + 1)]
  for name, m in payload["models"].items():
    for v, c in m["variants"].items():
      cells = [f"{c['fusions'].get(k, 0)} ({c['elements_written'].get(k, 0):,})" for k in keys]
      t = c.get("seconds_per_candidate")
      lines.append(f"| {name} ({m['unit']}) | {v} | " + " | ".join(cells) + " | " +
                   (f"{t:.4f}" if t is not None else "–") + " |")
  lines.append("")
  for name, m in payload["models"].items():
    same = "the same" if m["same_fitness_bits"] else "not the same"
    lines.append(f"- {name}: the two variants' fitness values are {same} bits (largest "
                 f"relative difference {m['max_rel_fitness_diff']:.1e})" +
                 (f"; with YNNPACK's reduce fusion off a candidate is scored at "
                  f"{m['ynn_reduce_off_speedup']:.3f}x the defaults' speed (median of "
                  f"{payload['reps']} interleaved runs each; load {m['load_before']} → "
                  f"{m['load_after']})" if "ynn_reduce_off_speedup" in m else "") + ".")
  return "\n".join(lines) + "\n"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  ap.add_argument("--time", action="store_true", help="time the variants (an idle machine)")
  ap.add_argument("--reps", type=int, default=7)
  args = ap.parse_args()
  log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
  payload = {"models": {}, "command": " ".join(["python"] + sys.argv), "reps": args.reps}
  for name in args.models:
    payload["models"][name] = measure(name, args.reps, args.time, log)
  payload["git_commit"] = git_commit()
  write_results(NAME, payload, page(payload))


if __name__ == "__main__":
  main()
