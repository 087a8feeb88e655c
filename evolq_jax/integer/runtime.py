"""From an export (evolq_jax.export.IntExport) to a runnable integer model:
unpack the codes into int8 operands once, pick the family's integer forward.

  rt = runtime(export)            # pytree: weights (IntLinear), acts (ActQ), floats, input
  fn = forward_for(export)        # fn(rt, images) -> logits; jit it
  int_logits(export, images)      # both, batched
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from evolq_jax.evaluate import batched_logits
from evolq_jax.export import IntExport, model_configs, unpack_codes
from evolq_jax.integer import vit
from evolq_jax.integer.kernels import ActQ, IntLinear, shift_for

# family name -> forward(rt, images, cfg). A family adds its integer module and a line here.
FORWARDS = {"vit": vit.forward}


def int_layer(arrays: dict, name: str, entry: dict) -> IntLinear:
  get = lambda k: arrays.get(f"weights/{name}/{k}")  # noqa: E731
  shift = shift_for(entry["bits"])
  codes = unpack_codes(get("codes"), entry["bits"], entry["shape"]).astype(np.int16)
  coef = get("input_sum_coef")
  return IntLinear(w=jnp.asarray((codes - shift).astype(np.int8)),
                   w_offset=jnp.asarray(shift - get("zero_point"), jnp.int32),
                   scale=jnp.asarray(get("scale")), bias=jnp.asarray(get("bias")),
                   sum_coef=None if coef is None else jnp.asarray(coef))


def act_q(arrays: dict, point: str, entry: dict) -> ActQ:
  if entry["quantizer"] == "log2":
    return ActQ(kind="log2", bits=entry["bits"])
  get = lambda k: arrays.get(f"acts/{point}/{k}")  # noqa: E731
  exponent = get("exponent")
  return ActQ(scale=jnp.asarray(get("scale")), zero_point=jnp.asarray(get("zero_point")),
              exponent=None if exponent is None else jnp.asarray(exponent, jnp.int32),
              kind=entry["quantizer"], bits=entry["bits"])


def runtime(export: IntExport) -> dict:
  m, arrays = export.manifest, export.arrays
  return {
      "weights": {name: int_layer(arrays, name, e) for name, e in m["weights"].items()},
      "acts": {point: act_q(arrays, point, e) for point, e in m["acts"].items()},
      "floats": {k[len("float/"):]: jnp.asarray(v) for k, v in arrays.items()
                 if k.startswith("float/")},
      "input": {"scale": jnp.asarray(arrays["input/scale"]),
                "zero_point": jnp.asarray(arrays["input/zero_point"])}}


def forward_for(export: IntExport):
  """The family's integer forward with the model config bound: fn(rt, images)."""
  family = export.manifest["model"]["family"]
  if family not in FORWARDS:
    raise ValueError(f"model family {family!r} has no integer forward yet: available "
                     f"{sorted(FORWARDS)}. The export file itself is complete; add "
                     "evolq_jax/integer/<family>.py and register it in FORWARDS.")
  cfg, _ = model_configs(export.manifest)
  return functools.partial(FORWARDS[family], cfg=cfg)


@functools.lru_cache(maxsize=16)
def _jitted(family: str, cfg):
  return jax.jit(functools.partial(FORWARDS[family], cfg=cfg))


def int_logits(export: IntExport, images, batch_size: int = 500, rt=None) -> np.ndarray:
  """Integer logits (N, classes) float32 of images (uint8 pixels or normalized floats)."""
  forward_for(export)  # a clear error for a family without an integer forward
  fn = _jitted(export.manifest["model"]["family"], model_configs(export.manifest)[0])
  rt = runtime(export) if rt is None else rt
  return batched_logits(lambda x: fn(rt, x), images, batch_size)
