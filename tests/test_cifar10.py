"""The CIFAR-10 fixture (vit_cifar10_patch4_32): the bundled weights on a slice of
the real CIFAR-10 (../shared/data/cifar10_jpeg.tar.gz, decoded once into the
cache), through the same config and pipeline as `evolq eval --config
configs/cifar10.py`. Nothing here trains."""
import json

from evolq_jax.cli import main
from evolq_jax.config import load_config
from evolq_jax.data import load_split
from evolq_jax.models import get_preset

RECORD = "evolq_jax/checkpoints/vit_cifar10_patch4_32.json"


def test_bundled_cifar10_fixture_through_evolq_eval(tmp_path, capsys):
  """`evolq eval --config configs/cifar10.py:W8A8` on 500 real test images (a fixed
  subset with every class): the bundled weights score what their training record
  says, within the subset's noise, and W8A8 keeps them."""
  c = load_config("configs/cifar10.py:W8A8")
  cfg = get_preset(c.model)
  _, y = load_split(c.data, "test", cfg, limit=500)
  assert len(set(y.tolist())) == 10
  rc = main(["eval", "--config", "configs/cifar10.py:W8A8", "--workdir", str(tmp_path),
             "--set", "calib.num_images=50", "--set", "calib.batch_size=50",
             "--set", "eval.limit=500"])  # OMSE runs on the last calibration batch: 50 images
  assert rc == 0, capsys.readouterr().err
  s = json.loads((tmp_path / "summary.json").read_text())
  assert s["model"] == "vit_cifar10_patch4_32" and s["test_images"] == 500
  with open(RECORD) as f:
    recorded = json.load(f)["test_top1"]  # on all 10,000 test images
  top1 = s["fp_top1"]
  se = 100 * (recorded / 100 * (1 - recorded / 100) / 500) ** 0.5  # a subset's standard error
  assert recorded >= 75.0 and abs(top1 - recorded) < 3 * se, (top1, recorded, se)
  assert s["init_agreement"] >= 95.0 and s["init_top1"] >= top1 - 2.0, s
