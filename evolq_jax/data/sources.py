"""Where images come from: IDX folders, the bundled subset, image folders, tfds.

Every source yields (images float32 NHWC normalized for the model, labels
int32). `data` is a ConfigDict / mapping with `source` and source options:
  idx:          dir (four IDX files; Fashion-MNIST's Debian path by default)
  bundled:      no options (ships with the package: 1,000 train + 2,000 holdout
                train images + 10,000 test)
  image_folder: dir, with one sub-folder per split holding one folder per class;
                labels follow one class list for every split: `classes` (a list,
                or a text file with one name per line), else DIR/classes.txt, else
                the train split's class folders in sorted order
  tfds:         name (e.g. imagenet2012), data_dir, split names; read only where
                prepared (array_record), never downloaded
  cifar10:      dir = path of cifar10_jpeg.tar.gz (default: ../shared/data beside the
                repo); decoded once into a uint8 cache outside the repo
  imagenet_sample: dir = imagenet_sample_256.tar.gz or its unpacked folder (default:
                ../shared/data); a seeded 500/500 train/test split (imagenet_sample.py)
and optionally `limit` (keep the first N after an optional seeded shuffle).
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from evolq_jax.data.cifar10 import load_cifar10
from evolq_jax.data.idx import FASHION_MNIST_DIR, load_idx_split
from evolq_jax.data.imagenet_sample import split_dir as imagenet_sample_dir
from evolq_jax.data.transforms import normalize, preprocess_pil

BUNDLED_DIR = os.path.join(os.path.dirname(__file__), "bundled")
SOURCES = ("idx", "bundled", "image_folder", "tfds", "cifar10", "imagenet_sample")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # matched case-insensitively
CLASS_FILE = "classes.txt"  # an image folder's explicit class list, one name per line
# Sources whose splits are stored class by class: their first N images would be
# the first classes only, so an unseeded `limit` draws a fixed random subset.
CLASS_ORDERED = ("image_folder", "cifar10", "imagenet_sample")
SUBSET_SEED = 0


class SplitTooSmall(ValueError):
  """A split holds fewer images (`available`) than a run asked for."""

  def __init__(self, message: str, available: int):
    super().__init__(message)
    self.available = available


def _get(cfg, key, default=None):
  return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def _select(n, limit, seed, exact=False, where="the split"):
  """Indices kept out of n: the first `limit` of a seeded permutation (or of 0..n-1).

  exact: a limit above n is an error (raised before anything is decoded)."""
  if exact and limit is not None and limit > n:
    raise SplitTooSmall(f"{where} has {n} images, fewer than the {limit} asked for.", n)
  order = np.random.default_rng(seed).permutation(n) if seed is not None else np.arange(n)
  return order if limit is None else order[:limit]


def _from_uint8(images, labels, model_cfg, source, limit, seed, exact=False):
  if images.dtype != np.uint8:
    raise ValueError(f"{source} images are {images.dtype}, expected uint8 pixels (0..255).")
  want = (model_cfg.img_size, model_cfg.img_size, model_cfg.in_chans)
  if images.shape[1:] != want:
    raise ValueError(
        f"{source} images have shape {images.shape[1:]} but model {model_cfg.name!r} "
        f"expects {want}. Use a source that resizes (image_folder, tfds) or a model "
        "preset for this image size.")
  t = model_cfg.transform
  keep = _select(len(images), limit, seed, exact, f"the {source} split")
  return normalize(images[keep], t["mean"], t["std"]), labels[keep]


def _names(items, most=8) -> str:
  return ", ".join(items[:most]) + (f", ... ({len(items)} in all)" if len(items) > most else "")


def _class_folders(root) -> list:
  return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def _read_class_file(path) -> list:
  try:
    with open(path) as f:
      return [line.strip() for line in f if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"class list {path!r} is unreadable ({e}): expected a text file with "
                     "one class folder name per line, in label order.") from None


def class_list(folder, data=None) -> tuple[list, str]:
  """An image folder's classes in label order, and where they came from: the
  config's `classes`, else FOLDER/classes.txt, else the train split's folders."""
  given = _get(data, "classes") if data is not None else None
  if given:
    names, origin = ((_read_class_file(given), given) if isinstance(given, str)
                     else ([str(c) for c in given], "data.classes"))
  elif os.path.isfile(os.path.join(folder, CLASS_FILE)):
    origin = os.path.join(folder, CLASS_FILE)
    names = _read_class_file(origin)
  else:
    train = os.path.join(folder, (_get(data, "train_split") if data is not None else None)
                         or "train")
    if not os.path.isdir(train):
      raise FileNotFoundError(
          f"image folder {folder!r} has no train split {train!r} to number the classes by: "
          f"add it, or list the classes in {os.path.join(folder, CLASS_FILE)} (one folder "
          "name per line, in label order).")
    names, origin = _class_folders(train), f"the train split's folders in {train!r}"
  if not names:
    raise FileNotFoundError(f"{origin} lists no classes: expected one folder per class.")
  doubles = sorted({c for c in names if names.count(c) > 1})
  if doubles:
    raise ValueError(f"{origin} names {_names(doubles)} more than once: each class once.")
  return names, origin


def _image_folder(folder, split, model_cfg, limit, seed, data=None, exact=False, field=None):
  """field: the config field that named `split` (its error says which to change)."""
  from PIL import Image
  root = os.path.join(folder, split)
  if not os.path.isdir(root):
    where = "set data.dir to the folder that holds the split folders."
    hint = (f"{field}={split!r} names this split's folder (defaults: data.train_split='train', "
            f"data.test_split='validation'): set it to the folder you have (e.g. --set "
            f"{field}=val), or {where}" if field else where.capitalize())
    raise FileNotFoundError(f"image folder {root!r} does not exist: expected "
                            f"DIR/{split}/<class>/<image> (ImageNet layout). {hint}")
  present = _class_folders(root)
  if not present:
    raise FileNotFoundError(f"image folder {root!r} has no class sub-folders.")
  classes, origin = class_list(folder, data)
  extra = sorted(set(present) - set(classes))
  if extra:
    raise ValueError(
        f"image folder {root!r} has {len(extra)} class folder(s) missing from the class list "
        f"({origin}): {_names(extra)}; their images would have no label. Remove them, or "
        f"list every class in {os.path.join(folder, CLASS_FILE)} (one per line, label order).")
  missing = [c for c in classes if c not in present]
  if missing:  # labels stay right (one class list); the split just lacks some classes
    warnings.warn(f"image folder {root!r} lacks {len(missing)} of the {len(classes)} classes "
                  f"of {origin}: {_names(missing)}.", stacklevel=3)
  label_of = {c: i for i, c in enumerate(classes)}
  paths, labels = [], []
  for cls in present:
    for name in sorted(os.listdir(os.path.join(root, cls))):
      if name.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.path.join(root, cls, name))
        labels.append(label_of[cls])
  if not paths:
    raise FileNotFoundError(f"image folder {root!r} holds no images ({IMAGE_EXTENSIONS}).")
  keep = _select(len(paths), limit, seed, exact, f"image folder {root!r}")  # decode only these
  images = np.empty((len(keep), model_cfg.img_size, model_cfg.img_size, model_cfg.in_chans),
                    np.float32)
  for j, i in enumerate(keep):
    try:
      with Image.open(paths[i]) as img:
        images[j] = preprocess_pil(img, model_cfg)
    except (OSError, ValueError, SyntaxError) as e:  # PIL: truncated, unidentified, bad header
      raise ValueError(f"image {paths[i]!r} does not decode ({e}): replace it, or delete it "
                       "from the folder.") from None
  return images, np.asarray(labels, np.int32)[keep]


def _tfds_builder(cfg):
  """The prepared dataset's builder; never downloads (FileNotFoundError if unprepared)."""
  import tensorflow_datasets as tfds
  name, data_dir = _get(cfg, "name", "imagenet2012"), _get(cfg, "data_dir") or None
  how = (f"tfds dataset {name!r} is not prepared in "
         f"{data_dir or 'tfds default folder (~/tensorflow_datasets or $TFDS_DATA_DIR)'!r}: "
         "nothing is downloaded at run time. Prepare it once, where there is network, with "
         f"`tfds build {name} --data_dir DIR --file_format array_record` (imagenet2012: put "
         "its tar files in DIR/downloads/manual first), then --set data.data_dir=DIR.")
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError:
    raise FileNotFoundError(how) from None
  if not builder.is_prepared():
    raise FileNotFoundError(how)
  return builder


