"""LeViT (timm's `levit.py` in linear mode, `LevitDistilled`: levit_128s ...
levit_384) behind the model interface, with the FQ-ViT layout that the Evol-Q
reference applies to it (`models/levit_quant.py` of enyac-group/evol-q).

timm's Linear/Conv + BatchNorm pairs (ConvNorm, LinearNorm, and the BN before
the linear of the NormLinear heads) are folded on load (`prepare`, eval-mode
statistics), as the reference folds them before quantizing: the Flax model
has plain Dense/Conv layers with bias, and every kernel is quantized per
output channel (stem convs, attention, MLP, head and head_dist).

Quantization points (images NHWC, already normalized and not quantized;
tokens (B, H*W, C) in timm's row-major order):
  stem/conv{k}_out, stem/act{k}_out  each stem conv and Hardswish output (the
                                     reference's LN config: PTF)
  embed                              the stem output once more, per tensor
  attn / attn_downsample:            queries, keys, values; qk (q @ k^T, before the scale);
    logits (after the scale and the attention biases); probs (uniform, or log2
    with quant.log2_softmax: the reference defines but never calls its log2
    softmax on LeViT); context (the Hardswish input); act_out (the Hardswish
    output: AttentionSubsample only); proj_out
  mlp/ln1_out, mlp/act_out           ln1 output, Hardswish output (ln2's input)
  resid1, resid2                     outputs of the attention and MLP residuals (PTF)
  postblocks, pool_out, head_out, head_dist_out, logits_out: the last tokens,
    their mean, both heads and their average (timm's eval-mode output)
The reference quantizes the stem output and the last tokens twice (PTF, then
per tensor on the same range), so values can sit exactly on half steps of the
second grid: programs that round differently (vmapped or not) may then differ.
Units: each attention module (LevitBlock's Attention, LevitDownsample's
AttentionSubsample) with the MLP residual after it: group "attn" holds qkv,
proj (kv, q, proj), group "mlp" holds ln1, ln2.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from evolq_jax.models.fold import fold_bn_after, fold_bn_before
from evolq_jax.models.interface import (IMAGENET_MEAN, IMAGENET_STD, Family, Layer, ModelConfig,
                                        QuantPoint, Transform, Unit, check_unit_range)
from evolq_jax.quant.recipe import fqvit_rules

STEM_STRIDE = 16  # timm's Stem16: four stride-2 3x3 convs
DOWN_ATTN_RATIO, DOWN_MLP_RATIO = 4.0, 2.0  # timm's LevitStage hard-codes these for downsampling


@dataclasses.dataclass(frozen=True)
class LevitConfig(ModelConfig):
  embed_dim: tuple = (128, 256, 384)
  key_dim: int = 16
  num_heads: tuple = (4, 6, 8)
  depth: tuple = (2, 3, 4)
  attn_ratio: float = 2.0
  mlp_ratio: float = 2.0
  bn_eps: float = 1e-5  # the checkpoint's BatchNorm epsilon, folded away on load
  preprocess: str = "levit"

  def __post_init__(self):
    if self.img_size % STEM_STRIDE or self.embed_dim[0] % 8:
      raise ValueError(f"LeViT config {self.name!r}: img_size={self.img_size} must be a multiple "
                       f"of {STEM_STRIDE} and embed_dim[0]={self.embed_dim[0]} of 8 (the stem "
                       "halves the image four times with widths C/8, C/4, C/2, C).")
    if not len(self.embed_dim) == len(self.num_heads) == len(self.depth):
      raise ValueError(f"LeViT config {self.name!r}: embed_dim {self.embed_dim}, num_heads "
                       f"{self.num_heads} and depth {self.depth} need one entry per stage.")


PRESETS = (
    LevitConfig("levit_128s", embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 6, 8),
                depth=(2, 3, 4)),
    LevitConfig("levit_128", embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 8, 12),
                depth=(4, 4, 4)),
    LevitConfig("levit_192", embed_dim=(192, 288, 384), key_dim=32, num_heads=(3, 5, 6),
                depth=(4, 4, 4)),
    LevitConfig("levit_256", embed_dim=(256, 384, 512), key_dim=32, num_heads=(4, 6, 8),
                depth=(4, 4, 4)),
    LevitConfig("levit_384", embed_dim=(384, 512, 768), key_dim=32, num_heads=(6, 9, 12),
                depth=(4, 4, 4)),
)


@dataclasses.dataclass(frozen=True)
class UnitSpec:
  """One unit's shapes. stride 1: a LevitBlock; 2: a LevitDownsample."""
  path: tuple
  in_dim: int
  dim: int
  heads: int
  key_dim: int
  attn_ratio: float
  mlp_ratio: float
  resolution: int  # side of the input token grid
  stride: int

  @property
  def val_dim(self) -> int:
    return int(self.attn_ratio * self.key_dim)

  @property
  def out_resolution(self) -> int:
    return (self.resolution - 1) // self.stride + 1


