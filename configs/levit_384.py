"""levit_384 (timm, distilled heads averaged) on ImageNet; arg = bit setting
(default W8A8), e.g. configs/levit_384.py:W4A8.

Needs a checkpoint (timm levit_384 .safetensors; its BatchNorms are folded on
load) and ImageNet prepared for tfds, e.g.
  --set checkpoint=/path/levit_384.safetensors --set data.data_dir=/path/tfds
or an image folder: --set data.source=image_folder --set data.dir=/path/imagenet
(with train/ and the test split folder named by data.test_split, default validation).
"""
from evolq_jax.config import imagenet_config


def get_config(arg="W8A8"):
  return imagenet_config(arg, "levit_384")
