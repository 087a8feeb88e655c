"""A run from its config: model + data -> calibrate -> evaluate -> summary.json.

The pieces are plain functions so notebooks can call them one by one. A run
checks what it can before any work: sizes and bit widths (check_sizes), the
workdir (writable, locked, not another run's: workdir.py), the checkpoint and
the data (loaded before calibration), a resumed search's checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp

from evolq_jax.calibrate import calibrate, weights_for
from evolq_jax.cache import enable_xla_cache
from evolq_jax.compilation import CompileLog
from evolq_jax.config import mixed_bits_config, quant_config, search_config
from evolq_jax.data import SplitTooSmall, class_count, load_split
from evolq_jax.evaluate import batched_logits, classification_metrics
from evolq_jax.models import get_preset, init_params, load_params
from evolq_jax.models.forward import units
from evolq_jax.qparams import QPARAMS_FILE, save_qparams
from evolq_jax.quant.bits import check_bits
from evolq_jax.search.bits import choose_bits
from evolq_jax.search.fitness import (FORWARD_BATCH, fp_forward, quantized_forward,
                                      reference_logits)
from evolq_jax.search.selection import check_rule
from evolq_jax.workdir import code_version, open_run, write_atomic, write_json

CHECKPOINT_DIR = os.path.join(os.path.dirname(__file__), "checkpoints")


def bundled_checkpoint(model: str) -> str:
  path = os.path.join(CHECKPOINT_DIR, f"{model}.safetensors")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"no bundled checkpoint for model {model!r} (only the two fixtures, "
        "vit_fixture_patch4_28 and vit_cifar10_patch4_32, ship one). Set "
        "checkpoint=PATH to a timm/Flax .safetensors file, or checkpoint='random'.")
  return path


def load_model(c):
  """-> (ViTConfig, params) from c.model and c.checkpoint."""
  cfg = get_preset(c.model)
  if c.checkpoint == "random":
    return cfg, init_params(cfg, jax.random.key(c.seed))
  if not c.checkpoint:
    raise ValueError(f"model {c.model!r} needs a checkpoint: --set checkpoint=PATH to a timm "
                     "or Flax .safetensors file (or checkpoint=random for a smoke run).")
  path = bundled_checkpoint(c.model) if c.checkpoint == "bundled" else c.checkpoint
  return cfg, load_params(path, cfg)


def _count(c, field: str, minimum: int, meaning: str) -> int:
  value = c
  for key in field.split("."):
    value = value[key]
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{field}={value!r} must be an integer >= {minimum} ({meaning}).")
  return value


def check_sizes(c, search: bool = False) -> None:
  """Bit widths and every size a run uses, checked before any work; each error
  names its field. Batches must divide their sets: nothing is silently dropped."""
  for field in ("w_bits", "a_bits", "prob_bits"):
    check_bits(c.quant[field], f"quant.{field}")
  b = _count(c, "calib.batch_size", 1, "images per calibration batch")
  n = _count(c, "calib.num_images", 1, f"a multiple of calib.batch_size={b}; the paper: 1000")
  _count(c, "eval.batch_size", 1, "images per evaluation batch")
  _count(c, "eval.limit", 0, "test images; 0 = the whole test split")
  _count(c, "holdout.num_images", 0, "0 = no held-out selection")
  _count(c, "data.limit", 0, "0 = no limit")
  alpha = c.holdout.alpha
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
    raise ValueError(f"holdout.alpha={alpha!r} must be a number in (0, 1]: the sign test's "
                     "level (0.05 by default; 1.0 = no test).")
  check_rule(c.holdout.rule)
  if n % b:
    fits = sorted({n - n % b or b, n - n % b + b})  # the nearest multiples (one when n < b)
    raise ValueError(f"calib.num_images={n} is not a multiple of calib.batch_size={b}: "
                     f"calibration would drop the last {n % b} images. Use "
                     f"{' or '.join(map(str, fits))}, or a calib.batch_size that divides {n}.")
  if search:
    lb = c.search.loss_batch
    if lb > n:
      raise ValueError(f"search.loss_batch={lb} is more than calib.num_images={n}: lower "
                       "search.loss_batch or raise calib.num_images.")
    if n % lb:
      raise ValueError(f"calib.num_images={n} is not a multiple of search.loss_batch={lb}: the "
                       f"search's loss would leave {n % lb} images out. Use a search.loss_batch "
                       f"that divides {n}.")


def _check_labels(labels, cfg, split: str) -> None:
  if len(labels) and (labels.min() < 0 or labels.max() >= cfg.num_classes):
    raise ValueError(f"the {split} split has labels {labels.min()}..{labels.max()} but model "
                     f"{cfg.name!r} has {cfg.num_classes} classes (0..{cfg.num_classes - 1}): "
                     "use data with the model's classes, or a model for this data.")


def _split(c, split: str, cfg, limit, seed, too_small: str):
  """load_split with `limit` exact: a split smaller than asked for is an error naming the field."""
  try:
    return load_split(c.data, split, cfg, limit=limit, seed=seed, exact=limit is not None)
  except SplitTooSmall as e:
    raise ValueError(f"{too_small}, but the {split} split has {e.available} images: lower "
                     "it.") from None


def load_data(c, cfg):
  """-> dict of calibration images, the test split (images, labels) and, when
  c.holdout.num_images > 0, a held-out split of training images (never the
  calibration images) that may pick among search passes."""
  check_sizes(c)
  n_calib, n_hold = c.calib.num_images, c.holdout.num_images
  classes = class_count(c.data)
  if classes is not None and classes != cfg.num_classes:
    raise ValueError(f"data.source={c.data.source!r} has {classes} classes but model "
                     f"{cfg.name!r} has {cfg.num_classes}: use data with the model's classes "
                     "(an image folder's classes.txt lists them), or a model for this data.")
  bundled = c.data.source == "bundled"
  # The bundled subset ships its held-out images apart; elsewhere they are the
  # train images right after the calibration set in the same seeded order.
  n_train = n_calib + (0 if bundled else n_hold)
  train_x, train_y = _split(c, "train", cfg, n_train, c.calib.seed, f"calib.num_images={n_calib}"
                            + ("" if bundled or not n_hold else f" + holdout.num_images={n_hold}")
                            + f" asks for {n_train} train images")
  _check_labels(train_y, cfg, "train")
  out = {"calib": train_x[:n_calib]}
  if n_hold:
    hx, hy = (_split(c, "holdout", cfg, n_hold, c.calib.seed,
                     f"holdout.num_images={n_hold} asks for {n_hold} held-out images")
              if bundled else (train_x[n_calib:], train_y[n_calib:]))
    out["holdout"] = (hx, hy)
  test_x, test_y = _split(c, "test", cfg, c.eval.limit or None, None,
                          f"eval.limit={c.eval.limit} asks for {c.eval.limit} test images")
  _check_labels(test_y, cfg, "test")
  out["test"] = (test_x, test_y)
  return out


def predict(cfg, params, images, qcfg=None, qparams=None, batch_size=FORWARD_BATCH,
            desc=None):
  """Logits (N, classes) of the FP model (qcfg None) or the quantized one (the search's
  own jitted forwards: one compiled program per config and batch shape). The default
  batch is the search's (reference_logits, calibration_fitness, the held-out pick), so
  that a library session's evaluation and search compile the full forward once."""
  run = ((lambda x: fp_forward(cfg, params, x)) if qcfg is None else
         (lambda x: quantized_forward(cfg, qcfg, params, qparams, x)))
  return batched_logits(run, images, batch_size, desc)


