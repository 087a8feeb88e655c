"""Swin Transformer (timm's `swin_transformer.py` layout as of timm >= 0.9:
NHWC tokens, patch merging at the start of stages 1..3) with the FQ-ViT
fully-quantized layout as the Evol-Q reference applies it to Swin
(`models/swin_quant.py`): presets, the Linen model in the four modes of
`interface.MODES`, its searchable units, its quantization rules and its timm
name table.

Quantization points (reference name in brackets):
  patch_embed/proj_out   conv output, the patch norm's input   [qact_before_norm]
  patch_embed/norm_out   input of block 0                      [patch_embed.qact]
  .../norm1_out, norm2_out                                     [block qact1, qact3]
  .../attn/qkv_out                                             [attn qact1]
  .../attn/qk            (q * scale) k^T, before the bias      [qact_attn1]
  .../attn/bias_table    the relative-position bias table      [qact_table]
  .../attn/logits        qk + bias, before the shift mask      [qact2]
  .../attn/probs         softmax (uniform, or log2)            [log_int_softmax]
  .../attn/context       attention x value, proj's input       [qact3]
  .../attn/proj_out                                            [qact4]
  .../resid1, resid2     residual outputs (LayerNorm inputs: PTF) [block qact2, qact4]
  .../mlp/gelu_out, fc2_out                                    [Mlp qact1, qact2]
  layers_i/downsample/norm_out                                 [PatchMerging qact1]
  layers_i/downsample/reduction_out  next block's input: PTF   [PatchMerging qact2]
  norm_out, pool_out, head_out                                 [qact2, qact3, act_out]
The images are not quantized (the reference's `input_quant`; vit.py leaves
them out too). Units: one per block; a stage's patch merging runs in its
first block's unit. Images are NHWC floats, already normalized.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evolq_jax.models.interface import (IMAGENET_MEAN, IMAGENET_STD, Family, Layer, ModelConfig,
                                        QuantPoint, Transform, Unit, check_unit_range)
from evolq_jax.models.vit import Mlp
from evolq_jax.quant.recipe import fqvit_rules

LN_EPS = 1e-5  # torch's LayerNorm default, which timm's Swin uses
MASK_VALUE = -100.0  # timm's (and the original's) shifted-window mask


@dataclasses.dataclass(frozen=True)
class SwinConfig(ModelConfig):
  patch_size: int = 4
  window_size: int = 7
  embed_dim: int = 96
  depths: tuple = (2, 2, 6, 2)
  num_heads: tuple = (3, 6, 12, 24)
  mlp_ratio: float = 4.0
  preprocess: str = "swin"

  def __post_init__(self):
    for name in ("depths", "num_heads"):  # tuples: configs are hashed as static jit arguments
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f"model {self.name!r}: depths={self.depths} and num_heads="
                       f"{self.num_heads} must have one entry per stage.")
    for s in range(len(self.depths)):
      res, (win, _), dim = self.resolution(s), self.window(s), self.dim(s)
      if res * 2 ** s * self.patch_size != self.img_size or res % win or dim % self.num_heads[s]:
        raise ValueError(
            f"model {self.name!r}: stage {s} has a {res}x{res} grid, window {win}, dim {dim} and "
            f"{self.num_heads[s]} heads: expected img_size ({self.img_size}) / patch_size "
            f"({self.patch_size}) to halve evenly per stage into multiples of the window, and "
            "dims divisible by the heads (timm pads uneven grids; this model does not). "
            "Pick an img_size such as 224 for window 7.")

  def dim(self, stage: int) -> int:
    return self.embed_dim * 2 ** stage

  def resolution(self, stage: int) -> int:
    return self.img_size // self.patch_size // 2 ** stage

  def window(self, stage: int) -> tuple:
    """(window, shift of odd blocks): a grid no larger than the window is one unshifted window."""
    res = self.resolution(stage)
    return (res, 0) if res <= self.window_size else (self.window_size, self.window_size // 2)

  @property
  def blocks(self) -> tuple:
    """(stage, block) of every unit, in forward order."""
    return tuple((s, j) for s, d in enumerate(self.depths) for j in range(d))


PRESETS = (
    SwinConfig("swin_tiny_patch4_window7_224", embed_dim=96, depths=(2, 2, 6, 2),
               num_heads=(3, 6, 12, 24)),
    SwinConfig("swin_small_patch4_window7_224", embed_dim=96, depths=(2, 2, 18, 2),
               num_heads=(3, 6, 12, 24)),
    SwinConfig("swin_base_patch4_window7_224", embed_dim=128, depths=(2, 2, 18, 2),
               num_heads=(4, 8, 16, 32)),
)


def window_partition(x, win: int):
  """(B, H, W, C) -> (B * windows, win * win, C), windows in row-major order per image."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // win, win, w // win, win, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, win * win, c)


