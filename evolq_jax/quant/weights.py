"""Per-output-channel weight quantization of a whole param tree.

Quantized layers are the Dense / Conv kernels (output channel = last axis);
their `WeightQ` entries live in a tree keyed like the params, one
{"scale", "zero_point"} dict per layer.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import traverse_util

from evolq_jax.quant.bits import BitSpec
from evolq_jax.quant.observers import observe
from evolq_jax.quant.uniform import fake_quant, fake_quant_ste


def kernel_paths(params):
  """Paths (tuples of keys, without 'kernel') of every quantized layer."""
  flat = traverse_util.flatten_dict(params)
  return sorted(p[:-1] for p in flat if p[-1] == "kernel")


@functools.partial(jax.jit, static_argnames=("spec", "observer"))
def calibrate_weights(params, spec: BitSpec, observer: str = "minmax"):
  """Params -> nested {layer: {"scale": (out,), "zero_point": (out,)}} (one
  program for all layers)."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path in kernel_paths(params):
    scale, zp = observe(observer, flat[path + ("kernel",)], spec, channelwise=True)
    out[path] = {"scale": scale, "zero_point": zp}
  return traverse_util.unflatten_dict(out)


def bias_correct(w, w_hat):
  """Match each output channel's mean and std of w_hat to those of w."""
  axes = tuple(range(w.ndim - 1))
  mu, mu_hat = jnp.mean(w, axes), jnp.mean(w_hat, axes)
  sd, sd_hat = jnp.std(w, axes), jnp.std(w_hat, axes)
  return (w_hat - mu_hat) * (sd / jnp.maximum(sd_hat, 1e-12)) + mu


def bias_correction_affine(w, w_hat):
  """`bias_correct` as a per-channel affine map of w_hat: -> (gain, shift), each (out,),
  with bias_correct(w, w_hat) == gain * w_hat + shift (up to rounding). A channel whose
  quantized weights are all equal (std 0) maps to its FP mean: gain 0, shift mu."""
  axes = tuple(range(w.ndim - 1))
  mu, mu_hat = jnp.mean(w, axes), jnp.mean(w_hat, axes)
  sd, sd_hat = jnp.std(w, axes), jnp.std(w_hat, axes)
  gain = jnp.where(sd_hat > 0, sd / jnp.maximum(sd_hat, 1e-12), 0.0)
  return gain, mu - gain * mu_hat


def quantize_kernel(w, scale, zero_point, spec: BitSpec, bias_correction: bool = False,
                    ste: bool = False):
  """One kernel (..., out) fake-quantized per output channel."""
  w_hat = (fake_quant_ste if ste else fake_quant)(w, scale, zero_point, spec)
  return bias_correct(w, w_hat) if bias_correction else w_hat


def quantize_weights(params, wq, spec: BitSpec, bias_correction: bool = False,
                     ste: bool = False):
  """Fake-quantize every kernel named in `wq`; other leaves pass through."""
  flat = traverse_util.flatten_dict(params)
  flat_q = traverse_util.flatten_dict(wq)
  out = dict(flat)
  # in the tree's order, not a set's: the traced program must not depend on the process's
  # string hashing, or the persistent compilation cache misses in every new process
  for path in dict.fromkeys(p[:-1] for p in flat_q):
    out[path + ("kernel",)] = quantize_kernel(
        flat[path + ("kernel",)], flat_q[path + ("scale",)], flat_q[path + ("zero_point",)],
        spec, bias_correction, ste)
  return traverse_util.unflatten_dict(out)