def _calibrated(c, progress: bool):
  """The steps every run shares: model, data, FP logits, FQ-ViT init and its metrics."""
  qcfg = quant_config(c)
  cfg, params = load_model(c)
  data = load_data(c, cfg)
  test_x, test_y = data["test"]
  desc = (lambda s: s) if progress else (lambda s: None)  # noqa: E731
  fp = predict(cfg, params, test_x, batch_size=c.eval.batch_size, desc=desc("eval fp"))
  qparams = calibrate(cfg, qcfg, params, data["calib"], c.calib.batch_size, progress)
  chosen, bcfg = None, mixed_bits_config(c)
  if bcfg.on:  # per-layer widths first; the activations' statistics stay
    qcfg, qparams, chosen = _choose_bits(c, bcfg, cfg, qcfg, params, qparams, data["calib"],
                                         progress)
  init = classification_metrics(
      predict(cfg, params, test_x, qcfg, qparams, c.eval.batch_size, desc(f"eval {qcfg.name}")),
      test_y, fp)
  fp_m = classification_metrics(fp, test_y)
  summary = {
      "model": cfg.name, "w_bits": qcfg.w_bits, "a_bits": qcfg.a_bits,
      "quant": dataclasses.asdict(qcfg), "checkpoint": c.checkpoint,
      "calib_images": int(len(data["calib"])), "test_images": int(len(test_x)),
      "fp_top1": fp_m["top1"], "fp_top5": fp_m["top5"],
      "init_top1": init["top1"], "init_top5": init["top5"], "init_agreement": init["agreement"],
  }
  if chosen is not None:
    summary["bits"] = chosen.to_json()
  return cfg, qcfg, params, data, fp, qparams, summary, desc


