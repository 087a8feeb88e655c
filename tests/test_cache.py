"""What runs keep between them (evolq_jax/cache.py): compiled programs and FP logits."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

from evolq_jax import cache
from evolq_jax.models import get_preset

HERE = os.path.dirname(__file__)


def test_fp_logits_are_computed_once_per_model_checkpoint_and_images(tmp_path, monkeypatch):
  monkeypatch.setenv("EVOLQ_CACHE", str(tmp_path))
  cfg = get_preset("vit_fixture_patch4_28")
  params = {"w": np.arange(6, dtype=np.float32)}
  images = np.ones((2, 3), np.float32)
  calls = []

  def compute(value):
    def run():
      calls.append(value)
      return jax.numpy.full((2, 10), value, jax.numpy.float32)
    return run

  first = cache.fp_logits(cfg, params, images, compute(1.0))
  again = cache.fp_logits(cfg, params, images, compute(2.0))  # read back: not computed
  np.testing.assert_array_equal(again, first)
  other = {"w": params["w"] + 1}  # another checkpoint, other images: computed
  cache.fp_logits(cfg, other, images, compute(3.0))
  cache.fp_logits(cfg, params, images * 2, compute(4.0))
  assert calls == [1.0, 3.0, 4.0] and len(os.listdir(tmp_path / "fp_logits")) == 3
  monkeypatch.setenv("EVOLQ_CACHE", "off")
  cache.fp_logits(cfg, params, images, compute(5.0))
  assert calls[-1] == 5.0


def _search_in_a_new_process(cache_dir) -> dict:
  code = f"""
import dataclasses, json, sys
sys.path.insert(0, {HERE!r})
import jax
from evolq_jax import cache
from evolq_jax.calibrate import calibrate
from evolq_jax.compilation import CompileLog
from evolq_jax.config import QuantConfig
from evolq_jax.models import get_preset, init_params
from evolq_jax.search import SearchConfig, search
print("CACHE", cache.enable_xla_cache())
cfg = dataclasses.replace(get_preset("vit_fixture_patch4_28"), depth=1)
qcfg = QuantConfig(w_bits=3, a_bits=8)
x = jax.random.normal(jax.random.key(1), (20, 28, 28, 1))
with CompileLog() as log:
  params = init_params(cfg, jax.random.key(0))
  qparams = calibrate(cfg, qcfg, params, x, batch_size=20, progress=False)
  r = search(cfg, qcfg, params, qparams, x, SearchConfig(passes=1, generations=1, children=2,
             loss_batch=10), progress=False)
print("RESULT " + json.dumps({{**log.summary(), "final": r.fitness_final}}))
"""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(EVOLQ_CACHE=str(cache_dir), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert f"CACHE {cache_dir / 'xla'}" in lines
  return json.loads(next(l for l in lines if l.startswith("RESULT "))[7:])


def test_a_second_identical_search_compiles_almost_nothing(tmp_path):
  """The persistent compilation cache is on by default (here in EVOLQ_CACHE): a second
  process that runs the same search reads its programs back instead of compiling."""
  cold = _search_in_a_new_process(tmp_path)
  warm = _search_in_a_new_process(tmp_path)
  assert warm["final"] == cold["final"]
  assert cold["compilations"] > 10 and warm["cache_hits"] >= 10
  assert warm["compilations"] <= 0.1 * cold["compilations"], (cold, warm)
  # issue 32's target: the warm run compiles (here: compiles and reads) in <= 10% of the time
  assert warm["compile_seconds"] <= 0.1 * cold["compile_seconds"], (cold, warm)
