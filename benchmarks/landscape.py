"""Is the attention layers' loss landscape more jagged? 3 vs 8 bits, infoNCE vs MSE.

  python benchmarks/landscape.py [--configs configs/fixture_w3a8.py configs/fixture_w8a8.py]
      [--unit U] [--seeds 0 1 2] [--channels 0] [--points 41] [--span 0.1]
      [--grid-points 15] [--calib 500] [--test-limit 1000]
  ->  benchmarks/results/landscape.json (+ docs/results/landscape.md), landscape_lines.png,
      landscape_roughness.png, landscape_2d_<setting>_<layer>.png

Each layer (qkv, proj, fc1, fc2) of one unit (a block) is perturbed along 1D lines:
random directions (one per seed; a = typical relative change of a channel's
scale) and basis directions (one output channel's scale). Both losses come from
one forward of each line. Roughness (evolq_jax.landscape.roughness): mean
|second difference| / range, and the number of strict local minima.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from common import RESULTS, git_commit, write_results

from evolq_jax.config import apply_overrides, load_config, quant_config
from evolq_jax.landscape import landscape, plot_landscape, roughness, unit_of
from evolq_jax.pipeline import calibrate_on_split, load_model
from evolq_jax.search.fitness import reference_logits

LAYERS = ("qkv", "proj", "fc1", "fc2")
ATTENTION, MLP = ("qkv", "proj"), ("fc1", "fc2")
LOSSES = ("infonce", "mse")


def run(args):
  lines, grids, meta = [], [], []
  for spec in args.configs:
    c = apply_overrides(load_config(spec), [f"calib.num_images={args.calib}"])
    qcfg = quant_config(c)
    cfg, params = load_model(c)
    calib_x, test, qparams = calibrate_on_split(c, cfg, qcfg, params, args.test_limit,
                                                progress=False)
    fp_ref = reference_logits(cfg, params, calib_x)
    meta.append({"config": spec, "setting": qcfg.name, "overrides": [f"calib.num_images={args.calib}"]})
    common = {"unit": args.unit, "points": args.points, "span": args.span, "loss": LOSSES,
              "temperature": c.search.temperature, "loss_batch": c.search.loss_batch,
              "fp_ref": fp_ref}
    dirs = [("random", s, None) for s in args.seeds] + [("basis", 0, (ch,)) for ch in args.channels]
    for layer in LAYERS:
      for i, (kind, seed, channels) in enumerate(dirs):
        t = time.time()
        r = landscape(cfg, qcfg, params, qparams, calib_x, layer, direction=kind, seed=seed,
                      channels=channels, test=test if i == 0 else None, **common)
        r.update(config=spec, seconds=round(time.time() - t, 1))
        lines.append(r)
        print(f"{qcfg.name} {layer} {kind} seed={seed} ch={channels}: "
              f"{ {n: round(v['second_difference'], 3) for n, v in r['roughness_by_loss'].items()} } "
              f"({r['seconds']} s)", file=sys.stderr, flush=True)
    if args.grid_points and qcfg.w_bits == min(_bits(s) for s in args.configs):
      for layer in ("qkv", "fc1"):
        t = time.time()
        common2d = {**common, "points": args.grid_points}
        r = landscape(cfg, qcfg, params, qparams, calib_x, layer, dims=2, seed=0,
                      test=(test[0][:args.grid_test], test[1][:args.grid_test]), **common2d)
        r.update(config=spec, seconds=round(time.time() - t, 1))
        grids.append(r)
        print(f"{qcfg.name} {layer} 2D: {r['roughness']} ({r['seconds']} s)", file=sys.stderr,
              flush=True)
  return lines, grids, meta


def _bits(spec):
  return quant_config(load_config(spec)).w_bits


def summarize(lines):
  """Mean/std of roughness per (setting, loss, layer) and per layer family."""
  rows = []
  for setting in dict.fromkeys(r["setting"] for r in lines):
    for loss in LOSSES:
      for kind in ("random", "basis"):
        for group, layers in [*((lay, (lay,)) for lay in LAYERS), ("attention", ATTENTION),
                              ("mlp", MLP)]:
          rs = [r["roughness_by_loss"][loss] for r in lines if r["setting"] == setting
                and r["layer"] in layers and r["direction"] == kind]
          if not rs:
            continue
          sd = np.array([x["second_difference"] for x in rs])
          lm = np.array([x["local_minima"] for x in rs])
          jump = np.array([x["jump"] for x in rs])
          rows.append({"setting": setting, "loss": loss, "direction": kind, "group": group,
                       "n": len(rs), "second_difference": float(sd.mean()),
                       "second_difference_std": float(sd.std()),
                       "jump": float(jump.mean()), "jump_std": float(jump.std()),
                       "local_minima": float(lm.mean()), "local_minima_std": float(lm.std()),
                       "range": float(np.mean([x["range"] for x in rs]))})
  return rows


def _resolution(lines):
  """How far above float32's resolution each loss's smallest line range is."""
  parts = []
  for loss in LOSSES:
    ulp = max(float(np.spacing(np.float32(abs(np.asarray(r["losses"][loss])).max())))
              for r in lines)
    low = min(r["roughness_by_loss"][loss]["range"] for r in lines)
    parts.append(f"{loss}: smallest line range {low:.3g} = {low / ulp:.0f} float32 steps "
                 f"({ulp:.2g})")
  return ("Float32 resolution of the loss values (the noise floor of the roughness): "
          + "; ".join(parts) + ".")


def _vs(rows, key, digits):
  fmt = f".{digits}f" if digits < 4 else ".2e"
  return " vs ".join(f"{r[key]:{fmt}}" for r in rows)


def _row(rows, **kw):
  return next(r for r in rows if all(r[k] == v for k, v in kw.items()))


def page(payload: dict) -> str:
  args = argparse.Namespace(**payload["args"])
  lines, grids, rows = payload["lines"], payload["grids"], payload["summary"]
  seconds, commit = payload["seconds"], payload["git_commit"]
  out = ["# Loss landscape of one unit's weight scales (fixture)", "",
         (f"git commit `{commit}`; unit {unit_of(lines[0])} of "
         f"{lines[0]['model']}; {lines[0]['calib_images']} calibration images; 1D lines of "
         f"{args.points} points over a in [-{args.span}, {args.span}] (scale x (1 + a d)); "
         f"random directions: seeds {args.seeds}; basis directions: output channel(s) "
         f"{args.channels}; {seconds:.0f} s on this machine."), "",
         ("Roughness = mean |second difference| of the loss along the line / the loss's range "
         "on the line (0 = straight; about 8/n² for a parabola sampled at n points; ~0.5–1 for "
         "white noise), and the number of strict local minima among the "
         f"{args.points - 2} interior points. Mean ± std over directions."), "",
         _resolution(lines), "",
         *([f"(Summary recomputed from the grids stored in `{args.from_json}`.)", ""]
           if getattr(args, "from_json", "") else []),
         "## Per layer", "",
         ("| setting | loss | direction | layer | roughness | local minima | loss range | "
         "mean abs 2nd diff. (loss units) |"),
         "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['setting']} | {r['loss']} | {r['direction']} | {r['group']} | "
               f"{r['second_difference']:.3f} ± {r['second_difference_std']:.3f} | "
               f"{r['local_minima']:.1f} ± {r['local_minima_std']:.1f} | {r['range']:.3g} | "
               f"{r['jump']:.3g} ± {r['jump_std']:.2g} |")
  out += ["", "## The comparisons (random directions)", "",
          "| comparison | held fixed | roughness | local minima | mean abs 2nd diff. |",
          "|---|---|---|---|---|"]
  settings = list(dict.fromkeys(r["setting"] for r in lines))
  for setting in settings:
    for loss in LOSSES:
      a = _row(rows, setting=setting, loss=loss, direction="random", group="attention")
      m = _row(rows, setting=setting, loss=loss, direction="random", group="mlp")
      out.append(f"| attention vs MLP | {setting}, {loss} | {_vs([a, m], 'second_difference', 3)}"
                 f" | {_vs([a, m], 'local_minima', 1)} | {_vs([a, m], 'jump', 7)} |")
  for loss in LOSSES:
    for group in ("attention", "mlp"):
      vals = [_row(rows, setting=s, loss=loss, direction="random", group=group) for s in settings]
      out.append(f"| {' vs '.join(settings)} | {group}, {loss} | "
                 f"{_vs(vals, 'second_difference', 3)} | {_vs(vals, 'local_minima', 1)} | "
                 f"{_vs(vals, 'jump', 7)} |")
  for setting in settings:
    for group in ("attention", "mlp"):
      vals = [_row(rows, setting=setting, loss=loss, direction="random", group=group)
              for loss in LOSSES]
      out.append(f"| {' vs '.join(LOSSES)} | {setting}, {group} | "
                 f"{_vs(vals, 'second_difference', 3)} | {_vs(vals, 'local_minima', 1)} | "
                 "(different units) |")
  if grids:
    out += ["", "## 2D grids (random directions, seed 0)", "",
            ("| setting | layer | grid | roughness (infoNCE) | local minima | loss range | "
            "top-1 range (test subset) |"), "|---|---|---|---|---|---|---|"]
    for g in grids:
      r, t = g["roughness"], np.asarray(g["top1"])
      out.append(f"| {g['setting']} | {g['layer']} | {g['points']}×{g['points']} | "
                 f"{r['second_difference']:.3f} | {r['local_minima']} | {r['range']:.3g} | "
                 f"{t.min():.1f}–{t.max():.1f} % ({g['test_images']} images) |")
  out += ["", ("Top-1 along the seed-0 random line of each layer (test subset of "
          f"{args.test_limit}): min–max."), "", "| setting | layer | top-1 at a=0 | min–max |",
          "|---|---|---|---|"]
  for r in lines:
    if r["top1"] is not None:
      out.append(f"| {r['setting']} | {r['layer']} | {r['top1_at_zero']:.1f} | "
                 f"{min(r['top1']):.1f}–{max(r['top1']):.1f} |")
  return "\n".join(out) + "\n"


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_lines(lines, path):
  """Rows: settings; columns: layers; seed-0 random line, loss - loss(0), top-1 twin axis."""
  plt = _pyplot()
  settings = list(dict.fromkeys(r["setting"] for r in lines))
  fig, axes = plt.subplots(len(settings), len(LAYERS), figsize=(3.4 * len(LAYERS),
                           2.8 * len(settings)), dpi=110, squeeze=False)
  for i, setting in enumerate(settings):
    for j, layer in enumerate(LAYERS):
      r = next(x for x in lines if x["setting"] == setting and x["layer"] == layer
               and x["top1"] is not None)
      a, ax = np.asarray(r["alphas"]), axes[i, j]
      loss = np.asarray(r["losses"]["infonce"])
      ax.plot(a, loss - r["loss_at_zero"], ".-", color="C0", lw=1, ms=2.5)
      ax2 = ax.twinx()
      ax2.plot(a, r["top1"], color="C1", lw=0.9, alpha=0.8)
      ax2.tick_params(labelsize=7, colors="C1")
      ax.tick_params(labelsize=7)
      rough = r["roughness_by_loss"]["infonce"]["second_difference"]
      ax.set_title(f"{setting} {layer}: roughness {rough:.2f}", fontsize=8)
      if j == 0:
        ax.set_ylabel("infoNCE - infoNCE(a=0)", fontsize=7, color="C0")
      if i == len(settings) - 1:
        ax.set_xlabel("a", fontsize=8)
  fig.suptitle(f"unit {unit_of(lines[0])}: calibration infoNCE (blue) and test top-1 % "
               "(orange) along a random direction", fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_roughness(rows, path):
  plt = _pyplot()
  groups = [(s, loss) for s in dict.fromkeys(r["setting"] for r in rows) for loss in LOSSES]
  fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
  width = 0.8 / len(LAYERS)
  for k, layer in enumerate(LAYERS):
    vals = [_row(rows, setting=s, loss=loss, direction="random", group=layer) for s, loss in groups]
    x = np.arange(len(groups)) + (k - (len(LAYERS) - 1) / 2) * width
    ax.bar(x, [v["second_difference"] for v in vals], width,
           yerr=[v["second_difference_std"] for v in vals], capsize=2,
           color=f"C{k}", alpha=0.85 if layer in ATTENTION else 0.45, label=layer)
  ax.set_xticks(np.arange(len(groups)), [f"{s}\n{loss}" for s, loss in groups], fontsize=8)
  ax.set_ylabel("roughness (mean |Δ²L| / range)")
  ax.set_title("loss roughness along random directions (mean ± std over directions)", fontsize=9)
  ax.legend(fontsize=8, ncol=4)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--configs", nargs="+",
                  default=["configs/fixture_w3a8.py", "configs/fixture_w8a8.py"])
  ap.add_argument("--unit", type=int, default=None, help="default: the last unit")
  ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  ap.add_argument("--channels", nargs="*", type=int, default=[0])
  ap.add_argument("--points", type=int, default=41)
  ap.add_argument("--span", type=float, default=0.1)
  ap.add_argument("--grid-points", type=int, default=15, help="0: no 2D grids")
  ap.add_argument("--grid-test", type=int, default=500, help="test images for the 2D top-1")
  ap.add_argument("--calib", type=int, default=500)
  ap.add_argument("--test-limit", type=int, default=1000)
  ap.add_argument("--name", default="landscape", help="results file stem")
  ap.add_argument("--from-json", default="",
                  help="re-summarize a saved results JSON (roughness recomputed from its grids)")
  args = ap.parse_args()
  start = time.time()
  if args.from_json:
    with open(args.from_json) as f:
      saved = json.load(f)
    lines, grids, meta, seconds = saved["lines"], saved["grids"], saved["configs"], saved["seconds"]
    args = argparse.Namespace(**{**saved["args"], "name": args.name, "from_json": args.from_json})
    for r in lines + grids:
      r["roughness_by_loss"] = {n: roughness(g) for n, g in r["losses"].items()}
      r["roughness"] = r["roughness_by_loss"][r["loss_name"]]
  else:
    lines, grids, meta = run(args)
    seconds = time.time() - start
  rows = summarize(lines)
  plot_lines(lines, os.path.join(RESULTS, f"{args.name}_lines.png"))
  plot_roughness(rows, os.path.join(RESULTS, f"{args.name}_roughness.png"))
  for g in grids:
    plot_landscape(g, os.path.join(RESULTS, f"{args.name}_2d_{g['setting'].lower()}_{g['layer']}.png"))
  payload = {"git_commit": saved["git_commit"] if args.from_json else git_commit(),
             "summarized_at": git_commit(), "configs": meta, "args": vars(args),
             "seconds": round(seconds, 1), "summary": rows, "lines": lines, "grids": grids}
  write_results(args.name, payload, page(payload))


if __name__ == "__main__":
  main()
