"""Data sources: IDX files, image folders, tfds (array_record, no TensorFlow), seeding.

All data is written by the tests into tmp_path; nothing is downloaded.
"""
from __future__ import annotations

import gzip
import math
import struct

import numpy as np
import pytest
from PIL import Image

from evolq_jax.data import load_split
from evolq_jax.data.transforms import resize_center_crop
from evolq_jax.models import get_preset

FIXTURE = "vit_fixture_patch4_28"


# ---------------------------------------------------------------- helpers

def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
  """IDX layout: 4-byte big-endian magic, one big-endian uint32 per dim, data."""
  return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_idx(path, arr, magic, gz):
  data = _idx_bytes(arr, magic)
  if gz:
    with gzip.open(str(path) + ".gz", "wb") as f:
      f.write(data)
  else:
    path.write_bytes(data)


def _make_idx_dir(folder, n_train=7, n_test=5, size=28, gz=True, seed=0):
  """Writes the four IDX files; returns {split: (images uint8 NHW, labels)}."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  out = {}
  for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.uint8)
    _write_idx(folder / f"{prefix}-images-idx3-ubyte", images, 0x00000803, gz)
    _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, 0x00000801, gz)
    out[split] = (images, labels)
  return out


def _expected(img: Image.Image, size, crop_pct, mean, std, mode="RGB"):
  """timm's eval transform written out independently of evolq_jax.data.transforms."""
  img = img.convert(mode)
  w, h = img.size
  short = math.floor(size / crop_pct)
  if w <= h:
    new = (short, int(short * h / w))
  else:
    new = (int(short * w / h), short)
  img = img.resize(new, Image.Resampling.BICUBIC)
  left = int(round((new[0] - size) / 2.0))
  top = int(round((new[1] - size) / 2.0))
  arr = np.asarray(img.crop((left, top, left + size, top + size)), np.float32) / 255.0
  if arr.ndim == 2:
    arr = arr[..., None]
  return (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# ---------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_idx_loads_both_splits_normalized(tmp_path, gz):
  ref = _make_idx_dir(tmp_path / "idx", gz=gz)
  cfg = get_preset(FIXTURE)
  mean, std = cfg.transform["mean"][0], cfg.transform["std"][0]
  assert (mean, std) == (0.2860, 0.3530)
  for split in ("train", "test"):
    x, y = load_split({"source": "idx", "dir": str(tmp_path / "idx")}, split, cfg)
    raw, labels = ref[split]
    assert x.shape == (len(raw), 28, 28, 1) and x.dtype == np.float32
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, labels.astype(np.int32))
    np.testing.assert_allclose(x[..., 0], (raw / 255.0 - mean) / std, rtol=0, atol=1e-5)
    # Spot values: a black pixel and a white pixel map where the mean/std say.
  black = np.zeros((1, 28, 28), np.uint8)
  white = np.full((1, 28, 28), 255, np.uint8)
  folder = tmp_path / "bw"
  folder.mkdir()
  for prefix in ("train", "t10k"):
    _write_idx(folder / f"{prefix}-images-idx3-ubyte", np.concatenate([black, white]),
               0x00000803, gz)
    _write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.array([3, 9], np.uint8),
               0x00000801, gz)
  x, y = load_split({"source": "idx", "dir": str(folder)}, "test", cfg)
  np.testing.assert_allclose(x[0], -mean / std, atol=1e-6)
  np.testing.assert_allclose(x[1], (1 - mean) / std, atol=1e-6)
  assert y.tolist() == [3, 9]


def test_idx_header_layout_is_what_is_read(tmp_path):
  # The header is exactly 16 bytes for images and 8 for labels; the pixel at
  # byte 16 is image 0, row 0, col 0 and the byte at 8 is label 0.
  ref = _make_idx_dir(tmp_path / "idx", gz=False)
  raw = (tmp_path / "idx" / "train-images-idx3-ubyte").read_bytes()
  assert raw[:4] == b"\x00\x00\x08\x03" and struct.unpack(">3I", raw[4:16]) == (7, 28, 28)
  assert raw[16] == ref["train"][0][0, 0, 0]
  lab = (tmp_path / "idx" / "train-labels-idx1-ubyte").read_bytes()
  assert lab[:4] == b"\x00\x00\x08\x01" and struct.unpack(">I", lab[4:8]) == (7,)
  assert lab[8] == ref["train"][1][0]
  x, y = load_split({"source": "idx", "dir": str(tmp_path / "idx")}, "train",
                    get_preset(FIXTURE))
  assert y[0] == lab[8]
  assert np.isclose(x[0, 0, 0, 0], (raw[16] / 255.0 - 0.2860) / 0.3530, atol=1e-5)


