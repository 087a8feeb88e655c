"""Configs, the `evolq` command and clear errors for bad input."""
import json
import shutil

import jax
import numpy as np
import pytest
from conftest import FIXTURE_CONFIG, FIXTURE_RUN_SETS, small_fixture_vit

from evolq_jax.calibrate import calibrate
from evolq_jax.cli import main
from evolq_jax.config import QuantConfig, apply_overrides, base_config, bits_config, load_config
from evolq_jax.evaluate import classification_metrics, topk_accuracy
from evolq_jax.models import get_preset, init_params

# the shared fixture run's sizes (conftest.FIXTURE_RUN_SETS): one calibration batch of 50 and
# forwards of 50, so that the A8 calibration and the FP forward are programs it compiled
SMALL = ["checkpoint='random'", "calib.num_images=50", "calib.batch_size=50", "eval.limit=100",
         "eval.batch_size=50"]


def test_eval_command_writes_summary(tmp_path, capsys):
  rc = main(["eval", "--config", "configs/fixture_w4a8.py", "--workdir", str(tmp_path)]
            + sum([["--set", s] for s in SMALL], []))
  assert rc == 0
  s = json.loads((tmp_path / "summary.json").read_text())
  for key in ("model", "w_bits", "a_bits", "fp_top1", "init_top1", "seconds"):
    assert key in s
  assert (s["model"], s["w_bits"], s["a_bits"]) == ("vit_fixture_patch4_28", 4, 8)
  assert s["test_images"] == 100 and s["calib_images"] == 50
  assert 0 <= s["init_top1"] <= 100 and s["seconds"] > 0
  assert s["quant"]["recipe"] == "reference" and s["quant"]["bias_correction"]  # the default
  assert "W4A8 init (reference)" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("quant.w_bits=9", r"bits=9.*\[2, 8\]"),
    ("quant.a_bits=1", r"bits=1.*\[2, 8\]"),
    ("quant.w_observer='median'", "w_observer='median'"),
    ("quant.recipe='brecq'", "recipe='brecq' is unknown.*fqvit"),
    ("model='deit_huge'", "model='deit_huge' is unknown"),
    ("data.source='idx'", None),  # with a missing folder, below
    ("data.source='parquet'", "data.source='parquet' is unknown"),
    ("checkpoint='/nonexistent/ckpt.safetensors'", "does not exist"),
])
def test_bad_config_values_give_clear_errors(tmp_path, capsys, override, message):
  extra = ["--set", "data.dir='/nonexistent/fmnist'"] if override.startswith("data.source='idx'") else []
  rc = main(["eval", "--config", "configs/fixture_w8a8.py", "--workdir", str(tmp_path),
             "--set", override] + extra + sum([["--set", s] for s in SMALL if "checkpoint" not in s
                                              or "checkpoint" not in override], []))
  assert rc == 2
  err = capsys.readouterr().err
  assert "error:" in err
  assert (message or "/nonexistent/fmnist") in err or __import__("re").search(message, err)


def test_overrides_and_config_files():
  c = apply_overrides(base_config(), ["quant.w_bits=3", "data.source=idx", "quant.ptf=False"])
  assert (c.quant.w_bits, c.data.source, c.quant.ptf) == (3, "idx", False)
  with pytest.raises(ValueError, match="no config field 'quant.wbits'"):
    apply_overrides(base_config(), ["quant.wbits=3"])
  with pytest.raises(ValueError, match="key=value"):
    apply_overrides(base_config(), ["quant.w_bits"])
  with pytest.raises(ValueError, match="W<bits>A<bits>"):
    bits_config("8bit", "vit_fixture_patch4_28")
  c = load_config("configs/imagenet.py:deit_small,W3A8")
  assert (c.model, c.quant.w_bits, c.data.source) == ("deit_small_patch16_224", 3, "tfds")
  c = load_config("configs/imagenet.py:bits=W4A4,model=swin_tiny")
  assert (c.model, c.quant.w_bits, c.quant.a_bits) == ("swin_tiny_patch4_window7_224", 4, 4)
  assert load_config("configs/imagenet.py:levit_128").model == "levit_128"  # exact name first
  for arg, says in [("levit_12", "unknown"), ("deit", "ambiguous"), ("depth=3", "'depth'")]:
    with pytest.raises(ValueError, match=says):
      load_config(f"configs/imagenet.py:{arg}")
  for name in ("fixture_w8a8", "fixture_w4a8", "fixture_w3a8", "imagenet", "cifar10",
               "efficientnet_lite0"):
    get_preset(load_config(f"configs/{name}.py").model)
  with pytest.raises(FileNotFoundError):
    load_config("configs/nope.py")


def test_timm_config_without_checkpoint_says_what_to_set(tmp_path, capsys):
  assert main(["eval", "--config", "configs/imagenet.py:deit_tiny", "--workdir",
               str(tmp_path)]) == 2
  assert "--set checkpoint=PATH" in capsys.readouterr().err


