"""Per-layer weight widths under a budget (issue 30): which layers get the bits,
and what top-1 each method buys at each size.

  python benchmarks/mixed_precision.py --bed lite0 [--budgets 3.5 4.5 6] [--seeds 0 1 2]
      [--methods uniform random sensitivity evolq] [--after adaround adam]
  python benchmarks/mixed_precision.py --report
  ->  benchmarks/results/mixed_precision.json (+ docs/results/mixed_precision.md),
      mixed_precision_pareto.png

A cell is (bed, activation bits, budget, method, seed): the method chooses the
widths (search/bits.py) on the calibration images; the model is recalibrated
at them and evaluated on the bed's test images ("init"); then each --after
method (a scale search or the reconstruction, at its AFTER budget) runs at those
widths and is evaluated too. uniform and sensitivity are deterministic and run
once. Resumable: the JSON is rewritten after every cell and every after-method;
finished cells are skipped, and a finished cell that lacks an --after method
runs it at its recorded widths.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
from common import RESULTS, git_commit, top1_interval, write_results

from evolq_jax.calibrate import calibrate
from evolq_jax.config import apply_overrides, load_config, quant_config, search_config
from evolq_jax.evaluate import classification_metrics
from evolq_jax.pipeline import load_data, load_model, predict
from evolq_jax.qparams import QParams
from evolq_jax.quant.weights import calibrate_weights
from evolq_jax.search import calibration_fitness, reference_logits, search
from evolq_jax.search.bits import METHODS, BitsConfig, choose_bits, width_rules

BEDS = {  # name -> (config, activation settings, budgets, test limit)
    "lite0": ("configs/efficientnet_lite0.py:W4A8", (8,), (3.5, 4.5, 6.0), 0),
    "vit": ("configs/cifar10.py:W3A8", (8, 4), (3.0, 4.0, 5.0), 0),
}
VIT_TEST_IMAGES = 10000  # the vit bed scores CIFAR-10's whole test split (test limit 0)
DETERMINISTIC = ("uniform", "sensitivity")
# the methods' labels here -> BitsConfig fields ("evolq" ran before the tournament's
# first pool could start from the sensitivity fill; "evolq-seeded" is today's default)
LABELS = {"evolq": {"method": "evolq", "start": "random"},
          "evolq-seeded": {"method": "evolq", "start": "sensitivity"}}
# the scale search / reconstruction run at the chosen widths, at a budget that fits 2 cores
AFTER = {"adaround": {"strategy": "adaround", "recon_iters": 500},
         # the Lite0 reconstruction rows' budget (the accuracy grid: 200 steps of 16 images)
         "adaround-qdrop": {"strategy": "adaround", "qdrop": True, "recon_acts": True,
                            "recon_iters": 200, "recon_batch": 16},
         "adam": {"strategy": "adam", "passes": 2, "generations": 10, "lr": 0.3,
                  "lr_schedule": "cosine"},
         "evolq": {"passes": 2, "generations": 3}}


def _key(r):
  return (r["bed"], r["a_bits"], r["budget"], r["method"], r["seed"])


def context(bed: str, a_bits: int):
  spec, _, _, limit = BEDS[bed]
  c = load_config(spec)
  c.quant.a_bits = a_bits
  if limit:
    c.eval.limit = limit
  cfg, params = load_model(c)
  data = load_data(c, cfg)
  qcfg = quant_config(c)
  test_x, test_y = data["test"]
  fp = predict(cfg, params, test_x, batch_size=c.eval.batch_size)
  qparams = calibrate(cfg, qcfg, params, data["calib"], c.calib.batch_size, progress=False)
  return {"c": c, "cfg": cfg, "params": params, "data": data, "qcfg": qcfg, "fp": fp,
          "fp_calib": reference_logits(cfg, params, data["calib"]),
          "acts": qparams.acts, "deltas": {},
          "fp_top1": classification_metrics(fp, test_y)["top1"]}


def _top1(ctx, qcfg, qparams):
  x, y = ctx["data"]["test"]
  return classification_metrics(predict(ctx["cfg"], ctx["params"], x, qcfg, qparams,
                                        ctx["c"].eval.batch_size), y, ctx["fp"])["top1"]


def run_cell(ctx, bed, a_bits, budget, method, seed, after):
  c, cfg, params = ctx["c"], ctx["cfg"], ctx["params"]
  calib = ctx["data"]["calib"]
  bcfg = dataclasses.replace(BitsConfig(**c.bits.to_dict()), w_budget=budget,
                             **LABELS.get(method, {"method": method}))
  images, fp_ref = calib[:bcfg.images], ctx["fp_calib"][:bcfg.images]
  chosen = choose_bits(cfg, ctx["qcfg"], bcfg, params, ctx["acts"], images, fp_ref, seed=seed,
                       progress=False, deltas=ctx["deltas"])
  qcfg, qparams = _at_widths(ctx, chosen.bits)
  record = {"bed": bed, "a_bits": a_bits, "budget": budget, "seed": seed,
            **{k: v for k, v in chosen.to_json().items() if k != "history"},
            "method": method, "start": bcfg.start if bcfg.method == "evolq" else None,
            "history": chosen.history if method != "sensitivity" else [],
            "init_top1": _top1(ctx, qcfg, qparams), "after": {}}
  for name in after:
    run_after(ctx, record, name, qcfg, qparams)
  return record


def _at_widths(ctx, bits: dict):
  """The bed's recipe at a width per layer, and its weights recalibrated at them."""
  qcfg = dataclasses.replace(ctx["qcfg"], layer_bits=width_rules(bits, ctx["qcfg"].w_bits))
  wq = calibrate_weights(ctx["params"], qcfg.w_spec, qcfg.w_observer, qcfg.weight_rules)
  return qcfg, QParams(wq, ctx["acts"])


