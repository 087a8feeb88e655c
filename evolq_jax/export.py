"""Integer export: a quantized model -> one `.safetensors` file whose header
holds a JSON manifest (schema `evolq-int-model`, version 2); and its loader.
The integer model it describes runs in JAX (evolq_jax.integer) or as QDQ ONNX
(evolq_jax.integer.to_onnx); both take float32 NHWC images normalized by the
model's transform, as the fake-quant model does.

What the file holds (flat keys; `<layer>` / `<point>` are '/'-joined param /
quantization-point paths, e.g. `blocks_0/attn/qkv`, `blocks_0/attn/qkv_out`):

  weights/<layer>/codes      uint8. Unsigned integer codes u in [0, 2^bits - 1],
                             the kernel's shape flattened row-major; bits <= 4:
                             packed two per byte (low nibble first, "nibble"),
                             else one per byte ("none"). Signed grids are stored
                             shifted by -qmin, with the zero point shifted alike.
  weights/<layer>/zero_point int32 (out,): w = scale * (u - zero_point).
  weights/<layer>/scale      float32 (out,), bias correction's gain folded in.
  weights/<layer>/input_sum_coef  float32 (out,), only with bias correction: its
                             shift t, so that the layer computes
                             x @ w + t * sum_k x_k + bias   (exact; see below).
  weights/<layer>/bias       float32 (out,).
  acts/<point>/scale, zero_point   float32 (), int32 (): uniform, per tensor.
  acts/<point>/scale, exponent, zero_point   PTF: float32 base scale (),
                             int8 (C,) exponents: channel c's scale is
                             scale * 2^exponent[c]; int32 zero point ().
  (log2 points hold no arrays: q = clip(round(-log2 p), 0, 2^bits - 1), p = 2^-q,
   0 past the grid; their bits are in the manifest.)
  float/<path>               float32: LayerNorm scales/biases, class token,
                             position embedding, attention biases (kept in
                             float, as in the fake-quant model).

Bias correction (FQ-ViT/Evol-Q's per-channel mean/std match) maps the fake-
quantized weights w_hat to gain * w_hat + shift per output channel. The gain
scales the channel's scale; the shift t multiplies every input, so it is
t * sum_k x_k per output: a per-channel term proportional to the input's sum,
which the integer kernel gets from the same row sum it needs for the zero
points. Nothing moves the weights off the integer grid.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from evolq_jax.models.forward import act_rules
from evolq_jax.models.registry import FAMILIES, family_of, get_preset
from evolq_jax.quant.bits import BitSpec
from evolq_jax.quant.recipe import QuantConfig, rule_for
from evolq_jax.quant.uniform import dequantize, quantize
from evolq_jax.quant.weights import bias_correction_affine, kernel_paths

SCHEMA, SCHEMA_VERSION = "evolq-int-model", 2  # 2: float normalized input, no pixel grid
MANIFEST_KEY = "evolq_manifest"
PACKED_BITS = 4  # codes of this many bits or fewer are packed two per byte


@dataclasses.dataclass
class IntExport:
  """What an export file holds: the manifest (JSON-able) and flat arrays."""
  manifest: dict
  arrays: dict  # key -> np.ndarray


# --- integer codes ---------------------------------------------------------------

def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned codes (any shape) -> uint8 bytes: two per byte when bits <= 4."""
  flat = np.asarray(codes, np.uint8).reshape(-1)
  if bits > PACKED_BITS:
    return flat.copy()
  flat = np.concatenate([flat, np.zeros(len(flat) % 2, np.uint8)])
  return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, shape) -> np.ndarray:
  """Inverse of `pack_codes` -> uint8 codes of `shape`."""
  size = int(np.prod(shape))
  if bits > PACKED_BITS:
    flat = packed
  else:
    flat = np.stack([packed & 15, packed >> 4], axis=-1).reshape(-1)
  if flat.size < size:
    raise ValueError(f"{flat.size} codes cannot fill a kernel of shape {tuple(shape)}: "
                     "the export file is truncated or its manifest does not match it.")
  return flat[:size].reshape(shape)


