"""Recipe of the CIFAR-10 fixture: `evolq train --config configs/train_cifar10.py --workdir DIR`.

A DeiT-style ViT (128 wide, 6 blocks, patch 4) from scratch on the 50,000
CIFAR-10 training images (../shared/data/cifar10_jpeg.tar.gz): about 4 hours
on 2 CPU cores. Resumable: rerun with --resume after an interruption.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "vit_cifar10_patch4_32"
  c.data = ml_collections.ConfigDict(dict(source="cifar10", dir="", limit=None))
  c.train = ml_collections.ConfigDict(dict(
      epochs=50, batch_size=128, lr=1e-3, warmup_epochs=5, weight_decay=0.05,
      clip=1.0, augment=True, pad=4, label_smoothing=0.1, seed=0, init_checkpoint=""))
  return c
