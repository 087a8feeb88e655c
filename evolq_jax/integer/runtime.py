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
from evolq_jax.integer.interpret import integer_forward, integer_forward_of_consts
from evolq_jax.integer.model import trace
from evolq_jax.search.fitness import FORWARD_BATCH


def _check_images(images, shape) -> None:
  if tuple(np.shape(images)[1:]) != tuple(shape[1:]):
    raise ValueError(f"images of shape {tuple(np.shape(images))} do not fit the exported model: "
                     f"expected (batch, {', '.join(map(str, shape[1:]))}) float32 NHWC, "
                     "normalized by the model's transform.")


def int_forward(export: IntExport, batch: int = 1):
  """-> (fn(images) -> logits, backend). The program is traced once at `batch`
  (the integer walk re-traces it for any other shape under jit); backend.counts
  says how many matmuls/convs run on integers and how many in float."""
  closed = trace(export, batch)
  fn, backend = integer_forward(closed)
  shape = closed.jaxpr.invars[0].aval.shape

  def call(images):
    _check_images(images, shape)
    if images.shape[0] == shape[0]:
      return fn(images)
    return integer_forward(trace(export, images.shape[0]))[0](images)
  return call, backend


def int_logits(export: IntExport, images, batch_size: int = FORWARD_BATCH) -> np.ndarray:
  """Integer logits (N, classes) float32 of normalized float images (N, H, W, C), in
  batches of the fake-quant forward's size. The export's arrays enter the compiled
  program as arguments: another export of the same model and layout (other scales,
  other bits in the same containers) reads the program from the persistent
  compilation cache instead of compiling."""
  n = min(batch_size, len(images))
  closed = trace(export, n)
  _check_images(images, closed.jaxpr.invars[0].aval.shape)
  fn = jax.jit(integer_forward_of_consts(closed.jaxpr)[0])
  consts = [jax.numpy.asarray(c) for c in closed.consts]
  return batched_logits(lambda x: fn(consts, x), np.asarray(images, np.float32), n)
