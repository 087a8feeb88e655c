"""The record behind the README's demo figures: `evolq demo` as shipped (the
default recipe) and from FQ-ViT's plain start, each run end to end.

  python benchmarks/demo.py [--recipes reference fqvit] [--workdir runs/demo_bench]
  ->  benchmarks/results/demo.json (+ docs/results/demo.md) and demo_fitness_w3a8.png
      (the default run's curve)

Each run is a whole `evolq demo` (calibration, FP and quantized evaluation on
the 10,000 test images, the search, the final evaluation) with its wall time
and the load average at its start; a run whose start was not idle says so.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time

from common import RESULTS, git_commit, write_results

from evolq_jax.cli import demo_config
from evolq_jax.pipeline import run_search

IDLE_LOAD = 1.0  # a 1-minute load above this: another job shared the 2 cores
KEEP = ("init_top1", "final_top1", "fitness_init", "fitness_final", "candidates_evaluated",
        "search_seconds", "seconds", "compile", "quant", "fp_top1")


def run(recipe: str, workdir: str) -> dict:
  load = os.getloadavg()
  t = time.time()
  s = run_search(demo_config([f"quant.recipe={recipe!r}"]), workdir, overwrite=True)
  return {"recipe": recipe, "wall_seconds": time.time() - t, "load_at_start": list(load),
          **{k: s[k] for k in KEEP if k in s}}


def page(payload: dict) -> str:
  runs = payload["runs"]
  lines = ["`evolq demo` (bundled Fashion-MNIST ViT fixture, W3A8, 2 passes x 4 generations x "
           "8 children per block, 10,000 test images), per start. Written by "
           "`benchmarks/demo.py`.", "",
           "| recipe | bias correction | FP top-1 | init top-1 | after Evol-Q | change | "
           "calib loss init → final | candidates | wall time | load at start (1/5/15 min) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in runs:
    load = "/".join(f"{x:.2f}" for x in r["load_at_start"])
    if r["load_at_start"][0] > IDLE_LOAD:
      load += " (not idle: the time is not comparable)"
    lines.append(f"| {r['recipe']} | {'on' if r['quant']['bias_correction'] else 'off'} | "
                 f"{r['fp_top1']:.2f} | {r['init_top1']:.2f} | {r['final_top1']:.2f} | "
                 f"{r['final_top1'] - r['init_top1']:+.2f} | {r['fitness_init']:.4f} → "
                 f"{r['fitness_final']:.4f} | {r['candidates_evaluated']} | "
                 f"{r['wall_seconds'] / 60:.1f} min | {load} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--recipes", nargs="+", default=["reference", "fqvit"])
  ap.add_argument("--workdir", default="runs/demo_bench")
  args = ap.parse_args(argv)  # the page alone, from demo.json: python benchmarks/pages.py demo
  runs = []
  for recipe in args.recipes:
    workdir = os.path.join(args.workdir, recipe)
    runs.append(run(recipe, workdir))
    if recipe == args.recipes[0]:
      os.makedirs(RESULTS, exist_ok=True)
      shutil.copy(os.path.join(workdir, "fitness.png"),
                  os.path.join(RESULTS, "demo_fitness_w3a8.png"))
  payload = {"git_commit": git_commit(), "runs": runs}
  write_results("demo", payload, page(payload))


if __name__ == "__main__":
  main()
