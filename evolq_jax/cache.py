"""What runs keep between them, in a user cache folder: JAX's persistent compilation
cache and the full-precision logits of calibration sets.

Users re-run searches all day (other bits, seeds, strategies). Without a
cache every run compiles the same programs again and recomputes the same FP
reference logits. Both caches are on by default:

  EVOLQ_CACHE unset   ~/.cache/evolq_jax (or $XDG_CACHE_HOME/evolq_jax): xla/, fp_logits/
  EVOLQ_CACHE=DIR     DIR/xla, DIR/fp_logits
  EVOLQ_CACHE=off     neither (the CLI's --no-cache)

A compilation cache folder the user already gave JAX (jax_compilation_cache_dir,
JAX_COMPILATION_CACHE_DIR) is kept.
"""
from __future__ import annotations

import hashlib
import io
import os

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

from evolq_jax.workdir import write_atomic

ENV = "EVOLQ_CACHE"
OFF = ("off", "0", "false", "no", "none")
# Every program is kept: JAX's default (only those compiling for 1 s or more) leaves
# out the many small ones, which together take most of a small model's compile time.
MIN_COMPILE_SECONDS = 0.0
MAX_XLA_BYTES = 4 * 2 ** 30  # LRU-evicted past this


def root() -> str | None:
  """The cache folder (None: caching is off)."""
  value = os.environ.get(ENV, "").strip()
  if value.lower() in OFF:
    return None
  if value:
    return os.path.expanduser(value)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "evolq_jax")


def _folder(name: str) -> str | None:
  top = root()
  if top is None:
    return None
  path = os.path.join(top, name)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise OSError(f"cannot create the cache folder {path!r} ({e.strerror}): set {ENV}=DIR to a "
                  f"writable folder, or {ENV}=off (--no-cache).") from e
  return path


def enable_xla_cache() -> str | None:
  """Turn on JAX's persistent compilation cache (root()/xla). -> the folder in use, or
  None when caching is off. Safe to call more than once; a folder set in JAX's
  config before the first call is kept."""
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  path = _folder("xla")
  if path is None:
    return None
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.config.update("jax_compilation_cache_max_size", MAX_XLA_BYTES)
  # also when this process compiled before (JAX decides once whether it uses a cache)
  compilation_cache.reset_cache()
  compilation_cache.set_cache_dir(path)
  return path


def disable():
  """No cache for this process and the processes it starts (the CLI's --no-cache)."""
  os.environ[ENV] = "off"
  if jax.config.jax_compilation_cache_dir:
    compilation_cache.reset_cache()
    compilation_cache.set_cache_dir(None)


def _digest(cfg, params, images) -> str:
  """The model (its config and every param's bytes) and the images, as one key."""
  h = hashlib.blake2b(digest_size=20)
  h.update(repr(cfg).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    a = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}".encode())
    h.update(np.ascontiguousarray(a).data)
  a = np.asarray(images)
  h.update(f"images:{a.dtype}:{a.shape}".encode())
  h.update(np.ascontiguousarray(a).data)
  return h.hexdigest()


def fp_logits(cfg, params, images, compute):
  """compute() -> the FP logits of `images`, or the ones a run before computed for the
  same model, checkpoint and images (root()/fp_logits/<key>.npy)."""
  folder = _folder("fp_logits")
  if folder is None:
    return compute()
  path = os.path.join(folder, _digest(cfg, params, images) + ".npy")
  if os.path.exists(path):
    try:
      return jax.numpy.asarray(np.load(path))
    except (OSError, ValueError):  # a damaged file: compute it again
      pass
  logits = compute()
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(logits))
  write_atomic(path, buffer.getvalue())
  return logits
