"""Model variants as data: timm's names and shapes, plus the bundled fixture."""
from __future__ import annotations

import dataclasses

# Per-family input pipeline (timm's defaults): crop fraction, interpolation, mean/std.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FAMILY_TRANSFORMS = {
    "deit": dict(crop_pct=0.875, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "vit": dict(crop_pct=0.9, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3),
    "fixture": dict(crop_pct=1.0, interpolation="bilinear", mean=(0.2860,), std=(0.3530,)),
    "cifar10": dict(crop_pct=1.0, interpolation="bilinear", mean=(0.4914, 0.4822, 0.4465),
                    std=(0.2470, 0.2435, 0.2616)),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  name: str
  img_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  num_classes: int = 1000
  embed_dim: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: float = 4.0
  family: str = "deit"

  @property
  def mlp_hidden(self) -> int:
    return int(self.embed_dim * self.mlp_ratio)

  @property
  def num_patches(self) -> int:
    return (self.img_size // self.patch_size) ** 2

  @property
  def transform(self) -> dict:
    return FAMILY_TRANSFORMS[self.family]

  def check_images(self, shape):
    want = (self.img_size, self.img_size, self.in_chans)
    if len(shape) != 4 or tuple(shape[1:]) != want:
      raise ValueError(
          f"images of shape {tuple(shape)} do not fit model {self.name!r}: expected "
          f"(batch, {want[0]}, {want[1]}, {want[2]}) NHWC. Resize/convert the images "
          "with the model's transform (evolq_jax.data.transforms).")


PRESETS = {c.name: c for c in [
    ViTConfig("deit_tiny_patch16_224", embed_dim=192, depth=12, num_heads=3),
    ViTConfig("deit_small_patch16_224", embed_dim=384, depth=12, num_heads=6),
    ViTConfig("deit_base_patch16_224", embed_dim=768, depth=12, num_heads=12),
    ViTConfig("vit_base_patch16_224", embed_dim=768, depth=12, num_heads=12, family="vit"),
    # The fixture: a DeiT-style ViT for 28x28 grayscale (Fashion-MNIST).
    ViTConfig("vit_fixture_patch4_28", img_size=28, patch_size=4, in_chans=1,
              num_classes=10, embed_dim=96, depth=6, num_heads=4, family="fixture"),
    # The second fixture: a DeiT-style ViT for 32x32 RGB (CIFAR-10).
    ViTConfig("vit_cifar10_patch4_32", img_size=32, patch_size=4, in_chans=3,
              num_classes=10, embed_dim=128, depth=6, num_heads=4, family="cifar10"),
]}


def get_preset(name: str) -> ViTConfig:
  if name not in PRESETS:
    raise ValueError(f"model={name!r} is unknown: expected one of {sorted(PRESETS)}.")
  return PRESETS[name]
