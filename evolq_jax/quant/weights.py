"""Per-output-channel weight quantization of a whole param tree.

Quantized layers are the Dense / Conv kernels (output channel = last axis);
their `WeightQ` entries live in a tree keyed like the params, one
{"scale", "zero_point"} dict per layer, plus "rounding" (0/1 per weight, int8)
once a reconstruction has learned how each weight rounds (AdaRound).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import traverse_util

from evolq_jax.quant.bits import BitSpec
from evolq_jax.quant.observers import observe
from evolq_jax.quant.recipe import layer_spec
from evolq_jax.quant.uniform import fake_quant, fake_quant_ste


def kernel_paths(params):
  """Paths (tuples of keys, without 'kernel') of every quantized layer."""
  flat = traverse_util.flatten_dict(params)
  return sorted(p[:-1] for p in flat if p[-1] == "kernel")


@functools.partial(jax.jit, static_argnames=("spec", "observer", "layer_bits"))
def calibrate_weights(params, spec: BitSpec, observer: str = "minmax", layer_bits: tuple = ()):
  """Params -> nested {layer: {"scale": (out,), "zero_point": (out,)}} (one
  program for all layers). layer_bits: QuantConfig.weight_rules (per-layer bits)."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path in kernel_paths(params):
    scale, zp = observe(observer, flat[path + ("kernel",)], layer_spec(spec, layer_bits, path),
                        channelwise=True)
    out[path] = {"scale": scale, "zero_point": zp}
  return traverse_util.unflatten_dict(out)


def _std(x, axes):
  """jnp.std's values, with a finite gradient where a channel is constant (std 0), as
  a quantized channel at low bits can be (learned rounding differentiates through it)."""
  return jnp.sqrt(jnp.maximum(jnp.var(x, axes), 1e-24))


def bias_correct(w, w_hat):
  """Match each output channel's mean and std of w_hat to those of w."""
  axes = tuple(range(w.ndim - 1))
  mu, mu_hat = jnp.mean(w, axes), jnp.mean(w_hat, axes)
  sd, sd_hat = _std(w, axes), _std(w_hat, axes)
  return (w_hat - mu_hat) * (sd / jnp.maximum(sd_hat, 1e-12)) + mu


def bias_correction_affine(w, w_hat):
  """`bias_correct` as a per-channel affine map of w_hat: -> (gain, shift), each (out,),
  with bias_correct(w, w_hat) == gain * w_hat + shift (up to rounding). A channel whose
  quantized weights are all equal (std 0) maps to its FP mean: gain 0, shift mu."""
  axes = tuple(range(w.ndim - 1))
  mu, mu_hat = jnp.mean(w, axes), jnp.mean(w_hat, axes)
  sd, sd_hat = _std(w, axes), _std(w_hat, axes)
  gain = jnp.where(sd_hat > 1e-12, sd / jnp.maximum(sd_hat, 1e-12), 0.0)
  return gain, mu - gain * mu_hat


def quantize_kernel(w, scale, zero_point, spec: BitSpec, bias_correction: bool = False,
                    ste: bool = False, rounding=None):
  """One kernel (..., out) fake-quantized per output channel. rounding: None = to
  nearest; else 0/1 per weight, learned (floor + rounding; quant/adaround.py)."""
  w_hat = (fake_quant_ste if ste else fake_quant)(w, scale, zero_point, spec, rounding)
  return bias_correct(w, w_hat) if bias_correction else w_hat


def quantize_weights(params, wq, spec: BitSpec, bias_correction: bool = False,
                     ste: bool = False, layer_bits: tuple = ()):
  """Fake-quantize every kernel named in `wq`; other leaves pass through.
  layer_bits: QuantConfig.weight_rules (per-layer bits; others at `spec`)."""
  flat = traverse_util.flatten_dict(params)
  flat_q = traverse_util.flatten_dict(wq)
  out = dict(flat)
  # in the tree's order, not a set's: the traced program must not depend on the process's
  # string hashing, or the persistent compilation cache misses in every new process
  for path in dict.fromkeys(p[:-1] for p in flat_q):
    out[path + ("kernel",)] = quantize_kernel(
        flat[path + ("kernel",)], flat_q[path + ("scale",)], flat_q[path + ("zero_point",)],
        layer_spec(spec, layer_bits, path), bias_correction, ste,
        flat_q.get(path + ("rounding",)))
  return traverse_util.unflatten_dict(out)
