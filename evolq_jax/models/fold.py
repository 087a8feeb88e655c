"""BatchNorm folded into the layer before it (or after it), as integer
deployments do: quantization then sees the weights that actually run.

Kernels are Flax's: (..., in, out) with the output channel last, so BN's
per-channel affine y = gamma * (x - mean) / sqrt(var + eps) + beta scales the
last axis of a preceding layer's kernel. For a BN *before* a Dense layer
(LeViT's NormLinear), the per-input-channel affine folds into the kernel's
rows and the bias instead.
"""
from __future__ import annotations

import numpy as np


def bn_affine(gamma, beta, mean, var, eps: float):
  """-> (a, b) with BN(x) = a * x + b per channel."""
  a = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
  return a, np.asarray(beta, np.float64) - a * np.asarray(mean, np.float64)


def fold_bn_after(kernel, bias, gamma, beta, mean, var, eps: float = 1e-5):
  """BN(layer(x)) as one layer: -> (kernel, bias) float32; bias may be None."""
  a, b = bn_affine(gamma, beta, mean, var, eps)
  bias = np.zeros_like(a) if bias is None else np.asarray(bias, np.float64)
  return ((np.asarray(kernel, np.float64) * a).astype(np.float32),
          (a * bias + b).astype(np.float32))


def fold_bn_before(kernel, bias, gamma, beta, mean, var, eps: float = 1e-5):
  """layer(BN(x)) for a Dense kernel (in, out): -> (kernel, bias) float32."""
  a, b = bn_affine(gamma, beta, mean, var, eps)
  k = np.asarray(kernel, np.float64)
  bias = np.zeros(k.shape[-1]) if bias is None else np.asarray(bias, np.float64)
  return (k * a[:, None]).astype(np.float32), (bias + b @ k).astype(np.float32)
