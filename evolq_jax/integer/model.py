"""An export (evolq_jax.export.IntExport) as the family's own model in "int"
mode: the kernels rebuilt from their integer codes through `weight_dq`
marks, the activation quantizers as `act_qdq` / `act_log2` marks.

  fn = int_model(export)        # fn(images) -> logits; jittable, values = fake-quant
  closed = trace(export, batch) # its jaxpr, what the integer backends walk

Images are float32 NHWC, normalized by the model's transform (what
`evolq_jax.load_split` returns).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from evolq_jax.export import IntExport, model_configs, unpack_codes
from evolq_jax.models.forward import model_for
from evolq_jax.quant import markers


def weight_container(codes: np.ndarray, zero_point: np.ndarray):
  """Unsigned codes u (..., out) and zero points (out,) -> (q, zero_point) in the
  smallest ONNX-friendly container: int8 u - z with zero point 0 when every
  u - z fits int8 (all weights of <= 7 bits, and signed 8-bit grids: the fast
  integer kernels want zero point 0), else uint8 u with its zero points."""
  centered = codes.astype(np.int16) - zero_point.astype(np.int16)
  if centered.min() >= -128 and centered.max() <= 127:
    return centered.astype(np.int8), np.zeros(zero_point.shape, np.int8)
  return codes.astype(np.uint8), zero_point.astype(np.uint8)


def int_weights(export: IntExport) -> dict:
  """Per layer name: {"q", "zero_point", "scale", "shift", "bias", "bits"} as numpy."""
  out = {}
  for name, e in export.manifest["weights"].items():
    get = lambda k: export.arrays.get(f"weights/{name}/{k}")  # noqa: E731, B023
    codes = unpack_codes(get("codes"), e["bits"], e["shape"])
    q, zp = weight_container(codes, get("zero_point"))
    shift = get("input_sum_coef")
    out[name] = {"q": q, "zero_point": zp, "scale": get("scale"), "bias": get("bias"),
                 "shift": np.zeros_like(get("scale")) if shift is None else shift,
                 "bits": e["bits"]}
  return out


def int_acts(export: IntExport) -> dict:
  """The activation QParams tree (PTF scales rebuilt as base * 2^exponent)."""
  flat = {}
  for point, e in export.manifest["acts"].items():
    get = lambda k: export.arrays.get(f"acts/{point}/{k}")  # noqa: E731, B023
    if e["quantizer"] == "log2":
      scale, zp = np.ones((), np.float32), np.zeros((), np.float32)  # unused by log2 points
    else:
      scale = get("scale")
      if get("exponent") is not None:
        scale = np.ldexp(scale, get("exponent").astype(np.int32)).astype(np.float32)
      zp = get("zero_point").astype(np.float32)
    flat[tuple(point.split("/"))] = {"scale": scale, "zero_point": zp}
  return traverse_util.unflatten_dict(flat)


def int_params(weights: dict, floats: dict) -> dict:
  """The param tree, each kernel as a `weight_dq` mark of its codes (call it
  inside the traced function, so that the marks are in the program)."""
  flat = {tuple(k.split("/")): jnp.asarray(v) for k, v in floats.items()}
  for name, w in weights.items():
    path = tuple(name.split("/"))
    flat[path + ("kernel",)] = markers.weight_dq(w["q"], w["zero_point"], w["scale"],
                                                 w["shift"], w["bits"])
    flat[path + ("bias",)] = jnp.asarray(w["bias"])
  return traverse_util.unflatten_dict(flat)


def int_model(export: IntExport):
  """-> fn(images (B, H, W, C) float32) -> logits (B, classes), the family's
  module in "int" mode on the export's integers."""
  cfg, qcfg = model_configs(export.manifest)
  weights, acts = int_weights(export), int_acts(export)
  floats = {k[len("float/"):]: v for k, v in export.arrays.items() if k.startswith("float/")}
  module = model_for(cfg, "int", qcfg, named_ops=True)

  def fn(images):
    return module.apply({"params": int_params(weights, floats)}, images, acts)
  return fn


def input_spec(export: IntExport, batch) -> jax.ShapeDtypeStruct:
  cfg, _ = model_configs(export.manifest)
  return jax.ShapeDtypeStruct((batch, cfg.img_size, cfg.img_size, cfg.in_chans), jnp.float32)


def trace(export: IntExport, batch: int = 1):
  """The "int" model's ClosedJaxpr at a batch size."""
  return jax.make_jaxpr(int_model(export))(input_spec(export, batch))