def test_idx_missing_folder_names_it(tmp_path):
  missing = tmp_path / "no_such_folder"
  with pytest.raises(FileNotFoundError, match="no_such_folder"):
    load_split({"source": "idx", "dir": str(missing)}, "train", get_preset(FIXTURE))


def test_idx_missing_file_names_it(tmp_path):
  _make_idx_dir(tmp_path / "idx", gz=True)
  (tmp_path / "idx" / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
    load_split({"source": "idx", "dir": str(tmp_path / "idx")}, "test", get_preset(FIXTURE))


@pytest.mark.parametrize("header", [
    b"\x12\x34\x08\x03",            # first two bytes must be zero
    b"\x00\x00\x07\x03",            # unknown dtype code
    b"\x00\x00\x08\xff",            # claims 255 dims: header runs past the file
    b"\x00\x00\x08\x00",            # zero dims
], ids=["nonzero-lead", "bad-dtype", "truncated-header", "zero-dims"])
def test_idx_corrupt_magic_raises_value_error(tmp_path, header):
  _make_idx_dir(tmp_path / "idx", gz=False, n_train=1)
  path = tmp_path / "idx" / "train-images-idx3-ubyte"
  raw = path.read_bytes()
  path.write_bytes(header + raw[4:])
  with pytest.raises(ValueError, match="IDX"):
    load_split({"source": "idx", "dir": str(tmp_path / "idx")}, "train", get_preset(FIXTURE))


def test_idx_size_mismatch_and_swapped_files_raise(tmp_path):
  _make_idx_dir(tmp_path / "idx", gz=False)
  path = tmp_path / "idx" / "train-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-5])  # header promises more pixels than there are
  with pytest.raises(ValueError, match="header says shape"):
    load_split({"source": "idx", "dir": str(tmp_path / "idx")}, "train", get_preset(FIXTURE))
  # Labels file where the images file should be.
  _make_idx_dir(tmp_path / "sw", gz=False)
  (tmp_path / "sw" / "t10k-images-idx3-ubyte").write_bytes(
      (tmp_path / "sw" / "t10k-labels-idx1-ubyte").read_bytes())
  with pytest.raises(ValueError, match="swapped"):
    load_split({"source": "idx", "dir": str(tmp_path / "sw")}, "test", get_preset(FIXTURE))


def test_idx_wrong_image_size_for_model(tmp_path):
  _make_idx_dir(tmp_path / "small", size=20, gz=True)
  with pytest.raises(ValueError, match="expects"):
    load_split({"source": "idx", "dir": str(tmp_path / "small")}, "train", get_preset(FIXTURE))
  _make_idx_dir(tmp_path / "mnist", size=28, gz=True)
  with pytest.raises(ValueError, match="deit_tiny_patch16_224"):
    load_split({"source": "idx", "dir": str(tmp_path / "mnist")}, "train",
               get_preset("deit_tiny_patch16_224"))


def test_idx_config_dict_and_unknown_split(tmp_path):
  ml_collections = pytest.importorskip("ml_collections")
  _make_idx_dir(tmp_path / "idx")
  data = ml_collections.ConfigDict(dict(source="idx", dir=str(tmp_path / "idx"), limit=3))
  x, y = load_split(data, "train", get_preset(FIXTURE))
  assert x.shape == (3, 28, 28, 1) and y.shape == (3,)
  with pytest.raises(ValueError, match="validation"):
    load_split(data, "validation", get_preset(FIXTURE))
  with pytest.raises(FileNotFoundError, match="only the bundled subset ships one"):
    load_split(data, "holdout", get_preset(FIXTURE))


def test_bundled_holdout_split_is_disjoint_from_calibration():
  train, _ = load_split({"source": "bundled"}, "train", get_preset(FIXTURE))
  held, labels = load_split({"source": "bundled"}, "holdout", get_preset(FIXTURE))
  assert held.shape == (2000, 28, 28, 1) and set(np.unique(labels)) == set(range(10))
  seen = {img.tobytes() for img in train}
  assert not any(img.tobytes() in seen for img in held)


# ---------------------------------------------------------------- image folder

CLASSES = ("zebra", "ant", "mouse")  # sorted: ant=0, mouse=1, zebra=2
SIZES = ((300, 260), (200, 310), (224, 224), (97, 131))  # (w, h): wide, tall, exact, small


def _make_image_folder(root, split="train", gray=False, seed=0):
  """-> list of (label, PIL image) in the order the source should return them."""
  rng = np.random.default_rng(seed)
  expected = []
  for cls in CLASSES:
    d = root / split / cls
    d.mkdir(parents=True)
    for k, (w, h) in enumerate(SIZES):
      if gray:
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
      else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
      img.save(d / f"img{k}.png")
    (d / "notes.txt").write_text("not an image")
  (root / split / "README").write_text("a file next to the class folders")
  for label, cls in enumerate(sorted(CLASSES)):
    for k in range(len(SIZES)):
      with Image.open(root / split / cls / f"img{k}.png") as img:
        expected.append((label, img.copy()))
  return expected


# timm's pretrained_cfg of each model (crop_pct, mean, std): the independent reference
TIMM_DEFAULTS = {"deit_tiny_patch16_224": (0.875, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                 "vit_base_patch16_224": (0.9, (0.5,) * 3, (0.5,) * 3)}


@pytest.mark.parametrize("model", sorted(TIMM_DEFAULTS))
def test_image_folder_resize_crop_normalize(tmp_path, model):
  cfg = get_preset(model)
  ref = _make_image_folder(tmp_path)
  x, y = load_split({"source": "image_folder", "dir": str(tmp_path)}, "train", cfg)
  assert x.shape == (len(CLASSES) * len(SIZES), 224, 224, 3) and x.dtype == np.float32
  assert y.dtype == np.int32
  assert y.tolist() == [label for label, _ in ref] == [0] * 4 + [1] * 4 + [2] * 4
  crop_pct, mean, std = TIMM_DEFAULTS[model]
  for i, (_, img) in enumerate(ref):
    want = _expected(img, 224, crop_pct, mean, std)
    np.testing.assert_allclose(x[i], want, rtol=0, atol=1e-5)


def test_resize_center_crop_geometry():
  # Hand-computed timm numbers for a 300x260 (w x h) image.
  # deit: crop_pct .875 -> short side 256 -> 295x256 -> crop box (36, 16).
  # vit:  crop_pct .9   -> short side floor(248.9)=248 -> 286x248 -> box (31, 12).
  ramp = np.tile(np.arange(300, dtype=np.uint16)[None, :] % 256, (260, 1)).astype(np.uint8)
  img = Image.fromarray(ramp, "L")
  for crop_pct, new, box in ((0.875, (295, 256), (36, 16)), (0.9, (286, 248), (31, 12))):
    got = np.asarray(resize_center_crop(img, 224, crop_pct, "bicubic"))
    big = img.resize(new, Image.Resampling.BICUBIC)
    want = np.asarray(big.crop((box[0], box[1], box[0] + 224, box[1] + 224)))
    assert got.shape == (224, 224)
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="lanczos"):
    resize_center_crop(img, 224, 0.9, "lanczos")


def test_image_folder_grayscale_to_rgb_and_rgb_to_gray(tmp_path):
  cfg = get_preset("deit_tiny_patch16_224")
  ref = _make_image_folder(tmp_path / "g", split="test", gray=True)
  (tmp_path / "g" / "classes.txt").write_text("\n".join(sorted(CLASSES)))  # no train split here
  x, y = load_split({"source": "image_folder", "dir": str(tmp_path / "g")}, "test", cfg)
  assert x.shape == (12, 224, 224, 3)
  pixels = x * np.asarray(cfg.transform["std"]) + np.asarray(cfg.transform["mean"])
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-5)
  np.testing.assert_allclose(pixels[..., 1], pixels[..., 2], atol=1e-5)
  t = cfg.transform
  np.testing.assert_allclose(x[5], _expected(ref[5][1], 224, t["crop_pct"], t["mean"], t["std"]),
                             atol=1e-5)
  # RGB images into the 1-channel fixture: converted to L, resized to 28.
  fx = get_preset(FIXTURE)
  _make_image_folder(tmp_path / "c", split="train")
  x, y = load_split({"source": "image_folder", "dir": str(tmp_path / "c")}, "train", fx)
  assert x.shape == (12, 28, 28, 1)


