"""The portable artifact: the integer forward, weights included, serialized with
`jax.export` (StableHLO). Running it needs jax, jaxlib and flatbuffers (which
jax.export's serialization imports), and nothing of evolq_jax:

  exported = jax.export.deserialize(bytearray(open(PATH, "rb").read()))
  logits = exported.call(images)   # float32 (B, H, W, C) normalized, any B -> (B, classes)
"""
from __future__ import annotations

import os

import jax

from evolq_jax.export import IntExport
from evolq_jax.integer.interpret import integer_forward
from evolq_jax.integer.model import input_spec, int_model

ARTIFACT_SUFFIX = ".stablehlo"


def export_forward(export: IntExport, platforms=None):
  """-> jax.export.Exported of images (symbolic batch) -> logits, weights as constants."""
  spec = input_spec(export, jax.export.symbolic_shape("b")[0])
  fn, _ = integer_forward(jax.make_jaxpr(int_model(export))(spec))
  return jax.export.export(jax.jit(fn), platforms=platforms)(spec)


def save_artifact(path: str, export: IntExport, platforms=None) -> str:
  """Write the serialized integer forward to `path`; -> path."""
  data = export_forward(export, platforms).serialize()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return path


def load_artifact(path: str):
  """-> a function images -> logits (what a process without evolq_jax does)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"artifact {path!r} does not exist: write one with "
                            "`evolq export --workdir RUN`.")
  with open(path, "rb") as f:
    return jax.export.deserialize(bytearray(f.read())).call
