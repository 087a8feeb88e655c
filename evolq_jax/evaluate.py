"""Metrics: top-1, top-5 and top-1 agreement with the full-precision model."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm


def batched(fn, images, batch_size: int = 500, desc: str | None = None, host: bool = True,
            axis: int = 0, pad: bool = True):
  """The package's one batched forward: fn applied to `images` batch by batch ->
  the outputs concatenated along `axis` (fn's batch axis), as numpy (host) or
  as device arrays (host=False: e.g. prefix activations that stay on the
  accelerator). pad: the last batch is padded to batch_size so that fn
  compiles once (off: it runs at its own size). Fewer images than one batch run
  as one batch of their own size, not padded up to batch_size."""
  xp = np if isinstance(images, np.ndarray) else jnp
  batch_size = max(1, min(batch_size, len(images)))
  out = []
  for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=desc is None, leave=False):
    batch = images[i:i + batch_size]
    n = len(batch)
    if pad and n < batch_size:
      batch = xp.concatenate([batch, xp.repeat(batch[-1:], batch_size - n, 0)])
    y = fn(batch)
    y = y[(slice(None),) * axis + (slice(0, n),)]
    out.append(np.asarray(y) if host else y)
  return np.concatenate(out, axis) if host else jnp.concatenate(out, axis)


def batched_logits(fn, images, batch_size: int = 500, desc: str | None = None) -> np.ndarray:
  """Apply a jitted `fn(images) -> logits` batch by batch; -> float32 (N, classes),
  checked finite."""
  logits = batched(fn, images, batch_size, desc).astype(np.float32)
  if not np.all(np.isfinite(logits)):
    raise ValueError("the model produced NaN/inf logits: check the checkpoint, the input "
                     "normalization and the quantization parameters.")
  return logits


def topk_accuracy(logits, labels, k: int) -> float:
  """Percent of rows whose label is among the k highest logits.

  Ties go to the lower class index, as `argmax` breaks them: a quantized
  model's logits tie exactly more often than one would think (47 of the
  fixture's 10,000 test images at W4A8), and `argpartition`, which picks
  among tied entries by its own order, counted 6 of them differently from
  the `argmax` that a deployed model's user would apply."""
  k = min(k, logits.shape[-1])
  top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
  return percent(np.any(top == labels[:, None], axis=-1))


def percent(hits) -> float:
  """100 x the mean of a boolean array, rounded to 6 decimals: a count over N
  images, without float noise (89.6, not 89.60000000000001) in JSON and print."""
  return round(100.0 * float(np.mean(hits)), 6)


def classification_metrics(logits, labels, fp_logits=None) -> dict:
  """Percentages: top1, top5 and (with fp_logits) agreement = same top-1 as FP."""
  m = {"top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 5)}
  if fp_logits is not None:
    m["agreement"] = percent(logits.argmax(-1) == fp_logits.argmax(-1))
  return m
