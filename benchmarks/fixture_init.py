"""FQ-ViT initialization on the bundled fixture: top-1 per bit setting and weight observer.

  python benchmarks/fixture_init.py
  ->  benchmarks/results/fixture_init.json (+ docs/results/fixture_init.md)
"""
from __future__ import annotations

import sys
import time

from common import git_commit, write_results

from evolq_jax.calibrate import calibrate
from evolq_jax.config import QuantConfig, base_config
from evolq_jax.evaluate import classification_metrics
from evolq_jax.pipeline import load_data, load_model, predict

SETTINGS = [(8, 8), (4, 8), (3, 8), (4, 4)]
OBSERVERS = ["minmax", "omse"]


def main():
  c = base_config()
  cfg, params = load_model(c)
  data = load_data(c, cfg)
  x, y = data["test"]
  fp = predict(cfg, params, x)
  fp_m = classification_metrics(fp, y)
  runs = [{"setting": "FP32", "w_observer": "-", **fp_m, "agreement": 100.0, "seconds": 0.0}]
  for w, a in SETTINGS:
    for obs in OBSERVERS:
      t = time.time()
      qcfg = QuantConfig(w_bits=w, a_bits=a, w_observer=obs, recipe="fqvit")
      qp = calibrate(cfg, qcfg, params, data["calib"], progress=False)
      m = classification_metrics(predict(cfg, params, x, qcfg, qp), y, fp)
      runs.append({"setting": qcfg.name, "w_observer": obs, **m,
                   "seconds": round(time.time() - t, 1)})
      print(runs[-1], file=sys.stderr, flush=True)
  other = ("activations: omse observer, per tensor, uint8 asymmetric; PTF on the residual "
           "stream; uniform softmax; no bias correction; weights per output channel, "
           "unsigned with zero point; 1,000 bundled calibration images (batches of 100); "
           "10,000 Fashion-MNIST test images")
  payload = {"git_commit": git_commit(), "settings": other, "runs": runs}
  write_results("fixture_init", payload, page(payload))


def page(payload: dict) -> str:
  lines = ["# FQ-ViT initialization on the fixture (`vit_fixture_patch4_28`)", "",
           f"git commit `{payload['git_commit']}`; other settings: {payload['settings']}.", "",
           "| setting | weight observer | top-1 | top-5 | agreement with FP | seconds |",
           "|---|---|---|---|---|---|"]
  lines += [f"| {r['setting']} | {r['w_observer']} | {r['top1']:.2f} | {r['top5']:.2f} | "
            f"{r['agreement']:.2f} | {r['seconds']} |" for r in payload["runs"]]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
