"""Where images come from: IDX folders, the bundled subset, image folders, tfds.

Every source yields (images float32 NHWC normalized for the model, labels
int32). `data` is a ConfigDict / mapping with `source` and source options:
  idx:          dir (four IDX files; Fashion-MNIST's Debian path by default)
  bundled:      no options (ships with the package: 1,000 train + 2,000 holdout
                train images + 10,000 test)
  image_folder: dir, with one sub-folder per split holding one folder per class
  tfds:         name (e.g. imagenet2012), data_dir, split names
  cifar10:      dir = path of cifar10_jpeg.tar.gz (default: ../shared/data beside the
                repo); decoded once into a uint8 cache outside the repo
and optionally `limit` (keep the first N after an optional seeded shuffle).
"""
from __future__ import annotations

import os

import numpy as np

from evolq_jax.data.cifar10 import load_cifar10
from evolq_jax.data.idx import FASHION_MNIST_DIR, load_idx_split
from evolq_jax.data.transforms import normalize, preprocess_pil

BUNDLED_DIR = os.path.join(os.path.dirname(__file__), "bundled")
SOURCES = ("idx", "bundled", "image_folder", "tfds", "cifar10")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # matched case-insensitively


def _get(cfg, key, default=None):
  return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def _select(n, limit, seed):
  """Indices kept out of n: the first `limit` of a seeded permutation (or of 0..n-1)."""
  order = np.random.default_rng(seed).permutation(n) if seed is not None else np.arange(n)
  return order if limit is None else order[:limit]


def _from_uint8(images, labels, model_cfg, source, limit, seed):
  if images.dtype != np.uint8:
    raise ValueError(f"{source} images are {images.dtype}, expected uint8 pixels (0..255).")
  want = (model_cfg.img_size, model_cfg.img_size, model_cfg.in_chans)
  if images.shape[1:] != want:
    raise ValueError(
        f"{source} images have shape {images.shape[1:]} but model {model_cfg.name!r} "
        f"expects {want}. Use a source that resizes (image_folder, tfds) or a model "
        "preset for this image size.")
  t = model_cfg.transform
  keep = _select(len(images), limit, seed)
  return normalize(images[keep], t["mean"], t["std"]), labels[keep]


def _image_folder(folder, split, model_cfg, limit, seed):
  from PIL import Image
  root = os.path.join(folder, split)
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f"image folder {root!r} does not exist: expected DIR/{split}/<class>/<image> "
        "(ImageNet layout). Set data.dir to the folder that holds the split folders.")
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not classes:
    raise FileNotFoundError(f"image folder {root!r} has no class sub-folders.")
  paths, labels = [], []
  for label, cls in enumerate(classes):
    for name in sorted(os.listdir(os.path.join(root, cls))):
      if name.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.path.join(root, cls, name))
        labels.append(label)
  if not paths:
    raise FileNotFoundError(f"image folder {root!r} holds no images ({IMAGE_EXTENSIONS}).")
  keep = _select(len(paths), limit, seed)  # decode only the images kept
  images = np.empty((len(keep), model_cfg.img_size, model_cfg.img_size, model_cfg.in_chans),
                    np.float32)
  for j, i in enumerate(keep):
    with Image.open(paths[i]) as img:
      images[j] = preprocess_pil(img, model_cfg)
  return images, np.asarray(labels, np.int32)[keep]


def _tfds(cfg, split, model_cfg, limit, seed):
  """Reads only the records kept (see _select) through tfds.data_source.

  The dataset must be prepared in array_record format; no TensorFlow is needed
  (tfds decodes the images with PIL / OpenCV).
  """
  import tensorflow_datasets as tfds
  from PIL import Image
  name = _get(cfg, "name", "imagenet2012")
  splits = {"train": _get(cfg, "train_split", "train"),
            "test": _get(cfg, "test_split", "validation")}
  if split not in splits:
    raise ValueError(f"split={split!r} is unknown: expected one of {tuple(splits)}.")
  src = tfds.data_source(name, split=splits[split], data_dir=_get(cfg, "data_dir") or None)
  order = _select(len(src), limit, seed)
  images = np.empty((len(order), model_cfg.img_size, model_cfg.img_size, model_cfg.in_chans),
                    np.float32)
  labels = np.empty((len(order),), np.int32)
  for j, i in enumerate(order):
    rec = src[int(i)]
    img = np.asarray(rec["image"])
    if img.dtype != np.uint8:
      raise ValueError(f"tfds {name!r} images are {img.dtype}, expected uint8.")
    img = Image.fromarray(img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img)
    images[j] = preprocess_pil(img, model_cfg)
    labels[j] = int(rec["label"])
  return images, labels


def load_split(data, split: str, model_cfg, limit: int | None = None, seed: int | None = None):
  """-> (images float32 (N, H, W, C), labels int32 (N,)).

  `seed` shuffles before `limit` is applied (e.g. a random calibration set).
  """
  source = _get(data, "source", "bundled")
  limit = limit if limit is not None else (_get(data, "limit") or None)  # 0 = all
  # Every source applies seed/limit (_select) before decoding/normalizing, so a
  # small calibration subset of a large dataset only decodes what it keeps.
  if source == "idx":
    return _from_uint8(*load_idx_split(_get(data, "dir") or FASHION_MNIST_DIR, split),
                       model_cfg, "IDX", limit, seed)
  if source == "bundled":
    return _from_uint8(*load_idx_split(BUNDLED_DIR, split), model_cfg, "bundled", limit, seed)
  if source == "image_folder":
    if not _get(data, "dir"):
      raise ValueError("data.source='image_folder' needs data.dir (a folder with split folders).")
    folder_split = _get(data, f"{split}_split") or split  # e.g. test_split="val"
    return _image_folder(_get(data, "dir"), folder_split, model_cfg, limit, seed)
  if source == "tfds":
    return _tfds(data, split, model_cfg, limit, seed)
  if source == "cifar10":
    return _from_uint8(*load_cifar10(split, _get(data, "dir") or ""), model_cfg, "CIFAR-10",
                       limit, seed)
  raise ValueError(f"data.source={source!r} is unknown: expected one of {SOURCES}.")