def unit_specs(cfg: LevitConfig) -> tuple:
  """Every unit in forward order, as timm's Levit builds its stages."""
  res, out = cfg.img_size // STEM_STRIDE, []
  for i, (dim, heads, depth) in enumerate(zip(cfg.embed_dim, cfg.num_heads, cfg.depth)):
    if i > 0:
      prev = cfg.embed_dim[i - 1]
      out.append(UnitSpec((f"stages_{i}", "downsample"), prev, dim, prev // cfg.key_dim,
                          cfg.key_dim, DOWN_ATTN_RATIO, DOWN_MLP_RATIO, res, 2))
      res = out[-1].out_resolution
    out += [UnitSpec((f"stages_{i}", f"blocks_{j}"), dim, dim, heads, cfg.key_dim,
                     cfg.attn_ratio, cfg.mlp_ratio, res, 1) for j in range(depth)]
  return tuple(out)


def attention_bias_idxs(resolution: int, stride: int) -> np.ndarray:
  """(queries, keys) index into attention_biases (heads, res^2): |dy| * res + |dx|."""
  grid = np.arange(resolution)
  k = np.stack(np.meshgrid(grid, grid, indexing="ij")).reshape(2, -1)
  sub = grid[::stride]
  q = np.stack(np.meshgrid(sub, sub, indexing="ij")).reshape(2, -1)
  rel = np.abs(q[:, :, None] - k[:, None, :])
  return rel[0] * resolution + rel[1]


class LevitAttention(QuantPoint):
  """timm's Attention (stride 1) or AttentionDownsample (stride 2: queries from
  every other token of the grid, keys/values from all)."""
  spec: Any = None

  @nn.compact
  def __call__(self, x, aq=None):
    s: UnitSpec = self.spec
    b, n, _ = x.shape
    h, kd, vd = s.heads, s.key_dim, s.val_dim
    if s.stride == 1:
      qkv = nn.Dense(h * (2 * kd + vd), name="qkv")(x).reshape(b, n, h, 2 * kd + vd)
      q, k, v = jnp.split(qkv, [kd, 2 * kd], axis=-1)  # per head [q | k | v], as timm
    else:
      k, v = jnp.split(nn.Dense(h * (kd + vd), name="kv")(x).reshape(b, n, h, kd + vd), [kd], -1)
      r = s.resolution
      sub = x.reshape(b, r, r, -1)[:, ::s.stride, ::s.stride].reshape(b, -1, x.shape[-1])
      q = nn.Dense(h * kd, name="q")(sub).reshape(b, -1, h, kd)
    q, k, v = (self.qpoint(name, t.transpose(0, 2, 1, 3), aq)  # (b, heads, tokens, dim)
               for name, t in (("queries", q), ("keys", k), ("values", v)))
    qk = self.qpoint("qk", q @ k.swapaxes(-1, -2), aq)
    biases = self.param("attention_biases", nn.initializers.zeros, (h, s.resolution ** 2))
    logits = qk * kd ** -0.5 + biases[:, attention_bias_idxs(s.resolution, s.stride)]
    logits = self.qpoint("logits", logits, aq)
    # softmax in at least float32 (bf16 logits are upcast; float64 stays)
    probs = self.qpoint("probs", self.softmax(
        logits.astype(jnp.promote_types(logits.dtype, jnp.float32))), aq)
    ctx = (probs.astype(v.dtype) @ v).transpose(0, 2, 1, 3).reshape(b, -1, h * vd)
    act = self.hard_swish(self.qpoint("context", ctx, aq))
    if s.stride != 1:  # the reference quantizes proj's input in AttentionSubsample only
      act = self.qpoint("act_out", act, aq)
    return self.qpoint("proj_out", nn.Dense(s.dim, name="proj")(act), aq)


class LevitMlp(QuantPoint):
  hidden: int = 256

  @nn.compact
  def __call__(self, x, aq=None):
    h = self.qpoint("ln1_out", nn.Dense(self.hidden, name="ln1")(x), aq)
    h = self.qpoint("act_out", self.hard_swish(h), aq)
    return nn.Dense(x.shape[-1], name="ln2")(h)


