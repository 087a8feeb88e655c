"""The portable artifact: the integer forward, weights included, serialized with
`jax.export` (StableHLO). Running it needs jax and nothing of evolq_jax:

  exported = jax.export.deserialize(open(PATH, "rb").read())
  logits = exported.call(pixels)   # uint8 (B, H, W, C), any B -> float32 (B, classes)
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from evolq_jax.export import IntExport, model_configs
from evolq_jax.integer.runtime import forward_for, runtime

ARTIFACT_SUFFIX = ".stablehlo"


def export_forward(export: IntExport, platforms=None):
  """-> jax.export.Exported of pixels (symbolic batch) -> logits, weights as constants."""
  cfg, _ = model_configs(export.manifest)
  rt, fn = runtime(export), forward_for(export)
  batch = jax.export.symbolic_shape("b")[0]
  spec = jax.ShapeDtypeStruct((batch, cfg.img_size, cfg.img_size, cfg.in_chans), jnp.uint8)
  return jax.export.export(jax.jit(lambda pixels: fn(rt, pixels)), platforms=platforms)(spec)


def save_artifact(path: str, export: IntExport, platforms=None) -> str:
  """Write the serialized integer forward to `path`; -> path."""
  data = export_forward(export, platforms).serialize()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return path


def load_artifact(path: str):
  """-> a function pixels -> logits (what a process without evolq_jax does)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"artifact {path!r} does not exist: write one with "
                            "`evolq export --workdir RUN`.")
  with open(path, "rb") as f:
    return jax.export.deserialize(bytearray(f.read())).call
