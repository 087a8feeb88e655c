"""The paper's comparisons in miniature: no-search baselines, Evol-Q, its loss
ablation, the gradient baseline, random search and evosax strategies, at
several bit settings and seeds, all with the same budget of candidate
evaluations. Model selection never looks at the test set: the best no-search
baseline is the one with the lowest calibration loss, and every search picks
among its passes on held-out training images (the init counting as pass 0).

  python benchmarks/accuracy.py [--config configs/fixture_w3a8.py] [--resume]
      [--settings W3A8 W4A8 W8A8 W4A4] [--seeds 0 1 2] [--only METHOD ...]
  ->  benchmarks/results/accuracy.json (+ docs/results/accuracy.md), accuracy_*.png

Runs are appended to accuracy.json as they finish; --resume skips the cells
already there with the same budget, so a killed grid continues. A running
search checkpoints after every unit under --workdir (default
runs/accuracy/NAME, one folder per cell and config, opened as any run folder
is: locked, its identity in run.json), so --resume also continues a killed
cell where it stopped, and a cell another process runs is skipped; its record
then lists the parts and the commits that ran them (extra.resumed). Runs that another --resume process
wrote to the same JSON meanwhile are kept. --report
rewrites the tables and plots from the JSON alone (--merge adds the runs
of other result files, e.g. a grid split over machines by --settings/--name). The same script runs on an
ImageNet config (e.g. configs/imagenet.py:deit_small,W4A8 with data and checkpoint set).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
from common import RESULTS, code_key, git_commit, top1_interval, write_results

from evolq_jax import workdir
from evolq_jax.baselines import clip_ratio
from evolq_jax.calibrate import calibrate, same_activations, weights_for
from evolq_jax.config import (
  apply_overrides,
  base_config,
  load_config,
  quant_config,
  search_config,
)
from evolq_jax.evaluate import classification_metrics
from evolq_jax.pipeline import load_data, load_model, predict
from evolq_jax.search import calibration_fitness, reference_logits, search
from evolq_jax.search import checkpoint as ckpt
from evolq_jax.models import resolve_quant
from evolq_jax.models.forward import units
from evolq_jax.quant.recipe import parse_bits, reference_init
from evolq_jax.search.strategies import EVOSAX, GRADIENT
from evolq_jax.workdir import write_json
from accuracy_plans import (PLANS, REGIME, SEARCHES, equal_passes, evaluations,
                            hardest_setting, stages)

CURVE_TEST_IMAGES = 2000  # the budget curves' points use the first 2,000 test images


def _setting(c, setting):
  c = c.copy_and_resolve_references()
  c.quant.w_bits, c.quant.a_bits = parse_bits(setting)
  return c


def _metrics(ctx, qcfg, qparams, limit=None):
  x, y = ctx["test"]
  m = classification_metrics(predict(ctx["cfg"], ctx["params"], x[:limit], qcfg, qparams,
                                     ctx.get("eval_batch", 500)),
                             y[:limit], ctx["fp"][:limit])
  return {"test_top1": m["top1"], "test_top5": m["top5"], "agreement_with_fp": m["agreement"]}


def baselines(ctx, c, setting):
  """-> list of run dicts and {name: (qcfg, qparams)} of the no-search baselines."""
  cfg, params, calib, fp_ref = ctx["cfg"], ctx["params"], ctx["calib"], ctx["fp_ref"]
  # the plain start (FQ-ViT's recipe, whatever the config's) and its variants;
  # init-reference is the same with bias correction
  ref = dataclasses.replace(quant_config(c), recipe="fqvit", bias_correction=False)
  variants = {"init-reference": reference_init(ref),
              "init-reference-ends8": resolve_quant(
                  cfg, dataclasses.replace(reference_init(ref), keep_ends_8bit=True))}
  for o in dict.fromkeys([ref.w_observer, "minmax", "omse", "percentile"]):
    variants[f"init-{o}"] = dataclasses.replace(ref, w_observer=o)
  corrected = dataclasses.replace(ref, bias_correction=True, recipe="reference")
  if corrected != variants["init-reference"]:
    variants[f"init-{ref.w_observer}+bias-correction"] = corrected
  starts, runs, first = {}, [], None
  for name, qcfg in variants.items():
    t = time.time()
    if first is not None and same_activations(first[0], qcfg):  # only the weights differ
      qp = weights_for(params, qcfg, first[1])
    else:
      qp = calibrate(cfg, qcfg, params, calib, c.calib.batch_size, progress=False)
      first = (qcfg, qp)
    starts[name] = (qcfg, qp)
    runs.append({"method": name, "seconds": time.time() - t, "extra": {}})
  t = time.time()
  qp, ratio, fits = clip_ratio(cfg, ref, params, starts[f"init-{ref.w_observer}"][1], calib,
                               fp_ref, ctx["yardstick"])
  starts["clip-ratio"] = (ref, qp)
  runs.append({"method": "clip-ratio", "seconds": time.time() - t,
               "extra": {"ratio": ratio, "fitness_by_ratio": fits}})
  for r in runs:
    qcfg, qp = starts[r["method"]]
    r.update({"setting": setting, "seed": None, "candidates_evaluated": 0,
              "calibration_fitness": calibration_fitness(cfg, qcfg, params, qp, calib, fp_ref,
                                                         ctx["yardstick"]),
              "config": {"quant": dataclasses.asdict(qcfg)}, **_metrics(ctx, qcfg, qp)})
  best = min((r for r in runs if not r["method"].endswith("-ends8")),  # fully quantized
             key=lambda r: r["calibration_fitness"])["method"]
  starts["reference"] = starts["init-reference"]
  starts["reference-ends8"] = starts["init-reference-ends8"]
  starts["best"] = starts[best]
  for r in runs:
    r["extra"]["best_no_search_by_calibration"] = r["method"] == best
  return runs, starts, best


def _deterministic(method):
  """Gradient runs draw nothing at random: every seed gives the same result
  (measured: W3A8 grad-adam seed 1 equals seed 0 bit for bit), so one runs."""
  return SEARCHES[method][1].get("strategy") in GRADIENT


def family_budget(method, budget):
  """The grid's budget (passes x generations x children evaluations per unit)
  in the method family's own settings: evosax's lambda = children, a gradient
  method takes generations x children steps (one evaluation each; the last step's
  result takes the place of the start's, whose loss is the first step's)."""
  strategy = SEARCHES[method][1].get("strategy", "evolq")
  if strategy in GRADIENT:
    return dict(passes=budget["passes"], generations=budget["generations"] * budget["children"])
  if strategy in EVOSAX:
    return dict(passes=budget["passes"], generations=budget["generations"],
                popsize=budget["children"])
  return dict(budget)


def method_budget(method, budget, n_units, done_runs=()):
  """The search settings that give `method` its budget shape (accuracy_plans):
  the grid's budget, the same number of evaluations in another shape, 4x it,
  or a gradient method's steps at the wall time of the paper's tournament."""
  shape = SEARCHES[method][2]
  out = family_budget(method, budget)
  total = evaluations(budget["passes"], n_units, budget["generations"], budget["children"])
  if isinstance(shape, str) and shape.startswith("wall:"):
    evo, grad = (_seed0(done_runs, m) for m in ("evolq-infonce", best_adam(done_runs)))
    if evo is None or grad is None:
      raise ValueError(f"{method} needs the seed-0 runs of evolq-infonce and {shape[5:]} of "
                       "the same setting first (they measure the wall time it matches).")
    steps = max(1, round(grad["config"]["search"]["generations"] * evo["seconds"]
                         / grad["seconds"]))
    return {**out, "generations": steps, "lr": grad["config"]["search"]["lr"]}
  if shape:
    out.update({k: v for k, v in shape.items() if k != "passes"})
    width = out.get("popsize") if "popsize" in shape else out.get("children", 1)
    passes = shape.get("passes", out["passes"])
    if passes == "equal":
      passes = equal_passes(total, n_units, out["generations"], width)
    elif passes == "4x":
      passes = equal_passes(4 * total, n_units, out["generations"], width)
    out["passes"] = passes
  return out


def _seed0(runs, method):
  return next((r for r in runs if r["method"] == method and r["seed"] == 0), None)


def best_adam(runs):
  """The Adam learning rate picked on calibration loss among the lr sweep's
  runs (never on test); 'grad-adam' when no sweep ran."""
  sweep = [r for r in runs if r["method"].startswith("grad-adam-lr")]
  return min(sweep, key=lambda r: r["calibration_fitness"])["method"] if sweep else "grad-adam"


def wants_curve(curves, setting, method, hard=None):
  """Whether the plan records the budget curve of (setting, method); a plan's
  "HARD" stands for the hardest setting once it is resolved (`hard`)."""
  return (setting, method) in curves or (setting == hard and ("HARD", method) in curves)


def cell_dir(root, setting, method, seed, identity):
  """The folder of one cell's checkpoints: named by the cell and a hash of
  everything that changes its result, so a changed config never resumes it."""
  key = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
  return os.path.join(root, f"{setting}_{method}_s{seed}_{key[:12]}")


def _read_jsonl(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _unique(curve):
  """A budget curve with each point once: a run killed between a point and its
  checkpoint writes that point again when it resumes."""
  points = {p["candidates"]: p for p in curve}
  return [points[k] for k in sorted(points)]


def _append(path, record):
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def run_search(ctx, c, setting, method, seed, starts, best, budget, done_runs=(), root=None):
  """One cell -> (its record, its folder or None). With `root`, the cell is a run
  folder of its own under root (cell_dir), opened like any run's
  (workdir.open_run: locked, its identity in run.json, resumed only with the same
  one); the search checkpoints there after every unit, and a killed cell resumes
  from it. The caller removes the folder once the record is written. The record is
  None when another process holds the folder."""
  start = SEARCHES[method][0]
  scfgs = [dataclasses.replace(search_config(c), **{
      **SEARCHES[m][1], **method_budget(m, budget, len(units(ctx["cfg"])), done_runs)})
      for m in stages(method)]
  qcfg, qp0 = starts[start]
  folder = None
  if root:
    searched = ([dataclasses.asdict(s) for s in scfgs] if len(scfgs) > 1
                else dataclasses.asdict(scfgs[0]))
    identity = json.loads(json.dumps({
        "quant": dataclasses.asdict(qcfg), "search": searched, "start": start,
        "holdout": len(ctx["holdout"][1]) if ctx.get("holdout") else 0,
        "holdout_alpha": ctx.get("holdout_alpha"), "source": ctx.get("source")}, default=str))
    folder = cell_dir(root, setting, method, seed, identity)
  with contextlib.ExitStack() as stack:
    if folder:
      begun = workdir.read_run(folder) is not None or bool(workdir.results(folder))
      try:
        stack.enter_context(workdir.open_run(folder, "search", identity, resume=begun))
      except workdir.InUse:  # another grid process runs this cell
        return None, folder
    if len(scfgs) == 1:
      return _run_cell(ctx, setting, method, seed, best, start, scfgs[0], qcfg, qp0, folder)[0], \
          folder
    return _run_stacked(ctx, setting, method, seed, best, start, scfgs, qcfg, qp0, folder), \
        folder


def _run_stacked(ctx, setting, method, seed, best, start, scfgs, qcfg, qp, folder):
  """A STACKED method: each stage a search of its own (its checkpoints in the cell's
  stage<k> folder, so a killed cell resumes in the stage it was in), from the previous
  stage's result. -> the last stage's record, with the stages' candidates and seconds
  summed and each stage's own figures under extra.stages."""
  records = []
  for k, (name, scfg) in enumerate(zip(stages(method), scfgs)):
    sub = os.path.join(folder, f"stage{k + 1}") if folder else None
    if sub:
      os.makedirs(sub, exist_ok=True)
    rec, qp = _run_cell(ctx, setting, method, seed, best, start, scfg, qcfg, qp, sub)
    records.append({**rec, "method": name})
  last = records[-1]
  extra = {**last["extra"], "start": records[0]["extra"]["start"],
           "stages": [{k: r[k] for k in ("method", "calibration_fitness", "test_top1",
                                         "candidates_evaluated", "seconds")}
                      | {"own_loss_init": r["extra"]["own_loss_init"]} for r in records]}
  return {**last, "method": method,
          "candidates_evaluated": sum(r["candidates_evaluated"] for r in records),
          "seconds": sum(r["seconds"] for r in records),
          "config": {**last["config"], "stages": [r["config"]["search"] for r in records]},
          "extra": extra}


