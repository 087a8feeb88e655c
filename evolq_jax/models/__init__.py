"""Model families behind one interface (see interface.py), presets and checkpoint converters."""
from evolq_jax.models.checkpoint import load_params, save_params
from evolq_jax.models.forward import (act_rules, calibration_stats, fp_logits, init_params,
                                      model_for, quantize_params, quantized_logits,
                                      resolve_quant, units)
from evolq_jax.models.interface import Family, Layer, ModelConfig, Unit
from evolq_jax.models.registry import FAMILIES, PRESETS, family_of, get_preset, register_preset
from evolq_jax.models.vit import ViTConfig, VisionTransformer
