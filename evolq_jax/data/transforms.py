"""Per-model input transforms: resize / center crop (PIL) and normalization."""
from __future__ import annotations

import math

import numpy as np

_PIL_FILTERS = {"bicubic": 3, "bilinear": 2, "nearest": 0}


def normalize(images_uint8: np.ndarray, mean, std) -> np.ndarray:
  """uint8 NHWC -> float32 NHWC, (x/255 - mean) / std per channel."""
  x = images_uint8.astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def resize_center_crop(img, size: int, crop_pct: float, interpolation: str):
  """A PIL image -> (size, size) PIL image, timm's eval recipe.

  The shorter side is resized to floor(size / crop_pct), then the center
  size x size crop is taken.
  """
  if interpolation not in _PIL_FILTERS:
    raise ValueError(f"interpolation={interpolation!r} is unknown: expected one of "
                     f"{tuple(_PIL_FILTERS)}.")
  scale_size = math.floor(size / crop_pct)
  w, h = img.size
  if w <= h:
    new_w, new_h = scale_size, int(scale_size * h / w)
  else:
    new_w, new_h = int(scale_size * w / h), scale_size
  img = img.resize((new_w, new_h), _PIL_FILTERS[interpolation])
  left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
  return img.crop((left, top, left + size, top + size))


def preprocess_pil(img, model_cfg) -> np.ndarray:
  """A PIL image -> normalized float32 (H, W, C) for `model_cfg` (a ViTConfig)."""
  t = model_cfg.transform
  img = img.convert("L" if model_cfg.in_chans == 1 else "RGB")
  img = resize_center_crop(img, model_cfg.img_size, t["crop_pct"], t["interpolation"])
  arr = np.asarray(img, np.uint8)
  if arr.ndim == 2:
    arr = arr[..., None]
  return normalize(arr[None], t["mean"], t["std"])[0]