def _tfds(cfg, split, model_cfg, limit, seed, exact=False):
  """Reads only the records kept (see _select) through the builder's data source.

  The dataset must be prepared in array_record format; no TensorFlow is needed
  (tfds decodes the images with PIL / OpenCV).
  """
  from PIL import Image
  name = _get(cfg, "name", "imagenet2012")
  splits = {"train": _get(cfg, "train_split", "train"),
            "test": _get(cfg, "test_split", "validation")}
  if split not in splits:
    raise ValueError(f"split={split!r} is unknown: expected one of {tuple(splits)}.")
  builder = _tfds_builder(cfg)
  try:
    src = builder.as_data_source(split=splits[split])
  except NotImplementedError:
    raise ValueError(f"tfds dataset {name!r} in {builder.data_dir!r} is prepared as "
                     f"{builder.info.file_format}, which has no random access: prepare it "
                     "again with --file_format array_record.") from None
  order = _select(len(src), limit, seed, exact, f"tfds {name!r} split {splits[split]!r}")
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


def class_count(data) -> int | None:
  """How many classes the source numbers (image folders, tfds); None where only
  the labels tell (IDX, bundled, CIFAR-10)."""
  source = _get(data, "source", "bundled")
  if source == "image_folder" and _get(data, "dir"):
    return len(class_list(_get(data, "dir"), data)[0])
  if source == "imagenet_sample":
    return len(class_list(imagenet_sample_dir(_get(data, "dir") or ""), data)[0])
  if source == "tfds":
    features = _tfds_builder(data).info.features
    if "image" not in features or "label" not in features:
      raise ValueError(f"tfds dataset {_get(data, 'name')!r} has features {sorted(features)}: "
                       "expected 'image' and 'label' (an image classification dataset).")
    return getattr(features["label"], "num_classes", None)
  return None


