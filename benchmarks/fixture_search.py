"""Init vs Evol-Q (infoNCE) on the bundled fixture, several seeds, via the library API.

With --holdout N (default 2,000 bundled held-out train images) the result of each
search is its best pass on those images, kept over the FQ-ViT init only if a
one-sided sign test gives p < --alpha (see evolq_jax.search.engine.search).

  python benchmarks/fixture_search.py [--passes P --generations K --children L --seeds 0 1 2
                                       --holdout N --alpha A]
  ->  benchmarks/results/fixture_search.json (+ docs/results/fixture_search.md)
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
from common import git_commit, write_results

from evolq_jax.calibrate import calibrate
from evolq_jax.config import QuantConfig, base_config
from evolq_jax.quant.recipe import parse_bits
from evolq_jax.evaluate import classification_metrics
from evolq_jax.pipeline import load_data, load_model, predict
from evolq_jax.search import SearchConfig, search


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--settings", nargs="+", default=["W3A8", "W4A8"])
  ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  ap.add_argument("--passes", type=int, default=2)
  ap.add_argument("--generations", type=int, default=2)
  ap.add_argument("--children", type=int, default=4)
  ap.add_argument("--holdout", type=int, default=2000)
  ap.add_argument("--alpha", type=float, default=0.05)
  args = ap.parse_args()
  c = base_config()
  c.holdout.num_images = args.holdout
  cfg, params = load_model(c)
  data = load_data(c, cfg)
  x, y = data["test"]
  fp = predict(cfg, params, x)
  scfg = SearchConfig(passes=args.passes, generations=args.generations, children=args.children)
  runs = []
  for setting in args.settings:
    w, a = parse_bits(setting)
    qcfg = QuantConfig(w_bits=w, a_bits=a, recipe="fqvit")  # the record's plain start
    qp0 = calibrate(cfg, qcfg, params, data["calib"], progress=False)
    init = classification_metrics(predict(cfg, params, x, qcfg, qp0), y, fp)
    for seed in args.seeds:
      r = search(cfg, qcfg, params, qp0, data["calib"], scfg, seed=seed, progress=False,
                 holdout=data.get("holdout"), holdout_alpha=args.alpha,
                 holdout_rule="best_significant")
      final = classification_metrics(predict(cfg, params, x, qcfg, r.qparams), y, fp)
      last = (final if r.selected_pass == scfg.passes else
              classification_metrics(predict(cfg, params, x, qcfg, r.last_qparams), y, fp))
      runs.append({"setting": setting, "seed": seed, "init_top1": init["top1"],
                   "final_top1": final["top1"], "last_pass_top1": last["top1"],
                   "selected_pass": r.selected_pass, "holdout": r.holdout,
                   "fitness_init": r.fitness_init,
                   "fitness_final": r.fitness_final, "candidates_evaluated": r.candidates,
                   "seconds": round(r.seconds, 1)})
      print(runs[-1], file=sys.stderr, flush=True)
  budget = (f"passes={scfg.passes}, generations={scfg.generations}, children={scfg.children} "
            f"per generation, pool {scfg.population}, tournament {scfg.tournament}, "
            f"r = paper default; held-out pick: {args.holdout} train images, sign test "
            f"alpha {args.alpha}")
  payload = {"git_commit": git_commit(), "budget": budget, "runs": runs}
  write_results("fixture_search", payload, page(payload))


def page(payload: dict) -> str:
  runs = payload["runs"]
  seeds = list(dict.fromkeys(r["seed"] for r in runs))
  lines = ["# Init vs Evol-Q (infoNCE) on the fixture", "",
           f"git commit `{payload['git_commit']}`; budget: {payload['budget']}; 1,000 "
           "calibration images, 10,000 test images; test top-1 in %, mean ± std over seeds "
           f"{seeds}.", "",
           "| setting | FQ-ViT init top-1 | Evol-Q top-1 | gain | worst-seed gain | "
           "kept pass per seed | last pass top-1 | calib loss init → final | candidates | "
           "search s / run |", "|---|---|---|---|---|---|---|---|---|---|"]
  for setting in dict.fromkeys(r["setting"] for r in runs):
    rs = [r for r in runs if r["setting"] == setting]
    fin = np.array([r["final_top1"] for r in rs])
    gain = fin - rs[0]["init_top1"]
    lines.append(
        f"| {setting} | {rs[0]['init_top1']:.2f} | {fin.mean():.2f} ± {fin.std():.2f} | "
        f"{gain.mean():+.2f} | {gain.min():+.2f} | "
        f"{', '.join(str(r['selected_pass']) for r in rs)} | "
        f"{np.mean([r['last_pass_top1'] for r in rs]):.2f} | {rs[0]['fitness_init']:.4f} → "
        f"{np.mean([r['fitness_final'] for r in rs]):.4f} | {rs[0]['candidates_evaluated']} | "
        f"{np.mean([r['seconds'] for r in rs]):.0f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
