"""Shared test helpers."""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile

# One XLA compilation cache for the whole test run: the two xdist workers, the
# CLI subprocesses and the notebook kernels inherit it from the process that
# starts them, so a program that many tests build (the fixture's forward, a
# search's scoring) compiles once. Set before jax is imported; a cache the
# user named is kept, one made here is removed when the run ends.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
_OWN_EVOLQ_CACHE = "EVOLQ_CACHE" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="evolq_jax_tests_xla_")
  # every program, as the package's own cache keeps them (cache.MIN_COMPILE_SECONDS): the
  # many small ones (eager ops, per-shape helpers) repeat across workers and subprocesses
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
if _OWN_EVOLQ_CACHE:  # the package's FP-logits cache (evolq_jax/cache.py), not in ~/.cache
  os.environ["EVOLQ_CACHE"] = tempfile.mkdtemp(prefix="evolq_jax_tests_cache_")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from evolq_jax.losses import batched_loss  # noqa: E402
from evolq_jax.models import quantize_params, quantized_logits  # noqa: E402


def import_timm():
  """Import timm beside a CPU-only torch (skips only when torch is absent).

  timm imports torchvision, whose C++ ops (`torchvision::nms`) fail to
  register against a CPU torch build; defining their schemas first lets the
  import go through. A missing timm (with torch present) is an error, not a
  skip: CI installs both, so the parity tests must run there.
  """
  torch = pytest.importorskip("torch")
  for op in ("nms", "qnms"):
    try:
      torch.library.define(f"torchvision::{op}",
                           "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except Exception:  # already defined (torchvision loaded fine, or second call)
      pass
  import timm
  return timm


def calibrated_shapes(cfg, qcfg, params, images):
  """The shapes of `calibrate(cfg, qcfg, params, images)`'s QParams, traced without
  compiling (for tests of a layout: which points, which scales per channel).
  images: an array or a jax.ShapeDtypeStruct."""
  import importlib
  cal = importlib.import_module("evolq_jax.calibrate")  # the module (the package's name
  # `calibrate` is the function)
  from evolq_jax.qparams import QParams
  from evolq_jax.quant.weights import calibrate_weights
  weights = jax.eval_shape(lambda p: calibrate_weights(p, qcfg.w_spec, qcfg.w_observer,
                                                       qcfg.weight_rules), params)
  states = jax.eval_shape(lambda p, x: cal._init_states(cfg, qcfg, p, x), params, images)
  acts = jax.eval_shape(lambda p, s, x: cal._fold_and_finalize(cfg, qcfg, p, s, x)[1],
                        params, states, images)
  return QParams(weights, acts)


def without_ptf(qcfg, qparams):
  """The recipe without PTF, and `qparams` fitted to it without calibrating again: each
  PTF point's per-channel scales replaced by one scale per tensor, their largest.
  -> (qcfg, qparams)."""
  import dataclasses
  one = lambda q: {**q, "scale": jnp.max(q["scale"])} if jnp.ndim(q["scale"]) else q  # noqa: E731
  acts = jax.tree.map(one, qparams.acts, is_leaf=lambda d: isinstance(d, dict) and "scale" in d)
  return dataclasses.replace(qcfg, ptf=False), qparams.replace(acts=acts)


def check_population_fitness(cfg, qcfg, arrays, unit: int, loss_batch: int,
                             layers=("attn",)) -> tuple:
  """The search's three programs agree on one unit of a tiny model: the vmapped
  population fitness, a loop of one candidate at a time on the same cached
  prefix, and the full forward with the candidate's scales set. In float64, so
  no value crosses a rounding boundary of the quantization grid between the
  programs. arrays: (params, images, qparams). -> the unit's scale layout."""
  from evolq_jax.search import (SearchConfig, population_fitness, prefix_activations,
                                reference_logits, searched_scales, set_scales)
  from evolq_jax.search.fitness import candidate_loss
  with jax.enable_x64(True):
    params, x, qparams = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), arrays)
    space = SearchConfig(loss_batch=loss_batch, layers=layers).space
    vec0, layout = searched_scales(cfg, qcfg, qparams, unit, space)
    pop = vec0 * jax.random.uniform(jax.random.key(0), (4, vec0.shape[0]), minval=0.8,
                                    maxval=1.2)
    tokens = prefix_activations(cfg, qcfg, params, qparams, x, unit)
    fp_ref = reference_logits(cfg, params, x)
    fq = quantize_params(qcfg, params, qparams)
    got = np.asarray(population_fitness(cfg, qcfg, unit, layout, "infonce", 3.0, loss_batch, 2,
                                        pop, params, fq, qparams, tokens, fp_ref))
    one = jax.jit(lambda v: candidate_loss(cfg, qcfg, unit, layout, "infonce", 3.0, loss_batch,
                                           v, params, fq, qparams, tokens, fp_ref))
    np.testing.assert_allclose(got, [float(one(v)) for v in pop], rtol=1e-6)
    full = [float(_full_loss(cfg, qcfg, loss_batch, params, set_scales(qparams, v, layout), x,
                             fp_ref)) for v in pop]
    np.testing.assert_allclose(got, full, rtol=1e-6)
    assert np.ptp(full) > 1e-4  # the candidates really differ
    return layout


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _full_loss(cfg, qcfg, loss_batch, params, qparams, x, fp_ref):
  """infoNCE of the whole quantized forward; one compiled program per model,
  shared by every unit's candidates."""
  return batched_loss("infonce", quantized_logits(cfg, qcfg, params, qparams, x), fp_ref,
                      loss_batch, 3.0)


