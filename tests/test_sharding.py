"""Memory-bounded chunking and the population split over devices.

The multi-device checks run this file as a script in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=4: the flag only takes effect
before JAX initializes, which the test process (and its xdist siblings) has
long done.
"""
import dataclasses
import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evolq_jax.calibrate import calibrate
from evolq_jax.config import QuantConfig
from evolq_jax.models import get_preset, init_params, quantize_params
from evolq_jax.search import (
  SearchConfig,
  searched_scales,
  fitness,
  population_fitness,
  prefix_activations,
  reference_logits,
  search,
)
from evolq_jax.search.sharding import population_mesh

CFG = dataclasses.replace(get_preset("vit_fixture_patch4_28"), depth=2)
QCFG = QuantConfig(w_bits=3, a_bits=8, a_observer="minmax")
N, LB, POP = 24, 12, 6
DEVICES = 4


def _setup(dtype=np.float32):
  params = init_params(CFG, jax.random.key(0))
  x = np.asarray(jax.random.normal(jax.random.key(1), (N, 28, 28, 1)))
  qparams = calibrate(CFG, QCFG, params, x, batch_size=12, progress=False)
  params, qparams, x = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, dtype)),
                                    (params, qparams, x))
  return params, x, qparams, reference_logits(CFG, params, x)


def _block_inputs(setup, block, k=POP):
  params, x, qparams, fp_ref = setup
  vec0, layout = searched_scales(CFG, QCFG, qparams, block, SearchConfig().space)
  noise = jax.random.uniform(jax.random.key(7), (k, vec0.shape[0]), vec0.dtype, 0.8, 1.2)
  tokens = prefix_activations(CFG, QCFG, params, qparams, x, block)
  fq = quantize_params(QCFG, params, qparams)
  return vec0 * noise, layout, (params, fq, qparams, tokens, fp_ref)


def test_chunk_shrinks_with_the_budget():
  per, fixed = 50 * 2 ** 20, 100 * 2 ** 20
  chunks = [fitness.chunk_for_budget(mb, per, fixed, 15) for mb in (4000, 800, 400, 200, 160)]
  assert chunks == [15, 14, 6, 2, 1]
  with pytest.warns(UserWarning, match="memory_mb=120 leaves room for no candidate"):
    assert fitness.chunk_for_budget(120, per, fixed, 15) == 1


def test_candidate_bytes_from_xla_grow_with_the_loss_batch():
  setup = _setup()
  _, layout, args = _block_inputs(setup, 0)
  sizes = {}
  for lb in (6, 12):
    sizes[lb] = fitness.candidate_bytes(*fitness.scoring_args(CFG, QCFG, 0, layout, "infonce",
                                                              3.0, lb, *args))
  assert 0 < sizes[6] < sizes[12]
  est = fitness.estimated_candidate_bytes(CFG, 0, 12)
  assert est / 4 < sizes[12] < est * 4  # the fallback estimate is of the right size


def test_memory_budget_picks_a_chunk_and_scores_like_unchunked():
  with jax.enable_x64(True):
    setup = _setup(np.float64)
    pop, layout, args = _block_inputs(setup, 1)
    whole = np.asarray(population_fitness(CFG, QCFG, 1, layout, "infonce", 3.0, LB, 0, pop,
                                          *args))
    per = fitness.candidate_bytes(*fitness.scoring_args(CFG, QCFG, 1, layout, "infonce", 3.0,
                                                        LB, *args))
    fixed = fitness.tree_bytes(args) + fitness.tree_bytes(pop)
    chunks = {}
    for mb in ((fixed + (POP + 0.5) * per) / 2 ** 20, (fixed + 2.5 * per) / 2 ** 20):
      scfg = SearchConfig(loss_batch=LB, memory_mb=mb, devices=1)
      inputs = fitness.unit_inputs(CFG, 1, layout, *args[:3])
      score = fitness.population_scorer(CFG, QCFG, scfg, inputs, *args[3:])
      got = np.asarray(score(pop))
      chunks[mb] = score.chunks[POP]
      np.testing.assert_allclose(got, whole, rtol=1e-12, atol=1e-12)
    assert list(chunks.values()) == [POP, 2]  # the tighter budget runs in chunks of 2
    assert np.ptp(whole) > 1e-3


