"""The results pages, generated from the committed JSON.

Every benchmark script writes its record to `benchmarks/results/NAME.json` and
its page to `docs/results/NAME.md`; the page is `page(payload)` of the script
that wrote the record, so it holds no figure the record does not. The README's
headline table is generated the same way, from the records it cites.

  python benchmarks/pages.py            # rewrite every page and the README's table
  python benchmarks/pages.py --check    # list the pages that differ; exit 1 if any

`tests/test_docs.py` runs the check.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import COMMITTED, PAGES_DIR, ROOT  # noqa: E402

from evolq_jax.deploy import has_int8_dot  # noqa: E402
from evolq_jax.workdir import write_atomic  # noqa: E402

# page name -> the script whose `page(payload)` writes it from NAME.json
PAGES = {
    "accuracy": "accuracy",
    "accuracy_cifar10": "accuracy",
    "efficientnet_lite0": "accuracy",
    "demo": "demo",
    "deploy": "deploy",
    "export_size": "export_size",
    "fake_quant_passes": "fake_quant_passes",
    "fixture_init": "fixture_init",
    "fixture_search": "fixture_search",
    "landscape": "landscape",
    "mixed_precision": "mixed_precision",
    "pick_study": "pick_study",
    "speed": "speed",
    "speed_search_fixture": "speed",
    "speed_search_cifar10": "speed",
}
README = os.path.join(ROOT, "README.md")
HEADLINE = ("<!-- headline -->", "<!-- /headline -->")


def record(name: str) -> dict:
  with open(os.path.join(COMMITTED, f"{name}.json")) as f:
    return json.load(f)


def render(name: str) -> str:
  """The page `name` as its script writes it from the committed record."""
  return importlib.import_module(PAGES[name]).page(record(name))


def _cell(values: list, seeds: bool = True) -> str:
  """Mean test top-1, with the number of seeds behind it for a search."""
  if not values:
    return "–"
  n = f" ({len(values)} seed{'s' if len(values) > 1 else ''})" if seeds else ""
  return f"{np.mean(values):.2f}{n}"


def _grid_row(name: str, setting: str, label: str) -> str:
  """One accuracy grid's setting: init-reference, the paper's tournament and the
  best other search by mean test top-1 (every method's runs are on its page)."""
  grid = record(name)
  by = {}
  for r in grid["runs"]:
    if r["setting"] == setting:
      by.setdefault(r["method"], []).append(r["test_top1"])
  others = {m: v for m, v in by.items()
            if not m.startswith(("init-", "evolq-infonce")) and m != "clip-ratio"}
  best = max(others, key=lambda m: np.mean(others[m]))
  return (f"| {label} | {setting} | {grid['fp_top1']:.2f} | "
          f"{_cell(by['init-reference'], seeds=False)} | {_cell(by['evolq-infonce'])} | "
          f"{best}: {_cell(others[best])} | [{name}](docs/results/{name}.md) |")


def _mixed_row(bed: str, a_bits: int, budget: float, label: str) -> str:
  """One budget of the per-layer widths: uniform widths, the default tournament, and the
  best other width method, at init or after a method run at its widths ("sensitivity +
  adaround-qdrop")."""
  mixed, width = {}, {}  # label -> top-1 per seed; method -> average bits
  for r in record("mixed_precision")["runs"]:
    if (r["bed"], r["a_bits"], r["budget"]) == (bed, a_bits, budget):
      mixed.setdefault(r["method"], []).append(r["init_top1"])
      width[r["method"]] = r["avg_bits"]
      for name, after in r["after"].items():
        mixed.setdefault(f"{r['method']} + {name}", []).append(after["top1"])
  others = {m: v for m, v in mixed.items() if m not in ("uniform", "evolq", "evolq-seeded")}
  best = max(others, key=lambda m: np.mean(others[m]))
  fp = record("mixed_precision")["fp_top1"][f"{bed}_a{a_bits}"]
  return (f"| {label}, per-layer widths | ≤ {budget:g} bits average, A{a_bits} | {fp:.2f} | "
          f"uniform W{width['uniform']:g}: {_cell(mixed['uniform'], seeds=False)} | "
          f"{_cell(mixed.get('evolq-seeded') or mixed['evolq'])} | {best}: "
          f"{_cell(others[best])} | [mixed_precision](docs/results/mixed_precision.md) |")


def headline() -> str:
  demo = next(r for r in record("demo")["runs"] if r["recipe"] == "reference")
  return "\n".join([
      "| model (test images) | setting | FP | start: init-reference | Evol-Q (the paper's "
      "tournament) | best other method | page |",
      "|---|---|---|---|---|---|---|",
      f"| ViT on Fashion-MNIST (10,000), `evolq demo` | W3A8 | {demo['fp_top1']:.2f} | "
      f"{demo['init_top1']:.2f} | {demo['final_top1']:.2f} (1 seed) | – | "
      "[demo](docs/results/demo.md) |",
      _grid_row("accuracy_cifar10", "W3A4", "ViT on CIFAR-10 (10,000)"),
      _grid_row("efficientnet_lite0", "W4A8", "EfficientNet-Lite0, ImageNet sample (500)"),
      _grid_row("efficientnet_lite0", "W4A4", "EfficientNet-Lite0, ImageNet sample (500)"),
      _mixed_row("lite0", 8, 4.5, "EfficientNet-Lite0 (500)"),
      _mixed_row("vit", 4, 3.0, "ViT on CIFAR-10 (10,000)"),
      "", "Deployed as QDQ ONNX in ONNX Runtime (2 threads, W4A8; "
      "[deploy](docs/results/deploy.md)):", "",
      "| model | int8 vs fp32 graph, batch 64 | batch 1 | file: int8 / fp32 |",
      "|---|---|---|---|",
      *(f"| {s['model']} | {s['ort_int8_vs_fp32_b64']:.2f}× | {s['ort_int8_vs_fp32_b1']:.2f}× | "
        f"{s['bytes']['onnx_int8'] / 2 ** 20:.2f} / {s['bytes']['onnx_fp32'] / 2 ** 20:.2f} MiB |"
        for s in record("deploy")["speed"].values()),
      *_deploy_ceiling(record("deploy").get("ceiling")),
  ])


def _deploy_ceiling(c) -> list:
  """A line under the deploy table: how much int8 can win on the CPU that measured it."""
  if not c:
    return []
  cpu = (f"On this CPU ({', '.join(c['cpu']['flags'])}"
         + ("" if has_int8_dot(c["cpu"]) else "; no int8 dot-product instructions in its flags")
         + ")")
  return ["", f"{cpu} ONNX Runtime's int8 matmul runs at {c['matmul_int8_vs_fp32']:.2f}× its "
          f"fp32 matmul, so no int8 graph of {c['model']} can run above "
          f"{c['bound_int8_vs_fp32_b64']:.2f}× fp32 here (the page's ceiling section)."]


def readme_with_headline(text: str) -> str:
  start, end = HEADLINE
  if start not in text or end not in text:
    raise SystemExit(f"README.md: the markers {start} and {end} are missing; put them "
                     "where the headline table goes.")
  head, rest = text.split(start, 1)
  return f"{head}{start}\n{headline()}\n{end}{rest.split(end, 1)[1]}"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--check", action="store_true", help="compare, write nothing")
  ap.add_argument("names", nargs="*", default=list(PAGES), help="pages (default: all)")
  args = ap.parse_args(argv)
  differ = []
  for name in args.names:
    path, text = os.path.join(PAGES_DIR, f"{name}.md"), render(name)
    old = open(path).read() if os.path.exists(path) else None
    if old != text:
      differ.append(path)
      if not args.check:
        write_atomic(path, text)
  with open(README) as f:
    readme = f.read()
  if readme_with_headline(readme) != readme:
    differ.append(README)
    if not args.check:
      write_atomic(README, readme_with_headline(readme))
  for path in differ:
    print(("differs from its record: " if args.check else "rewrote ") + os.path.relpath(path, ROOT))
  return 1 if args.check and differ else 0


if __name__ == "__main__":
  sys.exit(main())