def run_after(ctx, record, name: str, qcfg, qparams) -> None:
  """The scale search or reconstruction `name` (AFTER) from the record's widths (qcfg,
  qparams: _at_widths of them), its top-1 and cost into record["after"][name]."""
  c, cfg, params, calib = ctx["c"], ctx["cfg"], ctx["params"], ctx["data"]["calib"]
  scfg = dataclasses.replace(search_config(c), **AFTER[name])
  load, t = os.getloadavg(), time.time()
  r = search(cfg, qcfg, params, qparams, calib, scfg, seed=record["seed"], progress=False)
  record["after"][name] = {"top1": _top1(ctx, qcfg, r.qparams), "seconds": time.time() - t,
                           "steps_or_candidates": r.candidates,
                           "calibration_fitness": calibration_fitness(
                               cfg, qcfg, params, r.qparams, calib, ctx["fp_calib"], scfg),
                           "settings": AFTER[name], "load_at_start": list(load),
                           "git_commit": git_commit()}


def _mean_init_top1(runs: list, bed: str, a_bits: int, budget: float) -> dict:
  """{width method: its mean top-1 at init over its seeds} at one bed, A and budget."""
  tops = {}
  for r in runs:
    if (r["bed"], r["a_bits"], r["budget"]) == (bed, a_bits, budget):
      tops.setdefault(r["method"], []).append(r["init_top1"])
  return {m: float(np.mean(v)) for m, v in sorted(tops.items())}


def summary(runs: list) -> dict:
  def mean_best(rows):
    if not rows:
      return None
    per_seed = {}
    for r in rows:
      tops = [r["init_top1"]] + [a["top1"] for a in r["after"].values()]
      per_seed.setdefault((r["method"], r["seed"]), []).append(max(tops))
    by_method = {}
    for (m, _), t in per_seed.items():
      by_method.setdefault(m, []).extend(t)
    return max(float(np.mean(v)) for v in by_method.values())

  lite = [r for r in runs if r["bed"] == "lite0" and r["a_bits"] == 8 and r["budget"] == 4.5]
  uni = [r for r in lite if r["method"] == "uniform"]
  out = {"lite0_a8_top1_at_4p5_bits": mean_best([r for r in lite if r["method"] != "uniform"]),
         "lite0_uniform_w4a8_top1": uni[0]["init_top1"] if uni else None}
  # every Lite0 A8 budget: each width method's mean top-1 at init over its seeds
  for budget in sorted({r["budget"] for r in runs if (r["bed"], r["a_bits"]) == ("lite0", 8)}):
    key = f"lite0_a8_mean_top1_at_{budget:g}_bits".replace(".", "p")
    out[key] = _mean_init_top1(runs, "lite0", 8, budget)
  # the CIFAR-10 ViT at uniform W3's size: the widths alone, at init; the best width method
  # by mean top-1 against uniform, and the 95% interval of uniform's top-1
  for a_bits, tag in ((8, ""), (4, "a4")):
    means = _mean_init_top1(runs, "vit", a_bits, 3.0)
    mixed = [m for m in means if m not in ("uniform", "random")]
    best = max(mixed, key=means.get) if mixed and "uniform" in means else None
    out[f"vit_mixed_vs_uniform_w3{tag}"] = means[best] - means["uniform"] if best else None
    out[f"vit_mixed_method_w3{tag}"] = best
    out[f"vit_interval_w3{tag}"] = (top1_interval(means["uniform"], VIT_TEST_IMAGES)
                                    if best else None)
    out[f"vit_w3{tag}_mean_top1"] = means
  return out


