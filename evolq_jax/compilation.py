"""A run's compile counts: what a piece of work compiled, traced and read back from
JAX's persistent cache (cache.py), from JAX's monitoring events, for summary.json.
"""
from __future__ import annotations

import threading

from jax import monitoring

_COMPILE = "/jax/core/compile/backend_compile_duration"  # a compile, or a cache read
_TRACE = ("/jax/core/compile/jaxpr_trace_duration",
          "/jax/core/compile/jaxpr_to_mlir_module_duration")
_HIT = "/jax/compilation_cache/cache_hits"


class CompileLog:
  """Counts compiles while open (a context manager):

    with CompileLog() as log:
      ...
    log.summary() -> {"compilations", "compile_seconds", "cache_hits", "trace_seconds"}

  compilations: XLA programs built (cache reads excluded); compile_seconds: the
  time in XLA's compiler and in reading cached programs; cache_hits: programs
  read from the persistent cache; trace_seconds: Python tracing and lowering.
  Logs of other threads' work count too (JAX's events are process-wide)."""

  _lock = threading.Lock()
  _open: list = []
  _registered = False

  def __init__(self):
    self.programs = 0
    self.cache_hits = 0
    self.compile_seconds = 0.0
    self.trace_seconds = 0.0
    self.by_name: dict = {}  # "jit(fn)" -> programs built or read for it

  @classmethod
  def _register(cls):
    with cls._lock:
      if cls._registered:
        return
      monitoring.register_event_duration_secs_listener(cls._on_duration)
      monitoring.register_event_listener(cls._on_event)
      cls._registered = True

  @classmethod
  def _on_duration(cls, event, seconds, fun_name="?", **_):
    for log in cls._open:
      if event == _COMPILE:
        log.programs += 1
        log.compile_seconds += seconds
        log.by_name[fun_name] = log.by_name.get(fun_name, 0) + 1
      elif event in _TRACE:
        log.trace_seconds += seconds

  @classmethod
  def _on_event(cls, event, **_):
    if event == _HIT:
      for log in cls._open:
        log.cache_hits += 1

  def __enter__(self):
    self._register()
    with self._lock:
      CompileLog._open = [*CompileLog._open, self]
    return self

  def __exit__(self, *exc):
    with self._lock:
      CompileLog._open = [log for log in CompileLog._open if log is not self]
    return False

  def summary(self) -> dict:
    return {"compilations": self.programs - self.cache_hits,
            "cache_hits": self.cache_hits,
            "compile_seconds": round(self.compile_seconds, 2),
            "trace_seconds": round(self.trace_seconds, 2)}