def load_split(data, split: str, model_cfg, limit: int | None = None, seed: int | None = None,
               exact: bool = False):
  """-> (images float32 (N, H, W, C), labels int32 (N,)).

  `seed` shuffles before `limit` is applied (e.g. a random calibration set). A
  `limit` without a seed keeps the first images, except for sources stored class by
  class (CLASS_ORDERED), where it draws a fixed random subset (seed SUBSET_SEED).
  exact: a `limit` larger than the split raises SplitTooSmall instead of
  returning the whole split.
  """
  source = _get(data, "source", "bundled")
  limit = limit if limit is not None else (_get(data, "limit") or None)  # 0 = all
  if seed is None and limit is not None and source in CLASS_ORDERED:
    seed = SUBSET_SEED  # e.g. eval.limit=1000 on CIFAR-10: every class, not airplanes only
  # Every source applies seed/limit (_select) before decoding/normalizing, so a
  # small calibration subset of a large dataset only decodes what it keeps.
  if source == "idx":
    return _from_uint8(*load_idx_split(_get(data, "dir") or FASHION_MNIST_DIR, split),
                       model_cfg, "IDX", limit, seed, exact)
  if source == "bundled":
    return _from_uint8(*load_idx_split(BUNDLED_DIR, split), model_cfg, "bundled", limit, seed,
                       exact)
  if source == "image_folder":
    if not _get(data, "dir"):
      raise ValueError("data.source='image_folder' needs data.dir (a folder with split folders).")
    folder_split = _get(data, f"{split}_split") or split  # e.g. test_split="val"
    return _image_folder(_get(data, "dir"), folder_split, model_cfg, limit, seed, data, exact,
                         field=f"data.{split}_split")
  if source == "tfds":
    return _tfds(data, split, model_cfg, limit, seed, exact)
  if source == "cifar10":
    return _from_uint8(*load_cifar10(split, _get(data, "dir") or ""), model_cfg, "CIFAR-10",
                       limit, seed, exact)
  if source == "imagenet_sample":
    return _image_folder(imagenet_sample_dir(_get(data, "dir") or ""), split, model_cfg, limit,
                         seed, data, exact)
  raise ValueError(f"data.source={source!r} is unknown: expected one of {SOURCES}.")
