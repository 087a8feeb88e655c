"""Flax ViT/DeiT models, presets and checkpoint converters."""
from evolq_jax.models.checkpoint import load_params, save_params
from evolq_jax.models.forward import (calibration_stats, fp_logits, init_params, model_for,
                                      quantize_params, quantized_logits)
from evolq_jax.models.presets import PRESETS, ViTConfig, get_preset
from evolq_jax.models.vit import VisionTransformer