# The test files, longest first (their summed test seconds, in the order of the last full
# run's --durations): xdist (--dist loadfile, setup.cfg) hands each worker whole files, in
# collection order, as it frees up. One worker then builds a file's module fixtures and
# compiles its programs once, and the longest files start first, so that the two workers
# end close together. A file not listed here goes after these.
LONGEST_FIRST = ("test_notebooks", "test_families", "test_search", "test_export",
                 "test_reconstruct", "test_bits", "test_onnx", "test_sharding", "test_pipeline",
                 "test_faults", "test_multiprocess", "test_pinned", "test_benchmarks",
                 "test_landscape", "test_levit", "test_docs", "test_cache", "test_model",
                 "test_timm_parity", "test_cifar10", "test_quant", "test_efficientnet",
                 "test_swin")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: within a file,
  # pytest's own order (module fixtures' parameters grouped) is kept


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  if _OWN_EVOLQ_CACHE:
    shutil.rmtree(os.environ["EVOLQ_CACHE"], ignore_errors=True)


def bundled_fixture(setting: str, calib_images: int):
  """The bundled Fashion-MNIST ViT at `setting` with the default recipe:
  -> (cfg, QuantConfig, params, data splits)."""
  from evolq_jax.config import bits_config, quant_config
  from evolq_jax.pipeline import load_data, load_model
  c = bits_config(setting, "vit_fixture_patch4_28", **{"calib.num_images": calib_images})
  cfg, params = load_model(c)
  return cfg, quant_config(c), params, load_data(c, cfg)


def _session_root(tmp_path_factory):
  """The folder the whole test session shares: under xdist, the workers' common base."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _session_lock(root, name: str):
  """Held while one worker builds the session's `name` and the other waits for it."""
  import fcntl
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


@pytest.fixture(scope="session")
def fixture_acts(tmp_path_factory):
  """The bundled fixture (W8A8 recipe), its activations calibrated once on 100 images (they
  do not depend on the weights' settings), and 500 test images:
  -> (cfg, QuantConfig, params, acts, images). For test_export, test_onnx and
  test_reconstruct (under xdist the first worker calibrates and saves the scales, the other
  reads them)."""
  from evolq_jax.calibrate import calibrate
  from evolq_jax.qparams import load_qparams, save_qparams
  cfg, qcfg, params, data = bundled_fixture("W8A8", 100)
  root = _session_root(tmp_path_factory)
  path = root / "fixture_acts.safetensors"
  with _session_lock(root, "fixture_acts"):
    if not path.exists():
      save_qparams(str(path), calibrate(cfg, qcfg, params, data["calib"], 100, progress=False))
  return cfg, qcfg, params, load_qparams(str(path)).acts, data["test"][0][:500]


