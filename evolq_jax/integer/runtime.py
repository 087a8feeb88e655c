"""The integer model of an export, runnable in JAX:

  fn = int_forward(export)        # fn(images) -> logits on integer kernels; jit it
  int_logits(export, images)      # the same, batched, as numpy

Images are float32 NHWC, normalized by the model's transform (what
`evolq_jax.load_split` returns).
"""
from __future__ import annotations

import jax
import numpy as np

from evolq_jax.evaluate import batched_logits
from evolq_jax.export import IntExport
from evolq_jax.integer.interpret import integer_forward
from evolq_jax.integer.model import trace


def int_forward(export: IntExport, batch: int = 1):
  """-> (fn(images) -> logits, backend). The program is traced once at `batch`
  (the integer walk re-traces it for any other shape under jit); backend.counts
  says how many matmuls/convs run on integers and how many in float."""
  closed = trace(export, batch)
  fn, backend = integer_forward(closed)
  shape = closed.jaxpr.invars[0].aval.shape

  def call(images):
    if images.shape[1:] != shape[1:]:
      raise ValueError(f"images of shape {tuple(images.shape)} do not fit the exported model: "
                       f"expected (batch, {', '.join(map(str, shape[1:]))}) float32 NHWC, "
                       "normalized by the model's transform.")
    if images.shape[0] == shape[0]:
      return fn(images)
    return integer_forward(trace(export, images.shape[0]))[0](images)
  return call, backend


def int_logits(export: IntExport, images, batch_size: int = 500) -> np.ndarray:
  """Integer logits (N, classes) float32 of normalized float images (N, H, W, C)."""
  n = min(batch_size, len(images))
  fn = jax.jit(int_forward(export, n)[0])
  return batched_logits(fn, np.asarray(images, np.float32), n)