class LevitUnit(QuantPoint):
  """LevitBlock (x + attn, then + mlp) or LevitDownsample (attn_downsample, then + mlp)."""
  spec: Any = None

  @nn.compact
  def __call__(self, x, aq=None):
    s: UnitSpec = self.spec
    kw = self.child_kw()
    if s.stride == 1:
      x = self.qpoint("resid1", x + LevitAttention(spec=s, name="attn", **kw)(
          x, self.sub(aq, "attn")), aq)
    else:  # no residual around the downsampling attention
      x = LevitAttention(spec=s, name="attn_downsample", **kw)(x, self.sub(aq, "attn_downsample"))
    mlp = LevitMlp(hidden=int(s.dim * s.mlp_ratio), name="mlp", **kw)
    return self.qpoint("resid2", x + mlp(x, self.sub(aq, "mlp")), aq)


class LevitStage(QuantPoint):
  """Units [start, stop) of one stage (indices within the stage)."""
  specs: tuple = ()

  @nn.compact
  def __call__(self, x, aq, start: int, stop: int):
    for s in self.specs[start:stop]:
      x = LevitUnit(spec=s, name=s.path[-1], **self.child_kw())(x, self.sub(aq, s.path[-1]))
    return x


class Stem16(QuantPoint):
  dims: tuple = (16, 32, 64, 128)

  @nn.compact
  def __call__(self, x, aq=None):
    for k, d in enumerate(self.dims, 1):
      x = nn.Conv(d, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name=f"conv{k}")(x)
      x = self.qpoint(f"conv{k}_out", x, aq)
      if k < len(self.dims):
        x = self.qpoint(f"act{k}_out", self.hard_swish(x), aq)
    return x