def _run_cell(ctx, setting, method, seed, best, start, scfg, qcfg, qp0, folder):
  """One search from qp0 -> (its record, the qparams it ends with)."""
  cfg, params = ctx["cfg"], ctx["params"]
  parts = []  # the commits that ran parts of this cell, and where each began
  if folder:
    parts_file = os.path.join(folder, "parts.jsonl")
    parts = _read_jsonl(parts_file)
    done_before = ckpt.steps(folder)
    part = {"git_commit": ctx["git_commit"],
            "from_unit_visit": done_before[-1] if done_before else 0,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if parts:
      print(f"{setting} {method} seed {seed}: resuming at unit visit {part['from_unit_visit']} "
            f"from {folder}", file=sys.stderr, flush=True)
    else:  # a killed cell resumes only where --resume finds this folder again
      print(f"{setting} {method} seed {seed}: checkpoints in {os.path.abspath(folder)}",
            file=sys.stderr, flush=True)
    parts.append(part)
    _append(parts_file, part)
  curve_file = os.path.join(folder, "curve.jsonl") if folder else None
  curve = _read_jsonl(curve_file) if folder else []  # the points of earlier parts

  def add_point(point):
    curve.append(point)
    if folder:
      _append(curve_file, point)

  wanted = seed == 0 and wants_curve(ctx["curves"], setting, method, ctx.get("hard_setting"))
  if wanted and not curve:
    add_point({"candidates": 0, **_metrics(ctx, qcfg, qp0, CURVE_TEST_IMAGES),
               "fitness": calibration_fitness(cfg, qcfg, params, qp0, ctx["calib"],
                                              ctx["fp_ref"], ctx["yardstick"])})
  began = time.time()

  def on_unit(qp, rec):
    # one line a unit: a grid cell runs for hours with nothing else to show
    passes = 1 if scfg.method.order == "first_last" else scfg.passes
    print(f"{setting} {method} seed {seed}: pass {rec['pass'] + 1}/{passes}, unit "
          f"{rec['unit']}, {rec['candidates']} candidates, loss {rec['fitness']:.4f}, "
          f"{time.time() - began:.0f} s in this part", file=sys.stderr, flush=True)
    if wanted:
      add_point({"candidates": rec["candidates"], "fitness": rec["fitness"],
                 **_metrics(ctx, qcfg, qp, CURVE_TEST_IMAGES)})
  r = search(cfg, qcfg, params, qp0, ctx["calib"], scfg, seed=seed, progress=False,
             holdout=ctx["holdout"], holdout_alpha=ctx["holdout_alpha"],
             holdout_rule="best_significant", on_unit=on_unit,
             workdir=folder, resume=folder is not None)
  curve = _unique(curve)
  final = _metrics(ctx, qcfg, r.qparams)
  last = final if r.selected_pass == scfg.passes else _metrics(ctx, qcfg, r.last_qparams)
  extra = {"start": {"best": best, "reference": "init-reference",
                     "reference-ends8": "init-reference-ends8"}.get(start, start),
           "own_loss_init": r.fitness_init, "selected_pass": r.selected_pass,
           "holdout": r.holdout, "last_pass_test_top1": last["test_top1"], "curve": curve,
           # the 1-min load average at the end: "seconds" is only a timing when idle
           "load_average_1m": os.getloadavg()[0]}
  if len(parts) > 1:  # "seconds" then sums the parts up to their last checkpoints
    extra["resumed"] = parts
  return {"setting": setting, "method": method, "seed": seed,
          "calibration_fitness": calibration_fitness(cfg, qcfg, params, r.qparams, ctx["calib"],
                                                     ctx["fp_ref"], ctx["yardstick"]),
          **final, "candidates_evaluated": r.candidates,
          "seconds": r.seconds, "config": {"quant": dataclasses.asdict(qcfg),
                                           "search": dataclasses.asdict(scfg)},
          "extra": extra}, r.qparams


def _key(run):
  return (run["setting"], run["method"], run["seed"])


def _runs_on_disk(name, budget):
  """The runs in the grid's JSON as it is on disk now, if it has this budget
  (runs of another budget don't compare)."""
  path = os.path.join(RESULTS, f"{name}.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    disk = json.load(f)
  return disk["runs"] if disk.get("budget") == budget else []


def _finished(name, budget):
  """The cells another grid process on this JSON may have finished meanwhile."""
  return {_key(r) for r in _runs_on_disk(name, budget)}


def _save(payload, name, merge=False):
  """Write the grid's JSON (never half-written) -> the payload, which with
  `merge` has gained the runs another process added to the file since it was
  read (same budget), instead of overwriting them."""
  path = os.path.join(RESULTS, f"{name}.json")
  os.makedirs(RESULTS, exist_ok=True)
  if merge:
    mine = {_key(r) for r in payload["runs"]}
    payload["runs"] += [r for r in _runs_on_disk(name, payload.get("budget"))
                        if _key(r) not in mine]
  write_json(path, payload)  # as write_results: a rewrite of the same runs changes no byte
  return payload


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="", help="config file[:arg]; default: the fixture")
  ap.add_argument("--plan", default="fixture", choices=sorted(PLANS),
                  help="which grid (accuracy_plans.py): the fixture's or the CIFAR-10 test bed's")
  ap.add_argument("--settings", nargs="+", default=None,
                  help="settings to run (default: all of the plan's; HARD = the hardest "
                       "setting where init-reference keeps >= 50%% top-1)")
  ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  ap.add_argument("--only", nargs="+", default=None, help="search methods to run")
  ap.add_argument("--passes", type=int, default=2)
  ap.add_argument("--generations", type=int, default=2)
  ap.add_argument("--children", type=int, default=4)
  ap.add_argument("--holdout", type=int, default=2000, help="held-out train images")
  ap.add_argument("--holdout-alpha", type=float, default=1.0,
                  help="sign-test level for keeping a pass over the init (1.0: plain best "
                       "held-out top-1, what this grid's committed runs used)")
  ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
  ap.add_argument("--resume", action="store_true",
                  help="skip the cells already in the JSON and continue a killed cell from "
                       "its last checkpoint")
  ap.add_argument("--workdir", default=None,
                  help="where each running cell checkpoints after every unit (default "
                       "runs/accuracy/NAME under the current directory: resume a killed "
                       "cell from the same directory, or pass the same --workdir); a "
                       "finished cell's folder is removed")
  ap.add_argument("--report", action="store_true", help="only rewrite tables and plots")
  ap.add_argument("--name", default="accuracy", help="result file names")
  ap.add_argument("--merge", nargs="*", default=[],
                  help="with --report: add the runs of these result JSONs (e.g. a grid split "
                       "over machines by --settings and --name)")
  args = ap.parse_args()
  commit = git_commit()  # the code this process runs, whatever is committed while it runs
  path = os.path.join(RESULTS, f"{args.name}.json")
  payload = {"runs": []}
  if (args.resume or args.report) and os.path.exists(path):
    with open(path) as f:
      payload = json.load(f)
  if args.report:
    keys = {_key(r) for r in payload["runs"]}
    for other in args.merge:
      with open(other) as f:
        extra = json.load(f)
      if extra.get("budget") != payload.get("budget"):
        raise SystemExit(f"{other}: budget {extra.get('budget')} differs from "
                         f"{payload.get('budget')}; runs with different budgets don't compare.")
      payload["runs"] += [r for r in extra["runs"] if _key(r) not in keys]
    return report(payload, args.name)
  budget = dict(passes=args.passes, generations=args.generations, children=args.children)
  payload["budget"], payload["holdout_images"] = budget, args.holdout
  c = apply_overrides(load_config(args.config) if args.config else base_config(), args.set)
  c.holdout.num_images = args.holdout
  cfg, params = load_model(c)
  data = load_data(c, cfg)
  plan, curves = PLANS[args.plan]
  payload["plan"] = args.plan
  ctx = {"cfg": cfg, "params": params, "calib": data["calib"], "test": data["test"],
         "holdout": data.get("holdout"), "holdout_alpha": args.holdout_alpha, "curves": curves,
         "fp": predict(cfg, params, data["test"][0], batch_size=c.eval.batch_size),
         "eval_batch": c.eval.batch_size,
         "fp_ref": reference_logits(cfg, params, data["calib"]),
         # the common yardstick: every run's calibration loss is infoNCE with
         # the config's loss batch and temperature, whatever loss it searched
         "yardstick": dataclasses.replace(search_config(c), loss="infonce"),
         "source": {"config": args.config, "overrides": args.set}, "git_commit": commit}
  root = args.workdir or os.path.join("runs", "accuracy", args.name)
  payload["fp_top1"] = classification_metrics(ctx["fp"], data["test"][1])["top1"]
  payload["model"], payload["test_images"] = cfg.name, len(data["test"][1])
  done = {_key(r) for r in payload["runs"]}
  common = {"model": cfg.name, "git_commit": commit,
            "config_file": args.config or "base_config()", "overrides": args.set}
  states = {}
  code = code_key("evolq_jax", "configs", "benchmarks/accuracy.py",
                  "benchmarks/accuracy_plans.py", "benchmarks/common.py")

  def setting_state(setting):  # the no-search baselines, once per setting
    if setting not in states:
      cs = _setting(c, setting)
      # Cached across invocations of the same code and config: a resumed
      # grid need not recalibrate.
      key = hashlib.sha1(f"{cs.to_json()}|{args.holdout}|{code}".encode())
      key = key.hexdigest()[:16]
      cache = os.path.join(tempfile.gettempdir(), f"evolq_accuracy_{setting}_{key}.pkl")
      if os.path.exists(cache):
        with open(cache, "rb") as f:
          runs, starts, best = pickle.load(f)
      else:
        runs, starts, best = baselines(ctx, cs, setting)
        with open(cache, "wb") as f:
          pickle.dump(jax.device_get((runs, starts, best)), f)
      states[setting] = (cs, starts, best)
      for r in runs:
        if (setting, r["method"], None) not in done:
          payload["runs"].append({**r, **common})
      print(f"{setting}: best no-search baseline by calibration loss: {best}", file=sys.stderr,
            flush=True)
      _save(payload, args.name)
    return states[setting]

  def resolve(setting):
    """HARD -> the hardest regime setting where init-reference keeps >= 50 % top-1."""
    if setting != "HARD":
      return setting
    init = {r["setting"]: r["test_top1"] for r in payload["runs"]
            if r["method"] == "init-reference" and r["setting"] in REGIME}
    hard = hardest_setting(init)
    if hard is None:
      raise SystemExit(f"no setting keeps >= 50% top-1 with init-reference: {init}")
    payload["hard_setting"] = ctx["hard_setting"] = hard
    return hard

  wanted = args.settings or sorted({s for group, _ in plan for s in group})
  for settings, methods in plan:
    settings = list(dict.fromkeys(resolve(s) for s in settings if s in wanted))
    methods = [m for m in methods if not args.only or m in args.only]
    for setting in settings if not methods else ():
      setting_state(setting)
    for seed in args.seeds:  # seed-major inside a group
      for setting in settings:
        for method in methods:
          if args.resume:  # what other grid processes on this JSON have finished meanwhile
            done |= _finished(args.name, budget)
          if (setting, method, seed) in done or (seed != args.seeds[0] and _deterministic(method)):
            continue
          cs, starts, best = setting_state(setting)
          if SEARCHES[method][0] == "best" and best == "init-reference":
            continue  # the same run as the one from the reference's init
          r, folder = run_search(ctx, cs, setting, method, seed, starts, best, budget,
                                 [r for r in payload["runs"] if r["setting"] == setting], root)
          if r is None:
            print(f"{setting} {method} seed {seed}: skipped, another process is running it "
                  f"({folder})", file=sys.stderr, flush=True)
            continue
          payload["runs"].append({**r, **common})
          done.add((setting, method, seed))
          _save(payload, args.name, merge=args.resume)  # in place
          if folder:
            shutil.rmtree(folder, ignore_errors=True)
          print(f"{setting} {method} seed {seed}: top-1 {r['test_top1']:.2f}, "
                f"calib {r['calibration_fitness']:.4f}, {r['seconds']:.0f} s", file=sys.stderr,
                flush=True)
  report(payload, args.name)


# --- report -------------------------------------------------------------------

def _group(runs):
  out = {}
  for r in runs:
    out.setdefault((r["setting"], r["method"]), []).append(r)
  return out


def _ms(vals, fmt="{:.2f}"):
  vals = np.asarray(vals, float)
  return fmt.format(vals.mean()) + (f" ± {fmt.format(vals.std())}" if len(vals) > 1 else "")


def _best(groups, setting):
  """The setting's no-search baseline with the lowest calibration loss (None: not run)."""
  return next((m for (st, m), rs in groups.items() if st == setting
               and rs[0].get("extra", {}).get("best_no_search_by_calibration")), None)


def _start_top1(groups, run):
  """Test top-1 of the no-search baseline a search started from."""
  start = run["extra"]["start"]
  if start == "reference":  # runs before init-reference existed started from plain min/max
    start = f"init-{run['config']['quant']['w_observer']}"
  return groups[(run["setting"], start)][0]["test_top1"]


def report(payload, name="accuracy"):
  """The record, its page and its plots."""
  write_results(name, payload, page(payload))
  runs = payload["runs"]
  _plots(runs, _group(runs), list(dict.fromkeys(r["setting"] for r in runs)), name,
         payload.get("fp_top1"), min(CURVE_TEST_IMAGES, payload.get("test_images", 10000)))


def page(payload) -> str:
  runs = payload["runs"]
  groups = _group(runs)
  settings = list(dict.fromkeys(r["setting"] for r in runs))
  plan = payload.get("plan")
  n_test, fp1 = payload.get("test_images", 10000), payload.get("fp_top1", float("nan"))
  ci = top1_interval(fp1, n_test)  # of one top-1 near FP's
  curve_images = min(CURVE_TEST_IMAGES, n_test)
  lines = [f"# Accuracy: the paper's comparisons on {payload.get('model', 'the fixture')}", "",
           f"FP top-1 {payload.get('fp_top1', float('nan')):.2f} %. Budget per search: "
           f"{payload.get('budget')} (the search's `generations x children` candidates per "
           "block plus its start, for every block of every pass; the gradient baseline takes "
           "the same number of forward+backward steps; it draws nothing at random, so it runs "
           "for the first seed only). Test top-1/top-5/agreement in % on the "
           f"{n_test:,} test images (95% interval of one top-1 near FP: ±{ci:.1f} points), "
           "mean ± std over seeds; `calib` = infoNCE calibration loss "
           "(lower is better) of the kept result. "
           + (f"The budget curves' top-1 points use the first {curve_images:,} test images. "
              if any(r.get("extra", {}).get("curve") for r in runs) else "")
           + "Searches keep the pass with the best top-1 "
           f"on {payload.get('holdout_images', 0):,} held-out train images, the init counting as pass 0; `last pass` is what "
           "the search ended with. Commits: "
           + ", ".join(sorted({r['git_commit'][:12] for r in runs})) + ".", ""]
  if plan in ("cifar10", "efficientnet"):
    lines += _regime(groups, settings, payload.get("fp_top1", float("nan")))
  for s in settings:
    lines += [f"## {s}", "", f"Best no-search baseline by calibration loss: "
              f"`{_best(groups, s) or '?'}`.", "",
              "| method | seeds | calib | test top-1 | gain vs its start (worst seed) | "
              "last pass top-1 | top-5 | agreement | candidates | s / run |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for (st, m), rs in groups.items():
      if st != s:
        continue
      last = [r["extra"].get("last_pass_test_top1") for r in rs]
      gains = [r["test_top1"] - _start_top1(groups, r) for r in rs if rs[0]["seed"] is not None]
      lines.append(
          f"| {m} | {len(rs) if rs[0]['seed'] is not None else '-'} | "
          f"{_ms([r['calibration_fitness'] for r in rs], '{:.4f}')} | "
          f"{_ms([r['test_top1'] for r in rs])} | "
          f"{f'{np.mean(gains):+.2f} ({min(gains):+.2f})' if gains else '-'} | "
          f"{_ms(last) if None not in last else '-'} | {_ms([r['test_top5'] for r in rs])} | "
          f"{_ms([r['agreement_with_fp'] for r in rs])} | {rs[0]['candidates_evaluated']} | "
          f"{np.mean([r['seconds'] for r in rs]):.0f} |")
    lines.append("")
  lines += (_testbed_targets(groups, payload) if plan == "cifar10"
            else _interval_reading(groups, ci) if plan == "efficientnet" else _targets(groups))
  return "\n".join(lines)


# The targets: (setting, method, what it is compared with, margin in points).
TARGETS = [
    ("W3A8", "evolq-infonce-from-best", "best", 1.0),
    ("W3A8", "evolq-infonce-from-best", "grad-adam", 0.0),
    ("W3A8", "evolq-infonce-from-best", "grad-adam-from-best", 0.0),
    ("W3A8", "evolq-infonce", "grad-adam", 0.0),
    ("W3A8", "evolq-infonce", "grad-sgd", 0.0),
    ("W4A8", "evolq-infonce-from-best", "best", 0.0),
    ("W4A8", "evolq-infonce-from-best", "grad-adam", 0.0),
    ("W4A8", "evolq-infonce-from-best", "grad-adam-from-best", 0.0),
    ("W4A8", "evolq-infonce", "grad-adam", 0.0),
    ("W3A8", "evolq-infonce", "evolq-mse", 0.0),
    ("W3A8", "evolq-infonce", "evolq-kl", 0.0),
    ("W3A8", "evolq-infonce", "evolq-cosine", 0.0),
]


def _seeds(rs):
  return "-" if rs[0]["seed"] is None else len(rs)


def _targets(groups):
  """The issue's targets checked on the mean test top-1, with the seed counts
  behind each mean (1 seed cannot separate a 0.1-point difference from noise:
  0.1 points is 10 test images)."""
  lines = ["## Targets", "",
           "Mean test top-1; `best` is the no-search baseline with the lowest calibration "
           "loss. A row is met when the method's mean is at least the other's plus the margin.",
           "", "| setting | method (seeds) | vs (seeds) | margin | method | vs | difference | met |",
           "|---|---|---|---|---|---|---|---|"]
  for s, m, other, margin in TARGETS:
    if other == "best":
      other = _best(groups, s)
    a, b = groups.get((s, m)), groups.get((s, other))
    if not a or not b:
      continue
    ma, mb = (np.mean([r["test_top1"] for r in rs]) for rs in (a, b))
    lines.append(f"| {s} | {m} ({_seeds(a)}) | {other} ({_seeds(b)}) | +{margin:.1f} | {ma:.2f} | "
                 f"{mb:.2f} | {ma - mb:+.2f} | {'yes' if ma >= mb + margin else 'no'} |")
  return lines + [""]


def _testbed_targets(groups, payload):
  """The CIFAR-10 test bed's targets, in the compared setting where FP - best
  no-search baseline is largest. "Best search" is the search method with the
  highest mean test top-1 (reported, never used to pick anything)."""
  fp = payload.get("fp_top1", float("nan"))
  searched = {st for (st, m), rs in groups.items() if rs[0]["seed"] is not None}
  gaps = {st: fp - max(np.mean([r["test_top1"] for r in groups[(st, m)]])
                        for (s2, m), rs in groups.items() if s2 == st and rs[0]["seed"] is None)
          for st in searched}
  if not gaps:
    return []
  s = max(gaps, key=gaps.get)
  mean = {m: np.mean([r["test_top1"] for r in rs]) for (st, m), rs in groups.items() if st == s}
  std = {m: np.std([r["test_top1"] for r in rs]) for (st, m), rs in groups.items() if st == s}
  search_means = {m: v for m, v in mean.items() if groups[(s, m)][0]["seed"] is not None}
  best_search = max(search_means, key=search_means.get)
  best_base = max((m for m in mean if m not in search_means), key=mean.get)
  rows = [("best search >= best no-search + 1.0", best_search, best_base,
           mean[best_search] >= mean[best_base] + 1.0)]
  if "evolq-infonce" in mean and "random-search" in mean:
    spread = max(std["evolq-infonce"], std["random-search"])
    rows.append((f"tournament > random search by more than the seed spread ({spread:.2f})",
                 "evolq-infonce", "random-search",
                 mean["evolq-infonce"] - mean["random-search"] > spread))
  if "grad-adam-wall" in mean:
    rows.append(("best search >= Adam at equal wall time", best_search, "grad-adam-wall",
                 mean[best_search] >= mean["grad-adam-wall"]))
  lines = ["## Targets", "", f"In {s}, where FP - best no-search baseline is largest "
           f"({gaps[s]:.2f} points). Mean test top-1 over seeds.", "",
           "| target | method (seeds) | vs (seeds) | method | vs | difference | met |",
           "|---|---|---|---|---|---|---|"]
  for text, a, b, met in rows:
    lines.append(f"| {text} | {a} ({_seeds(groups[(s, a)])}) | {b} ({_seeds(groups[(s, b)])}) | "
                 f"{mean[a]:.2f} | {mean[b]:.2f} | {mean[a] - mean[b]:+.2f} | "
                 f"{'yes' if met else 'no'} |")
  return lines + [""]


def _regime(groups, settings, fp):
  """One row per setting: each no-search baseline's test top-1, and FP minus the best."""
  names = list(dict.fromkeys(m for (st, m), rs in groups.items() if rs[0]["seed"] is None))
  lines = ["## Regime: the no-search baselines", "",
           f"Test top-1 (%) without any search; FP {fp:.2f}. `FP - best` is the loss "
           "that no baseline recovers.", "",
           "| setting | " + " | ".join(names) + " | FP - best |",
           "|---|" + "---|" * (len(names) + 1)]
  for s in settings:
    top1 = {m: groups[(s, m)][0]["test_top1"] for m in names if (s, m) in groups}
    if not top1:
      continue
    lines.append(f"| {s} | " + " | ".join(f"{top1[m]:.2f}" if m in top1 else "-" for m in names)
                 + f" | {fp - max(top1.values()):.2f} |")
  return lines + [""]


def _interval_reading(groups, ci):
  """Each search against the best no-search baseline of its setting, the
  difference set against the 95% interval of one top-1 on these test images
  (a pretrained network's test bed is small: what lies inside is not shown)."""
  lines = ["## Searches against the best no-search baseline", "",
           f"Mean test top-1 over seeds; `best` is the no-search baseline with the highest test "
           f"top-1 (for this reading only, it picks nothing). ±{ci:.1f} points is the 95% "
           "interval of one top-1 on these images.", "",
           "| setting | search (seeds) | best no-search | search | best | difference | "
           "beyond the interval |", "|---|---|---|---|---|---|---|"]
  settings = dict.fromkeys(st for st, _ in groups)
  for s in settings:
    base = {m: rs[0]["test_top1"] for (st, m), rs in groups.items()
            if st == s and rs[0]["seed"] is None}
    if not base:
      continue
    best = max(base, key=base.get)
    for (st, m), rs in groups.items():
      if st != s or rs[0]["seed"] is None:
        continue
      mean = np.mean([r["test_top1"] for r in rs])
      d = mean - base[best]
      lines.append(f"| {s} | {m} ({len(rs)}) | {best} | {mean:.2f} | {base[best]:.2f} | "
                   f"{d:+.2f} | {'yes' if abs(d) > ci else 'no'} |")
  return lines + [""]


def _pass_losses(runs, setting, skip=()):
  """The calibration loss after each pass of the searches at `setting` that kept
  no per-block curve (their held-out records) -> [(method, seed, candidates, loss)];
  a search spends the same number of evaluations on every pass. A one-pass run (the
  reconstruction rows: their steps are not candidate evaluations) has no curve."""
  out = []
  for r in runs:
    passes = r.get("extra", {}).get("holdout") or []  # the start, then each pass
    if r["setting"] != setting or r["method"] in skip or len(passes) < 3:
      continue
    per_pass = r["candidates_evaluated"] / (len(passes) - 1)
    out.append((r["method"], r["seed"], [p["pass"] * per_pass for p in passes],
                [p["fitness"] for p in passes]))
  return out


def _plots(runs, groups, settings, name, fp_top1=None, curve_images=CURVE_TEST_IMAGES):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4.8), squeeze=False)
  for ax, s in zip(axes[0], settings):
    items = [(m, rs) for (st, m), rs in groups.items() if st == s]
    means = [np.mean([r["test_top1"] for r in rs]) for _, rs in items]
    stds = [np.std([r["test_top1"] for r in rs]) for _, rs in items]
    colors = ["tab:gray" if rs[0]["seed"] is None else "tab:blue" for _, rs in items]
    ax.barh(range(len(items)), means, xerr=stds, color=colors)
    ax.set_yticks(range(len(items)), [m for m, _ in items], fontsize=8)
    if fp_top1 is not None:
      ax.axvline(fp_top1, color="k", ls="--", lw=1, label=f"FP {fp_top1:.2f}")
      ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(min(means) - 0.3, max(means + [fp_top1 or 0]) + 0.3)
    ax.invert_yaxis()
    ax.set_title(f"{s}: test top-1 (%)")
  fig.tight_layout()
  fig.savefig(os.path.join(RESULTS, f"{name}_top1.png"), dpi=110)
  plt.close(fig)
  for s in settings:
    curves = {r["method"]: r["extra"]["curve"] for r in runs
              if r["setting"] == s and r.get("extra", {}).get("curve")}
    if not curves:
      continue
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for m, cv in curves.items():
      n = [p["candidates"] for p in cv]
      a1.plot(n, [p["test_top1"] for p in cv], marker="o", ms=3, label=m)
      a2.plot(n, [p["fitness"] for p in cv], marker="o", ms=3, label=m)
    for m, seed, n, loss in _pass_losses(runs, s, skip=curves):
      a2.plot(n, loss, marker="s", ms=4, ls="--", label=f"{m}, seed {seed}: after each pass")
    a2.legend(fontsize=8)
    a1.set(xlabel="candidates evaluated", ylabel=f"top-1 (%), first {curve_images:,} test images",
           title=f"{s}: test top-1")
    a2.set(xlabel="candidates evaluated", ylabel="infoNCE calibration loss",
           title=f"{s}: calibration loss")
    a1.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, f"{name}_budget_{s}.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
  main()
