"""The CIFAR-10 fixture (vit_cifar10_patch4_32): the bundled weights on a slice of
the real CIFAR-10 (../shared/data/cifar10_jpeg.tar.gz, decoded once into the
cache), through the same config and pipeline as `evolq eval --config
configs/cifar10.py`. Nothing here trains."""
import json

import numpy as np

from evolq_jax.calibrate import calibrate
from evolq_jax.cli import main
from evolq_jax.config import load_config, quant_config
from evolq_jax.data import load_split
from evolq_jax.evaluate import classification_metrics
from evolq_jax.pipeline import load_model, predict

RECORD = "evolq_jax/checkpoints/vit_cifar10_patch4_32.json"


def test_bundled_cifar10_fixture_on_real_test_images():
  """1,000 test images (a fixed subset with every class): the bundled weights score
  what their training record says, within the subset's noise, and W8A8 keeps them."""
  c = load_config("configs/cifar10.py:W8A8")
  cfg, params = load_model(c)
  x, y = load_split(c.data, "test", cfg, limit=1000)
  assert len(set(y.tolist())) == 10
  fp = predict(cfg, params, x)
  top1 = classification_metrics(fp, y)["top1"]
  with open(RECORD) as f:
    recorded = json.load(f)["test_top1"]  # on all 10,000 test images
  assert recorded >= 75.0 and abs(top1 - recorded) < 4.0, (top1, recorded)  # ~±2.5 at 1,000
  calib, _ = load_split(c.data, "train", cfg, limit=200, seed=0)
  qcfg = quant_config(c)
  q = predict(cfg, params, x, qcfg, calibrate(cfg, qcfg, params, calib, 100, progress=False))
  m = classification_metrics(q, y, fp)
  assert m["agreement"] >= 95.0 and m["top1"] >= top1 - 2.0, m


def test_evolq_eval_on_the_cifar10_config(tmp_path, capsys):
  """The issue's command, on a slice: bundled weights, the shared data, summary.json."""
  rc = main(["eval", "--config", "configs/cifar10.py:W3A8", "--workdir", str(tmp_path),
             "--set", "calib.num_images=100", "--set", "eval.limit=500"])
  assert rc == 0, capsys.readouterr().err
  s = json.loads((tmp_path / "summary.json").read_text())
  assert s["model"] == "vit_cifar10_patch4_32" and s["test_images"] == 500
  assert s["fp_top1"] >= 70.0 and 0.0 < s["init_top1"] <= 100.0
  assert np.isfinite(s["init_agreement"])