def page(payload: dict) -> str:
  runs = payload["runs"]
  lines = ["Per-layer weight widths under an average-bits budget (`benchmarks/mixed_precision.py`)"
           ": top-1 at the chosen widths (init: min/max scales with the recipe's bias "
           "correction), then after each method run at them. Size: the widths' own bytes "
           "(params x bits / 8); the export packs codes of <= 4 bits two a byte. Methods: "
           "`evolq` is the tournament from the uniform assignment and random feasible ones, "
           "`evolq-seeded` the tournament from the uniform assignment, the sensitivity fill "
           "and its mutants (the package's default, `bits.start=sensitivity`).", "",
           "| bed | A | budget | method | seed | avg bits | size (KB) | export codes (KB) "
           "| GBOPs | calib loss (bit search) | top-1 init | after |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(runs, key=lambda r: (r["bed"], -r["a_bits"], r["budget"], r["method"],
                                       r["seed"])):
    after = ", ".join(f"{k} {v['top1']:.2f} ({v['seconds'] / 60:.0f} min)"
                      for k, v in r["after"].items())
    lines.append(f"| {r['bed']} | {r['a_bits']} | {r['budget']:g} | {r['method']} | {r['seed']} "
                 f"| {r['avg_bits']:.2f} | {r['size_bytes'] / 1e3:.0f} | "
                 f"{r['export_code_bytes'] / 1e3:.0f} | {r['bops']:.2f} | {r['fitness']:.4f} | "
                 f"{r['init_top1']:.2f} | {after} |")
  s = payload.get("summary", {})
  lines += ["", "Summary (mean over seeds; the best method's):", ""]
  def shown(v):
    if isinstance(v, dict):
      return ", ".join(f"{k} {x:.2f}" for k, x in v.items())
    return "" if v is None else v if isinstance(v, str) else f"{v:.2f}"
  lines += [f"- `{k}`: {shown(v)}" for k, v in s.items()]
  lines += ["", "Mean width per layer kind of each bed and budget's best run at init (by "
            "test top-1; random excluded), with the kind's share of the weights:", ""]
  for (bed, a, budget), rows in sorted(_groups(runs).items()):
    picked = [r for r in rows if r["method"] != "random"]
    if picked:
      best = max(picked, key=lambda r: r["init_top1"])
      lines.append(f"- {bed} A{a} at {budget:g} bits ({best['method']}, "
                   f"{best['init_top1']:.2f}): " + _widths_by_kind(best["bits"],
                                                                 payload.get("sizes", {})))
  return "\n".join(lines) + "\n"


def _groups(runs):
  out = {}
  for r in runs:
    out.setdefault((r["bed"], r["a_bits"], r["budget"]), []).append(r)
  return out


def _widths_by_kind(bits: dict, sizes: dict) -> str:
  """Mean width per layer kind (the path's last name: qkv, fc1, dw, project, ...),
  weighted by parameter count where `sizes` ({path: params}) has them."""
  kinds = {}
  for path, b in bits.items():
    kinds.setdefault(path.split("/")[-1], []).append((b, sizes.get(path, 1)))
  total = sum(sizes.get(p, 1) for p in bits)
  out = []
  for k, v in sorted(kinds.items()):
    n = sum(c for _, c in v)
    share = f", {100 * n / total:.1f}% of weights" if sizes else ""
    out.append(f"{k} {sum(b * c for b, c in v) / n:.1f}{share}")
  return "; ".join(out)


def _sizes(params) -> dict:
  from flax import traverse_util
  return {"/".join(k[:-1]): int(np.size(v)) for k, v in traverse_util.flatten_dict(params).items()
          if k[-1] == "kernel"}


