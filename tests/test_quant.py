"""Property tests of the pure quantizers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evolq_jax.config import QuantConfig
from evolq_jax.quant import (BitSpec, bias_correct, fake_quant, fake_quant_ste, log2_fake_quant,
                             observe, ptf_qparams, qparams_from_range, quantize)
from evolq_jax.quant.observers import finalize, init_state, update

SPECS = [BitSpec(b, s) for b in (2, 3, 4, 8) for s in (False, True)]


def _tensor(seed, shape=(64, 32), heavy=True):
  r = np.random.default_rng(seed)
  x = r.standard_normal(shape).astype(np.float32)
  if heavy:  # a few outliers, as in ViT activations
    x[r.integers(0, shape[0], 3), r.integers(0, shape[1], 3)] *= 20
  return jnp.asarray(x)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("channelwise", [False, True])
def test_fake_quant_is_idempotent_and_on_grid(spec, channelwise):
  x = _tensor(spec.bits)
  scale, zp = observe("minmax", x, spec, channelwise)
  y = fake_quant(x, scale, zp, spec)
  np.testing.assert_allclose(fake_quant(y, scale, zp, spec), y, atol=1e-6)
  q = quantize(x, scale, zp, spec)
  assert float(q.min()) >= spec.qmin and float(q.max()) <= spec.qmax
  np.testing.assert_array_equal(q, jnp.round(q))
  # every output is (integer - zero point) * scale
  k = y / scale + zp
  np.testing.assert_allclose(k, jnp.round(k), atol=1e-3)
  assert len(np.unique(np.asarray(q))) <= spec.levels


def test_minmax_range_is_covered_within_half_a_step():
  spec = BitSpec(4)
  x = _tensor(0)
  scale, zp = observe("minmax", x, spec)
  assert float(jnp.max(jnp.abs(fake_quant(x, scale, zp, spec) - x))) <= float(scale) / 2 + 1e-6


def test_per_channel_scales_follow_the_last_axis():
  x = np.ones((16, 4), np.float32) * np.array([1.0, 10.0, 100.0, 1000.0], np.float32)
  x[0] = -x[0]
  scale, zp = observe("minmax", jnp.asarray(x), BitSpec(8), channelwise=True)
  assert scale.shape == (4,)
  np.testing.assert_allclose(scale[1:] / scale[:-1], 10.0, rtol=1e-5)
  # broadcasting the wrong axis would rescale the rows instead
  y = fake_quant(jnp.asarray(x), scale, zp, BitSpec(8))
  np.testing.assert_allclose(y, x, rtol=1e-2)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("channelwise", [False, True])
def test_omse_never_worse_than_minmax(bits, channelwise):
  spec = BitSpec(bits)
  for seed in range(5):
    x = _tensor(seed)
    errs = {}
    for name in ("minmax", "omse"):
      s, z = observe(name, x, spec, channelwise)
      errs[name] = float(jnp.mean((fake_quant(x, s, z, spec) - x) ** 2))
    assert errs["omse"] <= errs["minmax"] + 1e-9
  if bits < 8:
    assert errs["omse"] < errs["minmax"]  # outliers make clipping pay off at low bits


def test_percentile_clips_outliers_and_ema_tracks_batches():
  spec = BitSpec(8)
  x = _tensor(1, (1000, 8))
  s_mm, _ = observe("minmax", x, spec)
  s_pc, _ = observe("percentile", x, spec)
  assert float(s_pc) < float(s_mm)
  state = init_state()
  for b in range(3):
    state = update("ema", state, jnp.full((4,), float(b + 1)))
  # first batch initializes, later ones move by EMA_SIGMA = 0.01
  np.testing.assert_allclose(state["max"], 1 + 0.01 * (2 - 1) + 0.01 * (3 - 1.01), rtol=1e-5)


def test_unknown_observer_is_named():
  with pytest.raises(ValueError, match="'median'.*minmax"):
    observe("median", jnp.ones(3), BitSpec(8))
  with pytest.raises(ValueError, match="a_observer='nope'"):
    QuantConfig(a_observer="nope")


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 3.5])
def test_bits_outside_range_are_rejected(bits):
  with pytest.raises(ValueError, match=r"bits=.*\[2, 8\]"):
    BitSpec(bits)
  with pytest.raises(ValueError, match=r"\[2, 8\]"):
    QuantConfig(w_bits=bits)


def test_ptf_picks_power_of_two_factors():
  spec = BitSpec(8)
  r = np.random.default_rng(0)
  x = r.standard_normal((200, 6)).astype(np.float32) * np.array([0.1, 0.1, 1, 1, 8, 8], np.float32)
  x = jnp.asarray(x)
  scale, zp = ptf_qparams(x.min(0), x.max(0), x, spec)
  ratios = np.asarray(scale / scale.min())
  np.testing.assert_allclose(np.log2(ratios), np.round(np.log2(ratios)), atol=1e-5)
  assert ratios.max() <= 8 and scale[0] < scale[-1]
  s_lw, z_lw = qparams_from_range(x.min(), x.max(), spec)
  err = lambda s, z: float(jnp.mean((fake_quant(x, s, z, spec) - x) ** 2))  # noqa: E731
  assert err(scale, zp) < err(s_lw, zp)


def test_log2_quantizer():
  spec = BitSpec(4)
  p = jnp.asarray([1.0, 0.5, 0.3, 0.25, 2.0 ** -15, 2.0 ** -20, 0.0])
  y = log2_fake_quant(p, spec)
  np.testing.assert_allclose(y, [1.0, 0.5, 0.25, 0.25, 2.0 ** -15, 0.0, 0.0])
  nz = np.asarray(y[y > 0])
  np.testing.assert_allclose(np.log2(nz), np.round(np.log2(nz)))


def test_ste_matches_values_and_gives_scale_gradients():
  spec = BitSpec(3)
  x = _tensor(2, (32, 8), heavy=False)
  s, z = observe("minmax", x, spec, channelwise=True)
  np.testing.assert_allclose(fake_quant_ste(x, s, z, spec), fake_quant(x, s, z, spec))
  loss = lambda s: jnp.sum((fake_quant_ste(x, s, z, spec) - x) ** 2)  # noqa: E731
  g = jax.grad(loss)(s)
  assert g.shape == s.shape and float(jnp.abs(g).sum()) > 0
  g_plain = jax.grad(lambda s: jnp.sum(fake_quant(x, s, z, spec)))(s)
  assert float(jnp.abs(g_plain).sum()) > 0  # gradient via dequantize only, not STE
  assert not np.allclose(g, jax.grad(lambda s: jnp.sum((fake_quant(x, s, z, spec) - x) ** 2))(s))


def test_bias_correction_matches_channel_moments():
  spec = BitSpec(3)
  w = _tensor(3, (64, 16), heavy=False) * 0.05 + 0.01
  s, z = observe("minmax", w, spec, channelwise=True)
  w_hat = bias_correct(w, fake_quant(w, s, z, spec))
  np.testing.assert_allclose(w_hat.mean(0), w.mean(0), atol=1e-6)
  np.testing.assert_allclose(w_hat.std(0), w.std(0), rtol=1e-4)


def test_quantizers_jit_and_vmap():
  spec = BitSpec(4)
  x = _tensor(4)
  s, z = observe("minmax", x, spec, channelwise=True)
  scales = jnp.stack([s, s * 0.9, s * 1.1])
  out = jax.jit(jax.vmap(lambda sc: fake_quant(x, sc, z, spec)))(scales)
  for i in range(3):
    np.testing.assert_allclose(out[i], fake_quant(x, scales[i], z, spec))
  st = jax.jit(lambda x: finalize("omse", update("omse", init_state(), x), x, spec))(x)
  assert np.isfinite(np.asarray(st[0]))
