"""Quantizers as named marks in a traced program: what the integer backends
(evolq_jax.integer: the JAX integer forward and the ONNX export) read.

In the model's "int" mode every quantization point and every quantized
kernel goes through one of these functions. Each is a `jax.jit` whose name
says what it is (`evolq_qdq__8`), so it shows up in the jaxpr as one named
equation with its operands; run as it is, it computes exactly what the
fake-quant model computes. A backend that walks the jaxpr replaces each
mark by its own integer form (codes and an int32 matmul, or ONNX's
QuantizeLinear / DequantizeLinear), and needs no second model definition.

  act_qdq(x, scale, zero_point, bits)   uniform (scale ()) or PTF (scale (C,), last axis)
  act_log2(p, bits)                     FQ-ViT's log2 quantizer of probabilities
  weight_dq(q, zero_point, scale, shift, bits)
                                        integer kernel codes -> float kernel:
                                        scale * (q - zero_point) + shift per output
                                        channel (shift: bias correction's mean term)

Named float ops (`layer_norm`, `softmax`, `gelu`, `hard_swish`), used where a model
is traced for export: one equation each, which the ONNX backend writes as the
one ONNX op of that name (ONNX Runtime's fused kernel) instead of the dozen
elementwise ops they are made of. They compute what the Flax/JAX functions do.
"""
from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from evolq_jax.quant.bits import BitSpec
from evolq_jax.quant.log2 import log2_fake_quant
from evolq_jax.quant.uniform import fake_quant

PREFIX = "evolq_"
KINDS = ("qdq", "log2", "wdq")
_NAME = re.compile(rf"{PREFIX}({'|'.join(KINDS)})__(\d+)")
_FN = re.compile(rf"{PREFIX}fn__([a-z_0-9]+?)(?:__(.+))?")


def _named(kind: str, bits: int, fn):
  fn.__name__ = f"{PREFIX}{kind}__{bits}"
  return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def _qdq(bits: int):
  spec = BitSpec(bits)
  return _named("qdq", bits, lambda x, scale, zero_point: fake_quant(
      x, scale.astype(x.dtype), zero_point.astype(x.dtype), spec))


@functools.lru_cache(maxsize=None)
def _log2(bits: int):
  spec = BitSpec(bits)
  return _named("log2", bits, lambda p: log2_fake_quant(p, spec).astype(p.dtype))


@functools.lru_cache(maxsize=None)
def _wdq(bits: int):
  def dq(q, zero_point, scale, shift):
    centered = q.astype(jnp.int32) - zero_point.astype(jnp.int32)
    return centered.astype(jnp.float32) * scale + shift
  return _named("wdq", bits, dq)


def act_qdq(x, scale, zero_point, bits: int):
  return _qdq(bits)(x, jnp.asarray(scale), jnp.asarray(zero_point))


def act_log2(p, bits: int):
  return _log2(bits)(p)


def weight_dq(q, zero_point, scale, shift, bits: int):
  """q: int8/uint8 kernel codes (..., out); zero_point same dtype (out,); scale, shift (out,)."""
  return _wdq(bits)(q, zero_point, scale, shift)


@functools.lru_cache(maxsize=None)
def _fn(op: str, arg: str = ""):
  bodies = {
      "layernorm": lambda x, scale, bias: nn.LayerNorm(float(arg)).apply(
          {"params": {"scale": scale, "bias": bias}}, x),
      "softmax": lambda x: nn.softmax(x, axis=-1),
      "gelu": lambda x: nn.gelu(x, approximate=False),
      "hard_swish": nn.hard_swish}
  fn = bodies[op]
  name = f"{PREFIX}fn__{op}" + (f"__{arg}" if arg else "")
  wrapped = lambda *a: fn(*a)  # noqa: E731
  wrapped.__name__ = name
  return jax.jit(wrapped)


def layer_norm(x, scale, bias, epsilon: float):
  return _fn("layernorm", repr(float(epsilon)))(x, scale, bias)


def softmax(x):
  return _fn("softmax")(x)


def gelu(x):
  return _fn("gelu")(x)


def hard_swish(x):
  return _fn("hard_swish")(x)


def parse_fn(name: str):
  """A jit equation's name -> (op, arg) for a named float op, else None."""
  m = _FN.fullmatch(name or "")
  return (m.group(1), m.group(2) or "") if m else None


def parse(name: str):
  """A jit equation's name -> (kind, bits) for a mark, else None."""
  m = _NAME.fullmatch(name or "")
  return (m.group(1), int(m.group(2))) if m else None
