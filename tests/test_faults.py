"""Fault injection (issue 11): one test per numbered case of the issue, and kills
during calibration, mid-block and during a checkpoint write, each followed by
--resume and compared with one uninterrupted run (README, "Guarantees").

Kills are a real SIGKILL of a child process (during calibration) or, as in
tests/test_search.py, a KeyboardInterrupt raised in this process at the chosen
point. Budgets are tiny (conftest.FIXTURE_RUN_SETS): 1 pass x 1 generation x 2
children, 50 calibration images, 100 test images. Data are the bundled fixture or
folders written here.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import FIXTURE_CONFIG, FIXTURE_RUN_SETS, _network_refused
from PIL import Image

from evolq_jax import pipeline
from evolq_jax.cli import main
from evolq_jax.config import apply_overrides, load_config
from evolq_jax.data import load_split
from evolq_jax.models import get_preset
from evolq_jax.search import engine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(REPO, "evolq_jax", "data", "bundled")
TINY = FIXTURE_RUN_SETS  # the shared run's settings: a resumed kill must equal it
LOCK = "evolq.lock"


def _sets(items):
  return sum((["--set", s] for s in items), [])


def _cli(command, workdir, *extra, sets=(), config=FIXTURE_CONFIG):
  return main([command, "--config", config, "--workdir", str(workdir), *extra]
              + _sets(TINY + list(sets)))


def _steps(workdir) -> list:
  """The finished search checkpoints (orbax names a step's folder by its number)."""
  return sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


def _result(workdir) -> dict:
  """What a run promises to reproduce: summary (less timings), history, final QParams."""
  summary = json.loads((workdir / "summary.json").read_text())
  for key in ("seconds", "search_seconds", "code", "compile"):
    summary.pop(key, None)
  last = ocp.StandardCheckpointer().restore(
      workdir / "checkpoints" / str(_steps(workdir)[-1]) / "qparams")
  return {"summary": summary, "history": (workdir / "history.jsonl").read_text(),
          "qparams": {k: np.asarray(v).tolist() for k, v in _flat(last).items()}}


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    return {k2: v for k, sub in tree.items() for k2, v in _flat(sub, f"{prefix}{k}/").items()}
  return {prefix: tree}


def _copy(src, dest):
  shutil.copytree(src, dest)
  return dest


def _errors(err: str, command="eval") -> list:
  return [line for line in err.splitlines() if line.startswith(f"evolq {command}: error:")]


@pytest.fixture
def no_network(monkeypatch):
  return _network_refused(monkeypatch)


@pytest.fixture(scope="module")
def reference(fixture_run):
  """The uninterrupted tiny W3A8 search (conftest.fixture_run, built with the network
  blocked): the run every kill must equal."""
  return fixture_run[0]


def _image_folder(root, splits: dict, fmt="PNG", size=8):
  """root/<split>/<class>/0.<fmt>: one small image per class."""
  rng = np.random.default_rng(0)
  for split, classes in splits.items():
    for cls in classes:
      (root / split / cls).mkdir(parents=True)
      pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
      Image.fromarray(pixels, "RGB").save(root / split / cls / f"0.{fmt.lower()}", format=fmt)
  return root


TEN = [f"c{i}" for i in range(10)]


def _folder_config(root, *extra):
  return apply_overrides(load_config(FIXTURE_CONFIG), [
      "data.source='image_folder'", f"data.dir='{root}'", "calib.num_images=10",
      "calib.batch_size=10", *extra])


# ---------------------------------------------------------------- 1. run identity

def test_1_resume_with_another_config_is_refused_naming_the_fields(reference, tmp_path,
                                                                   capsys):
  run = json.loads((reference / "run.json").read_text())
  assert run["command"] == "search" and run["config"]["quant"]["w_bits"] == 3
  assert run["code"]["evolq_jax"] and "git" in run["code"]
  workdir = _copy(reference, tmp_path / "w")
  before = (workdir / "summary.json").read_text()
  capsys.readouterr()
  assert _cli("search", workdir, "--resume", sets=["quant.w_bits=4", "search.loss='mse'"]) == 2
  err = _errors(capsys.readouterr().err, "search")
  assert len(err) == 1 and "quant.w_bits (3 -> 4)" in err[0] and "search.loss" in err[0]
  assert (workdir / "summary.json").read_text() == before


def test_1b_resume_takes_the_runs_own_config_and_sets_must_agree(reference, tmp_path, capsys):
  workdir = _copy(reference, tmp_path / "w")
  before = json.loads((workdir / "summary.json").read_text())
  capsys.readouterr()
  # no --config: run.json's; a --set that changes the result is refused, naming it
  assert main(["search", "--workdir", str(workdir), "--resume", "--set", "quant.w_bits=4"]) == 2
  err = _errors(capsys.readouterr().err, "search")
  assert len(err) == 1 and "quant.w_bits (3 -> 4)" in err[0], err
  # one that only changes speed is taken; the finished run is the same run
  assert main(["search", "--workdir", str(workdir), "--resume", "--set", "eval.batch_size=100",
               "calib.batch_size=50"]) == 0
  after = json.loads((workdir / "summary.json").read_text())
  for key in ("final_top1", "fitness_final", "candidates_evaluated", "init_top1"):
    assert after[key] == before[key], key
  assert main(["search", "--workdir", str(tmp_path / "empty")]) == 2
  assert "needs --config" in _errors(capsys.readouterr().err, "search")[0]


def _search_process(workdir, calibrate: str):
  """`evolq search` (the fixture, TINY) in a subprocess whose calibration is
  `calibrate` (a statement run instead of it: a signal, say). -> (process, stderr)."""
  script = ("import os, signal, sys, time\n"
            "import evolq_jax.pipeline as p\n"
            f"def calibrate(*a, **k):\n  {calibrate}\n"
            "p.calibrate = calibrate\n"
            "from evolq_jax.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
  proc = subprocess.Popen([sys.executable, "-c", script, "search", "--config", FIXTURE_CONFIG,
                           "--workdir", str(workdir)] + _sets(TINY), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return proc, proc.communicate(timeout=300)[1]


def test_1c_sigterm_unwinds_like_ctrl_c(tmp_path):
  workdir = tmp_path / "w"
  proc, err = _search_process(workdir, "os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)")
  assert proc.returncode == 143, err[-2000:]
  assert "evolq search: terminated (SIGTERM); --resume continues" in err
  assert not (workdir / LOCK).exists() and (workdir / "run.json").exists()


# ---------------------------------------------------------------- 2. one writer

def test_2_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
  workdir = tmp_path / "w"
  workdir.mkdir()
  fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run writing here
  os.write(fd, b"pid 4242 on elsewhere since 2026-01-01T00:00:00\n")
  try:
    assert _cli("search", workdir) == 2
    err = _errors(capsys.readouterr().err, "search")
    assert len(err) == 1 and "in use by another evolq run (pid 4242" in err[0]
    assert sorted(os.listdir(workdir)) == [LOCK]  # nothing written beside it
  finally:
    os.close(fd)  # that run dies: its lock file stays, held by nobody
  # A run that takes the stale lock (it then stops at a missing checkpoint) says so
  # and leaves no lock behind.
  assert _cli("eval", workdir, sets=["checkpoint='/nonexistent/x.safetensors'"]) == 2
  err = capsys.readouterr().err
  assert "took over the lock" in err and "pid 4242" in err
  assert not (workdir / LOCK).exists()


# ---------------------------------------------------------------- 3. no network

def test_3_nothing_connects_and_an_unprepared_tfds_dataset_says_how_to_prepare(
    tmp_path, capsys, no_network):
  assert _cli("eval", tmp_path / "w", sets=[
      "data.source='tfds'", "data.name='mnist'", f"data.data_dir='{tmp_path / 'tfds'}'"]) == 2
  err = _errors(capsys.readouterr().err)
  assert len(err) == 1 and "not prepared" in err[0] and "tfds build mnist" in err[0]
  assert no_network == []
  # A prepared dataset reads with the network blocked.
  from test_data import _build_tfds
  splits = _build_tfds(tmp_path / "ready")
  _, y = load_split({"source": "tfds", "name": "tiny_images", "data_dir": str(tmp_path / "ready")},
                    "train", get_preset("vit_fixture_patch4_28"))
  assert y.tolist() == [label for _, label in splits["train"]] and no_network == []


# ---------------------------------------------------------------- 4. config arguments

def test_4_a_config_that_takes_no_argument_refuses_one(tmp_path, capsys):
  assert _cli("eval", tmp_path / "w", config=FIXTURE_CONFIG + ":W9A8") == 2
  err = _errors(capsys.readouterr().err)
  assert len(err) == 1 and "takes no argument" in err[0] and "':W9A8'" in err[0]
  assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------- 5. labels

def test_5_image_folder_labels_follow_the_train_classes(tmp_path):
  cfg = get_preset("vit_fixture_patch4_28")
  # The validation split lacks c3: every later class keeps its train-split label.
  root = _image_folder(tmp_path / "a", {"train": TEN,
                                        "validation": [c for c in TEN if c != "c3"]})
  with pytest.warns(UserWarning, match=r"lacks 1 of the 10 classes.*c3"):
    data = pipeline.load_data(_folder_config(root), cfg)
  assert data["test"][1].tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
  # An explicit class list numbers every split.
  (root / "classes.txt").write_text("\n".join(reversed(TEN)))
  _, y = load_split({"source": "image_folder", "dir": str(root)}, "train", cfg)
  assert y.tolist() == list(range(9, -1, -1))
  # A class the list lacks is an error, not a silent new label.
  root = _image_folder(tmp_path / "b", {"train": TEN, "validation": TEN + ["zebra"]})
  with pytest.raises(ValueError, match=r"missing from the class list.*zebra"):
    pipeline.load_data(_folder_config(root), cfg)
  # 12 classes for a 10-class model.
  root = _image_folder(tmp_path / "c", {"train": TEN + ["c10", "c11"], "validation": TEN})
  with pytest.raises(ValueError, match=r"12 classes but model 'vit_fixture_patch4_28' has 10"):
    pipeline.load_data(_folder_config(root), cfg)
  # A test split under another name: the error names the field that picks it.
  root = _image_folder(tmp_path / "d", {"train": TEN, "val": TEN})
  with pytest.raises(FileNotFoundError, match=r"data.test_split='validation'.*--set "
                     r"data.test_split=val"):
    pipeline.load_data(_folder_config(root), cfg)
  assert len(pipeline.load_data(_folder_config(root, "data.test_split='val'"), cfg)["test"][1]) \
      == 10
  # --help says how splits and labels are found
  from evolq_jax.cli import build_parser
  helptext = build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
  assert "data.test_split (default 'validation'" in helptext and "classes.txt" in helptext


def test_5b_set_takes_several_pairs_and_printed_figures_are_rounded():
  from evolq_jax.cli import build_parser
  from evolq_jax.evaluate import percent
  args = build_parser().parse_args(["search", "--config", FIXTURE_CONFIG, "--workdir", "w",
                                    "--set", "quant.w_bits=4", "search.passes=2", "--set",
                                    "seed=1"])
  assert args.set == ["quant.w_bits=4", "search.passes=2", "seed=1"]
  c = apply_overrides(load_config(FIXTURE_CONFIG), args.set)
  assert (c.quant.w_bits, c.search.passes, c.seed) == (4, 2, 1)
  assert repr(percent(np.array([True] * 896 + [False] * 104))) == "89.6"


# ---------------------------------------------------------------- 6. sizes

def _no_calibration(monkeypatch):
  def refuse(*args, **kw):
    raise AssertionError("calibration started before the bad input was found")
  monkeypatch.setattr(pipeline, "calibrate", refuse)


def test_6_sizes_are_checked_before_any_work_and_reported_as_used(tmp_path, capsys,
                                                                   monkeypatch):
  real = pipeline.calibrate
  _no_calibration(monkeypatch)
  for i, (bad, field) in enumerate([
      ("calib.num_images=-5", "calib.num_images=-5"), ("eval.limit=-1", "eval.limit=-1"),
      ("calib.num_images=70", "not a multiple of calib.batch_size=50: calibration would "
       "drop the last 20 images. Use 50 or 100,"),
      ("calib.num_images=30", "drop the last 30 images. Use 50,"),
      ("eval.limit=20000", "eval.limit=20000"), ("calib.num_images=5000", "calib.num_images=5000"),
      ("eval.batch_size=0", "eval.batch_size=0")]):
    assert _cli("eval", tmp_path / f"w{i}", sets=[bad]) == 2, bad
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and field in err[0], (bad, err)
  monkeypatch.setattr(pipeline, "calibrate", real)
  assert _cli("eval", tmp_path / "ok", sets=["calib.num_images=200", "eval.limit=300"]) == 0
  s = json.loads((tmp_path / "ok" / "summary.json").read_text())
  assert (s["calib_images"], s["test_images"]) == (200, 300)


# ---------------------------------------------------------------- 7. fail fast

def test_7_workdir_data_checkpoint_and_loss_batch_are_checked_before_calibration(
    tmp_path, capsys, monkeypatch):
  _no_calibration(monkeypatch)
  a_file = tmp_path / "file"
  a_file.write_text("not a folder")
  for command, workdir, sets, says in [
      ("eval", a_file, [], "is a file"),
      ("eval", a_file / "sub", [], "not a writable folder"),
      ("search", tmp_path / "w1", ["search.loss_batch=200"], "search.loss_batch=200"),
      ("eval", tmp_path / "w2", ["data.source='idx'", f"data.dir='{tmp_path / 'none'}'"],
       str(tmp_path / "none")),
      ("eval", tmp_path / "w3", [f"checkpoint='{tmp_path / 'none.safetensors'}'"],
       "none.safetensors"),
      ("search", tmp_path / "w4", ["search.units=(7,)"], "search.units"),
      ("search", tmp_path / "w5", ["search.layers=('qkvv',)"], "qkvv"),
      ("search", tmp_path / "w6", ["holdout.alpha=2.0"], "holdout.alpha=2.0"),
      ("eval", tmp_path / "w7", ["holdout.alpha=0"], "holdout.alpha=0")]:
    assert _cli(command, workdir, sets=sets) == 2, says
    err = _errors(capsys.readouterr().err, command)
    assert len(err) == 1 and says in err[0], (says, err)
  # a mistyped --workdir with --resume: an error, not a fresh run in silence
  assert _cli("search", tmp_path / "typo", "--resume") == 2
  err = _errors(capsys.readouterr().err, "search")
  assert len(err) == 1 and "holds no run to continue" in err[0], err
  assert not (tmp_path / "typo" / "run.json").exists()
  assert main(["landscape", "--config", FIXTURE_CONFIG, "--workdir", str(tmp_path / "w8"),
               "--layer", "qkv", "--test-limit", "-5"]) == 2
  err = _errors(capsys.readouterr().err, "landscape")
  assert len(err) == 1 and "--test-limit -5" in err[0], err


# ---------------------------------------------------------------- 8. corrupt files

def _truncated_safetensors(tmp_path):
  path = tmp_path / "ckpt.safetensors"
  raw = open(os.path.join(REPO, "evolq_jax", "checkpoints", "vit_fixture_patch4_28.safetensors"),
             "rb").read()
  path.write_bytes(raw[:len(raw) // 2])
  return [f"checkpoint='{path}'"], str(path), None


def _checkpoint_folder(tmp_path):
  (tmp_path / "ckpt").mkdir()
  return [f"checkpoint='{tmp_path / 'ckpt'}'"], str(tmp_path / "ckpt"), None


def _truncated_idx(tmp_path):
  folder = _copy(BUNDLED, tmp_path / "idx")
  path = folder / "train-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:100_000])
  return ["data.source='idx'", f"data.dir='{folder}'"], str(path), None


def _truncated_jpeg(tmp_path):
  root = _image_folder(tmp_path / "jpg", {"train": TEN, "validation": TEN}, fmt="JPEG", size=64)
  path = root / "train" / "c4" / "0.jpeg"
  path.write_bytes(path.read_bytes()[:300])
  return (["data.source='image_folder'", f"data.dir='{root}'", "calib.num_images=10",
           "calib.batch_size=10", "holdout.num_images=0", "eval.limit=0"], str(path), None)


def _config_folder(tmp_path):
  return [], os.path.join(REPO, "configs"), os.path.join(REPO, "configs")


@pytest.mark.parametrize("make", [_truncated_safetensors, _checkpoint_folder, _truncated_idx,
                                  _truncated_jpeg, _config_folder],
                         ids=["safetensors", "checkpoint-folder", "idx-gz", "jpeg",
                              "config-folder"])
def test_8_corrupt_files_get_one_line_errors_naming_them(tmp_path, capsys, monkeypatch, make):
  _no_calibration(monkeypatch)
  sets, path, config = make(tmp_path)
  assert _cli("eval", tmp_path / "w", sets=sets, config=config or FIXTURE_CONFIG) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = _errors(err)
  assert len(lines) == 1 and path in lines[0], lines
  if make is _truncated_safetensors:  # --debug shows the traceback
    with pytest.raises(ValueError, match="truncated"):
      _cli("eval", tmp_path / "w", "--debug", sets=sets)


# ---------------------------------------------------------------- 9. corrupt checkpoint

def test_9_resume_falls_back_to_the_newest_readable_checkpoint(reference, tmp_path, capsys):
  workdir = _copy(reference, tmp_path / "w")
  newest = _steps(workdir)[-1]
  for data in (workdir / "checkpoints" / str(newest) / "qparams").rglob("d/*"):
    data.write_bytes(b"garbage")  # the arrays' bytes, as a failing disk might leave them
  capsys.readouterr()
  assert _cli("search", workdir, "--resume") == 0
  err = capsys.readouterr().err
  assert f"search checkpoint {newest}" in err and f"falling back to checkpoint {newest - 1}" in err
  assert (workdir / "checkpoints.unreadable" / str(newest)).is_dir()
  assert _result(workdir) == _result(reference)


# ---------------------------------------------------------------- 10. another run's results

def test_10_eval_into_a_search_workdir_is_refused_unless_overwrite(reference, tmp_path, capsys):
  workdir = _copy(reference, tmp_path / "w")
  before = (workdir / "summary.json").read_text()
  capsys.readouterr()
  assert _cli("eval", workdir) == 2
  err = _errors(capsys.readouterr().err)
  assert len(err) == 1 and "holds the results of an `evolq search` run" in err[0]
  assert "--overwrite" in err[0] and (workdir / "summary.json").read_text() == before
  for name in ("model_int.safetensors", "model_int.json", "model_int.stablehlo"):
    (workdir / name).write_text("an export of the search run")
  assert _cli("eval", workdir, "--overwrite") == 0
  left = set(os.listdir(workdir))  # nothing of the search is left to describe another run
  assert {"run.json", "summary.json"} <= left and not left & {
      "history.jsonl", "fitness.png", "checkpoints", "checkpoints.unreadable", LOCK,
      "model_int.safetensors", "model_int.json", "model_int.stablehlo"}
  assert "final_top1" not in json.loads((workdir / "summary.json").read_text())
  assert json.loads((workdir / "run.json").read_text())["command"] == "eval"


# ---------------------------------------------------------------- 11. bit widths

def test_11_bit_width_errors_name_the_field(tmp_path, capsys):
  for bad, field, other in (("quant.w_bits=9", "quant.w_bits=9", "a_bits"),
                            ("quant.a_bits=1", "quant.a_bits=1", "w_bits")):
    assert _cli("eval", tmp_path / "w", sets=[bad]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and field in err[0] and other not in err[0], err


# ---------------------------------------------------------------- kills, then --resume

def test_killed_during_calibration_then_resumed_equals_uninterrupted(reference, tmp_path,
                                                                      capsys):
  workdir = tmp_path / "w"
  proc, err = _search_process(workdir, "os.kill(os.getpid(), signal.SIGKILL)")
  assert proc.returncode == -signal.SIGKILL, err[-2000:]
  assert (workdir / LOCK).read_text().startswith(f"pid {proc.pid} ")  # left by the dead run
  capsys.readouterr()
  assert _cli("search", workdir, "--resume") == 0
  assert "took over the lock" in capsys.readouterr().err
  assert _result(workdir) == _result(reference)


def _dies_on_call(monkeypatch, owner, name, nth, wrap=None):
  """owner.name raises KeyboardInterrupt (a kill) on its nth call; `wrap` instead
  wraps that call's return value (to die later inside it)."""
  real, calls = getattr(owner, name), {"n": 0}

  def dying(*args, **kw):
    calls["n"] += 1
    if calls["n"] == nth and wrap is None:
      raise KeyboardInterrupt
    out = real(*args, **kw)
    return wrap(out) if calls["n"] == nth else out

  monkeypatch.setattr(owner, name, dying)


def _score_then_die(score):
  """A block's scorer that dies on its second call: the first generation, mid-block."""
  calls = {"n": 0}

  def scoring(*args, **kw):
    calls["n"] += 1
    if calls["n"] == 2:
      raise KeyboardInterrupt
    return score(*args, **kw)
  return scoring


def test_killed_mid_block_then_in_a_checkpoint_write_then_resumed_equals_uninterrupted(
    reference, tmp_path, capsys, monkeypatch):
  """Two kills of one run, each resumed: in the third block searched (mid-block),
  then, in the resumed run, while its first checkpoint's state is written."""
  workdir = tmp_path / "w"
  _dies_on_call(monkeypatch, engine, "population_scorer", 3, wrap=_score_then_die)
  assert _cli("search", workdir) == 130  # killed in the third block searched
  assert "interrupted; --resume continues" in capsys.readouterr().err
  assert _steps(workdir) == [1, 2] and not (workdir / LOCK).exists()
  monkeypatch.undo()
  real = ocp.JsonCheckpointHandler.async_save

  async def dying(self, *args, **kw):  # the arrays are written, the state is not
    raise KeyboardInterrupt

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", dying)
  assert _cli("search", workdir, "--resume") == 130
  left = os.listdir(workdir / "checkpoints")
  assert "3.orbax-checkpoint-tmp" in left and _steps(workdir) == [1, 2], left
  monkeypatch.undo()
  assert ocp.JsonCheckpointHandler.async_save is real
  assert _cli("search", workdir, "--resume") == 0
  assert _result(workdir) == _result(reference)