def small_fixture_vit():
  """The bundled fixture's ViT with 2 of its 6 blocks, registered as a preset (so that a
  config or the CLI names it: model=NAME) -> its ModelConfig. For end-to-end runs that need
  no trained weights (checkpoint='random'): each of their programs compiles a third of the
  6-block model's code."""
  import dataclasses
  from evolq_jax.models import get_preset, register_preset
  return register_preset(dataclasses.replace(get_preset("vit_fixture_patch4_28"), depth=2,
                                             name="vit_fixture_depth2_test"))


def tiny_config(family: str):
  """A small random-weight preset of each registered family (shapes of the real
  layout, sizes a test can run in seconds). Each has a shared segment of two units
  (models/segments.py): Swin's is a shifted and an unshifted block of its first stage."""
  import dataclasses
  from evolq_jax.models.registry import FAMILIES
  base = FAMILIES[family].presets[0]
  sizes = {
      "vit": dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=3, num_heads=2),
      "swin": dict(img_size=16, patch_size=2, window_size=4, embed_dim=16, depths=(3, 1),
                   num_heads=(2, 4)),
      "levit": dict(img_size=64, embed_dim=(16, 24), key_dim=8, num_heads=(2, 3), depth=(1, 2)),
      "efficientnet": dict(img_size=32, head=64, stages=((1, 3, 1, 1, 32, 16),
                                                         (3, 3, 2, 6, 16, 24),
                                                         (1, 5, 2, 6, 24, 40))),
  }[family]
  return dataclasses.replace(base, name=f"{family}_tiny_test", num_classes=10, **sizes)


def tiny_qcfg():
  """The recipe the tiny presets are quantized with (test_families, test_onnx, the LeViT
  CLI test: one calibration program per family for all three): the reference's layout and
  weights (PTF, bias correction) at W4A8, with min/max activation ranges. OMSE's shrink
  ratios per point would add seconds of compiling and running a calibration that no check
  on random weights reads (test_quant and the fixture runs check OMSE)."""
  import dataclasses
  from evolq_jax.quant.recipe import QuantConfig, reference_init
  return dataclasses.replace(reference_init(QuantConfig(w_bits=4, a_bits=8)), a_observer="minmax")


# The one finished tiny `evolq search` of the bundled fixture (W3A8) that the
# tests of a finished run read: its outputs and --resume (test_pipeline), export
# (test_export), kills and corrupt checkpoints (test_faults, whose killed runs
# use these settings and must end equal to it).
FIXTURE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "fixture_w3a8.py")
FIXTURE_RUN_SETS = ["calib.num_images=50", "calib.batch_size=50", "eval.limit=100",
                    "eval.batch_size=50", "search.passes=1", "search.generations=1",
                    "search.children=2", "search.loss_batch=50", "holdout.num_images=50",
                    "search.units=(-4,-3,-2,-1)"]  # 4 of the 6 units: fewer compiles
# (batches of 50 everywhere: the evaluation, the whole-model loss and the held-out pick
# then run one compiled forward)


def _network_refused(mp) -> list:
  """Every way out to the network raises and is recorded; -> the list of attempts."""
  import socket
  attempts = []

  def refuse(*args, **kw):
    attempts.append(repr(args[:3]))
    raise OSError("the network is blocked in this test")

  for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"),
                      (socket, "create_connection"), (socket, "getaddrinfo")):
    mp.setattr(owner, name, refuse)
  return attempts


@pytest.fixture(scope="session")
def fixture_run(tmp_path_factory):
  """-> (workdir, its stdout) of the shared finished run, built once per test
  session: under xdist the first worker to ask builds it under a lock in the
  session's base folder, the other waits and reads it. Tests copy it before
  they change anything. Built with the network blocked: a run needs none."""
  import io
  root = _session_root(tmp_path_factory)
  workdir, out_file = root / "fixture_run", root / "fixture_run.stdout"
  with _session_lock(root, "fixture_run"):
    if not out_file.exists():
      shutil.rmtree(workdir, ignore_errors=True)
      from evolq_jax.cli import main
      out = io.StringIO()
      with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        attempts = _network_refused(mp)
        rc = main(["search", "--config", FIXTURE_CONFIG, "--workdir", str(workdir)]
                  + sum((["--set", s] for s in FIXTURE_RUN_SETS), []))
      assert rc == 0 and attempts == [], (rc, attempts)
      out_file.write_text(out.getvalue())
  return workdir, out_file.read_text()
