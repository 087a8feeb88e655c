"""The CIFAR-10 ViT fixture (vit_cifar10_patch4_32, bundled weights) on the real
CIFAR-10 (../shared/data/cifar10_jpeg.tar.gz); arg = bit setting, e.g.
configs/cifar10.py:W3A8 (default W3A8). Calibration: 1,000 training images;
evaluation: the 10,000 test images."""
from evolq_jax.config import bits_config


def get_config(arg="W3A8"):
  return bits_config(arg, "vit_cifar10_patch4_32", **{"data.source": "cifar10"})
