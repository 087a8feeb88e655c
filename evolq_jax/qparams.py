"""QParams: every quantization parameter of a model, as one pytree.

  weights: {layer path...: {"scale": (out,), "zero_point": (out,)}} for every
           Dense / Conv kernel (keys mirror the param tree);
  acts:    {point path...: {"scale": () or (C,), "zero_point": ()}} for every
           activation quantization point (keys mirror the model's "stats").
Bit widths and flags are static and live in `QuantConfig`, not here.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from flax import struct, traverse_util
from safetensors.numpy import load_file, save_file

QPARAMS_FILE = "qparams.safetensors"  # a run's final QParams, in its workdir


@struct.dataclass
class QParams:
  weights: dict
  acts: dict


def non_finite_paths(tree) -> list[str]:
  """'/'-joined paths of leaves holding NaN or inf."""
  # on the host: jnp.isfinite per leaf would compile two XLA programs per leaf shape
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  return sorted(jax.tree_util.keystr(p, simple=True, separator="/")
                for p, v in leaves if not np.isfinite(np.asarray(v)).all())


def save_qparams(path: str, qparams: QParams, metadata: dict | None = None) -> None:
  """QParams -> one `.safetensors` file, keys 'weights/<layer>/scale', 'acts/<point>/...'."""
  tree = {"weights": qparams.weights, "acts": qparams.acts}
  flat = traverse_util.flatten_dict(jax.device_get(tree), sep="/")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # np.array(order="C"), not ascontiguousarray, which turns 0-d scales into shape (1,)
  save_file({k: np.array(v, order="C") for k, v in flat.items()}, path,
            metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_qparams(path: str) -> QParams:
  """A file written by `save_qparams` -> QParams (numpy leaves, dtypes as saved)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"QParams file {path!r} does not exist: runs write "
                            "WORKDIR/qparams.safetensors; rerun `evolq search` or `evolq eval`.")
  tree = traverse_util.unflatten_dict(load_file(path), sep="/")
  missing = {"weights", "acts"} - set(tree)
  if missing:
    raise ValueError(f"{path!r} holds no {sorted(missing)} section(s): expected a file written "
                     "by evolq_jax.qparams.save_qparams.")
  return QParams(weights=tree["weights"], acts=tree["acts"])