def test_image_folder_errors(tmp_path):
  cfg = get_preset("deit_tiny_patch16_224")
  with pytest.raises(FileNotFoundError, match="test"):
    load_split({"source": "image_folder", "dir": str(tmp_path)}, "test", cfg)
  with pytest.raises(ValueError, match="data.dir"):
    load_split({"source": "image_folder"}, "train", cfg)
  (tmp_path / "train").mkdir()
  with pytest.raises(FileNotFoundError, match="no class"):
    load_split({"source": "image_folder", "dir": str(tmp_path)}, "train", cfg)
  (tmp_path / "train" / "cat").mkdir()
  (tmp_path / "train" / "cat" / "x.txt").write_text("")
  with pytest.raises(FileNotFoundError, match="no images"):
    load_split({"source": "image_folder", "dir": str(tmp_path)}, "train", cfg)


def test_image_folder_uppercase_extension(tmp_path):
  d = tmp_path / "train" / "n01440764"
  d.mkdir(parents=True)
  Image.new("RGB", (50, 40), (255, 0, 0)).save(d / "ILSVRC2012_val_1.JPEG", format="JPEG")
  Image.new("RGB", (50, 40), (0, 0, 255)).save(d / "b.PNG", format="PNG")
  x, y = load_split({"source": "image_folder", "dir": str(tmp_path)}, "train",
                    get_preset("vit_base_patch16_224"))
  assert x.shape == (2, 224, 224, 3) and y.tolist() == [0, 0]


