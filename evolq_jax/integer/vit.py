"""ViT / DeiT integer forward: the FQ-ViT layout of models/vit.py run on
integer codes (see kernels.py for the arithmetic).

Integer matmuls: patch embedding, qkv, q @ k^T, probs @ v (uniform probs),
proj, fc1, fc2, head. Float32 on dequantized codes: LayerNorm, softmax, GELU,
the residual additions, the class token / position embedding (added before
the embed quantizer, as in the fake-quant model) and probs @ v when the
probabilities are log2-quantized (powers of two).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from evolq_jax.integer.kernels import (act_matmul, dequantize, linear, pixel_linear,
                                       pixels_from_images, quantize)
from evolq_jax.models.vit import LN_EPS


def layer_norm(x, floats: dict, name: str):
  params = {"scale": floats[f"{name}/scale"], "bias": floats[f"{name}/bias"]}
  return nn.LayerNorm(LN_EPS).apply({"params": params}, x)


def embed(rt, pixels, cfg):
  """uint8 pixels (B, H, W, C) -> codes (B, 1 + patches, D) on the 'embed' grid."""
  b, p, c, g = pixels.shape[0], cfg.patch_size, cfg.in_chans, cfg.img_size // cfg.patch_size
  patches = pixels.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(
      b, g * g, p * p, c)  # (ph, pw) within a patch, channels last: the kernel's order
  pq = rt["acts"]["patch_out"]
  x = dequantize(quantize(pixel_linear(patches, rt["input"], rt["weights"]["patch_embed"]), pq), pq)
  cls = jnp.broadcast_to(rt["floats"]["cls_token"], (b, 1, cfg.embed_dim))
  return quantize(jnp.concatenate([cls, x], 1) + rt["floats"]["pos_embed"], rt["acts"]["embed"])


def attention(rt, h, hq, path: str, num_heads: int):
  """norm1_out codes (B, N, D) -> proj_out codes."""
  w, a = rt["weights"], rt["acts"]
  qq = a[f"{path}/qkv_out"]
  qkv = quantize(linear(h, hq, w[f"{path}/qkv"]), qq)
  b, n, d3 = qkv.shape
  hd = d3 // 3 // num_heads
  q, k, v = qkv.reshape(b, n, 3, num_heads, hd).transpose(2, 0, 3, 1, 4)  # (B, heads, N, hd)
  lq, pq = a[f"{path}/logits"], a[f"{path}/probs"]
  logits = quantize(act_matmul(q, qq, k.swapaxes(-1, -2), qq) * hd ** -0.5, lq)
  probs = quantize(nn.softmax(dequantize(logits, lq), axis=-1), pq)
  if pq.kind == "log2":  # p = 2^-q: float on dequantized values
    ctx = dequantize(probs, pq) @ dequantize(v, qq)
  else:
    ctx = act_matmul(probs, pq, v, qq)
  cq = a[f"{path}/context"]
  ctx = quantize(ctx.transpose(0, 2, 1, 3).reshape(b, n, d3 // 3), cq)
  return quantize(linear(ctx, cq, w[f"{path}/proj"]), a[f"{path}/proj_out"])


def mlp(rt, h, hq, path: str):
  """norm2_out codes -> fc2_out codes."""
  w, a = rt["weights"], rt["acts"]
  gq = a[f"{path}/gelu_out"]
  g = quantize(nn.gelu(linear(h, hq, w[f"{path}/fc1"]), approximate=False), gq)
  return quantize(linear(g, gq, w[f"{path}/fc2"]), a[f"{path}/fc2_out"])


def block(rt, x, xq, path: str, num_heads: int):
  """Residual codes x on grid xq -> codes on the block's resid2 grid."""
  a, f = rt["acts"], rt["floats"]
  xf = dequantize(x, xq)
  hq = a[f"{path}/norm1_out"]
  h = quantize(layer_norm(xf, f, f"{path}/norm1"), hq)
  attn = attention(rt, h, hq, f"{path}/attn", num_heads)
  r1 = a[f"{path}/resid1"]
  x1 = dequantize(quantize(xf + dequantize(attn, a[f"{path}/attn/proj_out"]), r1), r1)
  hq = a[f"{path}/norm2_out"]
  h = quantize(layer_norm(x1, f, f"{path}/norm2"), hq)
  out = dequantize(mlp(rt, h, hq, f"{path}/mlp"), a[f"{path}/mlp/fc2_out"])
  return quantize(x1 + out, a[f"{path}/resid2"]), a[f"{path}/resid2"]


def forward(rt, images, cfg):
  """Runtime tree (runtime.runtime) and images (B, H, W, C): uint8 pixels or
  normalized floats -> logits float32 (B, classes)."""
  cfg.check_images(images.shape)
  x, xq = embed(rt, pixels_from_images(images, rt["input"]), cfg), rt["acts"]["embed"]
  for i in range(cfg.depth):
    x, xq = block(rt, x, xq, f"blocks_{i}", cfg.num_heads)
  a = rt["acts"]
  nq, oq = a["norm_out"], a["head_out"]
  h = quantize(layer_norm(dequantize(x[:, 0], xq), rt["floats"], "norm"), nq)  # class token
  return dequantize(quantize(linear(h, nq, rt["weights"]["head"]), oq), oq)
