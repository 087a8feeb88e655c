"""A run's folder: one writer at a time, and the identity of the run that made it.

  evolq.lock  held (flock) by the run writing here; it holds that run's pid. The
              kernel drops the hold when the process dies, so a lock left by a
              killed run is taken over, with a warning, and never blocks.
  run.json    the command, the config and the code version that made the folder;
              --resume with a config that changes the result is refused, naming
              the fields, and a new run does not write over another run's
              results unless told to (--overwrite).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
import subprocess
import warnings

LOCK = "evolq.lock"
RUN_FILE = "run.json"
# What a run leaves in its workdir; `evolq export`'s default files count too, so
# that --overwrite never leaves an export of the replaced run behind.
RESULTS = ("summary.json", "history.jsonl", "fitness.png", "qparams.safetensors", "checkpoints",
           "checkpoints.unreadable", "model_int.safetensors", "model_int.json",
           "model_int.stablehlo")
# Settings that change speed or memory, not the result: a resume may change them.
SPEED_ONLY = ("eval.batch_size", "search.chunk", "search.memory_mb", "search.devices")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_writable(workdir: str) -> None:
  """Create `workdir` if needed; a ValueError unless it is a folder this process can write."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir!r} is a file: expected a folder for the run's "
                     "outputs; choose another --workdir.")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-test-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"--workdir {workdir!r} is not a writable folder ({e.strerror or e}): "
                     "choose a folder you can write to.") from None


def _holder(fd: int) -> str:
  os.lseek(fd, 0, os.SEEK_SET)
  return os.read(fd, 400).decode(errors="replace").strip()


class InUse(ValueError):
  """Another process holds the folder's lock."""


@contextlib.contextmanager
def lock(workdir: str):
  """Hold WORKDIR/evolq.lock for the block; InUse (a ValueError) if another process
  holds it."""
  path = os.path.join(workdir, LOCK)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(fd) or "a process"
      os.close(fd)
      raise InUse(f"--workdir {workdir!r} is in use by another evolq run ({holder}): wait "
                  "for it to finish, or choose another --workdir (one run per folder).") \
          from None
    try:  # the last holder may have removed the file between our open and flock
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  stale = _holder(fd)
  if stale:
    warnings.warn(f"took over the lock of {workdir!r} left by {stale}, which no longer runs "
                  "(killed?).", stacklevel=3)
  os.ftruncate(fd, 0)
  os.lseek(fd, 0, os.SEEK_SET)
  os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n".encode())
  try:
    yield
  finally:
    with contextlib.suppress(OSError):
      os.remove(path)
    os.close(fd)


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


def code_version() -> dict:
  """The package version and, in a git checkout, the commit (+ '-dirty')."""
  from importlib.metadata import PackageNotFoundError, version
  try:
    out = {"evolq_jax": version("evolq_jax")}
  except PackageNotFoundError:
    out = {"evolq_jax": "unknown"}
  if os.path.exists(os.path.join(_REPO, ".git")):  # a file in a git worktree
    try:
      git = lambda *a: subprocess.run(["git", "-C", _REPO, *a], capture_output=True,  # noqa: E731
                                      text=True, timeout=20).stdout.strip()
      head = git("rev-parse", "--short", "HEAD")
      dirty = git("status", "--porcelain", "--untracked-files=no", "--", "evolq_jax", "configs")
      out["git"] = head + ("-dirty" if dirty else "") if head else None
    except (OSError, subprocess.SubprocessError):
      out["git"] = None
  return out


def flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def differences(old: dict, new: dict) -> list:
  """'field (old -> new)' for each result-changing config field that differs. A field
  the recorded run lacks is not compared: a version without it made the run, and the
  run continues with the field's current value (its default unless set)."""
  a, b = flatten(old), flatten(new)
  return [f"{k} ({a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r})"
          for k in sorted(a) if k not in SPEED_ONLY and a.get(k) != b.get(k)]


