"""The 1,000-image ImageNet sample (`imagenet_sample_256.tar.gz`: one image per
class, `imagenet_sample/val/<wnid>/<wnid>_<name>.JPEG`) as an image folder
with a seeded, disjoint split of its images:

  train  the calibration side (calibration images, then an optional held-out
         part that may pick among search passes);
  test   the evaluation images, which never choose anything.

The tar is unpacked once into a cache folder outside the repo
(`$XDG_CACHE_HOME/evolq_jax/imagenet_sample/`, default `~/.cache/...`). A split
is a folder of symlinks, `train/<wnid>/` and `test/<wnid>/`, each holding every
class folder (empty where the class's image went to the other split), and a
`classes.txt` of all 1,000 wnids in sorted order, so the image-folder source's
label stays the ILSVRC-2012 class index. The image-folder source then decodes and
preprocesses the images for each model.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile

import numpy as np

TAR_NAME = "imagenet_sample_256.tar.gz"
SPLIT_SEED = 0     # fixed: the split is part of the data, not of a run's seed
TEST_IMAGES = 500  # 500 / 500: about +-2.8 top-1 points of 95% interval at 89% on each side
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def default_tar() -> str:
  """$EVOLQ_SHARED_DATA/<tar>, else ../shared/data/<tar> beside the repo or the cwd."""
  candidates = [os.path.join(d, TAR_NAME) for d in (
      os.environ.get("EVOLQ_SHARED_DATA", ""),
      os.path.join(_REPO_ROOT, "..", "shared", "data"),
      os.path.join(os.getcwd(), "..", "shared", "data")) if d]
  return next((p for p in candidates if os.path.exists(p)), candidates[-1])


def cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "evolq_jax", "imagenet_sample")


def _publish(tmp: str, dest: str) -> str:
  """Move a finished folder into place; a concurrent run that got there first wins."""
  try:
    os.rename(tmp, dest)
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.isdir(dest):
      raise
  return dest


def unpack(tar_path: str) -> str:
  """Unpack the tar once into the cache; -> the unpacked folder."""
  if not os.path.exists(tar_path):
    raise FileNotFoundError(
        f"ImageNet sample not found at {tar_path!r}: the project reads {TAR_NAME} from "
        "../shared/data beside the repository; set data.dir to the tar's path (or to the "
        "unpacked folder), or EVOLQ_SHARED_DATA to the tar's folder.")
  dest = os.path.join(cache_dir(), f"unpacked-{os.path.getsize(tar_path)}")
  if os.path.isdir(dest):
    return dest
  os.makedirs(cache_dir(), exist_ok=True)
  tmp = f"{dest}.tmp{os.getpid()}"
  try:
    with tarfile.open(tar_path, "r:*") as tar:
      tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
  except (tarfile.TarError, EOFError, OSError) as e:
    shutil.rmtree(tmp, ignore_errors=True)
    raise ValueError(f"ImageNet sample tar {tar_path!r} is unreadable ({e}): copy {TAR_NAME} "
                     "again (../shared/data/README.md).") from None
  return _publish(tmp, dest)


def class_root(path: str = "") -> str:
  """The folder of <wnid>/ class folders, from the tar, the unpacked folder or itself."""
  path = path or default_tar()
  folder = unpack(path) if not os.path.isdir(path) else path
  for sub in (os.path.join("imagenet_sample", "val"), "val", ""):
    root = os.path.join(folder, sub)
    if os.path.isdir(root) and any(re.fullmatch(r"n\d{8}", d) and
                                   os.path.isdir(os.path.join(root, d)) for d in os.listdir(root)):
      return root
  raise FileNotFoundError(f"{folder!r} holds no ImageNet class folders (<wnid>/<image>): "
                          "expected the unpacked sample, imagenet_sample/val/<wnid>/.")


def split_images(files: list, seed: int = SPLIT_SEED, n_test: int = TEST_IMAGES):
  """A seeded, disjoint split of sorted relative image paths -> (train, test)."""
  if not 0 < n_test < len(files):
    raise ValueError(f"{n_test} test images cannot be split off {len(files)} images: expected "
                     "0 < test images < images.")
  order = np.random.default_rng(seed).permutation(len(files))
  files = sorted(files)
  return sorted(files[i] for i in order[n_test:]), sorted(files[i] for i in order[:n_test])


def split_dir(path: str = "", seed: int = SPLIT_SEED, n_test: int = TEST_IMAGES) -> str:
  """-> a folder with train/<wnid>/ and test/<wnid>/ (symlinks), made once."""
  root = os.path.abspath(class_root(path))
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  files = [os.path.join(c, f) for c in classes for f in os.listdir(os.path.join(root, c))
           if f.lower().endswith(_IMAGE_EXTENSIONS)]
  key = hashlib.sha1(f"{root}|{len(files)}".encode()).hexdigest()[:12]
  dest = os.path.join(cache_dir(), f"split-{key}-seed{seed}-test{n_test}")
  if os.path.isdir(dest):
    return dest
  train, test = split_images(files, seed, n_test)
  tmp = f"{dest}.tmp{os.getpid()}"
  os.makedirs(tmp)
  with open(os.path.join(tmp, "classes.txt"), "w") as f:  # label order, stated explicitly
    f.writelines(c + "\n" for c in classes)
  for split, chosen in (("train", train), ("test", test)):
    for c in classes:  # every class folder in both splits keeps the labels
      os.makedirs(os.path.join(tmp, split, c), exist_ok=True)
    for f in chosen:
      os.symlink(os.path.join(root, f), os.path.join(tmp, split, f))
  return _publish(tmp, dest)
