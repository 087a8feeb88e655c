"""swin_tiny_patch4_window7_224 on ImageNet; arg = bit setting (default W8A8), e.g. configs/swin_tiny.py:W4A8.

Needs a checkpoint (timm .safetensors or .pth; the original Swin release's .pth, weights
under 'model', converts too) and ImageNet
prepared for tfds, e.g.
  --set checkpoint=/path/swin_tiny_patch4_window7_224.safetensors --set data.data_dir=/path/tfds
or an image folder: --set data.source=image_folder --set data.dir=/path/imagenet
(with train/ and the test split folder named by data.test_split, default validation).
"""
from evolq_jax.config import imagenet_config


def get_config(arg="W8A8"):
  return imagenet_config(arg, "swin_tiny_patch4_window7_224")
