"""From a run's workdir to the deployable files (`evolq export`):

  WORKDIR/summary.json (+ run.json)  -> model preset, QuantConfig, checkpoint
  WORKDIR/qparams.safetensors        -> the run's final QParams (runs write it);
    older search runs: their newest orbax checkpoint (the held-out pick if any)
  -> format "int": OUT.safetensors (integer model + manifest), OUT.json (the
     manifest), OUT.stablehlo (the integer forward, jax.export);
     format "onnx": OUT (default WORKDIR/model.onnx), QDQ ONNX for ONNX Runtime
     (and TensorRT), built from the same integer model.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from evolq_jax.export import build_export, save_export
from evolq_jax.integer.artifact import ARTIFACT_SUFFIX, save_artifact
from evolq_jax.integer.to_onnx import export_onnx, require_onnx, save_onnx
from evolq_jax.pipeline import load_model
from evolq_jax.qparams import QPARAMS_FILE, QParams, load_qparams
from evolq_jax.quant.recipe import QuantConfig

DEFAULT_NAME = "model_int.safetensors"
ONNX_NAME = "model.onnx"
FORMATS = ("int", "onnx")


# The instruction sets that decide how fast int8 runs on x86 (AVX2: 8-bit multiplies
# through 16-bit sums; AVX512-VNNI / AVX-VNNI: int8 dot products in one instruction).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_info() -> dict:
  """This machine's CPU model, core count and which of CPU_FLAGS it reports (Linux)."""
  info = {"model": "unknown", "cores": os.cpu_count(), "flags": []}
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
  except OSError:
    return info
  for line in text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() == "model name" and info["model"] == "unknown":
      info["model"] = value.strip()
    elif key.strip() == "flags":
      have = set(value.split())
      info["flags"] = [f for f in CPU_FLAGS if f in have]
      break
  return info


def has_int8_dot(info: dict) -> bool:
  """Whether a CPU (cpu_info()) reports int8 dot-product instructions."""
  return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(info["flags"]))


def int8_speed_note(info: dict | None = None) -> str | None:
  """A line for `evolq export --format onnx` where this CPU has no int8 dot products
  (no VNNI): ONNX Runtime's int8 kernels then barely beat fp32 here. None otherwise."""
  info = cpu_info() if info is None else info
  if not info["flags"] or has_int8_dot(info):
    return None
  return (f"note: this CPU ({info['model']}) reports no VNNI int8 dot-product instructions "
          "(AVX512-VNNI, AVX-VNNI or AMX), so ONNX Runtime's int8 kernels run about as fast "
          "as fp32 on it; deploy on a CPU that has them, or on a GPU (docs/deploy.md).")


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_record(workdir: str) -> dict:
  """The finished run's summary, with model / checkpoint / seed from run.json where present."""
  summary = _read_json(os.path.join(workdir, "summary.json"))
  if summary is None:
    raise FileNotFoundError(f"{workdir!r} holds no summary.json: expected the folder of a "
                            "finished `evolq eval`, `search` or `demo` run.")
  config = (_read_json(os.path.join(workdir, "run.json")) or {}).get("config", {})
  return {"model": summary["model"], "quant": summary["quant"],
          "checkpoint": config.get("checkpoint", summary.get("checkpoint")),
          "seed": config.get("seed", summary.get("seed")), "summary": summary}


def _orbax_qparams(workdir: str, summary: dict) -> QParams | None:
  """The result of an older search run from its newest orbax checkpoint."""
  ckpts = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(ckpts):
    return None
  with ocp.CheckpointManager(ckpts) as mngr:
    step = mngr.latest_step()
    if step is None:
      return None
    # held-out selection keeps its pick apart; otherwise the result is the last qparams
    which = "selected" if "selected_pass" in summary else "qparams"
    tree = mngr.restore(step, args=ocp.args.Composite(**{which: ocp.args.StandardRestore()}))
  tree = jax.tree.map(np.asarray, dict(tree[which]))
  return QParams(weights=tree["weights"], acts=tree["acts"])


def run_qparams(workdir: str, summary: dict) -> QParams:
  path = os.path.join(workdir, QPARAMS_FILE)
  if os.path.exists(path):
    return load_qparams(path)
  if "final_top1" in summary:
    qparams = _orbax_qparams(workdir, summary)
    if qparams is not None:
      return qparams
  raise FileNotFoundError(
      f"{workdir!r} holds neither {QPARAMS_FILE} nor a finished search's checkpoints: "
      "rerun it with this version of evolq (runs now write their final QParams there).")


def _check_out(out: str):
  """One clear line for an output path that cannot be written, before any work."""
  if os.path.isdir(out):
    raise IsADirectoryError(f"--out {out!r} is a directory: give a file path, e.g. "
                            f"{os.path.join(out, ONNX_NAME)!r}.")
  parent = os.path.dirname(os.path.abspath(out))
  if os.path.isdir(parent) and not os.access(parent, os.W_OK):
    raise PermissionError(f"--out {out!r}: the folder {parent!r} is not writable; pick another.")


def export_run(workdir: str, out: str | None = None, artifact: bool = True,
               fmt: str = "int") -> dict:
  """Export a finished run. -> {"export", "manifest"[, "artifact"]} paths (format "int") or
  {"onnx": path} (format "onnx")."""
  if fmt not in FORMATS:
    raise ValueError(f"--format {fmt!r} is unknown: expected one of {FORMATS}.")
  if fmt == "onnx":
    require_onnx()
  if out is not None:
    _check_out(out)
  rec = run_record(workdir)
  if rec["checkpoint"] == "random" and rec["seed"] is None:
    raise ValueError(f"{workdir!r} ran on random weights but records no seed: its weights "
                     "cannot be rebuilt. Export a run of a real checkpoint.")
  c = ml_collections.ConfigDict({"model": rec["model"], "checkpoint": rec["checkpoint"],
                                 "seed": rec["seed"] or 0})
  cfg, params = load_model(c)
  qcfg = QuantConfig(**rec["quant"])
  source = {"workdir": os.path.abspath(workdir), "checkpoint": rec["checkpoint"],
            **{k: rec["summary"][k] for k in ("final_top1", "init_top1", "fp_top1", "code")
               if k in rec["summary"]}}
  export = build_export(cfg, qcfg, params, run_qparams(workdir, rec["summary"]), source)
  if fmt == "onnx":
    out = out or os.path.join(workdir, ONNX_NAME)
    return {"onnx": save_onnx(out, export_onnx(export))}
  out = out or os.path.join(workdir, DEFAULT_NAME)
  paths = save_export(out, export)
  if artifact:
    paths["artifact"] = save_artifact(os.path.splitext(out)[0] + ARTIFACT_SUFFIX, export)
  return paths