# ---------------------------------------------------------------- tfds

def _build_tfds(data_dir, channels=3):
  """Writes a tiny array_record dataset `tiny_images` with TFDS's own builder.

  No TensorFlow: images are given as PIL images, which tfds encodes to PNG with
  PIL (numpy arrays would go through tf.image.encode_png). The builder is left
  unregistered, so tfds.data_source finds the dataset from the files alone, as
  for any dataset prepared elsewhere. disable_shuffling keeps generation order.
  Returns {split: [(PIL image, label), ...]}.
  """
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("array_record")
  rng = np.random.default_rng(channels)
  splits = {}
  for split, n in (("train", 5), ("test", 4)):
    items = []
    for i in range(n):
      h, w = 30 + 7 * i, 41 - 3 * i
      shape = (h, w) if channels == 1 else (h, w, channels)
      arr = rng.integers(0, 256, shape, dtype=np.uint8)
      items.append((Image.fromarray(arr, "L" if channels == 1 else "RGB"), (2 * i + 1) % 3))
    splits[split] = items

  with tfds.core.registered.skip_registration():
    class TinyImages(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, disable_shuffling=True,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, channels)),
                "label": tfds.features.ClassLabel(num_classes=3)}))

      def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s) for s in splits}

      def _generate_examples(self, split):
        for i, (img, label) in enumerate(splits[split]):
          yield i, {"image": img, "label": label}

  builder = TinyImages(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  assert list((data_dir / "tiny_images" / "1.0.0").glob("*.array_record*"))
  return splits


def test_tfds_array_record_without_tensorflow(tmp_path):
  import sys
  splits = _build_tfds(tmp_path / "tfds")
  cfg = get_preset("deit_tiny_patch16_224")
  t = cfg.transform
  data = {"source": "tfds", "name": "tiny_images", "data_dir": str(tmp_path / "tfds"),
          "test_split": "test"}
  for split in ("train", "test"):
    x, y = load_split(data, split, cfg)
    ref = splits[split]
    assert x.shape == (len(ref), 224, 224, 3) and x.dtype == np.float32
    assert y.dtype == np.int32 and y.tolist() == [label for _, label in ref]
    for i, (img, _) in enumerate(ref):
      np.testing.assert_allclose(x[i], _expected(img, 224, t["crop_pct"], t["mean"], t["std"]),
                                 atol=1e-5)
  assert "tensorflow" not in sys.modules
  # The test split defaults to "validation", which this dataset lacks.
  with pytest.raises(ValueError, match="validation"):
    load_split({k: v for k, v in data.items() if k != "test_split"}, "test", cfg)
  with pytest.raises(ValueError, match="val"):
    load_split(data, "val", cfg)


def test_tfds_grayscale_and_limit(tmp_path):
  splits = _build_tfds(tmp_path / "tfds", channels=1)
  data = {"source": "tfds", "name": "tiny_images", "data_dir": str(tmp_path / "tfds"),
          "train_split": "train", "limit": 3}
  fx = get_preset(FIXTURE)
  x, y = load_split(data, "train", fx)
  assert x.shape == (3, 28, 28, 1)
  assert y.tolist() == [label for _, label in splits["train"][:3]]
  t = fx.transform
  for i in range(3):
    # The fixture: crop_pct 1.0 (short side 28), bilinear.
    img = splits["train"][i][0]
    w, h = img.size
    new = (28, int(28 * h / w)) if w <= h else (int(28 * w / h), 28)
    big = img.resize(new, Image.Resampling.BILINEAR)
    l, tp = int(round((new[0] - 28) / 2)), int(round((new[1] - 28) / 2))
    want = (np.asarray(big.crop((l, tp, l + 28, tp + 28)), np.float32)[..., None] / 255.0
            - t["mean"][0]) / t["std"][0]
    np.testing.assert_allclose(x[i], want, atol=1e-5)
  x3, _ = load_split(data, "train", get_preset("vit_base_patch16_224"))
  assert x3.shape == (3, 224, 224, 3)
  np.testing.assert_allclose(x3[..., 0], x3[..., 2], atol=1e-6)


def test_tfds_seeded_subset_matches_full_permutation(tmp_path):
  _build_tfds(tmp_path / "tfds")
  cfg = get_preset(FIXTURE)
  data = {"source": "tfds", "name": "tiny_images", "data_dir": str(tmp_path / "tfds")}
  x_all, y_all = load_split(data, "train", cfg)
  x, y = load_split(data, "train", cfg, limit=3, seed=4)
  order = np.random.default_rng(4).permutation(len(y_all))[:3]
  np.testing.assert_array_equal(y, y_all[order])
  np.testing.assert_array_equal(x, x_all[order])


# ---------------------------------------------------------------- seed / limit / source

def test_seed_limit_reproducible_random_subset(tmp_path):
  ref = _make_idx_dir(tmp_path / "idx", n_train=40, n_test=5)
  cfg = get_preset(FIXTURE)
  data = {"source": "idx", "dir": str(tmp_path / "idx")}
  x_all, y_all = load_split(data, "train", cfg)
  x1, y1 = load_split(data, "train", cfg, limit=10, seed=7)
  x2, y2 = load_split(data, "train", cfg, limit=10, seed=7)
  x3, _ = load_split(data, "train", cfg, limit=10, seed=8)
  assert x1.shape == (10, 28, 28, 1) and y1.shape == (10,)
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, y2)
  assert not np.array_equal(x1, x3)
  assert not np.array_equal(x1, x_all[:10])  # a random subset, not the first 10
  # Every chosen image is a distinct image of the split, with its own label.
  order = np.random.default_rng(7).permutation(40)[:10]
  np.testing.assert_array_equal(x1, x_all[order])
  np.testing.assert_array_equal(y1, ref["train"][1][order].astype(np.int32))
  assert len(set(order.tolist())) == 10
  # Without a seed, limit keeps the first N; data.limit is the default limit.
  x4, y4 = load_split(data, "train", cfg, limit=6)
  np.testing.assert_array_equal(x4, x_all[:6])
  x5, _ = load_split({**data, "limit": 4}, "train", cfg)
  np.testing.assert_array_equal(x5, x_all[:4])
  # An explicit limit wins over data.limit; a seed alone permutes everything.
  x6, _ = load_split({**data, "limit": 4}, "train", cfg, limit=9)
  assert len(x6) == 9
  x7, y7 = load_split(data, "train", cfg, seed=1)
  assert sorted(y7.tolist()) == sorted(y_all.tolist()) and len(x7) == 40


