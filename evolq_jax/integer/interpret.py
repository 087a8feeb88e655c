"""The integer forward in JAX: the family's own "int"-mode program with every
matmul and convolution whose operands sit on quantization grids run on
integers (int8 operands, int32 accumulation), then rescaled in float32.

Values between equations are plain arrays or, after a quantizer mark,
`Grid`s: an integer operand `a` (int8 when the codes fit, else int32) with
an integer offset, centered value = a + offset, real value = scale * (a +
offset). Shape-only operations (reshape, transpose, slicing, concatenation
of equal grids, multiplication by a constant scalar) keep a Grid; any other
operation sees its real values. Weights come from `weight_dq` marks as
`Kernel`s: int8 q - z (zero point 0), or uint8 codes with per-channel zero
points, and their bias-correction shift.

What stays in float32, as in FQ-ViT's integer layout: LayerNorm, softmax,
GELU / Hardswish / ReLU6, residual additions, biases; and a layer whose
input is not quantized (the first layer: its input is the normalized image).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from evolq_jax.integer.walk import walk

SHAPE_OPS = ("reshape", "transpose", "squeeze", "broadcast_in_dim", "slice", "rev",
             "expand_dims", "copy", "copy_p")


@dataclasses.dataclass
class Grid:
  a: Any        # integer operand
  offset: Any   # int32 scalar: a + offset = code - zero point
  scale: Any    # float32 scalar

  def real(self):
    return (self.a.astype(jnp.int32) + self.offset).astype(jnp.float32) * self.scale


@dataclasses.dataclass
class Kernel:
  q: Any        # int8 (zero point 0) or uint8 codes, (..., out)
  zero_point: Any
  scale: Any    # (out,)
  shift: Any    # (out,) bias correction's mean term

  def operand(self):
    """-> (int8 operand b, int32 per-channel offset): b + offset = q - zero point."""
    if self.q.dtype == jnp.int8:
      return self.q, jnp.zeros(self.q.shape[-1], jnp.int32)
    return ((self.q.astype(jnp.int32) - 128).astype(jnp.int8),
            128 - self.zero_point.astype(jnp.int32))

  def real(self):
    centered = self.q.astype(jnp.int32) - self.zero_point.astype(jnp.int32)
    return centered.astype(jnp.float32) * self.scale + self.shift


def grid_of(x, scale, zero_point, bits: int) -> Grid:
  """Quantize x onto a uniform (scale ()) or PTF (scale (C,), powers of two) grid."""
  scale = jnp.asarray(scale, jnp.float32)
  zp = jnp.asarray(zero_point, jnp.float32)
  u = jnp.clip(jnp.round(x / scale.astype(x.dtype)) + zp.astype(x.dtype), 0, 2 ** bits - 1)
  u = u.astype(jnp.int32)
  if scale.ndim:  # PTF: (u - z) << k on one base scale, an int32 operand
    base = jnp.min(scale)
    k = jnp.round(jnp.log2(scale / base)).astype(jnp.int32)
    return Grid(jnp.left_shift(u - zp.astype(jnp.int32), k), jnp.int32(0), base)
  shift = 128 if bits == 8 else 0
  return Grid((u - shift).astype(jnp.int8), shift - zp.astype(jnp.int32), scale)


def _free(ndim, contract, batch):
  return [d for d in range(ndim) if d not in contract and d not in batch]


def int_dot(a, ao, b, bo, dims):
  """Exact sum over the contracting dims of (a + ao)(b + bo), int32; bo: () or
  per entry of rhs's last free dim. -> (acc, sum_k (a + ao) shaped for the output)."""
  (lc, rc), (lb, rb) = dims
  acc = lax.dot_general(a, b, dims, preferred_element_type=jnp.int32)
  lf, rf = _free(a.ndim, lc, lb), _free(b.ndim, rc, rb)
  k = int(np.prod([a.shape[d] for d in lc]))
  a_sum = jnp.sum(a, axis=tuple(lc), dtype=jnp.int32)  # batch + lhs free
  b_sum = jnp.sum(b, axis=tuple(rc), dtype=jnp.int32)  # batch + rhs free
  a_sum = a_sum.reshape(a_sum.shape + (1,) * len(rf))
  b_sum = b_sum.reshape(b_sum.shape[:len(lb)] + (1,) * len(lf) + b_sum.shape[len(lb):])
  acc = acc + a_sum * bo + ao * b_sum + k * ao * bo
  return acc, a_sum + k * ao