def _choose_bits(c, bcfg, cfg, qcfg, params, qparams, calib, progress):
  """-> (qcfg at the chosen widths, QParams with its weights recalibrated, BitsResult)."""
  scfg = search_config(c)
  images = calib[:bcfg.images]
  fp_ref = reference_logits(cfg, params, jnp.asarray(images))
  chosen = choose_bits(cfg, qcfg, bcfg, params, qparams.acts, images, fp_ref, seed=c.seed,
                       loss=scfg.loss, temperature=scfg.temperature, progress=progress)
  qcfg = dataclasses.replace(qcfg, layer_bits=chosen.rules(qcfg.w_bits))
  return qcfg, weights_for(params, qcfg, qparams), chosen


def calibrate_on_split(c, cfg, qcfg, params, test_limit: int = 0, progress: bool = True):
  """-> (calibration images, (test images, labels) or None, FQ-ViT init QParams):
  the inputs an analysis of one calibrated model needs (landscape, its benchmark).
  Sizes are exact, as for eval and search: a split smaller than asked for is an error."""
  check_sizes(c)
  n = c.calib.num_images
  calib_x, _ = _split(c, "train", cfg, n, c.calib.seed,
                      f"calib.num_images={n} asks for {n} train images")
  test = (_split(c, "test", cfg, test_limit, None,
                 f"--test-limit {test_limit} asks for {test_limit} test images")
          if test_limit else None)
  if test is not None:
    _check_labels(test[1], cfg, "test")
  return calib_x, test, calibrate(cfg, qcfg, params, calib_x, c.calib.batch_size, progress)


def run_landscape(c, workdir: str, layer: str, unit: int | None = None, dims: int = 1,
                  direction: str = "random", points: int = 41, span: float = 0.1,
                  test_limit: int = 1000, channels=None, progress: bool = True) -> dict:
  """From a run config: calibrate (FQ-ViT init), then the landscape; writes PNG + JSON.

  The loss, temperature, loss batch and chunk are the config's `search.*`;
  `test_limit` test images give the top-1 (0: no accuracy).
  """
  from evolq_jax import landscape as ls
  if isinstance(test_limit, bool) or not isinstance(test_limit, int) or test_limit < 0:
    raise ValueError(f"--test-limit {test_limit!r} must be an integer >= 0 (test images for "
                     "the top-1; 0 = no accuracy).")
  qcfg, scfg = quant_config(c), search_config(c)
  cfg, params = load_model(c)
  unit = ls.check_target(cfg, layer, unit)  # fail before the slow steps
  ls.check_grid(direction, dims, points, span, channels,
                ls.layer_channels(cfg, params, layer, unit))
  calib_x, test, qparams = calibrate_on_split(c, cfg, qcfg, params, test_limit, progress)
  result = ls.landscape(cfg, qcfg, params, qparams, calib_x, layer, unit, dims, direction,
                        points, span, scfg.loss, scfg.temperature, scfg.loss_batch,
                        scfg.chunk or 16, test, c.seed, channels)
  result["paths"] = ls.save_landscape(result, workdir)
  return result


def _config_dict(c) -> dict:
  """The run's config as plain JSON values (what run.json records and compares)."""
  return json.loads(json.dumps(c.to_dict(), default=str))


def run_eval(c, workdir: str | None = None, progress: bool = True,
             overwrite: bool = False) -> dict:
  """Calibrate (FQ-ViT init) and evaluate FP and quantized models.

  workdir: where summary.json goes; a folder holding another run's results is
    refused unless `overwrite` (which removes them first)."""
  start = time.time()
  check_sizes(c)
  quant_config(c)  # every quant field, before any work
  mixed_bits_config(c)
  enable_xla_cache()
  if not workdir:
    return _eval(c, None, progress, start)
  with open_run(workdir, "eval", _config_dict(c), overwrite=overwrite):
    return _eval(c, workdir, progress, start)