def test_seed_limit_image_folder(tmp_path):
  _make_image_folder(tmp_path)
  cfg = get_preset(FIXTURE)
  data = {"source": "image_folder", "dir": str(tmp_path)}
  x_all, y_all = load_split(data, "train", cfg)
  x, y = load_split(data, "train", cfg, limit=5, seed=3)
  order = np.random.default_rng(3).permutation(12)[:5]
  np.testing.assert_array_equal(x, x_all[order])
  np.testing.assert_array_equal(y, y_all[order])


def test_limit_on_a_class_ordered_source_draws_every_class(tmp_path):
  """An image folder is stored class by class: an unseeded limit (eval.limit) must
  not mean "the first classes only"; it draws a fixed subset (seed 0)."""
  _make_image_folder(tmp_path)
  cfg = get_preset(FIXTURE)
  data = {"source": "image_folder", "dir": str(tmp_path)}
  x_all, y_all = load_split(data, "train", cfg)
  assert y_all.tolist() == sorted(y_all.tolist())  # stored by class
  x, y = load_split(data, "train", cfg, limit=6)
  order = np.random.default_rng(0).permutation(12)[:6]
  np.testing.assert_array_equal(x, x_all[order])
  np.testing.assert_array_equal(y, y_all[order])
  assert len(set(y.tolist())) > len(set(y_all[:6].tolist()))
  x2, _ = load_split({**data, "limit": 6}, "train", cfg)  # data.limit: the same subset
  np.testing.assert_array_equal(x2, x)


