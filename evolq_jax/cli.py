"""The `evolq` command: train | eval | demo."""
from __future__ import annotations

import argparse
import os
import sys

from evolq_jax.config import apply_overrides, base_config, load_config

DEMO_WORKDIR = "runs/demo"


def _config(args):
  c = load_config(args.config)
  return apply_overrides(c, args.set)


def cmd_train(args):
  from evolq_jax.train import train
  summary = train(_config(args), args.workdir)
  print(f"final test top-1 {summary['test_top1']:.2f}% after {summary['epochs']} epochs "
        f"({summary['seconds']:.0f} s); params in {args.workdir}/params.safetensors")


def _print_eval(s):
  from evolq_jax.pipeline import format_table
  rows = [{"model": "FP32", "top1": s["fp_top1"], "top5": s["fp_top5"], "agree": 100.0},
          {"model": f"W{s['w_bits']}A{s['a_bits']} (FQ-ViT init)", "top1": s["init_top1"],
           "top5": s["init_top5"], "agree": s["init_agreement"]}]
  print(format_table(rows, ["model", "top1", "top5", "agree"]))
  print(f"{s['model']}: {s['calib_images']} calibration / {s['test_images']} test images, "
        f"{s['seconds']:.1f} s")


def cmd_eval(args):
  from evolq_jax.pipeline import run_eval
  s = run_eval(_config(args), args.workdir)
  _print_eval(s)
  print(f"summary: {os.path.join(args.workdir, 'summary.json')}")


def cmd_demo(args):
  from evolq_jax.pipeline import run_eval
  c = base_config()
  c.quant.w_bits, c.quant.a_bits = 3, 8
  apply_overrides(c, args.set)
  print("evolq demo: the bundled Fashion-MNIST ViT fixture, FQ-ViT calibration at "
        f"W{c.quant.w_bits}A{c.quant.a_bits}, evaluated on 10,000 test images")
  s = run_eval(c, args.workdir)
  _print_eval(s)
  print(f"summary: {os.path.join(args.workdir, 'summary.json')}")


def build_parser():
  p = argparse.ArgumentParser(prog="evolq", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)

  def add(name, fn, help_, config=True, workdir=None):
    s = sub.add_parser(name, help=help_)
    if config:
      s.add_argument("--config", required=True, help="configs/FILE.py[:arg]")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set quant.w_bits=4 (repeatable)")
    s.add_argument("--workdir", required=workdir is None, default=workdir,
                   help="folder for outputs")
    s.set_defaults(fn=fn)

  add("train", cmd_train, "train a model from scratch (the fixture recipe)")
  add("eval", cmd_eval, "FQ-ViT calibration + evaluation; writes WORKDIR/summary.json")
  add("demo", cmd_demo, "the whole pipeline on the bundled fixture", config=False,
      workdir=DEMO_WORKDIR)
  return p


def main(argv=None):
  args = build_parser().parse_args(argv)
  try:
    args.fn(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"evolq {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