def int_conv(a, ao, b, bo, params):
  """Exact NHWC/HWIO convolution of (a + ao) with (b + bo): padding applied to a
  with the value whose centered code is 0. -> (acc int32, window sums of a + ao)."""
  groups = params["feature_group_count"]
  pad = [(0, 0)] + list(params["padding"]) + [(0, 0)]
  a = jnp.pad(a, pad, constant_values=(-ao).astype(a.dtype) if hasattr(ao, "astype") else -ao)
  conv = lambda x, w: lax.conv_general_dilated(  # noqa: E731
      x, w, params["window_strides"], "VALID", params["lhs_dilation"], params["rhs_dilation"],
      params["dimension_numbers"], feature_group_count=groups,
      preferred_element_type=jnp.int32)
  acc = conv(a, b)
  kh, kw, cin, cout = b.shape
  k = kh * kw * cin
  ones = jnp.ones((kh, kw, cin, groups), a.dtype) if groups > 1 else jnp.ones((kh, kw, cin, 1),
                                                                               a.dtype)
  a_sum = conv(a, ones)  # (B, H, W, groups or 1): window sums per group
  if groups > 1:  # depthwise: one group per output channel
    a_sum = jnp.repeat(a_sum, cout // groups, axis=-1)
  b_sum = jnp.sum(b, axis=(0, 1, 2), dtype=jnp.int32)
  acc = acc + a_sum * bo + ao * b_sum + k * ao * bo
  return acc, a_sum + k * ao


class IntegerBackend:
  """Runs each equation in JAX; counts the integer and float matmuls/convs."""

  def __init__(self):
    self.counts = {"integer": 0, "float": 0}
    self.floats = []  # (primitive, operand kinds, shapes) of the matmuls left in float

  def literal(self, value, aval):
    return value

  def mark(self, kind, bits, eqn, args, twin):
    if kind == "wdq":
      return Kernel(*args)
    if kind == "qdq":
      return grid_of(self._real(args[0]), args[1], args[2], bits)
    # log2: powers of two, kept in float (the jit call returns a list of outputs)
    return eqn.primitive.bind(self._real(args[0]), **eqn.params)[0]

  @staticmethod
  def _real(v):
    return v.real() if isinstance(v, (Grid, Kernel)) else v

  def op(self, eqn, args, twin):
    name = eqn.primitive.name
    if name in ("dot_general", "conv_general_dilated") and isinstance(args[1], (Kernel, Grid)) \
        and isinstance(args[0], Grid):
      self.counts["integer"] += 1
      return [self._matmul(name, eqn, args[0], args[1])]
    if name in ("dot_general", "conv_general_dilated"):
      self.counts["float"] += 1
      self.floats.append((name, [type(a).__name__ for a in args],
                          [tuple(v.aval.shape) for v in eqn.invars]))
    grid = self._shape_op(name, eqn, args)
    if grid is not None:
      return [grid]
    out = eqn.primitive.bind(*[self._real(a) for a in args], **eqn.params)
    return out if eqn.primitive.multiple_results else [out]

  def _shape_op(self, name, eqn, args):
    """A Grid through a shape-only op (or a constant scalar product) stays a Grid."""
    g = args[0] if args else None
    if isinstance(g, Kernel) and name in ("slice", "squeeze", "reshape", "copy", "copy_p",
                                          "convert_element_type"):
      q = g.q if name == "convert_element_type" else eqn.primitive.bind(g.q, **eqn.params)
      if q.shape[-1] == g.q.shape[-1]:  # the output channels stay the last axis
        return Kernel(q, g.zero_point, g.scale, g.shift)
    if name in SHAPE_OPS and isinstance(g, Grid) and all(not isinstance(a, (Grid, Kernel))
                                                         for a in args[1:]):
      return Grid(eqn.primitive.bind(g.a, *args[1:], **eqn.params), g.offset, g.scale)
    if name == "convert_element_type" and isinstance(g, Grid) and jnp.issubdtype(
        eqn.params["new_dtype"], jnp.floating):
      return g
    if name == "mul" and sum(isinstance(a, Grid) for a in args) == 1:
      g, c = (args[0], args[1]) if isinstance(args[0], Grid) else (args[1], args[0])
      if not isinstance(c, Kernel) and np.ndim(c) == 0:
        return Grid(g.a, g.offset, g.scale * c)
    if name == "concatenate" and all(isinstance(a, Grid) for a in args):
      same = all(a.a.dtype == args[0].a.dtype for a in args)
      if same and all(a.offset is args[0].offset and a.scale is args[0].scale for a in args):
        return Grid(eqn.primitive.bind(*[a.a for a in args], **eqn.params), args[0].offset,
                    args[0].scale)
    return None

  def _matmul(self, name, eqn, x: Grid, w):
    if isinstance(w, Kernel):
      b, bo = w.operand()
      w_scale, shift = w.scale, w.shift
    else:
      b, bo, w_scale, shift = w.a, w.offset, w.scale, None
    a, b = _common_int(x.a, b)
    if name == "dot_general":
      acc, a_sum = int_dot(a, x.offset, b, bo, eqn.params["dimension_numbers"])
    else:
      acc, a_sum = int_conv(a, x.offset, b, bo, eqn.params)
    y = acc.astype(jnp.float32) * (x.scale * w_scale)
    if shift is not None:
      y = y + a_sum.astype(jnp.float32) * (x.scale * shift)
    return y


def _common_int(a, b):
  """int8 x int8 stays; a wider operand (PTF shifts) makes both int32."""
  if a.dtype == b.dtype == jnp.int8:
    return a, b
  return a.astype(jnp.int32), b.astype(jnp.int32)


def integer_forward(closed_jaxpr):
  """-> (fn(images) -> logits running the program on integer kernels, counts)."""
  with_consts, backend = integer_forward_of_consts(closed_jaxpr.jaxpr)
  return (lambda images: with_consts(closed_jaxpr.consts, images)), backend


def integer_forward_of_consts(jaxpr):
  """-> (fn(consts, images) -> logits, counts): the program with its constants (the
  export's integer weights and scales) as arguments, so that under jit they are
  inputs, not literals: the compile does not fold them, and exports of the same
  shapes share one compiled program (and its persistent-cache entry)."""
  backend = IntegerBackend()

  def fn(consts, images):
    backend.counts.update(integer=0, float=0)
    backend.floats.clear()
    return IntegerBackend._real(walk(jaxpr, consts, [images], backend)[0])
  return fn, backend