def plot(payload: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  beds = sorted({(r["bed"], r["a_bits"]) for r in payload["runs"]})
  fig, axes = plt.subplots(1, max(len(beds), 1), figsize=(6 * max(len(beds), 1), 4), dpi=110,
                           squeeze=False)
  for ax, (bed, a) in zip(axes[0], beds):
    rows = [r for r in payload["runs"] if r["bed"] == bed and r["a_bits"] == a]
    for m in sorted({r["method"] for r in rows}):
      i = (METHODS + tuple(LABELS)).index(m)  # one colour per method in every panel
      mine = [r for r in rows if r["method"] == m]
      ax.scatter([r["size_bytes"] / 1e6 for r in mine], [r["init_top1"] for r in mine],
                 color=f"C{i}", label=f"{m} (init)", s=18)
      after = [(r["size_bytes"] / 1e6, max(v["top1"] for v in r["after"].values()))
               for r in mine if r["after"]]
      if after:
        ax.scatter(*zip(*after), color=f"C{i}", marker="^", s=30,
                   label=f"{m} + best after-method")
    fp = payload.get("fp_top1", {}).get(f"{bed}_a{a}")
    if fp:
      ax.axhline(fp, color="0.5", ls="--", lw=0.8, label="FP")
    ax.set_xlabel("weights size (MB, params x bits / 8)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{bed} A{a}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write(payload):
  payload["summary"] = summary(payload["runs"])
  write_results("mixed_precision", payload, page(payload))
  plot(payload, os.path.join(RESULTS, "mixed_precision_pareto.png"))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--bed", choices=sorted(BEDS), default="lite0")
  ap.add_argument("--a-bits", nargs="+", type=int, default=None)
  ap.add_argument("--budgets", nargs="+", type=float, default=None)
  ap.add_argument("--methods", nargs="+",
                  default=["uniform", "sensitivity", "random", "evolq", "evolq-seeded"],
                  help=f"bits.method names, or the labels {sorted(LABELS)}")
  ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  ap.add_argument("--after", nargs="*", default=[], choices=sorted(AFTER),
                  help="methods run at the chosen widths (for the non-random methods)")
  ap.add_argument("--set", nargs="*", default=[], help="config overrides (e.g. bits.generations=10)")
  ap.add_argument("--report", action="store_true", help="only rewrite the page and the plot")
  ap.add_argument("--sizes", nargs="*", default=[], choices=sorted(BEDS),
                  help="with --report: record these beds' layer sizes first")
  args = ap.parse_args(argv)
  path = os.path.join(RESULTS, "mixed_precision.json")
  payload = {"runs": [], "fp_top1": {}}
  if os.path.exists(path):
    with open(path) as f:
      payload = json.load(f)
  if args.report:
    if args.sizes:  # parameter counts of the beds' layers, for the widths-by-kind lines
      for bed in args.sizes:
        c = load_config(BEDS[bed][0])
        payload.setdefault("sizes", {}).update(_sizes(load_model(c)[1]))
    write(payload)
    return
  _, a_settings, budgets, _ = BEDS[args.bed]
  done = {_key(r): r for r in payload["runs"]}
  for a_bits in args.a_bits or a_settings:
    ctx = None
    for budget in args.budgets or budgets:
      for method in args.methods:
        after = args.after if method != "random" else []
        for seed in ([0] if method in DETERMINISTIC else args.seeds):
          old = done.get((args.bed, a_bits, budget, method, seed))
          if old is not None and all(name in old["after"] for name in after):
            continue
          if ctx is None:
            ctx = context(args.bed, a_bits)
            apply_overrides(ctx["c"], args.set)
            payload["fp_top1"][f"{args.bed}_a{a_bits}"] = ctx["fp_top1"]
            payload.setdefault("sizes", {}).update(_sizes(ctx["params"]))
          if old is not None:  # a finished cell: the after-methods it lacks, at its widths
            at = _at_widths(ctx, old["bits"])
            for name in [n for n in after if n not in old["after"]]:
              run_after(ctx, old, name, *at)
              write(payload)
              print(f"{args.bed} A{a_bits} {budget:g} {method} seed {seed} + {name}: "
                    f"{old['after'][name]['top1']:.2f}", flush=True)
            continue
          load = os.getloadavg()
          t = time.time()
          rec = run_cell(ctx, args.bed, a_bits, budget, method, seed, after)
          rec.update({"wall_seconds": time.time() - t, "load_at_start": list(load),
                      "git_commit": git_commit()})
          payload["runs"].append(rec)
          write(payload)
          print(f"{args.bed} A{a_bits} {budget:g} {method} seed {seed}: avg {rec['avg_bits']:.2f} "
                f"init {rec['init_top1']:.2f} {rec['after']}", flush=True)


if __name__ == "__main__":
  main()
