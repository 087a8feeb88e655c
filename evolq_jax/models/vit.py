"""A Linen ViT / DeiT with the FQ-ViT fully-quantized layout, one definition in
three modes:

  "fp"     full precision;
  "calib"  full precision, and every quantization point's input is sown into
           the "stats" collection (its tree is the layout of QParams.acts);
  "quant"  fake-quant at every quantization point with `aq` (QParams.acts);
  "quant_ste" the same values, with straight-through gradients through every
           rounding (for gradient-based baselines; plain fake-quant has a zero
           gradient almost everywhere, which would stop them dead).

Weights are quantized outside the module (`quant.quantize_weights`), so the
module only ever sees (already fake-quantized) params. Names follow timm.
Images are NHWC floats, already normalized.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from evolq_jax.config import QuantConfig
from evolq_jax.models.presets import ViTConfig
from evolq_jax.quant.log2 import log2_fake_quant
from evolq_jax.quant.uniform import fake_quant, fake_quant_ste

MODES = ("fp", "calib", "quant", "quant_ste")
LN_EPS = 1e-6
# Quantization points feeding a LayerNorm: PTF (per channel) when enabled.
RESIDUAL_POINTS = ("embed", "resid1", "resid2")
PROB_POINT = "probs"


def _keep_last(_, new):
  return new


class QuantPoint(nn.Module):
  """Mixin: `self.qpoint(name, x, aq)` marks a quantization point."""
  mode: str = "fp"
  quant: Optional[QuantConfig] = None

  def qpoint(self, name: str, x, aq):
    if self.mode == "calib":
      self.sow("stats", name, x, init_fn=lambda: None, reduce_fn=_keep_last)
    elif self.mode in ("quant", "quant_ste"):
      ste = self.mode == "quant_ste"
      if name == PROB_POINT and self.quant.log2_softmax:
        y = log2_fake_quant(x, self.quant.prob_spec)
        return x + jax.lax.stop_gradient(y - x) if ste else y
      q = aq[name]
      return (fake_quant_ste if ste else fake_quant)(x, q["scale"], q["zero_point"],
                                                     self.quant.a_spec)
    return x

  def sub(self, aq, name):
    return None if aq is None else aq[name]


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
    probs = self.qpoint(PROB_POINT, nn.softmax(
        logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1), aq)
    ctx = (probs.astype(v.dtype) @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    ctx = self.qpoint("context", ctx, aq)
    return self.qpoint("proj_out", nn.Dense(d, name="proj")(ctx), aq)


class Mlp(QuantPoint):
  hidden: int = 768

  @nn.compact
  def __call__(self, x, aq=None):
    d = x.shape[-1]
    h = self.qpoint("gelu_out", nn.gelu(nn.Dense(self.hidden, name="fc1")(x),
                                        approximate=False), aq)
    return self.qpoint("fc2_out", nn.Dense(d, name="fc2")(h), aq)


class Block(QuantPoint):
  num_heads: int = 3
  mlp_hidden: int = 768

  @nn.compact
  def __call__(self, x, aq=None):
    kw = dict(mode=self.mode, quant=self.quant)
    h = self.qpoint("norm1_out", nn.LayerNorm(LN_EPS, name="norm1")(x), aq)
    x = self.qpoint("resid1", x + Attention(num_heads=self.num_heads, name="attn", **kw)(
        h, self.sub(aq, "attn")), aq)
    h = self.qpoint("norm2_out", nn.LayerNorm(LN_EPS, name="norm2")(x), aq)
    return self.qpoint("resid2", x + Mlp(hidden=self.mlp_hidden, name="mlp", **kw)(
        h, self.sub(aq, "mlp")), aq)


class VisionTransformer(QuantPoint):
  """ViT with a class token (DeiT / timm `vit_*` layout).

  Call with images (B, H, W, C) -> logits (B, classes). For block-wise work:
  `first_block=b` takes tokens (B, N, D) (the prefix activations) instead of
  images; `last_block=e` returns the tokens after blocks [first_block, e).
  """
  config: Any = None

  @nn.compact
  def __call__(self, x, aq=None, first_block: int = 0, last_block: Optional[int] = None):
    cfg: ViTConfig = self.config
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r} is unknown: expected one of {MODES}.")
    if self.mode.startswith("quant") and (aq is None or self.quant is None):
      raise ValueError("mode='quant' needs activation qparams and a QuantConfig: "
                       "run evolq_jax.calibrate first.")
    kw = dict(mode=self.mode, quant=self.quant)
    if first_block == 0:
      x = self.embed(x, aq)
    for i in range(first_block, cfg.depth if last_block is None else last_block):
      x = Block(num_heads=cfg.num_heads, mlp_hidden=cfg.mlp_hidden, name=f"blocks_{i}", **kw)(
          x, self.sub(aq, f"blocks_{i}"))
    if last_block is not None:
      return x
    x = self.qpoint("norm_out", nn.LayerNorm(LN_EPS, name="norm")(x), aq)
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