def _eval(c, workdir, progress, start) -> dict:
  with CompileLog() as log:
    qparams, summary = _calibrated(c, progress)[5:7]
  summary["seconds"] = round(time.time() - start, 2)
  summary["compile"] = log.summary()
  if workdir:
    summary["code"] = code_version()
    save_qparams(os.path.join(workdir, QPARAMS_FILE), qparams)  # for `evolq export`
    write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def run_search(c, workdir: str, resume: bool = False, progress: bool = True,
               overwrite: bool = False) -> dict:
  """Calibrate, evaluate, search, evaluate again; writes summary.json,
  history.jsonl and fitness.png into workdir.

  resume: continue the run in workdir (refused when the config differs from
    its run.json in a field that changes the result). overwrite: replace the
    results of another run there (otherwise refused)."""
  from evolq_jax.search import checkpoint as search_checkpoint
  start = time.time()
  check_sizes(c, search=True)
  quant_config(c)  # every field, before any work, the searched units and layers included
  mixed_bits_config(c)
  search_config(c).space.searched_units(units(get_preset(c.model)))
  enable_xla_cache()
  with open_run(workdir, "search", _config_dict(c), resume=resume, overwrite=overwrite):
    if resume:  # a damaged newest checkpoint: fall back (and say so) before calibrating
      search_checkpoint.newest_readable(workdir)
    with CompileLog() as log:
      summary = _search(c, workdir, resume, progress, start)
    summary["compile"] = log.summary()
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def _search(c, workdir, resume, progress, start) -> dict:
  """-> the summary (written by run_search, once the compile counts are in)."""
  from evolq_jax.plots import plot_fitness
  from evolq_jax.search import search
  scfg = search_config(c)
  cfg, qcfg, params, data, fp, qparams0, summary, desc = _calibrated(c, progress)
  test_x, test_y = data["test"]
  result = search(cfg, qcfg, params, qparams0, data["calib"], scfg, seed=c.seed,
                  workdir=workdir, resume=resume, progress=progress,
                  holdout=data.get("holdout"), holdout_alpha=c.holdout.alpha,
                  holdout_rule=c.holdout.rule)
  final = classification_metrics(
      predict(cfg, params, test_x, qcfg, result.qparams, c.eval.batch_size, desc("eval final")),
      test_y, fp)
  if "holdout" in data:  # report the last pass too, so the pick's effect is visible
    last = (final if result.qparams is result.last_qparams else classification_metrics(
        predict(cfg, params, test_x, qcfg, result.last_qparams, c.eval.batch_size), test_y, fp))
    summary.update({"holdout_images": int(len(data["holdout"][0])),
                    "selected_pass": result.selected_pass, "holdout": result.holdout,
                    "last_pass_top1": last["top1"]})
  write_atomic(os.path.join(workdir, "history.jsonl"),
               "".join(json.dumps(h) + "\n" for h in result.history))
  plot_fitness(result.history, os.path.join(workdir, "fitness.png"),
               f"{cfg.name} {qcfg.name}: {scfg.strategy} / {scfg.loss}", result.fitness_init)
  summary.update({
      "search": dataclasses.asdict(scfg), "strategy": scfg.strategy, "loss": scfg.loss,
      "seed": c.seed, "final_top1": final["top1"], "final_top5": final["top5"],
      "final_agreement": final["agreement"],
      "fitness_init": result.fitness_init, "fitness_final": result.fitness_final,
      "candidates_evaluated": result.candidates, "search_seconds": round(result.seconds, 2),
      "seconds": round(time.time() - start, 2), "code": code_version()})
  save_qparams(os.path.join(workdir, QPARAMS_FILE), result.qparams)  # for `evolq export`
  return summary


def format_table(rows: list[dict], columns: list[str]) -> str:
  """Plain-text table of dicts; floats with 2 decimals."""
  cells = [[f"{r.get(k):.2f}" if isinstance(r.get(k), float) else str(r.get(k, ""))
            for k in columns] for r in rows]
  widths = [max(len(k), *(len(row[i]) for row in cells)) for i, k in enumerate(columns)]
  line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
  return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