def window_reverse(windows, win: int, h: int, w: int):
  """Inverse of window_partition: (B * windows, win * win, C) -> (B, H, W, C)."""
  c = windows.shape[-1]
  x = windows.reshape(-1, h // win, w // win, win, win, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, h, w, c)


def relative_position_index(win: int) -> np.ndarray:
  """(win², win²) row of the bias table for each (query, key) pair of a window."""
  coords = np.stack(np.meshgrid(np.arange(win), np.arange(win), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (win - 1)
  return rel[..., 0] * (2 * win - 1) + rel[..., 1]


def shift_mask(res: int, win: int, shift: int) -> np.ndarray:
  """(windows, win², win²) additive mask: 0 within a region of the rolled grid, -100 across."""
  region = np.zeros((res, res), np.float32)
  cuts = (slice(0, -win), slice(-win, -shift), slice(-shift, None))
  for i, hs in enumerate(cuts):
    for j, ws in enumerate(cuts):
      region[hs, ws] = 3 * i + j
  ids = window_partition(region[None, :, :, None], win)[..., 0]  # (windows, win²)
  return np.where(ids[:, None, :] != ids[:, :, None], MASK_VALUE, 0.0).astype(np.float32)


class WindowAttention(QuantPoint):
  num_heads: int = 3
  window: int = 7

  @nn.compact
  def __call__(self, x, mask=None, aq=None):
    b, n, d = x.shape
    h, hd = self.num_heads, d // self.num_heads
    qkv = self.qpoint("qkv_out", nn.Dense(3 * d, name="qkv")(x), aq)
    qkv = qkv.reshape(b, n, 3, h, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (windows * batch, heads, n, hd)
    qk = self.qpoint("qk", (q * hd ** -0.5) @ k.swapaxes(-1, -2), aq)
    table = self.param("relative_position_bias_table", nn.initializers.normal(0.02),
                       ((2 * self.window - 1) ** 2, h))
    table = self.qpoint("bias_table", table, aq)
    bias = table[relative_position_index(self.window).reshape(-1)].reshape(n, n, h)
    logits = self.qpoint("logits", qk + bias.transpose(2, 0, 1), aq)
    if mask is not None:  # after the logits point, as in the reference: -100 would swamp its range
      logits = (logits.reshape(-1, mask.shape[0], h, n, n) + mask[None, :, None]).reshape(
          logits.shape)
    # softmax in at least float32 (bf16 logits are upcast; float64 stays)
    probs = self.qpoint("probs", self.softmax(
        logits.astype(jnp.promote_types(logits.dtype, jnp.float32))), aq)
    ctx = (probs.astype(v.dtype) @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    ctx = self.qpoint("context", ctx, aq)
    return self.qpoint("proj_out", nn.Dense(d, name="proj")(ctx), aq)


class SwinBlock(QuantPoint):
  num_heads: int = 3
  window: int = 7
  shift: int = 0
  mlp_hidden: int = 384

  @nn.compact
  def __call__(self, x, aq=None, shifted=None):
    """shifted: None = shift by `shift` (0: not at all); a traced bool = shift by `shift`
    where it is true (a shared segment's unit: models/segments.py), else not, with the
    same values as the static choice."""
    _, res, _, _ = x.shape
    win, s, kw = self.window, self.shift, self.child_kw()
    h = self.qpoint("norm1_out", self.layer_norm(LN_EPS, "norm1")(x), aq)
    if shifted is None:
      roll = (lambda t, k: jnp.roll(t, (k, k), axis=(1, 2))) if s else (lambda t, k: t)
      mask = jnp.asarray(shift_mask(res, win, s)) if s else None
    else:  # the rolls under a cond; the mask times 0 or 1 (adding zeros changes no value)
      roll = lambda t, k: jax.lax.cond(  # noqa: E731
          shifted, lambda t: jnp.roll(t, (k, k), axis=(1, 2)), lambda t: t, t)
      mask = jnp.asarray(shift_mask(res, win, s)) * jnp.asarray(shifted, jnp.float32)
    h = roll(h, -s)
    a = WindowAttention(num_heads=self.num_heads, window=win, name="attn", **kw)(
        window_partition(h, win), mask, self.sub(aq, "attn"))
    a = roll(window_reverse(a, win, res, res), s)
    x = self.qpoint("resid1", x + a, aq)
    h = self.qpoint("norm2_out", self.layer_norm(LN_EPS, "norm2")(x), aq)
    return self.qpoint("resid2", x + Mlp(hidden=self.mlp_hidden, name="mlp", **kw)(
        h, self.sub(aq, "mlp")), aq)


class PatchMerging(QuantPoint):
  """2x2 neighbours concatenated (timm's channel order), normalized, projected to out_dim."""
  out_dim: int = 192

  @nn.compact
  def __call__(self, x, aq=None):
    b, hh, ww, c = x.shape
    x = x.reshape(b, hh // 2, 2, ww // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
    x = self.qpoint("norm_out", self.layer_norm(LN_EPS, "norm")(
        x.reshape(b, hh // 2, ww // 2, 4 * c)), aq)
    return self.qpoint("reduction_out", nn.Dense(self.out_dim, use_bias=False,
                                                 name="reduction")(x), aq)


class SwinStage(QuantPoint):
  """Stage `index` of the model: its patch merging (stages > 0) runs with block 0."""
  config: Any = None
  index: int = 0

  @nn.compact
  def __call__(self, x, aq, start: int, stop: int, shifted=None):
    """shifted: a traced bool for the one block [start, stop) (see SwinBlock)."""
    cfg, s = self.config, self.index
    win, shift = cfg.window(s)
    if start == 0 and s > 0:
      x = PatchMerging(out_dim=cfg.dim(s), name="downsample", **self.child_kw())(
          x, self.sub(aq, "downsample"))
    for j in range(start, stop):
      x = SwinBlock(num_heads=cfg.num_heads[s], window=win,
                    shift=shift if j % 2 or shifted is not None else 0,
                    mlp_hidden=int(cfg.dim(s) * cfg.mlp_ratio), name=f"blocks_{j}",
                    **self.child_kw())(x, self.sub(aq, f"blocks_{j}"), shifted)
    return x


class PatchEmbed(QuantPoint):
  embed_dim: int = 96
  patch_size: int = 4

  @nn.compact
  def __call__(self, images, aq=None):
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", name="proj")(images)
    x = self.qpoint("proj_out", x, aq)
    return self.qpoint("norm_out", self.layer_norm(LN_EPS, "norm")(x), aq)


class SwinTransformer(QuantPoint):
  """Swin with average pooling and a linear head (timm's layout).

  Call with images (B, H, W, C) -> logits (B, classes). Units are blocks in
  forward order (`config.blocks`): `first_unit=b` takes the activations
  entering unit b (B, h, w, c) instead of images (before the patch merging
  when b is a stage's first block); `last_unit=e` returns the activations
  after units [first_unit, e).
  """
  config: Any = None

  @nn.compact
  def __call__(self, x, aq=None, first_unit: int = 0, last_unit: Optional[int] = None,
               shifted=None):
    cfg: SwinConfig = self.config
    blocks = cfg.blocks
    self.check_mode(aq)
    check_unit_range(cfg, blocks, first_unit, last_unit)
    stop = len(blocks) if last_unit is None else last_unit
    if shifted is not None and stop - first_unit != 1:
      raise ValueError(f"shifted (a traced window shift) applies to one unit: got units "
                       f"[{first_unit}, {stop}).")
    if first_unit == 0:
      cfg.check_images(x.shape)
      x = PatchEmbed(embed_dim=cfg.embed_dim, patch_size=cfg.patch_size, name="patch_embed",
                     **self.child_kw())(x, self.sub(aq, "patch_embed"))
    offset = 0
    for s, depth in enumerate(cfg.depths):
      start, end = max(first_unit - offset, 0), min(stop - offset, depth)
      if start < end:
        x = SwinStage(config=cfg, index=s, name=f"layers_{s}", **self.child_kw())(
            x, self.sub(aq, f"layers_{s}"), start, end, shifted)
      offset += depth
    if last_unit is not None:
      return x
    x = self.qpoint("norm_out", self.layer_norm(LN_EPS, "norm")(x), aq)
    x = self.qpoint("pool_out", x.mean(axis=(1, 2)), aq)
    return self.qpoint("head_out", nn.Dense(cfg.num_classes, name="head")(x), aq)


def units(cfg: SwinConfig) -> tuple:
  out = []
  for i, (s, j) in enumerate(cfg.blocks):
    path = (f"layers_{s}", f"blocks_{j}")
    merge = (Layer("reduction", (f"layers_{s}", "downsample", "reduction"), "mlp"),) if (
        s > 0 and j == 0) else ()
    out.append(Unit(i, path, merge + (
        Layer("qkv", path + ("attn", "qkv")),
        Layer("proj", path + ("attn", "proj")),
        Layer("fc1", path + ("mlp", "fc1"), "mlp"),
        Layer("fc2", path + ("mlp", "fc2"), "mlp"))))
  return tuple(out)


def unit_kinds(cfg: SwinConfig) -> tuple:
  """The blocks of a stage after its first compute the same function, up to the window
  shift that alternates between them (segment_kwargs: traced); a stage's first block
  holds the patch embedding or merging."""
  return tuple(None if j == 0 else (s,) for s, j in cfg.blocks)


def segment_kwargs(cfg: SwinConfig, rep: int, position) -> dict:
  """The traced window shift of the unit at `position` of the segment that starts at
  unit `rep`: odd blocks of a stage shift (none where the grid is one window)."""
  s, j = cfg.blocks[rep]
  if not cfg.window(s)[1]:
    return {}
  return {"shifted": (j + position) % 2 == 1}


def act_rules(qcfg):
  return fqvit_rules(qcfg, residual=r"(.*/)?(resid1|resid2|reduction_out)", probs=r".*/probs")


def candidate_bytes(cfg: SwinConfig, unit: int, loss_batch: int, itemsize: int = 4) -> int:
  """Live activations of one loss batch through units unit..end: per block its
  residual, qkv, windowed logits and probs, MLP; per patch merging its 4x input."""
  total = 0
  for s, j in cfg.blocks[unit:]:
    tokens, d, heads = cfg.resolution(s) ** 2, cfg.dim(s), cfg.num_heads[s]
    per_token = 8 * d + 4 * heads * cfg.window(s)[0] ** 2 + 2 * int(d * cfg.mlp_ratio)
    total += tokens * (per_token + (4 * d if s > 0 and j == 0 else 0))
  return itemsize * loss_batch * total


def prepare(flat: dict, cfg: SwinConfig) -> dict:
  """Drop timm's buffers (computed here) and move original Microsoft checkpoints'
  patch merging (the end of stage i) to timm's place (the start of stage i + 1)."""
  flat = {k: v for k, v in flat.items()
          if not re.fullmatch(r".*\.(relative_position_index|attn_mask)", k)}
  if "layers_0/downsample/reduction/kernel" in flat:
    flat = {re.sub(r"^layers_(\d+)/downsample/",
                   lambda m: f"layers_{int(m.group(1)) + 1}/downsample/", k): v
            for k, v in flat.items()}
  return flat


_B = r"layers\.(\d+)\.blocks\.(\d+)"
# (timm regex, flax name template, how to convert the array: see convert.CONVERSIONS)
TIMM_TABLE = (
    (r"patch_embed\.proj\.weight", "patch_embed/proj/kernel", "conv"),
    (r"patch_embed\.proj\.bias", "patch_embed/proj/bias", "same"),
    (r"patch_embed\.norm\.weight", "patch_embed/norm/scale", "same"),
    (r"patch_embed\.norm\.bias", "patch_embed/norm/bias", "same"),
    (r"layers\.(\d+)\.downsample\.norm\.weight", "layers_{0}/downsample/norm/scale", "same"),
    (r"layers\.(\d+)\.downsample\.norm\.bias", "layers_{0}/downsample/norm/bias", "same"),
    (r"layers\.(\d+)\.downsample\.reduction\.weight", "layers_{0}/downsample/reduction/kernel",
     "dense"),
    (_B + r"\.(norm1|norm2)\.weight", "layers_{0}/blocks_{1}/{2}/scale", "same"),
    (_B + r"\.(norm1|norm2)\.bias", "layers_{0}/blocks_{1}/{2}/bias", "same"),
    (_B + r"\.(attn|mlp)\.(qkv|proj|fc1|fc2)\.weight", "layers_{0}/blocks_{1}/{2}/{3}/kernel",
     "dense"),
    (_B + r"\.(attn|mlp)\.(qkv|proj|fc1|fc2)\.bias", "layers_{0}/blocks_{1}/{2}/{3}/bias", "same"),
    (_B + r"\.attn\.relative_position_bias_table",
     "layers_{0}/blocks_{1}/attn/relative_position_bias_table", "same"),
    (r"norm\.weight", "norm/scale", "same"),
    (r"norm\.bias", "norm/bias", "same"),
    (r"head(\.fc)?\.weight", "head/kernel", "dense"),  # head.fc (timm) or head (original)
    (r"head(\.fc)?\.bias", "head/bias", "same"),
)

TRANSFORMS = (Transform("swin", 0.9, "bicubic", IMAGENET_MEAN, IMAGENET_STD),)

FAMILY = Family("swin", SwinTransformer, PRESETS, units, act_rules, candidate_bytes, TIMM_TABLE,
                prepare, TRANSFORMS, unit_kinds=unit_kinds, segment_kwargs=segment_kwargs,
                end_layers=("patch_embed/proj", "head"))
