"""CIFAR-10 from the JPEG tar (`train/<class>/<n>.jpg`, `test/<class>/<n>.jpg`).

The tar is decoded once into a uint8 cache outside the repo
(`$XDG_CACHE_HOME/evolq_jax/cifar10/`, default `~/.cache/...`), so later runs
read two `.npz` files instead of 60,000 JPEGs. Class index = position of the
class folder in sorted order (the original CIFAR-10 order).
"""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np

TAR_NAME = "cifar10_jpeg.tar.gz"
SPLITS = ("train", "test")
# The project's shared data folder sits beside the repository (../shared/data).
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_tar() -> str:
  """$EVOLQ_SHARED_DATA/<tar>, else ../shared/data/<tar> beside the repo or the cwd."""
  candidates = [os.path.join(d, TAR_NAME) for d in (
      os.environ.get("EVOLQ_SHARED_DATA", ""),
      os.path.join(_REPO_ROOT, "..", "shared", "data"),
      os.path.join(os.getcwd(), "..", "shared", "data"))
      if d]
  return next((p for p in candidates if os.path.exists(p)), candidates[-1])


def cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "evolq_jax", "cifar10")


def _decode_tar(path: str) -> dict:
  """-> {split: (images uint8 (N, 32, 32, 3), labels int32 (N,))}, in sorted member order."""
  from PIL import Image
  members = {s: [] for s in SPLITS}
  try:
    with tarfile.open(path, "r:*") as tar:
      for m in tar:
        parts = m.name.strip("./").split("/")
        if m.isfile() and len(parts) >= 3 and parts[-3] in SPLITS:
          members[parts[-3]].append((parts[-2], parts[-1], tar.extractfile(m).read()))
  except (tarfile.TarError, EOFError, OSError) as e:
    raise ValueError(f"CIFAR-10 tar {path!r} is unreadable ({e}): copy "
                     f"{TAR_NAME} again (../shared/data/README.md).") from None
  out = {}
  for split, items in members.items():
    classes = sorted({c for c, _, _ in items})
    if len(classes) != 10:
      raise ValueError(f"CIFAR-10 tar {path!r}: split {split!r} has {len(classes)} class "
                       f"folders, expected 10 (layout {split}/<class>/<image>.jpg).")
    items.sort(key=lambda t: (t[0], t[1]))
    images = np.empty((len(items), 32, 32, 3), np.uint8)
    for i, (cls, name, raw) in enumerate(items):
      try:
        with Image.open(io.BytesIO(raw)) as img:
          images[i] = np.asarray(img.convert("RGB"), np.uint8)
      except (OSError, ValueError) as e:
        raise ValueError(f"CIFAR-10 tar {path!r}: {split}/{cls}/{name} does not decode "
                         f"({e}); copy {TAR_NAME} again.") from None
    labels = np.asarray([classes.index(c) for c, _, _ in items], np.int32)
    out[split] = (images, labels)
  return out


def load_cifar10(split: str, tar_path: str = "") -> tuple[np.ndarray, np.ndarray]:
  """-> (uint8 (N, 32, 32, 3), int32 (N,)) for split 'train' (50,000) or 'test' (10,000)."""
  if split not in SPLITS:
    raise ValueError(f"CIFAR-10 split {split!r} is unknown: expected one of {SPLITS}.")
  tar_path = tar_path or default_tar()
  if not os.path.exists(tar_path):
    raise FileNotFoundError(
        f"CIFAR-10 not found at {tar_path!r}: the project reads {TAR_NAME} from "
        "../shared/data beside the repository; set data.dir to the tar's path or "
        "EVOLQ_SHARED_DATA to its folder.")
  stamp = f"{os.path.getsize(tar_path)}"  # a different tar gets its own cache
  cached = os.path.join(cache_dir(), f"{split}-{stamp}.npz")
  if not os.path.exists(cached):
    decoded = _decode_tar(tar_path)
    os.makedirs(cache_dir(), exist_ok=True)
    for s, (x, y) in decoded.items():
      dest = os.path.join(cache_dir(), f"{s}-{stamp}.npz")
      tmp = dest + f".tmp{os.getpid()}.npz"
      np.savez(tmp, images=x, labels=y)
      os.replace(tmp, dest)  # atomic: a killed run never leaves half a cache
    return decoded[split]
  try:
    with np.load(cached) as f:
      return f["images"], f["labels"]
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"CIFAR-10 cache {cached!r} is corrupt ({e}): delete it and rerun "
                     "(it is rebuilt from the tar).") from None
