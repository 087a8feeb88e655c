"""Shared test helpers."""
from __future__ import annotations

import pytest


def import_timm():
  """Import timm beside a CPU-only torch (skips only when torch is absent).

  timm imports torchvision, whose C++ ops (`torchvision::nms`) fail to
  register against a CPU torch build; defining their schemas first lets the
  import go through. A missing timm (with torch present) is an error, not a
  skip: CI installs both, so the parity tests must run there.
  """
  torch = pytest.importorskip("torch")
  for op in ("nms", "qnms"):
    try:
      torch.library.define(f"torchvision::{op}",
                           "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except Exception:  # already defined (torchvision loaded fine, or second call)
      pass
  import timm
  return timm
