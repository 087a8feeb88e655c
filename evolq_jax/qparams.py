"""QParams: every quantization parameter of a model, as one pytree.

  weights: {layer path...: {"scale": (out,), "zero_point": (out,)}} for every
           Dense / Conv kernel (keys mirror the param tree);
  acts:    {point path...: {"scale": () or (C,), "zero_point": ()}} for every
           activation quantization point (keys mirror the model's "stats").
Bit widths and flags are static and live in `QuantConfig`, not here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class QParams:
  weights: dict
  acts: dict


def non_finite_paths(tree) -> list[str]:
  """'/'-joined paths of leaves holding NaN or inf."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return sorted(jax.tree_util.keystr(p, simple=True, separator="/")
                for p, v in leaves if not bool(jnp.all(jnp.isfinite(v))))
