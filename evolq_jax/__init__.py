"""evolq_jax: Evol-Q post-training quantization of Vision Transformers in JAX/Flax.

The pipeline, one function per step:
  load_params / load_split -> calibrate -> search -> predict / classification_metrics
"""
from evolq_jax.calibrate import calibrate
from evolq_jax.config import QuantConfig, base_config, load_config
from evolq_jax.data import load_split
from evolq_jax.evaluate import classification_metrics
from evolq_jax.losses import info_nce
from evolq_jax.models import (PRESETS, VisionTransformer, fp_logits, get_preset, load_params,
                              quantized_logits, save_params)
from evolq_jax.pipeline import bundled_checkpoint, predict
from evolq_jax.qparams import QParams
from evolq_jax.search import SearchConfig, calibration_fitness, search

__version__ = "0.1.0"
