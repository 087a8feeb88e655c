"""The `evolq` command: train | eval | search | demo | landscape."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import warnings

from evolq_jax.config import apply_overrides, base_config, load_config, run_config
from evolq_jax.workdir import held

DEMO_WORKDIR = "runs/demo"
DATA_HELP = """data (--set data.*):
  data.source   bundled (Fashion-MNIST, the fixture's) | idx | cifar10 | tfds |
                image_folder | imagenet_sample
  image_folder  data.dir=DIR holding DIR/<split>/<class>/<image>; the splits'
                folders are data.train_split (default 'train') and
                data.test_split (default 'validation', e.g. --set data.test_split=val).
                Labels number the classes in the order of DIR/classes.txt (one folder
                name per line) if it exists, else of the train split's class folders
                sorted by name.
"""


def _config(args):
  """The config file's, or on --resume without --config the run's own (run.json);
  then the --set overrides (on --resume they must agree with the run's config)."""
  if args.config:
    c = load_config(args.config)
  elif getattr(args, "resume", False):
    c = run_config(args.workdir)
  else:
    raise ValueError(f"evolq {args.command} needs --config configs/FILE.py[:arg] (or --resume "
                     "with a --workdir that holds a run).")
  return apply_overrides(c, args.set)


def _locked(fn):
  """fn(args) as the only writer of args.workdir (eval and search lock in the pipeline);
  export too, so that it never reads a run that is still writing its results."""
  def run(args):
    with held(args.workdir):
      return fn(args)
  return run


def cmd_train(args):
  from evolq_jax.train import train
  summary = train(_config(args), args.workdir, resume=args.resume)
  print(f"final test top-1 {summary['test_top1']:.2f}% after {summary['epochs']} epochs "
        f"({summary['seconds']:.0f} s); params in {args.workdir}/params.safetensors")


def _init_label(s):
  """'W3A8 init (reference)': the start a run's quant recipe gives."""
  recipe = s.get("quant", {}).get("recipe", "fqvit")  # runs before recipes: FQ-ViT's start
  if "bits" in s:  # per-layer widths: their average
    return f"W{s['bits']['avg_bits']:.2f}A{s['a_bits']} init ({recipe}, mixed)"
  return f"W{s['w_bits']}A{s['a_bits']} init ({recipe})"


def _print_eval(s):
  from evolq_jax.pipeline import format_table
  rows = [{"model": "FP32", "top1": s["fp_top1"], "top5": s["fp_top5"], "agree": 100.0},
          {"model": _init_label(s), "top1": s["init_top1"],
           "top5": s["init_top5"], "agree": s["init_agreement"]}]
  print(format_table(rows, ["model", "top1", "top5", "agree"]))
  print(f"{s['model']}: {s['calib_images']} calibration / {s['test_images']} test images, "
        f"{s['seconds']:.1f} s")


def cmd_eval(args):
  from evolq_jax.pipeline import run_eval
  s = run_eval(_config(args), args.workdir, overwrite=args.overwrite)
  _print_eval(s)
  print(f"summary: {os.path.join(args.workdir, 'summary.json')}")


def _print_search(s, workdir):
  from evolq_jax.pipeline import format_table
  rows = [{"model": "FP32", "top1": s["fp_top1"], "top5": s["fp_top5"], "agree": 100.0,
           "calib loss": ""},
          {"model": _init_label(s), "top1": s["init_top1"],
           "top5": s["init_top5"], "agree": s["init_agreement"], "calib loss": s["fitness_init"]},
          {"model": f"W{s['w_bits']}A{s['a_bits']} Evol-Q ({s['strategy']}, {s['loss']})",
           "top1": s["final_top1"], "top5": s["final_top5"], "agree": s["final_agreement"],
           "calib loss": s["fitness_final"]}]
  print(format_table(rows, ["model", "top1", "top5", "agree", "calib loss"]))
  if "selected_pass" in s:
    picks = ", ".join(f"{h['pass']}: {h['holdout_top1']:.2f} (p={h['p_value']:.2g})"
                      for h in s["holdout"])
    print(f"held-out top-1 per pass ({s['holdout_images']} train images; 0 = init) {picks}; "
          f"kept pass {s['selected_pass']} (the last pass scores {s['last_pass_top1']:.2f} "
          "on test)")
  print(f"{s['candidates_evaluated']} candidates in {s['search_seconds']:.0f} s of search "
        f"({s['seconds']:.0f} s in all); top-1 change {s['final_top1'] - s['init_top1']:+.2f}")
  if "compile" in s:
    c = s["compile"]
    print(f"XLA: {c['compilations']} programs compiled and {c['cache_hits']} read from the "
          f"persistent cache, {c['compile_seconds']:.0f} s in all")
  for name in ("summary.json", "history.jsonl", "fitness.png"):
    print(f"  {os.path.join(workdir, name)}")


def cmd_search(args):
  from evolq_jax.pipeline import run_search
  if args.distributed:
    from evolq_jax.search.sharding import initialize_distributed
    index = initialize_distributed()
    if index > 0:  # the same run in every process: each its own folder, process 0 the main one
      args.workdir = f"{args.workdir.rstrip(os.sep)}.process{index}"
  s = run_search(_config(args), args.workdir, resume=args.resume, overwrite=args.overwrite)
  _print_search(s, args.workdir)


# The demo's budget: small enough for 2 CPU cores in a few minutes, large
# enough that the gain at W3A8 shows (the paper's budget: passes=10,
# generations=3, children=1).
DEMO_SEARCH = dict(passes=2, generations=4, children=8)


def demo_config(overrides=()):
  """The demo's run: the bundled fixture at W3A8, the default recipe, DEMO_SEARCH."""
  c = base_config()
  c.quant.w_bits, c.quant.a_bits = 3, 8
  c.search.update(DEMO_SEARCH)
  return apply_overrides(c, overrides)


def cmd_demo(args):
  from evolq_jax.pipeline import run_search
  c = demo_config(args.set)
  print("evolq demo: the bundled Fashion-MNIST ViT fixture at "
        f"W{c.quant.w_bits}A{c.quant.a_bits}: calibration ({c.quant.recipe} recipe) on "
        f"{c.calib.num_images} "
        f"images, Evol-Q search ({c.search.passes} passes x {c.search.generations} generations "
        f"x {c.search.children} children per block), evaluation on the 10,000 test images")
  # the demo's folder is its own: a new demo replaces the last one
  _print_search(run_search(c, args.workdir, resume=args.resume, overwrite=not args.resume),
                args.workdir)


def cmd_landscape(args):
  from evolq_jax.pipeline import run_landscape
  c = _config(args)
  if args.seed is not None:
    c.seed = args.seed
  r = run_landscape(c, args.workdir, args.layer, args.unit, args.dims, args.direction,
                    args.points, args.span, args.test_limit, args.channel)
  rough = r["roughness"]
  print(f"{r['model']} {r['setting']}: unit {r['unit']} {r['layer']}, {r['direction']} "
        f"direction(s), {r['points']}{'x' + str(r['points']) if r['dims'] == 2 else ''} points, "
        f"a in [-{r['span']}, {r['span']}]")
  print(f"calibration {r['loss_name']}: {min(_flat(r['loss'])):.5f} .. {max(_flat(r['loss'])):.5f}"
        f" (at a=0: {r['loss_at_zero']:.5f}); roughness {rough['second_difference']:.3f}, "
        f"{rough['local_minima']} local minima")
  if r["top1"] is not None:
    print(f"test top-1 on {r['test_images']} images: {min(_flat(r['top1'])):.2f} .. "
          f"{max(_flat(r['top1'])):.2f} % (at a=0: {r['top1_at_zero']:.2f})")
  for path in r["paths"].values():
    print(f"  {path}")


def cmd_export(args):
  from evolq_jax.deploy import export_run, int8_speed_note
  paths = export_run(args.workdir, args.out, artifact=not args.no_artifact, fmt=args.format)
  print(f"{'ONNX' if args.format == 'onnx' else 'integer'} export of {args.workdir}:")
  for path in paths.values():
    print(f"  {path} ({os.path.getsize(path) / 2 ** 20:.2f} MiB)")
  note = int8_speed_note() if args.format == "onnx" else None
  if note:
    print(note)


def _flat(grid):
  return [v for row in grid for v in row] if grid and isinstance(grid[0], list) else grid


def _RenamedTo(new: str):
  """An argparse action for an old option name: stores into the new one's dest, with a
  warning that names the new one."""
  class Renamed(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
      print(f"evolq: warning: {option_string} is renamed {new}; {option_string} will go.",
            file=sys.stderr)
      setattr(namespace, self.dest, values)
  return Renamed


def _family_layers() -> str:
  """Each registered family's layer names (from its units), for --help."""
  from evolq_jax.models.registry import FAMILIES
  return "; ".join(f"{f.name}: " + " | ".join(sorted({l.name for p in f.presets
                                                       for u in f.units(p) for l in u.layers}))
                   for f in FAMILIES.values())


def build_parser():
  p = argparse.ArgumentParser(prog="evolq", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)

  def add(name, fn, help_, config=True, workdir=None, resume=False, overwrite=False):
    s = sub.add_parser(name, help=help_, description=help_, epilog=DATA_HELP if config else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    if resume:
      s.add_argument("--resume", action="store_true",
                     help="continue the run whose checkpoints are in --workdir (with its config)")
    if overwrite:
      s.add_argument("--overwrite", action="store_true",
                     help="replace the results of another run in --workdir")
    if config:
      s.add_argument("--config", required=not resume or name != "search",
                     help="configs/FILE.py[:arg]" + (
                         " (with --resume: the run's own config, from WORKDIR/run.json)"
                         if resume and name == "search" else ""))
    s.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config fields, e.g. --set quant.w_bits=4 search.passes=2 "
                   "(several per --set, and --set repeatable)")
    s.add_argument("--workdir", required=workdir is None, default=workdir,
                   help="folder for outputs (one run writes there at a time)")
    s.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the caches of compiled XLA programs and FP "
                   "logits (default: in $EVOLQ_CACHE, else ~/.cache/evolq_jax)")
    s.add_argument("--debug", action="store_true",
                   help="show the traceback of an error, not just its message")
    s.set_defaults(fn=fn)
    return s

  add("train", _locked(cmd_train), "train a model from scratch (the fixtures' recipes)",
      resume=True)
  add("eval", cmd_eval, "FQ-ViT calibration + evaluation; writes WORKDIR/summary.json",
      overwrite=True)
  s = add("search", cmd_search, "calibrate + Evol-Q search + evaluate; writes summary.json, "
          "history.jsonl, fitness.png", resume=True, overwrite=True)
  s.add_argument("--distributed", action="store_true",
                 help="one process of a multi-process run (JAX's distributed runtime: SLURM, "
                 "TPU pods, Open MPI detected; else EVOLQ_COORDINATOR=host:port, "
                 "EVOLQ_NUM_PROCESSES, EVOLQ_PROCESS_ID). The population is sharded over "
                 "every process's devices; process 0 writes --workdir, process i "
                 "WORKDIR.process<i> (scripts/slurm_search.sh, scripts/tpu_pod_search.sh)")
  add("demo", cmd_demo, "the whole pipeline on the bundled fixture (W3A8)", config=False,
      workdir=DEMO_WORKDIR, resume=True)
  s = add("landscape", _locked(cmd_landscape), "calibration loss and test top-1 on a 1D/2D grid of "
          "perturbations of one layer's weight scales; writes landscape.{png,json}")
  s.add_argument("--layer", required=True,
                 help=f"a layer of the unit ({_family_layers()}; a wrong name lists the unit's "
                 "own layers)")
  s.add_argument("--unit", type=int, default=None,
                 help="unit index (a ViT block, an MBConv block, ...; default: the last)")
  s.add_argument("--block", type=int, dest="unit", action=_RenamedTo("--unit"),
                 help=argparse.SUPPRESS)
  s.add_argument("--dims", type=int, default=1, help="1: a line, 2: a grid")
  s.add_argument("--direction", default="random",
                 help="random (unit-RMS relative) | basis (one output channel's scale)")
  s.add_argument("--channel", type=int, nargs="+", default=None,
                 help="basis channel(s), one per dimension (default 0 [1])")
  s.add_argument("--points", type=int, default=41, help="grid points per axis")
  s.add_argument("--span", type=float, default=0.1,
                 help="relative perturbations a in [-span, span]: scale x (1 + a d)")
  s.add_argument("--test-limit", type=int, default=1000,
                 help="test images for the top-1 (0: no accuracy)")
  s.add_argument("--seed", type=int, default=None,
                 help="seed of the random direction(s) (default: the config's seed)")
  s = add("export", _locked(cmd_export), "a finished run -> integer model (.safetensors + .json "
          "manifest) and its jax.export artifact (.stablehlo), or QDQ ONNX (--format onnx)",
          config=False)
  s.add_argument("--format", default="int", choices=("int", "onnx"),
                 help="int: integer model + jax.export artifact; onnx: QDQ ONNX for ONNX "
                 "Runtime / TensorRT (needs: pip install onnx onnxruntime)")
  s.add_argument("--out", default=None,
                 help="output file (default WORKDIR/model_int.safetensors, or WORKDIR/model.onnx)")
  s.add_argument("--no-artifact", action="store_true", help="skip the .stablehlo artifact")
  return p


def _one_line(text) -> str:
  return " ".join(str(text).split())


class Terminated(KeyboardInterrupt):
  """SIGTERM (a scheduler's kill, `timeout`, `docker stop`), raised like Ctrl-C so that
  the run unwinds the same way: lock released, last checkpoint kept."""


def _raise_terminated(signum, frame):
  raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
  if threading.current_thread() is not threading.main_thread():  # signals go to the main thread
    yield
    return
  previous = signal.signal(signal.SIGTERM, _raise_terminated)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def main(argv=None):
  args = build_parser().parse_args(argv)
  from evolq_jax import cache
  if args.no_cache:
    cache.disable()
  with _sigterm_as_interrupt():
    if args.debug:
      cache.enable_xla_cache()
      args.fn(args)
      return 0
    with warnings.catch_warnings():
      warnings.showwarning = lambda message, *_, **__: print(
          f"evolq {args.command}: warning: {_one_line(message)}", file=sys.stderr)
      try:
        cache.enable_xla_cache()
        args.fn(args)
      except (ValueError, OSError, ImportError) as e:  # bad input: its message is the whole story
        print(f"evolq {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
      except KeyboardInterrupt as e:
        term = isinstance(e, Terminated)
        print(f"evolq {args.command}: {'terminated (SIGTERM)' if term else 'interrupted'}"
              + ("; --resume continues from the last checkpoint." if args.command == "search"
                 else "."), file=sys.stderr)
        return 143 if term else 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
