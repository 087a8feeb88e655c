"""Block reconstruction with learned rounding (AdaRound / BRECQ / QDrop) on the
bundled fixture: the rounding ends hard, the reconstruction error falls, the
export holds the learned integers, and a run resumes to the same result."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import bundled_fixture

from evolq_jax.calibrate import same_activations, weights_for
from evolq_jax.export import build_export, unpack_codes
from evolq_jax.integer import int_logits
from evolq_jax.models import quantized_logits
from evolq_jax.pipeline import predict
from evolq_jax.qparams import QParams
from evolq_jax.quant import adaround
from evolq_jax.quant.uniform import quantize
from evolq_jax.search import SearchConfig, engine, search
from evolq_jax.search.reconstruct import reconstruct_unit, used_kernels

ITERS = 100


@pytest.fixture(scope="module")
def fixture(fixture_acts):
  """The bundled fixture at W3A8: its activations are conftest.fixture_acts' (the same 100
  calibration images and activation recipe), its weights calibrated here."""
  cfg, qcfg, params, data = bundled_fixture("W3A8", 100)
  assert same_activations(qcfg, fixture_acts[1])
  qparams = weights_for(params, qcfg, QParams(weights={}, acts=fixture_acts[3]))
  return cfg, qcfg, params, jnp.asarray(data["calib"]), qparams, data["test"][0][:300]


@pytest.fixture(scope="module")
def last_unit(fixture):
  """The last unit (block 5 and the head) reconstructed with QDrop and learned step sizes."""
  cfg, qcfg, params, x, qparams, _ = fixture
  # a tenth of our default steps at 20x the rate: V travels farther (Adam steps ~ lr each)
  scfg = SearchConfig(strategy="adaround", recon_iters=ITERS, round_lr=0.2, qdrop=True,
                      recon_acts=True)
  start = adaround.with_rounding(params, qparams)
  out, record, steps = reconstruct_unit(cfg, qcfg, scfg, params, start, x, 5,
                                        jax.random.key(0))
  return start, out, record, steps


def test_nearest_rounding_as_data_changes_nothing(fixture):
  cfg, qcfg, params, x, qparams, _ = fixture
  a = quantized_logits(cfg, qcfg, params, qparams, x[:50])
  b = quantized_logits(cfg, qcfg, params, adaround.with_rounding(params, qparams), x[:50])
  np.testing.assert_array_equal(a, b)


def test_the_unit_learns_the_kernels_its_forward_reads(fixture, last_unit):
  cfg, qcfg, params, x, qparams, _ = fixture
  _, _, record, _ = last_unit
  assert record["layers"] == ["blocks_5/attn/proj", "blocks_5/attn/qkv", "blocks_5/mlp/fc1",
                              "blocks_5/mlp/fc2", "head"]
  from evolq_jax.models.forward import quantize_params
  first = used_kernels(cfg, qcfg, 0, quantize_params(qcfg, params, qparams), qparams.acts,
                       x[:1])
  assert "patch_embed" in ["/".join(p) for p in first] and ("head",) not in first


def test_learned_rounding_ends_hard_and_lowers_the_error(last_unit):
  start, out, record, steps = last_unit
  assert steps == ITERS and record["curve"][-1]["step"] == ITERS
  # the regularizer, on from 20% of the steps, falls as h(V) goes to 0 or 1 although its
  # beta falls too (which alone would raise it); most variables end exactly at 0 or 1
  reg = [c["round_loss"] for c in record["curve"] if c["round_loss"] > 0]
  assert len(reg) >= 15 and reg[-1] < 0.2 * reg[0], reg
  assert record["hard_fraction"] >= 0.9, record["hard_fraction"]
  assert record["rec_loss_learned"] < 0.9 * record["rec_loss_nearest"], record
  assert 0 < record["flipped_fraction"] < 0.5
  rounding = out.weights["blocks_5"]["mlp"]["fc1"]["rounding"]
  assert rounding.dtype == jnp.int8 and set(np.unique(rounding)) <= {0, 1}
  # step sizes were learned: the unit's searchable activation scales moved
  assert record["act_points"] > 0
  moved = [not np.array_equal(a, b) for a, b in
           zip(jax.tree.leaves(start.acts["blocks_5"]), jax.tree.leaves(out.acts["blocks_5"]))]
  assert any(moved)


def test_the_export_holds_the_learned_integers(fixture, last_unit):
  cfg, qcfg, params, _, _, images = fixture
  _, out, _, _ = last_unit
  export = build_export(cfg, qcfg, params, out)
  spec, q = qcfg.w_spec, out.weights["blocks_5"]["mlp"]["fc1"]
  w = params["blocks_5"]["mlp"]["fc1"]["kernel"]
  codes = unpack_codes(export.arrays["weights/blocks_5/mlp/fc1/codes"], spec.bits, w.shape)
  learned = np.asarray(quantize(w, q["scale"], q["zero_point"], spec, q["rounding"]))
  nearest = np.asarray(quantize(w, q["scale"], q["zero_point"], spec))
  np.testing.assert_array_equal(codes.astype(np.int64) + spec.qmin, learned)
  assert np.any(learned != nearest)
  fq = predict(cfg, params, images, qcfg, out)
  il = int_logits(export, images)
  assert np.mean(fq.argmax(-1) == il.argmax(-1)) >= 0.99


def test_reconstruction_resumes_to_the_same_result(fixture, tmp_path, monkeypatch):
  cfg, qcfg, params, x, qparams, _ = fixture
  scfg = SearchConfig(strategy="adaround", recon_iters=20, units=(-2, -1))
  run = lambda **kw: search(cfg, qcfg, params, qparams, x, scfg, progress=False,  # noqa: E731
                            **kw)
  full = run()
  assert [h["unit"] for h in full.history] == [4, 5]  # first to last, one pass
  assert full.candidates == 40 and full.selected_pass == 1
  real, calls = engine.reconstruct_block, {"n": 0}

  def dying(*args, **kw):
    calls["n"] += 1
    if calls["n"] == 2:
      raise KeyboardInterrupt
    return real(*args, **kw)

  monkeypatch.setattr(engine, "reconstruct_block", dying)
  with pytest.raises(KeyboardInterrupt):
    run(workdir=str(tmp_path))
  monkeypatch.setattr(engine, "reconstruct_block", real)
  resumed = run(workdir=str(tmp_path), resume=True)
  for u, v in zip(jax.tree.leaves(full.qparams), jax.tree.leaves(resumed.qparams)):
    np.testing.assert_array_equal(u, v)


def test_reconstruction_settings_are_checked():
  with pytest.raises(ValueError, match="search.recon_iters=0 must be >= 1"):
    SearchConfig(strategy="adaround", recon_iters=0)
  with pytest.raises(ValueError, match="search.round_lr=0 must be > 0"):
    SearchConfig(strategy="adaround", round_lr=0)
  assert dataclasses.replace(SearchConfig(), strategy="adaround").family == "reconstruction"
