"""IDX files (the MNIST / Fashion-MNIST format), plain or gzipped.

A folder holds the four files train-images-idx3-ubyte[.gz],
train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz],
t10k-labels-idx1-ubyte[.gz]; any dataset in that layout loads unchanged.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SPLIT_PREFIX = {"train": "train", "test": "t10k", "holdout": "holdout"}  # holdout: bundled only
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
  """One IDX file -> array with the shape its header declares."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a truncated or corrupt gzip stream
    raise ValueError(f"{path} is truncated or corrupt ({str(e) or type(e).__name__}): copy "
                     "or download it again.") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r}).")
  ndim = raw[3]
  if ndim == 0 or len(raw) < 4 + 4 * ndim:
    raise ValueError(f"{path} is not an IDX file: magic number {raw[:4]!r} declares "
                     f"{ndim} dimensions but the header is truncated or empty.")
  shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
  data = np.frombuffer(raw, dtype=_DTYPES[raw[2]], offset=4 + 4 * ndim)
  if data.size != int(np.prod(shape)):
    raise ValueError(f"{path}: header says shape {shape} but holds {data.size} values.")
  return data.reshape(shape)


def _find(folder: str, stem: str) -> str:
  for name in (stem + ".gz", stem):
    if os.path.exists(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise FileNotFoundError(
      f"{stem}[.gz] not found in {folder!r}. Point data.dir at a folder holding the "
      "four IDX files (train-/t10k- images-idx3-ubyte, labels-idx1-ubyte), or install "
      "Fashion-MNIST with `apt-get install dataset-fashion-mnist`.")


def load_idx_split(folder: str = FASHION_MNIST_DIR, split: str = "train"):
  """-> (images uint8 (N, H, W, 1), labels int32 (N,))."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(
        f"data folder {folder!r} does not exist. Pass an existing folder of IDX files, "
        "or install Fashion-MNIST with `apt-get install dataset-fashion-mnist`.")
  if split not in SPLIT_PREFIX:
    raise ValueError(f"split={split!r} is unknown: expected one of {tuple(SPLIT_PREFIX)}.")
  prefix = SPLIT_PREFIX[split]
  if split == "holdout" and not any(os.path.exists(os.path.join(folder, f"holdout-{k}"))
                                    for k in ("images-idx3-ubyte", "images-idx3-ubyte.gz")):
    raise FileNotFoundError(
        f"{folder!r} has no 'holdout' split: only the bundled subset ships one. Elsewhere "
        "set holdout.num_images=N and the pipeline takes N train images after the "
        "calibration set.")
  images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
  labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
  if images.ndim not in (3, 4) or labels.ndim != 1:
    raise ValueError(
        f"{folder}: {split} images have shape {images.shape} (expected N x H x W [x C]) "
        f"and labels shape {labels.shape} (expected N); are the files swapped?")
  labels = labels.astype(np.int32)
  if images.ndim == 3:
    images = images[..., None]
  if len(images) != len(labels):
    raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels in {split}.")
  return images, labels
