"""The forward passes users call, for any family: full precision, calibration
statistics and fully quantized.

`quantized_logits(params, qparams, images)` = weights fake-quantized per
channel with `qparams.weights`, then the model in "quant" mode with
`qparams.acts`. All functions are pure; jit them with the configs static.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax

from evolq_jax.models.registry import family_of
from evolq_jax.quant.recipe import QuantConfig
from evolq_jax.quant.weights import quantize_weights


def units(cfg):
  """The model's searchable units, in forward order (see interface.Unit)."""
  return family_of(cfg).units(cfg)


def act_rules(cfg, qcfg: QuantConfig) -> tuple:
  """The recipe's activation rules for this model's quantization points."""
  return family_of(cfg).act_rules(qcfg)


def resolve_quant(cfg, qcfg: QuantConfig) -> QuantConfig:
  """qcfg with what depends on the model filled in: the family's end layers for
  keep_ends_8bit (a no-op otherwise)."""
  if not qcfg.keep_ends_8bit:
    return qcfg
  return dataclasses.replace(qcfg, end_layers=family_of(cfg).end_layers)


def model_for(cfg, mode: str = "fp", quant: Optional[QuantConfig] = None,
              named_ops: bool = False):
  """named_ops: LayerNorm, softmax, GELU, Hardswish as one named equation each (the
  export's traces; the same values)."""
  fam = family_of(cfg)
  return fam.module(config=cfg, mode=mode, quant=quant,
                    rules=fam.act_rules(quant) if quant is not None else (),
                    named_ops=named_ops)


# LLVM without optimization: the init program runs once, and compiles 3-5x faster
# so (10 s -> 2 s for a small LeViT on a CPU). Some initializers' values then
# differ by one float32 ulp from an optimized build (fused multiply-adds); random
# weights mean nothing at that level. Never for programs whose numbers matter.
_RUN_ONCE = {"xla_backend_optimization_level": 0}


@functools.partial(jax.jit, static_argnums=0, compiler_options=_RUN_ONCE)
def init_params(cfg, key):
  """Random params (one program, compiled once per model: run eagerly, every
  initializer of every leaf compiles on its own)."""
  import jax.numpy as jnp
  images = jnp.zeros((1, cfg.img_size, cfg.img_size, cfg.in_chans), jnp.float32)
  return model_for(cfg).init(key, images)["params"]


def fp_logits(cfg, params, images, **kw):
  """kw: first_unit / last_unit (see interface)."""
  return model_for(cfg).apply({"params": params}, images, **kw)


@functools.partial(jax.jit, static_argnames=("qcfg", "ste"))
def quantize_params(qcfg: QuantConfig, params, qparams, ste: bool = False):
  """Every kernel fake-quantized with its scales (one program: run eagerly, each
  layer's few elementwise ops would dispatch, and compile, on their own)."""
  return quantize_weights(params, qparams.weights, qcfg.w_spec, qcfg.bias_correction, ste,
                          qcfg.weight_rules)


def quantized_logits(cfg, qcfg: QuantConfig, params, qparams, images, ste: bool = False, **kw):
  """Fully quantized forward. kw: first_unit / last_unit (see interface)."""
  qp = quantize_params(qcfg, params, qparams, ste)
  return model_for(cfg, "quant", qcfg).apply({"params": qp}, images, qparams.acts, **kw)


def calibration_stats(cfg, params, images):
  """FP forward -> (logits, {"stats": tree of every quantization point's input})."""
  return model_for(cfg, "calib").apply({"params": params}, images, mutable=["stats"])
