"""Block reconstruction with learned rounding: AdaRound per unit (BRECQ's block
granularity), with QDrop's random dropping of activation quantization as a
switch and LSQ-style learning of the unit's activation step sizes as another.

For unit u (first to last, so that each unit is learned on the inputs its
already-reconstructed predecessors give):
  - inputs: the activations entering u in the quantized model (x_q) and in
    the FP model (x_fp); target: the FP model's output of u on x_fp (for the
    last unit, the FP logits: the head is learned with it; unit 0 holds the
    stem or patch embedding);
  - learned: one rounding variable per weight of every kernel that u's forward
    uses (quant/adaround.py), and optionally the step sizes of u's searchable
    activation points;
  - loss: ||out_q - y_fp||_p^p summed over channels, averaged over the rest
    (p = 2.4, BRECQ's and QDrop's), plus AdaRound's annealed regularizer
    (weight 0.01, beta 20 -> 2, no regularizer in the first 20%);
  - Adam on a random minibatch of the calibration images at each step
    (rounding: search.round_lr, 1e-2 by default; step sizes: 4e-5, BRECQ's);
  - activation rounding is straight-through; with QDrop each activation of
    the unit keeps its quantization with probability 0.5, and the unit's
    input is x_q or x_fp per value with probability 0.5.

The learned 0/1 per weight goes into QParams (each layer's "rounding"), which
the fake-quant model, the integer export and the ONNX export read. The papers
run 20,000 steps per block on a GPU; search.recon_iters sets ours.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from evolq_jax.models.forward import act_rules, model_for, quantize_params, units
from evolq_jax.quant import adaround
from evolq_jax.quant.weights import bias_correction_affine, quantize_kernel
from evolq_jax.search.fitness import FORWARD_BATCH, in_batches, segment_prefix, unit_inputs
from evolq_jax.search.space import SearchSpace, get_path, replace_leaf

P_NORM = 2.4        # BRECQ / QDrop: the reconstruction loss's L_p
ROUND_WEIGHT = 0.01  # AdaRound's regularizer weight (BRECQ's block default)
ACT_LR = 4e-5       # Adam's rate for activation step sizes (BRECQ / QDrop)
CURVE_POINTS = 20   # logged points of a unit's loss curve
EVAL_IMAGES = 256   # images of the before/after reconstruction error


def _chunk(scfg) -> int:
  """Steps between two logged points of a unit's loss curve (one compiled scan)."""
  return max(1, scfg.recon_iters // CURVE_POINTS)


def chunks(scfg) -> int:
  """Logged points (progress ticks) of one unit's reconstruction."""
  return -(-scfg.recon_iters // _chunk(scfg))


def unit_range(cfg, unit: int):
  """(first_unit, last_unit) of unit u's forward: the last unit runs to the logits."""
  return unit, (None if unit == len(units(cfg)) - 1 else unit + 1)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _fp_range(cfg, first, last, params, x):
  return model_for(cfg).apply({"params": params}, x, first_unit=first, last_unit=last)


def used_kernels(cfg, qcfg, unit: int, fq_params, acts, x) -> tuple:
  """Paths of the kernels unit u's quantized forward reads (found in its trace)."""
  first, last = unit_range(cfg, unit)
  flat = traverse_util.flatten_dict(fq_params)
  keys = list(flat)
  model = model_for(cfg, "quant", qcfg)

  def fn(leaves):
    p = traverse_util.unflatten_dict(dict(zip(keys, leaves)))
    return model.apply({"params": p}, x, acts, first_unit=first, last_unit=last)

  jaxpr = jax.make_jaxpr(fn)(list(flat.values())).jaxpr
  read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
  read |= {id(v) for v in jaxpr.outvars}
  return tuple(k[:-1] for k, var in zip(keys, jaxpr.invars)
               if k[-1] == "kernel" and id(var) in read)


def lp_loss(out, target, p: float = P_NORM):
  """|out - target|^p summed over the last axis (channels), averaged over the rest."""
  return jnp.mean(jnp.sum(jnp.abs(out - target) ** p, axis=-1))


def _unit_output(cfg, qcfg, unit, mode, kernels, act_points, theta, base, x, soft, key):
  """Unit u's quantized output with its kernels at the learned (soft or hard) rounding."""
  first, last = unit_range(cfg, unit)
  fq, raw, wq, acts = base["fq"], base["raw"], base["wq"], base["acts"]
  for path in kernels:
    w, q = get_path(raw, path)["kernel"], get_path(wq, path)
    v, spec = theta["v"]["/".join(path)], qcfg.w_spec_of(path)
    if soft:
      w_hat = adaround.soft_quant(w, q["scale"], q["zero_point"], spec, v)
      if qcfg.bias_correction:
        # the correction's per-channel gain and shift at the current soft weights, held
        # constant for the step: through their statistics the gradient overflows on the
        # near-constant channels real networks have (pruned depthwise channels)
        gain, shift = jax.lax.stop_gradient(bias_correction_affine(w, w_hat))
        w_hat = gain * w_hat + shift
    else:  # what the model computes at the hard rounding
      w_hat = quantize_kernel(w, q["scale"], q["zero_point"], spec, qcfg.bias_correction,
                              rounding=adaround.hard_rounding(v))
    fq = replace_leaf(fq, tuple(path), {**get_path(fq, path), "kernel": w_hat.astype(w.dtype)})
  acts = _with_scales(acts, act_points, theta["acts"])
  model = model_for(cfg, mode, qcfg)
  rngs = {"qdrop": key} if mode == "quant_drop" else None
  return model.apply({"params": fq}, x, acts, first_unit=first, last_unit=last, rngs=rngs)


def _with_scales(acts, points, scales: dict):
  """acts with the scale of each point in `points` set to scales['/'-joined path]."""
  for path in points:
    acts = replace_leaf(acts, tuple(path),
                        {**get_path(acts, path), "scale": scales["/".join(path)]})
  return acts


def _optimizer(round_lr: float):
  labels = lambda t: {"v": jax.tree.map(lambda _: "v", t["v"]),  # noqa: E731
                      "acts": jax.tree.map(lambda _: "acts", t["acts"])}
  return optax.multi_transform({"v": optax.adam(round_lr), "acts": optax.adam(ACT_LR)}, labels)


@functools.partial(jax.jit, static_argnums=tuple(range(10)))
def _steps(cfg, qcfg, unit, kernels, act_points, qdrop, iters, batch, round_lr, n_steps,
           theta, opt_state, step0, key, base, x_q, x_fp, y_fp):
  """n_steps Adam steps from step0 (one lax.scan) -> (theta, opt_state, mean rec loss,
  mean regularizer)."""
  opt = _optimizer(round_lr)
  mode = "quant_drop" if qdrop else "quant_ste"

  def loss_fn(th, step, k):
    k_batch, k_mix, k_drop = jax.random.split(k, 3)
    idx = jax.random.randint(k_batch, (batch,), 0, x_q.shape[0])
    xb, yb = x_q[idx], y_fp[idx]
    if qdrop:
      xb = jnp.where(jax.random.bernoulli(k_mix, 0.5, xb.shape), xb, x_fp[idx])
    out = _unit_output(cfg, qcfg, unit, mode, kernels, act_points, th, base, xb, True, k_drop)
    rec = lp_loss(out, yb)
    reg = (ROUND_WEIGHT * adaround.regularizer_on(step, iters)
           * adaround.rounding_loss(list(th["v"].values()), adaround.beta_at(step, iters)))
    return rec + reg, (rec, reg)

  def one(carry, i):
    th, st = carry
    step = step0 + i
    (_, (rec, reg)), grad = jax.value_and_grad(loss_fn, has_aux=True)(
        th, step, jax.random.fold_in(key, step))
    updates, st = opt.update(grad, st, th)
    return (optax.apply_updates(th, updates), st), (rec, reg)

  (theta, opt_state), (rec, reg) = jax.lax.scan(one, (theta, opt_state), jnp.arange(n_steps))
  return theta, opt_state, jnp.mean(rec), jnp.mean(reg)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _hard_loss(cfg, qcfg, unit, kernels, act_points, theta, base, x, y):
  out = _unit_output(cfg, qcfg, unit, "quant", kernels, act_points, theta, base, x, False, None)
  return lp_loss(out, y) * x.shape[0]


def _eval_loss(cfg, qcfg, unit, kernels, act_points, theta, base, x, y, batch=32):
  n = min(EVAL_IMAGES, x.shape[0])
  total = sum(float(_hard_loss(cfg, qcfg, unit, kernels, act_points, theta, base,
                               x[i:i + batch], y[i:i + batch])) for i in range(0, n, batch))
  return total / n


def reconstruct_unit(cfg, qcfg, scfg, params, qparams, images, unit: int, key,
                     on_chunk=None, batch_size: int = FORWARD_BATCH):
  """Learn unit `unit`'s rounding (and step sizes). qparams must hold a "rounding"
  entry per layer (adaround.with_rounding). -> (qparams, record, steps)."""
  first, last = unit_range(cfg, unit)
  images = jnp.asarray(images)
  fq = quantize_params(qcfg, params, qparams)
  x_q = segment_prefix(cfg, qcfg, unit_inputs(cfg, unit, (), params, fq, qparams, qcfg), images,
                       batch_size)
  x_fp = images if unit == 0 else in_batches(lambda b: _fp_range(cfg, 0, unit, params, b),
                                             images, batch_size)
  y_fp = in_batches(lambda b: _fp_range(cfg, first, last, params, b), x_fp, batch_size)
  kernels = used_kernels(cfg, qcfg, unit, fq, qparams.acts, x_q[:1])
  act_points = tuple(SearchSpace(acts=True).act_points(units(cfg)[unit], qparams.acts,
                                                       act_rules(cfg, qcfg))
                     if scfg.recon_acts else ())
  theta = {"v": {"/".join(p): adaround.init_v(get_path(params, p)["kernel"],
                                              get_path(qparams.weights, p)["scale"])
                 for p in kernels},
           "acts": {"/".join(p): jnp.asarray(get_path(qparams.acts, p)["scale"])
                    for p in act_points}}
  base = {"fq": fq, "raw": params, "wq": qparams.weights, "acts": qparams.acts}
  static = (cfg, qcfg, unit, kernels, act_points)
  # V starts at h(V) = the fraction of w / s, whose hard rounding (V >= 0, h >= 0.5) is
  # to-nearest (ties aside): the start's error
  before = _eval_loss(*static, theta, base, x_q, y_fp)
  opt_state = _optimizer(scfg.round_lr).init(theta)
  iters, chunk = scfg.recon_iters, _chunk(scfg)
  curve, step = [], 0
  while step < iters:
    n = min(chunk, iters - step)
    theta, opt_state, rec, reg = _steps(*static, scfg.qdrop, iters, scfg.recon_batch,
                                        scfg.round_lr, n, theta, opt_state, jnp.int32(step),
                                        key, base, x_q, x_fp, y_fp)
    step += n
    curve.append({"step": step, "rec_loss": float(rec), "round_loss": float(reg)})
    if on_chunk:
      on_chunk(curve[-1])
  after = _eval_loss(*static, theta, base, x_q, y_fp)
  weights = traverse_util.flatten_dict(qparams.weights)
  for path in kernels:
    weights[path + ("rounding",)] = adaround.hard_rounding(theta["v"]["/".join(path)])
  out = qparams.replace(weights=traverse_util.unflatten_dict(weights),
                        acts=_with_scales(qparams.acts, act_points, theta["acts"]))
  record = {"layers": ["/".join(p) for p in kernels], "act_points": len(act_points),
            "rec_loss_nearest": before, "rec_loss_learned": after,
            "hard_fraction": adaround.hard_fraction(list(theta["v"].values())),
            "flipped_fraction": _flipped(qparams, out, kernels),
            "curve": curve}
  return out, record, iters


def _flipped(old, new, kernels) -> float:
  """Share of the unit's weights whose rounding differs from the one it started with."""
  changed = total = 0
  for path in kernels:
    a = np.asarray(get_path(old.weights, path)["rounding"])
    b = np.asarray(get_path(new.weights, path)["rounding"])
    changed, total = changed + int(np.sum(a != b)), total + a.size
  return changed / max(total, 1)
