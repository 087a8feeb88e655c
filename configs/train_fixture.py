"""Recipe of the bundled fixture: `evolq train --config configs/train_fixture.py --workdir DIR`."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "vit_fixture_patch4_28"
  c.data = ml_collections.ConfigDict(
      dict(source="idx", dir="/usr/share/datasets/fashion-mnist", limit=None))
  c.train = ml_collections.ConfigDict(dict(
      epochs=16, batch_size=128, lr=1e-3, warmup_epochs=1, weight_decay=0.05,
      clip=1.0, augment=True, seed=0, init_checkpoint=""))
  return c
