"""ViT / DeiT (timm's `vision_transformer.py` layout) with the FQ-ViT
fully-quantized layout: presets, the Linen model in the four modes of
`interface.MODES`, its searchable units, its quantization rules and its timm
name table.

Quantization points: patch-embedding output, the embedding (+ position),
every residual-stream output (the LayerNorm inputs: PTF), every LayerNorm
output, qkv output, attention logits, probabilities (uniform or log2),
attention x value, proj output, GELU output, fc2 output, final norm, head.
Units: one per block; the paper searches its attention's qkv and proj.
Images are NHWC floats, already normalized.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from evolq_jax.models.interface import (IMAGENET_MEAN, IMAGENET_STD, Family, Layer, ModelConfig,
                                        QuantPoint, Transform, Unit, check_unit_range)
from evolq_jax.quant.recipe import fqvit_rules

LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class ViTConfig(ModelConfig):
  patch_size: int = 16
  embed_dim: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: float = 4.0

  @property
  def mlp_hidden(self) -> int:
    return int(self.embed_dim * self.mlp_ratio)

  @property
  def num_patches(self) -> int:
    return (self.img_size // self.patch_size) ** 2


PRESETS = (
    ViTConfig("deit_tiny_patch16_224", embed_dim=192, depth=12, num_heads=3),
    ViTConfig("deit_small_patch16_224", embed_dim=384, depth=12, num_heads=6),
    ViTConfig("deit_base_patch16_224", embed_dim=768, depth=12, num_heads=12),
    ViTConfig("vit_base_patch16_224", embed_dim=768, depth=12, num_heads=12, preprocess="vit"),
    # The fixture: a DeiT-style ViT for 28x28 grayscale (Fashion-MNIST).
    ViTConfig("vit_fixture_patch4_28", img_size=28, patch_size=4, in_chans=1,
              num_classes=10, embed_dim=96, depth=6, num_heads=4, preprocess="fixture"),
    # The second fixture: a DeiT-style ViT for 32x32 RGB (CIFAR-10).
    ViTConfig("vit_cifar10_patch4_32", img_size=32, patch_size=4, in_chans=3,
              num_classes=10, embed_dim=128, depth=6, num_heads=4, preprocess="cifar10"),
)


class Attention(QuantPoint):
  num_heads: int = 3

  @nn.compact
  def __call__(self, x, aq=None):
    b, n, d = x.shape
    hd = d // self.num_heads
    qkv = self.qpoint("qkv_out", nn.Dense(3 * d, name="qkv")(x), aq)
    qkv = qkv.reshape(b, n, 3, self.num_heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (b, heads, n, hd)
    logits = self.qpoint("logits", (q * hd ** -0.5) @ k.swapaxes(-1, -2), aq)
    # softmax in at least float32 (bf16 logits are upcast; float64 stays)
    probs = self.qpoint("probs", self.softmax(
        logits.astype(jnp.promote_types(logits.dtype, jnp.float32))), aq)
    ctx = (probs.astype(v.dtype) @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    ctx = self.qpoint("context", ctx, aq)
    return self.qpoint("proj_out", nn.Dense(d, name="proj")(ctx), aq)


class Mlp(QuantPoint):
  hidden: int = 768

  @nn.compact
  def __call__(self, x, aq=None):
    d = x.shape[-1]
    h = self.qpoint("gelu_out", self.gelu(nn.Dense(self.hidden, name="fc1")(x)), aq)
    return self.qpoint("fc2_out", nn.Dense(d, name="fc2")(h), aq)


class Block(QuantPoint):
  num_heads: int = 3
  mlp_hidden: int = 768

  @nn.compact
  def __call__(self, x, aq=None):
    kw = self.child_kw()
    h = self.qpoint("norm1_out", self.layer_norm(LN_EPS, "norm1")(x), aq)
    x = self.qpoint("resid1", x + Attention(num_heads=self.num_heads, name="attn", **kw)(
        h, self.sub(aq, "attn")), aq)
    h = self.qpoint("norm2_out", self.layer_norm(LN_EPS, "norm2")(x), aq)
    return self.qpoint("resid2", x + Mlp(hidden=self.mlp_hidden, name="mlp", **kw)(
        h, self.sub(aq, "mlp")), aq)


class VisionTransformer(QuantPoint):
  """ViT with a class token (DeiT / timm `vit_*` layout).

  Call with images (B, H, W, C) -> logits (B, classes). Units are blocks:
  `first_unit=b` takes tokens (B, N, D) (the prefix activations) instead of
  images; `last_unit=e` returns the tokens after blocks [first_unit, e).
  """
  config: Any = None

  @nn.compact
  def __call__(self, x, aq=None, first_unit: int = 0, last_unit: Optional[int] = None):
    cfg: ViTConfig = self.config
    self.check_mode(aq)
    check_unit_range(cfg, range(cfg.depth), first_unit, last_unit)
    if first_unit == 0:
      x = self.embed(x, aq)
    for i in range(first_unit, cfg.depth if last_unit is None else last_unit):
      x = Block(num_heads=cfg.num_heads, mlp_hidden=cfg.mlp_hidden, name=f"blocks_{i}",
                **self.child_kw())(x, self.sub(aq, f"blocks_{i}"))
    if last_unit is not None:
      return x
    x = self.qpoint("norm_out", self.layer_norm(LN_EPS, "norm")(x), aq)
    return self.qpoint("head_out", nn.Dense(cfg.num_classes, name="head")(x[:, 0]), aq)

  def embed(self, images, aq):
    cfg: ViTConfig = self.config
    cfg.check_images(images.shape)
    p = cfg.patch_size
    x = nn.Conv(cfg.embed_dim, (p, p), strides=(p, p), padding="VALID",
                name="patch_embed")(images)
    x = self.qpoint("patch_out", x.reshape(x.shape[0], -1, cfg.embed_dim), aq)
    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, cfg.embed_dim))
    pos = self.param("pos_embed", nn.initializers.normal(0.02),
                     (1, cfg.num_patches + 1, cfg.embed_dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, cfg.embed_dim)), x], 1)
    return self.qpoint("embed", x + pos, aq)


def units(cfg: ViTConfig) -> tuple:
  return tuple(Unit(i, (f"blocks_{i}",), (
      Layer("qkv", (f"blocks_{i}", "attn", "qkv")),
      Layer("proj", (f"blocks_{i}", "attn", "proj")),
      Layer("fc1", (f"blocks_{i}", "mlp", "fc1"), "mlp"),
      Layer("fc2", (f"blocks_{i}", "mlp", "fc2"), "mlp"))) for i in range(cfg.depth))


def unit_kinds(cfg: ViTConfig) -> tuple:
  """Every block after the first (which embeds the images) computes the same function."""
  return (None,) + ("block",) * (cfg.depth - 1)


def act_rules(qcfg):
  return fqvit_rules(qcfg, residual=r"(.*/)?(embed|resid1|resid2)", probs=r".*/probs")


def candidate_bytes(cfg: ViTConfig, unit: int, loss_batch: int, itemsize: int = 4) -> int:
  """Live activations of one loss batch through blocks unit..end (residual,
  qkv, attention logits and probs, MLP)."""
  t, d, h = cfg.num_patches + 1, cfg.embed_dim, cfg.num_heads
  per_token = 8 * d + 4 * h * t + 2 * cfg.mlp_hidden
  return itemsize * loss_batch * t * per_token * (cfg.depth - unit)


# (timm regex, flax name template, how to convert the array: see convert.CONVERSIONS)
TIMM_TABLE = (
    (r"cls_token", "cls_token", "same"),
    (r"pos_embed", "pos_embed", "same"),
    (r"patch_embed\.proj\.weight", "patch_embed/kernel", "conv"),
    (r"patch_embed\.proj\.bias", "patch_embed/bias", "same"),
    (r"blocks\.(\d+)\.(norm1|norm2)\.weight", "blocks_{0}/{1}/scale", "same"),
    (r"blocks\.(\d+)\.(norm1|norm2)\.bias", "blocks_{0}/{1}/bias", "same"),
    (r"blocks\.(\d+)\.(attn|mlp)\.(qkv|proj|fc1|fc2)\.weight", "blocks_{0}/{1}/{2}/kernel", "dense"),
    (r"blocks\.(\d+)\.(attn|mlp)\.(qkv|proj|fc1|fc2)\.bias", "blocks_{0}/{1}/{2}/bias", "same"),
    (r"norm\.weight", "norm/scale", "same"),
    (r"norm\.bias", "norm/bias", "same"),
    (r"head\.weight", "head/kernel", "dense"),
    (r"head\.bias", "head/bias", "same"),
)

TRANSFORMS = (
    Transform("deit", 0.875, "bicubic", IMAGENET_MEAN, IMAGENET_STD),
    Transform("vit", 0.9, "bicubic", (0.5,) * 3, (0.5,) * 3),
    Transform("fixture", 1.0, "bilinear", (0.2860,), (0.3530,)),  # Fashion-MNIST's statistics
    Transform("cifar10", 1.0, "bilinear", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
)

FAMILY = Family("vit", VisionTransformer, PRESETS, units, act_rules, candidate_bytes, TIMM_TABLE,
                transforms=TRANSFORMS, unit_kinds=unit_kinds,
                end_layers=("patch_embed", "head"))
