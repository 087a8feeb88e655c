"""Orbax checkpoints of a search: QParams + position in the schedule + log.

Written after every block, so the newest checkpoint always sits on a block
boundary; the next block's strategy starts fresh from the saved QParams and a
key derived from (seed, position), which is why a resumed run ends exactly
where an uninterrupted one does.
"""
from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

KEEP = 2


def _manager(workdir: str):
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=KEEP, create=True))


def save(workdir: str, qparams, state: dict, selected=None) -> None:
  """`selected`: the QParams held-out selection keeps so far (default: qparams)."""
  with _manager(workdir) as mngr:
    mngr.save(state["position"], args=ocp.args.Composite(
        qparams=ocp.args.StandardSave(jax.device_get(qparams)),
        selected=ocp.args.StandardSave(jax.device_get(qparams if selected is None else selected)),
        state=ocp.args.JsonSave(state)))
    mngr.wait_until_finished()


def restore(workdir: str, like_qparams):
  """-> (qparams, selected qparams, state) of the newest checkpoint, or None."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return None
  with _manager(workdir) as mngr:
    step = mngr.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), like_qparams)
    out = mngr.restore(step, args=ocp.args.Composite(
        qparams=ocp.args.StandardRestore(abstract), selected=ocp.args.StandardRestore(abstract),
        state=ocp.args.JsonRestore()))
  return out["qparams"], out["selected"], dict(out["state"])