def test_search_config_checks_the_new_options():
  with pytest.raises(ValueError, match="both set"):
    SearchConfig(chunk=4, memory_mb=100)
  with pytest.raises(ValueError, match="must be >= 0"):
    SearchConfig(devices=-1)
  with pytest.raises(ValueError, match="device\\(s\\) are visible"):
    population_mesh(len(jax.devices()) + 1)
  assert population_mesh(1) is None


def test_search_with_a_memory_budget_equals_the_unchunked_search():
  setup = _setup()
  params, x, qparams, _ = setup
  base = SearchConfig(passes=1, generations=2, children=POP, loss_batch=LB, devices=1)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the budget below must fit a chunk without warning
    tight = dataclasses.replace(base, memory_mb=_budget_for_chunk(setup, 2))
    a = search(CFG, QCFG, params, qparams, x, base, seed=3, progress=False)
    b = search(CFG, QCFG, params, qparams, x, tight, seed=3, progress=False)
  assert a.fitness_final == b.fitness_final
  for u, v in zip(jax.tree.leaves(a.qparams), jax.tree.leaves(b.qparams)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _budget_for_chunk(setup, chunk):
  """A budget (MiB) that fits `chunk` candidates of block 0, the hungriest block."""
  pop, layout, args = _block_inputs(setup, 0)
  per = fitness.candidate_bytes(*fitness.scoring_args(CFG, QCFG, 0, layout, "infonce", 3.0, LB,
                                                      *args))
  return (fitness.tree_bytes(args) + fitness.tree_bytes(pop) + (chunk + 0.5) * per) / 2 ** 20


# --- several devices (a subprocess with 4 forced host devices) ----------------

def _worker():
  """Prints the population fitness on one device and on all four, as JSON."""
  assert len(jax.devices()) == DEVICES, jax.devices()
  out = {"devices": len(jax.devices())}
  with jax.enable_x64(True):
    setup = _setup(np.float64)
    # block 1: a block behind a cached prefix; chunks of 1; 3 devices: 6 candidates pad to 9
    for block, devices, chunk in ((1, DEVICES, 0), (1, DEVICES, 1), (1, 3, 0)):
      pop, layout, args = _block_inputs(setup, block, k=POP)
      static = (CFG, QCFG, block, layout, "infonce", 3.0, LB)
      one = population_fitness(*static, 0, pop, *args)
      scfg = SearchConfig(loss_batch=LB, devices=devices, chunk=chunk)
      many = fitness.population_scorer(
          CFG, QCFG, scfg, fitness.unit_inputs(CFG, block, layout, *args[:3]), *args[3:])(pop)
      out[f"block{block}_devices{devices}_chunk{chunk}"] = [np.asarray(one).tolist(),
                                                            np.asarray(many).tolist()]
    mesh = population_mesh(0)
    sharded = population_fitness(*static, 0, pop, *fitness.sharding.replicate(args, mesh),
                                 mesh=mesh)
    out["devices_used"] = len(sharded.sharding.device_set)
  # a whole search sharded over devices equals the one-device search: test_multiprocess
  # (four devices over two processes)
  print("RESULT " + json.dumps(out))


@pytest.fixture(scope="module")
def four_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={DEVICES}").strip())
  proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                        timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def test_sharded_fitness_equals_one_device(four_devices):
  """One test: under xdist a module fixture used by two tests may be built on both
  workers, and this one is a 4-device subprocess."""
  assert four_devices["devices"] == DEVICES
  assert four_devices["devices_used"] == DEVICES  # really spread over the four
  keys = [k for k in four_devices if k.startswith("block")]
  assert len(keys) == 3
  for k in keys:
    one, many = four_devices[k]
    assert len(many) == POP  # the padding rows are dropped again
    np.testing.assert_allclose(many, one, rtol=1e-12, atol=1e-12, err_msg=k)
    assert np.ptp(one) > 1e-3


if __name__ == "__main__":
  _worker()