def results(workdir: str) -> list:
  """The names in RESULTS that `workdir` holds (an empty checkpoints folder does not count)."""
  found = []
  for name in RESULTS:
    path = os.path.join(workdir, name)
    if os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path)):
      found.append(name)
  return found


def read_run(workdir: str):
  """run.json as a dict, or None where there is none."""
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path!r} is unreadable ({e}): pass --overwrite to start over in "
                     f"{workdir!r}, or choose another --workdir.") from None


def write_atomic(path: str, data) -> str:
  """Write bytes or text to `path` through a temporary file and a rename: a
  reader (or a killed run) never sees half a file. The one writer of the
  package's result files. -> path."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)
  os.replace(tmp, path)
  return path


def write_json(path: str, obj, indent: int = 2) -> str:
  """`obj` as JSON, atomically (write_atomic); the same object writes the same bytes."""
  return write_atomic(path, json.dumps(obj, indent=indent))


def _describe(run) -> str:
  if not run:
    return "an earlier run"
  c = run.get("config", {})
  q = c.get("quant", {})
  return (f"an `evolq {run.get('command', '?')}` run of {c.get('model', '?')} at "
          f"W{q.get('w_bits', '?')}A{q.get('a_bits', '?')}, started {run.get('started', '?')}")


def _check_resume(workdir: str, run, command: str, config: dict, found: list) -> None:
  if run is None:
    if not found:  # a mistyped --workdir must not start a fresh run in silence
      raise ValueError(f"--resume: {workdir!r} holds no run to continue (no {RUN_FILE}, no "
                       "results): check --workdir, or drop --resume to start a new run there.")
    else:
      warnings.warn(f"{workdir!r} has no {RUN_FILE} (made by an older evolq): --resume cannot "
                    "check that this config is the run's own.", stacklevel=4)
    return
  if run.get("command") != command:
    raise ValueError(f"--resume: {workdir!r} holds {_describe(run)}, not an `evolq {command}` "
                     "run. Choose another --workdir, or pass --overwrite instead of --resume.")
  diffs = differences(run.get("config", {}), config)
  if diffs:
    raise ValueError(f"--resume would mix two runs: this config differs from the one that "
                     f"made {workdir!r} in {', '.join(diffs)}. Resume with that run's settings "
                     f"(see {os.path.join(workdir, RUN_FILE)}), or start the new run in another "
                     "--workdir (or replace the old one with --overwrite).")
  if run.get("code") != code_version():
    warnings.warn(f"{workdir!r} was made by code {run.get('code')} and is resumed by "
                  f"{code_version()}: the result may differ from an uninterrupted run.",
                  stacklevel=4)


@contextlib.contextmanager
def held(workdir: str):
  """`workdir` made if needed, checked writable, and locked for the block: how
  every command that writes a run folder holds it (open_run adds run.json)."""
  check_writable(workdir)
  with lock(workdir):
    yield


@contextlib.contextmanager
def open_run(workdir: str, command: str, config: dict, resume: bool = False,
             overwrite: bool = False):
  """Check and lock `workdir` for a run, record it (run.json), and hold the lock
  for the block. Refuses another run's results unless `overwrite` (which removes
  them) and, on `resume`, a config that differs from the run's own."""
  if resume and overwrite:
    raise ValueError("--resume continues the run in --workdir and --overwrite replaces it: "
                     "pass one of them.")
  with held(workdir):
    run = None if overwrite else read_run(workdir)  # --overwrite: even an unreadable one goes
    found = results(workdir)
    if resume:
      _check_resume(workdir, run, command, config, found)
    elif found and not overwrite:
      raise ValueError(
          f"--workdir {workdir!r} holds the results of {_describe(run)} ({', '.join(found)}): "
          + ("pass --resume to continue it, " if command == "search" else "")
          + "pass --overwrite to replace them, or choose another --workdir.")
    elif found:
      for name in found:
        path = os.path.join(workdir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if not resume or run is None:
      write_json(os.path.join(workdir, RUN_FILE),
                  {"command": command, "config": config, "code": code_version(),
                   "started": _now()})
    yield
