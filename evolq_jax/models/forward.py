"""The forward passes users call: full precision and fully quantized.

`quantized_logits(params, qparams, images)` = weights fake-quantized per
channel with `qparams.weights`, then the model in "quant" mode with
`qparams.acts`. All functions are pure; jit them with the configs static.
"""
from __future__ import annotations

from typing import Optional

from evolq_jax.config import QuantConfig
from evolq_jax.models.presets import ViTConfig
from evolq_jax.models.vit import VisionTransformer
from evolq_jax.quant.weights import quantize_weights


def model_for(cfg: ViTConfig, mode: str = "fp", quant: Optional[QuantConfig] = None):
  return VisionTransformer(config=cfg, mode=mode, quant=quant)


def init_params(cfg: ViTConfig, key):
  import jax.numpy as jnp
  images = jnp.zeros((1, cfg.img_size, cfg.img_size, cfg.in_chans), jnp.float32)
  return model_for(cfg).init(key, images)["params"]


def fp_logits(cfg: ViTConfig, params, images, **kw):
  return model_for(cfg).apply({"params": params}, images, **kw)


def quantize_params(qcfg: QuantConfig, params, qparams, ste: bool = False):
  return quantize_weights(params, qparams.weights, qcfg.w_spec, qcfg.bias_correction, ste)


def quantized_logits(cfg: ViTConfig, qcfg: QuantConfig, params, qparams, images,
                     ste: bool = False, **kw):
  """Fully quantized forward. kw: first_block / last_block (see VisionTransformer)."""
  qp = quantize_params(qcfg, params, qparams, ste)
  return model_for(cfg, "quant", qcfg).apply({"params": qp}, images, qparams.acts, **kw)


def calibration_stats(cfg: ViTConfig, params, images):
  """FP forward -> (logits, {"stats": tree of every quantization point's input})."""
  return model_for(cfg, "calib").apply({"params": params}, images, mutable=["stats"])
