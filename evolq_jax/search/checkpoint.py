"""Orbax checkpoints of a search: QParams + position in the schedule + log.

Written after every block, so the newest checkpoint always sits on a block
boundary; the next block's strategy starts fresh from the saved QParams and a
key derived from (seed, position), which is why a resumed run ends exactly
where an uninterrupted one does.

Saves are synchronous: orbax writes a step into a temporary folder and renames
it when complete, so a kill mid-write leaves only that folder, which the next
manager removes (a workdir has one writer: the run's lock, see workdir.py). A
step that does not read back is moved to WORKDIR/checkpoints.unreadable/ and
the newest readable one is used instead, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

from evolq_jax.workdir import write_json

KEEP = 2
UNREADABLE = "checkpoints.unreadable"
MANIFEST = "evolq_manifest.json"  # size + sha256 of every file of a finished step


def _dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, "checkpoints"))


def _manager(workdir: str):
  return ocp.CheckpointManager(_dir(workdir), options=ocp.CheckpointManagerOptions(
      max_to_keep=KEEP, create=True, enable_async_checkpointing=False,
      cleanup_tmp_directories=True))


def save(workdir: str, qparams, state: dict, selected=None) -> None:
  """`selected`: the QParams held-out selection keeps so far (default: qparams)."""
  with _manager(workdir) as mngr:
    mngr.save(state["position"], args=ocp.args.Composite(
        qparams=ocp.args.StandardSave(jax.device_get(qparams)),
        selected=ocp.args.StandardSave(jax.device_get(qparams if selected is None else selected)),
        state=ocp.args.JsonSave(state)))
    mngr.wait_until_finished()
  _write_manifest(os.path.join(_dir(workdir), str(state["position"])))


def _files(step_dir: str) -> dict:
  """{relative path: [bytes, sha256]} of a step's files (its manifest left out)."""
  out = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if not rel.startswith(MANIFEST):
        with open(path, "rb") as f:
          out[rel] = [os.path.getsize(path), hashlib.sha256(f.read()).hexdigest()]
  return out


def _write_manifest(step_dir: str) -> None:
  write_json(os.path.join(step_dir, MANIFEST), _files(step_dir), indent=None)


def _damage(step_dir: str):
  """What differs from the step's manifest (None: intact; "" : no manifest to check)."""
  try:
    with open(os.path.join(step_dir, MANIFEST)) as f:
      want = json.load(f)
  except FileNotFoundError:
    return ""
  except (OSError, ValueError) as e:
    return f"its manifest is unreadable: {e}"
  got = _files(step_dir)
  for rel, (size, digest) in sorted(want.items()):
    if rel not in got:
      return f"{rel} is missing"
    if got[rel] != [size, digest]:
      return f"{rel} holds {got[rel][0]} bytes that differ from the {size} written"
  return None


def steps(workdir: str) -> list:
  """The finished checkpoints' steps (positions), oldest first."""
  d = _dir(workdir)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _read(workdir: str, step: int, like_qparams=None) -> dict:
  """One step; without `like_qparams` the arrays come back as saved (a readability probe)."""
  if like_qparams is None:
    tree = ocp.args.StandardRestore()
  else:
    tree = ocp.args.StandardRestore(
        jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), like_qparams))
  with _manager(workdir) as mngr:
    return mngr.restore(step, args=ocp.args.Composite(
        qparams=tree, selected=tree, state=ocp.args.JsonRestore()))


def _reason(e: Exception) -> str:
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return text if len(text) <= 160 else text[:157] + "..."


def _set_aside(workdir: str, step: int) -> str:
  """Move an unreadable step out of orbax's way (kept for inspection) -> its new path."""
  dest = os.path.join(os.path.abspath(workdir), UNREADABLE, str(step))
  k = 0
  while os.path.exists(dest if not k else f"{dest}.{k}"):
    k += 1
  dest = dest if not k else f"{dest}.{k}"
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  os.rename(os.path.join(_dir(workdir), str(step)), dest)
  return dest


def newest_readable(workdir: str):
  """The newest step that reads back, or None. Newer unreadable steps are moved
  to WORKDIR/checkpoints.unreadable/ with a warning that says what is used instead."""
  found = steps(workdir)
  for step in reversed(found):
    problem = _damage(os.path.join(_dir(workdir), str(step)))
    if problem == "":  # written before manifests: ask orbax to read it
      try:
        _read(workdir, step)
        problem = None
      except Exception as e:  # noqa: BLE001  any failure to read means a damaged step
        problem = _reason(e)
    if problem is None:
      return step
    dest = _set_aside(workdir, step)
    older = [s for s in found if s < step]
    warnings.warn(
        f"search checkpoint {step} in {_dir(workdir)!r} is unreadable ({problem}); moved it to "
        f"{dest!r} and " + (f"falling back to checkpoint {older[-1]}." if older
                            else "starting the search from the beginning."), stacklevel=2)
  return None


def restore(workdir: str, like_qparams):
  """-> (qparams, selected qparams, state) of the newest readable checkpoint, or None."""
  step = newest_readable(workdir)
  if step is None:
    return None
  try:
    out = _read(workdir, step, like_qparams)
  except Exception as e:  # noqa: BLE001  it read without a template: the run differs
    raise ValueError(
        f"search checkpoint {step} in {_dir(workdir)!r} does not fit this run's quantization "
        f"parameters ({_reason(e)}): it was made by another model or setting. Resume with "
        "that run's config, or start over with --overwrite.") from None
  return out["qparams"], out["selected"], dict(out["state"])