def test_unknown_source_names_it():
  with pytest.raises(ValueError, match="'parquet'"):
    load_split({"source": "parquet"}, "train", get_preset(FIXTURE))


def test_cifar10_tar_decodes_once_into_a_cache(tmp_path, monkeypatch):
  """A tiny tar in the shared layout (split/class/image): labels follow the sorted class
  folders, the second load reads the uint8 cache, a tar without 10 classes is an error."""
  import io
  import os
  import tarfile

  from PIL import Image

  from evolq_jax.data.cifar10 import load_cifar10
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  rng = np.random.default_rng(0)
  classes = [f"c{i}" for i in range(10)]
  want = {}

  def make(path, n_classes):
    with tarfile.open(path, "w:gz") as tar:
      for split in ("train", "test"):
        for cls in classes[:n_classes]:
          img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
          want[(split, cls)] = img
          buf = io.BytesIO()
          Image.fromarray(img).save(buf, format="PNG")  # lossless: exact pixels
          info = tarfile.TarInfo(f"./cifar10/{split}/{cls}/0001.jpg")
          info.size = len(buf.getvalue())
          tar.addfile(info, io.BytesIO(buf.getvalue()))

  make(tmp_path / "c.tar.gz", 10)
  for attempt in ("decoded", "cached"):
    x, y = load_cifar10("test", str(tmp_path / "c.tar.gz"))
    assert x.dtype == np.uint8 and x.shape == (10, 32, 32, 3), attempt
    assert y.tolist() == list(range(10)), attempt
    for i, cls in enumerate(classes):
      np.testing.assert_array_equal(x[i], want[("test", cls)], err_msg=attempt)
  assert len(os.listdir(tmp_path / "cache" / "evolq_jax" / "cifar10")) == 2  # train + test
  make(tmp_path / "bad.tar.gz", 9)
  with pytest.raises(ValueError, match="has 9 class folders, expected 10"):
    load_cifar10("train", str(tmp_path / "bad.tar.gz"))