def _integral(x, what: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if not np.all(np.isfinite(x)) or not np.array_equal(x, np.round(x)):
    raise ValueError(f"{what} holds non-integer zero point(s) {x.reshape(-1)[:4]}: an integer "
                     "export needs integer zero points, as calibrate produces. Recalibrate, or "
                     "keep zero points integral when editing QParams.")
  return x.astype(np.int32)


# --- one layer, one quantizer ------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("spec",))
def _codes_and_affine(w, scale, zero_point, spec: BitSpec, rounding=None):
  """One program per kernel shape (layers of one shape share it; eagerly, every op of
  every layer would compile on its own)."""
  q = quantize(w, scale, zero_point, spec, rounding)  # the fake-quant's codes, bit for bit
  return q, bias_correction_affine(w, dequantize(q, scale, zero_point))


def integer_layer(kernel, bias, scale, zero_point, spec: BitSpec, bias_correction: bool,
                  rounding=None):
  """A kernel (..., out) and its QParams -> (arrays, manifest entry) of the export.
  rounding: the learned 0/1 per weight of a reconstruction (None: to nearest)."""
  w = jnp.asarray(kernel, jnp.float32)
  q, (gain, shift) = _codes_and_affine(w, jnp.asarray(scale, jnp.float32),
                                       jnp.asarray(zero_point, jnp.float32), spec,
                                       None if rounding is None else jnp.asarray(rounding,
                                                                                 jnp.float32))
  zp = _integral(zero_point, "a weight quantizer")
  arrays = {"codes": pack_codes(np.asarray(q - spec.qmin), spec.bits),
            "zero_point": (zp - spec.qmin).astype(np.int32)}
  if bias_correction:
    arrays["scale"] = np.asarray(scale * gain, np.float32)
    arrays["input_sum_coef"] = np.asarray(shift, np.float32)
  else:
    arrays["scale"] = np.asarray(scale, np.float32)
  out = kernel.shape[-1]
  arrays["bias"] = np.asarray(np.zeros(out) if bias is None else bias, np.float32)
  entry = {"bits": spec.bits, "shape": list(kernel.shape),
           "packing": "nibble" if spec.bits <= PACKED_BITS else "none",
           "bias_correction": bool(bias_correction)}
  return arrays, entry


def ptf_exponents(scale) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel PTF scales (C,) -> (base scale (), int8 exponents (C,)), exactly."""
  scale = np.asarray(scale, np.float32)
  base = scale.min()
  exponent = np.round(np.log2(scale / base)).astype(np.int8)
  rebuilt = np.ldexp(base, exponent.astype(np.int32)).astype(np.float32)
  if not np.allclose(rebuilt, scale, rtol=1e-6, atol=0):
    raise ValueError(f"PTF scales {scale[:4]} are not power-of-two multiples of one base "
                     f"scale {base}: expected FQ-ViT's PTF (scale * 2^k per channel). "
                     "Recalibrate, or quantize this point with quant.ptf=False.")
  return np.asarray(base, np.float32), exponent


def integer_act(point: str, q: dict, quantizer: str, qcfg: QuantConfig):
  """One activation quantizer's QParams -> (arrays, manifest entry)."""
  if quantizer == "log2":
    return {}, {"quantizer": "log2", "bits": qcfg.prob_bits}
  zp = _integral(q["zero_point"], f"activation point {point!r}")
  if quantizer == "ptf":
    base, exponent = ptf_exponents(q["scale"])
    arrays = {"scale": base, "exponent": exponent}
  else:
    if np.ndim(q["scale"]) != 0:
      raise ValueError(f"activation point {point!r} has a per-channel scale under the uniform "
                       "quantizer: expected one scale per tensor (only PTF points have one "
                       "per channel).")
    arrays = {"scale": np.asarray(q["scale"], np.float32)}
  arrays["zero_point"] = zp.reshape(())
  return arrays, {"quantizer": quantizer, "bits": qcfg.a_bits}


# --- the whole model -------------------------------------------------------------

def build_export(cfg, qcfg: QuantConfig, params, qparams, source: dict | None = None) -> IntExport:
  """(model config, quant config, FP params, QParams) -> IntExport."""
  flat = traverse_util.flatten_dict(jax.device_get(params))
  wq = traverse_util.flatten_dict(jax.device_get(qparams.weights))
  arrays, layers, acts = {}, {}, {}
  layer_paths = kernel_paths(params)
  for path in layer_paths:
    name = "/".join(path)
    if path + ("scale",) not in wq:
      raise ValueError(f"layer {name!r} has no weight QParams: expected QParams from "
                       "evolq_jax.calibrate for this model.")
    a, layers[name] = integer_layer(flat[path + ("kernel",)], flat.get(path + ("bias",)),
                                    wq[path + ("scale",)], wq[path + ("zero_point",)],
                                    qcfg.w_spec_of(path), qcfg.bias_correction,
                                    wq.get(path + ("rounding",)))
    arrays.update({f"weights/{name}/{k}": v for k, v in a.items()})
  owned = {p + (leaf,) for p in layer_paths for leaf in ("kernel", "bias")}
  arrays.update({f"float/{'/'.join(k)}": np.asarray(v, np.float32)
                 for k, v in flat.items() if k not in owned})
  rules = act_rules(cfg, qcfg)
  points = traverse_util.flatten_dict(jax.device_get(qparams.acts),
                                      is_leaf=lambda _, v: isinstance(v, dict) and "scale" in v)
  for path, q in sorted(points.items()):
    point = "/".join(path)
    a, acts[point] = integer_act(point, q, rule_for(rules, point).quantizer, qcfg)
    arrays.update({f"acts/{point}/{k}": v for k, v in a.items()})
  manifest = {
      "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
      "model": {"family": family_of(cfg).name, "preset": cfg.name,
                "config": dataclasses.asdict(cfg)},
      "quant": json.loads(json.dumps(dataclasses.asdict(qcfg))),  # tuples as JSON lists
      "input": {"layout": "NHWC", "dtype": "float32", "preprocess": cfg.preprocess,
                "normalize": {k: list(cfg.transform[k]) for k in ("mean", "std")}},
      "weights": layers, "acts": acts, "source": source or {}}
  return IntExport(manifest, arrays)


def _tuples(v):
  return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def model_configs(manifest: dict):
  """The manifest's (model config, QuantConfig); a config derived from a preset (another
  size, other classes) is rebuilt on its family's preset type."""
  model = manifest["model"]
  try:
    preset = get_preset(model["preset"])
  except ValueError:
    if model.get("family") not in FAMILIES:
      raise
    preset = FAMILIES[model["family"]].presets[0]
  cfg = dataclasses.replace(preset, **{k: _tuples(v) for k, v in model["config"].items()})
  return cfg, QuantConfig(**manifest["quant"])


# --- the file ----------------------------------------------------------------------

def manifest_path(path: str) -> str:
  return os.path.splitext(path)[0] + ".json"


def save_export(path: str, export: IntExport) -> dict:
  """Write FILE.safetensors (manifest in its header) and FILE.json (the manifest
  again, for reading). -> {"export": path, "manifest": json path}."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  text = json.dumps(export.manifest, indent=1, sort_keys=True)
  save_file({k: np.array(v, order="C") for k, v in export.arrays.items()}, path,
            metadata={MANIFEST_KEY: text})
  with open(manifest_path(path), "w") as f:
    f.write(text + "\n")
  return {"export": path, "manifest": manifest_path(path)}


def load_export(path: str) -> IntExport:
  """An export file -> IntExport (arrays exactly as written)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"export file {path!r} does not exist: write one with "
                            "`evolq export --workdir RUN`.")
  with safe_open(path, framework="np") as f:
    meta = f.metadata() or {}
    arrays = {k: f.get_tensor(k) for k in f.keys()}
  if MANIFEST_KEY not in meta:
    raise ValueError(f"{path!r} holds no '{MANIFEST_KEY}' manifest: expected a file written by "
                     "evolq_jax.export.save_export (not a param checkpoint).")
  manifest = json.loads(meta[MANIFEST_KEY])
  if manifest.get("schema") != SCHEMA or manifest.get("schema_version") != SCHEMA_VERSION:
    raise ValueError(f"{path!r} has schema {manifest.get('schema')!r} version "
                     f"{manifest.get('schema_version')!r}: this evolq_jax reads {SCHEMA!r} "
                     f"version {SCHEMA_VERSION}. Re-export the run with this version.")
  return IntExport(manifest, arrays)
