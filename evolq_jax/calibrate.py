"""FQ-ViT initialization: full-precision statistics on calibration data -> QParams.

Weights: one observer call per kernel (per output channel). Activations: the
model runs in "calib" mode batch by batch; each quantization point's observer
state is folded in a jitted step; the last batch feeds OMSE / PTF, as in FQ-ViT.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from evolq_jax.models.forward import act_rules, calibration_stats
from evolq_jax.qparams import QParams, non_finite_paths
from evolq_jax.quant import observers
from evolq_jax.quant.ptf import ptf_qparams
from evolq_jax.quant.recipe import QuantConfig, observer_of, rule_for
from evolq_jax.quant.weights import calibrate_weights


def _rule(cfg, qcfg: QuantConfig, path):
  """The recipe's rule for a stats-tree path (the point's module path + name)."""
  return rule_for(act_rules(cfg, qcfg), "/".join(k.key for k in path))


def _fold(cfg, qcfg: QuantConfig, stats, states):
  """Every point's observer state updated with the batch's statistics."""
  def fold(path, x, state):
    rule = _rule(cfg, qcfg, path)
    return observers.update(observer_of(rule, qcfg), state, x,
                            channelwise=rule.quantizer == "ptf")

  return jax.tree_util.tree_map_with_path(fold, stats, states)


def _final(cfg, qcfg: QuantConfig, stats, states):
  """Every point's scale and zero point from its state and the last batch (OMSE, PTF)."""
  spec = qcfg.a_spec

  def final(path, x, state):
    rule = _rule(cfg, qcfg, path)
    if rule.quantizer == "ptf":
      scale, zp = ptf_qparams(state["min"], state["max"], x, spec)
    else:
      scale, zp = observers.finalize(observer_of(rule, qcfg), state, x, spec)
    return {"scale": scale, "zero_point": zp}

  return jax.tree_util.tree_map_with_path(final, stats, states)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _fold_batch(cfg, qcfg: QuantConfig, params, states, images):
  _, stats = calibration_stats(cfg, params, images)
  return _fold(cfg, qcfg, stats["stats"], states)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _fold_and_finalize(cfg, qcfg: QuantConfig, params, states, last_images):
  """The last batch: folded in and then finalized from the same forward (one
  program and one forward instead of two)."""
  _, stats = calibration_stats(cfg, params, last_images)
  states = _fold(cfg, qcfg, stats["stats"], states)
  return states, _final(cfg, qcfg, stats["stats"], states)


def _init_states(cfg, qcfg, params, images):
  shapes = jax.eval_shape(lambda: calibration_stats(cfg, params, images)[1]["stats"])
  return jax.tree_util.tree_map_with_path(
      lambda path, s: observers.init_state(
          s.shape[-1:] if _rule(cfg, qcfg, path).quantizer == "ptf" else ()), shapes)


def calibrate(cfg, qcfg: QuantConfig, params, images, batch_size: int = 100,
              progress: bool = True) -> QParams:
  """FQ-ViT initialization of every scale and zero point.

  Args:
    images: float32 (N, H, W, C) calibration images, normalized for the model;
      N should be a multiple of batch_size (a ragged last batch is dropped).
  Returns:
    QParams; raises ValueError when a statistic is NaN / inf.
  """
  cfg.check_images(images.shape)
  n_batches = len(images) // batch_size
  if n_batches == 0:
    raise ValueError(f"{len(images)} calibration images are fewer than one batch of "
                     f"{batch_size}: lower calib.batch_size or pass more images.")
  batches = [jnp.asarray(images[i * batch_size:(i + 1) * batch_size]) for i in range(n_batches)]
  states = _init_states(cfg, qcfg, params, batches[0])
  with tqdm(total=n_batches, desc="calibrate", disable=not progress, leave=False) as bar:
    for batch in batches[:-1]:
      states = _fold_batch(cfg, qcfg, params, states, batch)
      bar.update(1)
    states, acts = _fold_and_finalize(cfg, qcfg, params, states, batches[-1])
    bar.update(1)
  _check_finite(states)
  qparams = weights_for(params, qcfg, QParams(weights={}, acts=acts))
  bad = non_finite_paths(qparams)
  if bad:
    raise ValueError(f"calibration produced NaN/inf quantization parameters at {', '.join(bad[:6])}"
                     f"{' ...' if len(bad) > 6 else ''}: check the checkpoint's weights.")
  return qparams


# The QuantConfig fields the activation half of `calibrate` reads; the weight half
# reads w_bits, w_signed, w_observer and the per-layer widths.
ACT_FIELDS = ("a_bits", "a_observer", "ptf", "log2_softmax", "prob_bits")


def same_activations(a: QuantConfig, b: QuantConfig) -> bool:
  """Whether two recipes calibrate the activations alike (see weights_for)."""
  return all(getattr(a, k) == getattr(b, k) for k in ACT_FIELDS)


def weights_for(params, qcfg: QuantConfig, qparams: QParams) -> QParams:
  """`qparams` with its weights calibrated for `qcfg` (observer, bits, per-layer widths)
  and its activations kept: what `calibrate` returns for `qcfg` when `qparams` came
  from a recipe with the same activations (same_activations), without a second pass
  over the calibration images."""
  return qparams.replace(weights=calibrate_weights(params, qcfg.w_spec, qcfg.w_observer,
                                                   qcfg.weight_rules))


def _check_finite(states) -> None:
  counts = jax.tree_util.tree_flatten_with_path(
      jax.tree.map(lambda s: s["nonfinite"], states, is_leaf=lambda t: isinstance(t, dict) and "nonfinite" in t))[0]
  bad = [jax.tree_util.keystr(p, simple=True, separator="/") for p, n in counts if int(n) > 0]
  if bad:
    raise ValueError(
        f"the model's activations hold NaN/inf at {len(bad)} quantization point(s): "
        f"{', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}. The model's outputs are not "
        "finite on the calibration images: check the checkpoint and the input normalization.")