def test_nan_in_calibration_is_reported_by_point():
  cfg = get_preset("vit_fixture_patch4_28")
  params = init_params(cfg, jax.random.key(0))
  params["blocks_2"]["mlp"]["fc1"]["bias"] = params["blocks_2"]["mlp"]["fc1"]["bias"].at[0].set(np.nan)
  x = np.random.default_rng(0).standard_normal((20, 28, 28, 1)).astype(np.float32)
  with pytest.raises(ValueError, match=r"NaN/inf.*blocks_2/mlp/gelu_out"):
    calibrate(cfg, QuantConfig(), params, x, batch_size=20, progress=False)
  with pytest.raises(ValueError, match="fewer than one batch"):
    calibrate(cfg, QuantConfig(), params, x, batch_size=50, progress=False)


def test_metrics():
  logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]], np.float32)
  labels = np.array([1, 1, 0])
  assert topk_accuracy(logits, labels, 1) == pytest.approx(100 / 3)
  assert topk_accuracy(logits, labels, 2) == pytest.approx(200 / 3)
  m = classification_metrics(logits, labels, fp_logits=logits[[0, 2, 1]])
  assert m["agreement"] == pytest.approx(100 / 3)


def test_metrics_break_ties_as_argmax():
  # exact ties are common in a quantized model's logits: top-1 must count the
  # class argmax picks (the lowest index), whatever order a partition leaves
  rng = np.random.default_rng(0)
  logits = rng.integers(0, 3, (2000, 10)).astype(np.float32)  # many tied maxima
  labels = rng.integers(0, 10, 2000)
  assert topk_accuracy(logits, labels, 1) == pytest.approx(
      100 * np.mean(logits.argmax(-1) == labels))
  top3 = np.argsort(-logits, -1, kind="stable")[:, :3]
  assert topk_accuracy(logits, labels, 3) == pytest.approx(
      100 * np.mean((top3 == labels[:, None]).any(-1)))


def test_search_command_outputs_and_resume_guard(fixture_run, tmp_path, capsys):
  """The shared finished run (conftest.fixture_run: 4 of the 6 units, 1 pass of 2
  children, 50 held-out images): its files, and a second run into its workdir."""
  run, out = fixture_run
  workdir = tmp_path / "w"
  shutil.copytree(run, workdir)
  s = json.loads((workdir / "summary.json").read_text())
  for key in ("fp_top1", "init_top1", "final_top1", "fitness_init", "fitness_final",
              "candidates_evaluated", "seconds", "strategy", "loss", "seed"):
    assert key in s
  assert s["candidates_evaluated"] == 4 * (1 + 2) and s["fitness_final"] <= s["fitness_init"] + 1e-5
  lines = (workdir / "history.jsonl").read_text().splitlines()
  assert [json.loads(l)["unit"] for l in lines] == [5, 4, 3, 2]  # the last unit first
  assert (workdir / "fitness.png").stat().st_size > 1000
  assert s["holdout_images"] == 50 and [h["pass"] for h in s["holdout"]] == [0, 1]
  assert s["selected_pass"] in (0, 1) and "last_pass_top1" in s
  c = s["compile"]  # programs built or read from the (test run's) persistent cache
  assert set(c) == {"compilations", "cache_hits", "compile_seconds", "trace_seconds"}
  assert c["compilations"] + c["cache_hits"] > 0 and c["compile_seconds"] > 0
  assert "Evol-Q (evolq, infonce)" in out and "held-out top-1 per pass" in out
  args = ["search", "--config", FIXTURE_CONFIG, "--workdir", str(workdir)] + sum(
      [["--set", x] for x in FIXTURE_RUN_SETS], [])
  assert main(args) == 2  # a second run into the same workdir needs --resume
  assert "--resume" in capsys.readouterr().err
  assert main(args + ["--resume"]) == 0
  assert json.loads((workdir / "summary.json").read_text())["fitness_final"] == s["fitness_final"]


def test_bundled_fixture_w8a8_stays_close_to_fp(tmp_path):
  """The trained fixture: W8A8 after FQ-ViT calibration keeps FP's accuracy."""
  rc = main(["eval", "--config", "configs/fixture_w8a8.py", "--workdir", str(tmp_path),
             "--set", "eval.limit=1000", "--set", "eval.batch_size=50",
             "--set", "calib.num_images=50", "--set", "calib.batch_size=50"])  # the shared
  # run's shapes (conftest.FIXTURE_RUN_SETS): its calibration and FP forward programs
  assert rc == 0
  s = json.loads((tmp_path / "summary.json").read_text())
  assert s["fp_top1"] > 85.0  # the checkpoint is the trained one
  assert abs(s["init_top1"] - s["fp_top1"]) <= 1.0
  assert s["init_agreement"] >= 97.0


def test_train_command_smoke(tmp_path, capsys):
  """`evolq train` (the fixture's recipe) runs end to end on a tiny budget, on the fixture's
  ViT with 2 of its 6 blocks (its training step compiles a third of the code)."""
  cfg = small_fixture_vit()
  rc = main(["train", "--config", "configs/train_fixture.py", "--workdir", str(tmp_path),
             "--set", f"model='{cfg.name}'", "--set", "data.source='bundled'",
             "--set", "data.limit=256", "--set", "train.epochs=1"])
  assert rc == 0
  s = json.loads((tmp_path / "train_summary.json").read_text())
  assert s["epochs"] == 1 and np.isfinite(s["history"][0]["train_loss"])
  from evolq_jax.models import load_params
  assert load_params(str(tmp_path / "params.safetensors"), cfg)["head"]["kernel"].shape == (96, 10)
  assert "final test top-1" in capsys.readouterr().out