class Levit(QuantPoint):
  """LeViT with both heads (timm's LevitDistilled in eval mode).

  Call with images (B, H, W, C) -> logits (B, classes). `first_unit=b` takes
  the tokens (B, N, C) entering unit b instead of images; `last_unit=e`
  returns the tokens after units [first_unit, e).
  """
  config: Any = None

  @nn.compact
  def __call__(self, x, aq=None, first_unit: int = 0, last_unit: Optional[int] = None):
    cfg: LevitConfig = self.config
    specs = unit_specs(cfg)
    self.check_mode(aq)
    check_unit_range(cfg, specs, first_unit, last_unit)
    stop = len(specs) if last_unit is None else last_unit
    if first_unit == 0:
      cfg.check_images(x.shape)
      c = cfg.embed_dim[0]
      x = Stem16(dims=(c // 8, c // 4, c // 2, c), name="stem", **self.child_kw())(
          x, self.sub(aq, "stem"))
      x = self.qpoint("embed", x.reshape(x.shape[0], -1, c), aq)
    for i in range(len(cfg.embed_dim)):
      name = f"stages_{i}"
      mine = [u for u, s in enumerate(specs) if s.path[0] == name]
      start, end = max(first_unit, mine[0]), min(stop, mine[-1] + 1)
      if start < end:
        x = LevitStage(specs=tuple(specs[u] for u in mine), name=name, **self.child_kw())(
            x, self.sub(aq, name), start - mine[0], end - mine[0])
    if last_unit is not None:
      return x
    x = self.qpoint("postblocks", x, aq)
    x = self.qpoint("pool_out", jnp.mean(x, axis=1), aq)
    head = self.qpoint("head_out", nn.Dense(cfg.num_classes, name="head")(x), aq)
    dist = self.qpoint("head_dist_out", nn.Dense(cfg.num_classes, name="head_dist")(x), aq)
    return self.qpoint("logits_out", (head + dist) / 2, aq)


def units(cfg: LevitConfig) -> tuple:
  out = []
  for u, s in enumerate(unit_specs(cfg)):
    attn, names = (("attn", ("qkv", "proj")) if s.stride == 1 else
                   ("attn_downsample", ("kv", "q", "proj")))
    out.append(Unit(u, s.path, tuple(Layer(n, s.path + (attn, n)) for n in names) + tuple(
        Layer(n, s.path + ("mlp", n), "mlp") for n in ("ln1", "ln2"))))
  return tuple(out)


def unit_kinds(cfg: LevitConfig) -> tuple:
  """The blocks of a stage compute the same function (their spec but its path); the first
  unit holds the stem."""
  return (None,) + tuple(dataclasses.replace(s, path=()) for s in unit_specs(cfg)[1:])


def act_rules(qcfg):
  """The reference's LN-config points (PTF): the stem's and the residual outputs."""
  return fqvit_rules(qcfg, residual=r"stem/.*|.*/resid[12]", probs=r".*/probs")


def candidate_bytes(cfg: LevitConfig, unit: int, loss_batch: int, itemsize: int = 4) -> int:
  """Live activations of one loss batch through units unit..end (input tokens,
  q/k/v, attention scores and probs, context, MLP hidden, residuals)."""
  total = 0
  for s in unit_specs(cfg)[unit:]:
    n, nq = s.resolution ** 2, s.out_resolution ** 2
    qkv = s.heads * (n * (s.key_dim + s.val_dim) + nq * s.key_dim)
    total += (n * s.in_dim + qkv + 3 * s.heads * nq * n + 2 * nq * s.heads * s.val_dim
              + nq * (2 * int(s.dim * s.mlp_ratio) + 3 * s.dim))
  return itemsize * loss_batch * total


# (timm regex, flax template, conversion). BatchNorm entries land beside their
# layer as bn_* and are folded by `prepare`; "proj.ln" / "q.ln" lose the ".ln".
_BN = r"bn\.(weight|bias|running_mean|running_var|num_batches_tracked)"
_BLOCK = r"stages\.(\d+)\.blocks\.(\d+)\.(attn|mlp)\.(qkv|proj|ln1|ln2)(?:\.ln)?"
_DOWN = r"stages\.(\d+)\.downsample\.(attn_downsample|mlp)\.(kv|q|proj|ln1|ln2)(?:\.ln)?"
TIMM_TABLE = (
    (r"stem\.conv(\d)\.linear\.weight", "stem/conv{0}/kernel", "conv"),
    (rf"stem\.conv(\d)\.{_BN}", "stem/conv{0}/bn_{1}", "same"),
    (rf"{_BLOCK}\.linear\.weight", "stages_{0}/blocks_{1}/{2}/{3}/kernel", "dense"),
    (rf"{_BLOCK}\.{_BN}", "stages_{0}/blocks_{1}/{2}/{3}/bn_{4}", "same"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.attn\.attention_biases",
     "stages_{0}/blocks_{1}/attn/attention_biases", "same"),
    (rf"{_DOWN}\.linear\.weight", "stages_{0}/downsample/{1}/{2}/kernel", "dense"),
    (rf"{_DOWN}\.{_BN}", "stages_{0}/downsample/{1}/{2}/bn_{3}", "same"),
    (r"stages\.(\d+)\.downsample\.attn_downsample\.attention_biases",
     "stages_{0}/downsample/attn_downsample/attention_biases", "same"),
    (r"(head|head_dist)\.linear\.weight", "{0}/kernel", "dense"),
    (r"(head|head_dist)\.linear\.bias", "{0}/bias", "same"),
    (rf"(head|head_dist)\.{_BN}", "{0}/bn_{1}", "same"),
)
_BN_BEFORE = ("head", "head_dist")  # NormLinear: BatchNorm1d, then the linear


def prepare(flat: dict, cfg: LevitConfig) -> dict:
  """Fold every BatchNorm (bn_* entries) into its layer; drop the bias index
  tables that older checkpoints stored (they follow from the resolution)."""
  out = {k: v for k, v in flat.items()
         if "/bn_" not in k and not k.endswith("attention_bias_idxs")}
  for key in [k for k in flat if k.endswith("/bn_weight")]:
    layer = key[:-len("/bn_weight")]
    bn = [flat.get(f"{layer}/bn_{n}") for n in ("weight", "bias", "running_mean", "running_var")]
    if any(v is None for v in bn) or f"{layer}/kernel" not in flat:
      raise ValueError(f"checkpoint layer {layer!r}: its BatchNorm (weight, bias, running_mean, "
                       "running_var) or its linear weight is missing; expected a timm LeViT "
                       "state dict (levit_*, not levit_conv_*).")
    fold = fold_bn_before if layer in _BN_BEFORE else fold_bn_after
    out[f"{layer}/kernel"], out[f"{layer}/bias"] = fold(
        flat[f"{layer}/kernel"], flat.get(f"{layer}/bias"), *bn, cfg.bn_eps)
  return out


TRANSFORMS = (Transform("levit", 0.9, "bicubic", IMAGENET_MEAN, IMAGENET_STD),)

FAMILY = Family("levit", Levit, PRESETS, units, act_rules, candidate_bytes, TIMM_TABLE, prepare,
                TRANSFORMS, unit_kinds=unit_kinds,
                end_layers=("stem/conv1", "head", "head_dist"))
