"""The loss landscape: its grid, its directions, its numbers and the command."""
import dataclasses
import functools
import json
import operator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_fixture_vit

from evolq_jax.calibrate import calibrate
from evolq_jax.cli import main
from evolq_jax.config import QuantConfig
from evolq_jax.landscape import (
  grid_population,
  landscape,
  make_directions,
  plot_landscape,
  roughness,
)
from evolq_jax.models import get_preset, init_params, quantized_logits
from evolq_jax.search import SearchConfig, calibration_fitness, reference_logits
from evolq_jax.search.space import SearchSpace, searched_scales

CFG = dataclasses.replace(get_preset("vit_fixture_patch4_28"), depth=2)
QCFG = QuantConfig(w_bits=3, a_bits=8)
N, LB = 40, 20


def _float64(tree):
  return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)


@pytest.fixture(scope="module")
def setup():
  params = init_params(CFG, jax.random.key(0))
  x = np.asarray(jax.random.normal(jax.random.key(1), (N, 28, 28, 1)))
  y = np.asarray(jax.random.randint(jax.random.key(2), (N,), 0, 10))
  qparams = calibrate(CFG, QCFG, params, x, batch_size=N, progress=False)
  return params, x, y, qparams


# In float64 (as in test_search): float reassociation between the vmapped grid
# and the full forward then cannot move weights across 3-bit rounding boundaries.
def test_loss_at_zero_is_the_calibration_fitness_and_both_loss_paths_agree(setup):
  layer, unit = "qkv", 1  # unit 1: from cached prefix tokens, not images
  with jax.enable_x64(True):
    params, x, _y, qparams = _float64(setup)
    fp_ref = reference_logits(CFG, params, x)
    kw = {"unit": unit, "points": 5, "span": 0.2, "loss_batch": LB, "chunk": 2, "fp_ref": fp_ref}
    one = landscape(CFG, QCFG, params, qparams, x, layer, loss="infonce", **kw)
    both = landscape(CFG, QCFG, params, qparams, x, layer, loss=("infonce", "mse"), **kw)
    for loss in ("infonce", "mse"):
      want = calibration_fitness(CFG, QCFG, params, qparams, x, fp_ref,
                                 SearchConfig(loss=loss, loss_batch=LB))
      assert both["losses"][loss][2] == pytest.approx(want, rel=1e-9)
    assert one["loss_at_zero"] == pytest.approx(both["loss_at_zero"], rel=1e-9)
    # population_fitness (one loss) and the shared-forward path (two losses) agree everywhere
    np.testing.assert_allclose(one["loss"], both["losses"]["infonce"], rtol=1e-9)
    assert len(set(np.round(one["loss"], 9))) > 1  # the perturbation changes the loss


def test_top1_at_zero_is_the_quantized_models_top1(setup):
  with jax.enable_x64(True):
    params, x, y, qparams = _float64(setup)
    r = landscape(CFG, QCFG, params, qparams, x, "proj", unit=0, points=3, loss_batch=LB,
                  test=(x, y))
    want = 100 * np.mean(np.asarray(quantized_logits(CFG, QCFG, params, qparams, x)).argmax(-1)
                         == y)
    assert r["top1_at_zero"] == pytest.approx(want)
    assert r["test_images"] == N and len(r["top1"]) == 3


def test_basis_direction_perturbs_one_channel_only(setup):
  qparams = setup[3]
  scales, _ = searched_scales(CFG, QCFG, qparams, 1, SearchSpace(("qkv",)))
  dirs = make_directions("basis", scales.shape[0], 1, channels=(7,))
  pop, _coeffs = grid_population(scales, dirs, [-0.1, 0.0, 0.3])
  pop, scales = np.asarray(pop), np.asarray(scales)
  changed = np.nonzero(np.any(pop != scales[None], axis=0))[0]
  assert changed.tolist() == [7]
  np.testing.assert_allclose(pop[:, 7], scales[7] * np.array([0.9, 1.0, 1.3]), rtol=1e-6)
  np.testing.assert_array_equal(pop[1], scales)


def test_random_directions_are_relative_unit_rms_and_orthogonal():
  d = np.asarray(make_directions("random", 288, 2, jax.random.key(3)))
  np.testing.assert_allclose(np.sqrt(np.mean(d ** 2, axis=1)), 1.0, rtol=1e-5)
  assert abs(d[0] @ d[1]) < 1e-3 * 288
  scales = jnp.linspace(0.01, 1.0, 288)
  pop, coeffs = grid_population(scales, jnp.asarray(d), np.linspace(-0.1, 0.1, 3))
  assert pop.shape == (9, 288) and coeffs.shape == (9, 2)
  assert np.all(np.asarray(pop) > 0)  # floored: a scale stays positive
  # relative: every channel moves in proportion to its own scale
  np.testing.assert_allclose(np.asarray(pop[4]), np.asarray(scales), rtol=1e-6)


def test_2d_grid_shapes_and_plot(setup, tmp_path):
  params, x, y, qparams = setup
  r = landscape(CFG, QCFG, params, qparams, x, "fc2", dims=2, points=5, loss_batch=LB,
                test=(x[:10], y[:10]), loss=("infonce", "cosine"))
  assert np.shape(r["loss"]) == (5, 5) and np.shape(r["top1"]) == (5, 5)
  assert np.shape(r["losses"]["cosine"]) == (5, 5)
  assert r["loss_at_zero"] == r["loss"][2][2] and r["unit"] == CFG.depth - 1
  assert set(r["roughness"]) == {"second_difference", "jump", "local_minima", "range"}
  json.dumps(r)  # JSON-ready
  plot_landscape(r, str(tmp_path / "g.png"))
  assert (tmp_path / "g.png").stat().st_size > 1000


def test_roughness_separates_smooth_from_jagged():
  a = np.linspace(-1, 1, 41)
  smooth = roughness(a ** 2)
  assert smooth["local_minima"] == 1 and smooth["second_difference"] < 0.01
  jagged = roughness(a ** 2 + 0.3 * np.random.default_rng(0).standard_normal(41))
  assert jagged["second_difference"] > 10 * smooth["second_difference"]
  assert jagged["local_minima"] > 3
  assert roughness(np.ones(9))["second_difference"] == 0.0
  bowl = roughness(np.add.outer(a ** 2, a ** 2))
  assert bowl["local_minima"] == 1 and bowl["second_difference"] < 0.01


@pytest.mark.parametrize("kwargs, message", [
    ({"layer": "attn"}, "layer 'attn' is unknown"),
    ({"layer": "qkv", "unit": 2}, "unit 2 is out of range"),
    ({"layer": "qkv", "direction": "sideways"}, "direction 'sideways' is unknown"),
    ({"layer": "qkv", "dims": 3}, "dims=3"),
    ({"layer": "qkv", "direction": "basis", "channels": (999,)}, "channel 999 is out of range"),
    ({"layer": "qkv", "loss": "l1"}, "loss='l1' is unknown"),
    ({"layer": "qkv", "points": 2}, "points=2"),
])
def test_bad_arguments_give_clear_errors(setup, kwargs, message):
  params, x, _y, qparams = setup
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    landscape(CFG, QCFG, params, qparams, x, loss_batch=LB, **kwargs)
  if "unit" in kwargs:  # the old keyword: the same check, and a warning that names the new one
    with pytest.warns(DeprecationWarning, match=r"landscape\(unit=\.\.\.\)"), \
         pytest.raises(ValueError, match=message):
      landscape(CFG, QCFG, params, qparams, x, loss_batch=LB, layer="qkv",
                block=kwargs["unit"])


def test_command_writes_png_and_json(tmp_path, capsys):
  """On the registered 2-block fixture ViT (conftest.small_fixture_vit), random weights."""
  small = ["model='" + small_fixture_vit().name + "'", "checkpoint='random'",
           "calib.num_images=40", "calib.batch_size=40", "search.loss_batch=20"]
  rc = main(["landscape", "--config", "configs/fixture_w3a8.py", "--layer", "fc1", "--points",
             "5", "--test-limit", "50", "--workdir", str(tmp_path)]
            + functools.reduce(operator.iadd, [["--set", s] for s in small], []))
  assert rc == 0
  r = json.loads((tmp_path / "landscape.json").read_text())
  assert (r["layer"], r["unit"], r["setting"], r["dims"]) == ("fc1", 1, "W3A8", 1)  # the last
  assert len(r["loss"]) == 5 and len(r["top1"]) == 5 and r["test_images"] == 50
  assert (tmp_path / "landscape.png").stat().st_size > 1000
  assert "roughness" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--layer", "mlp"], ("layer 'mlp' is unknown in unit 5 of 'vit_fixture_patch4_28': expected "
                          "one of ['qkv', 'proj', 'fc1', 'fc2']")),
    (["--layer", "qkv", "--unit", "6"], ("unit 6 is out of range: model 'vit_fixture_patch4_28' "
     "has searchable units 0..5")),
    (["--layer", "qkv", "--block", "6"], "--block is renamed --unit"),  # the old name: a warning
    (["--layer", "qkv", "--block", "6"], "unit 6 is out of range"),
    (["--layer", "qkv", "--direction", "basis", "--dims", "2", "--channel", "3", "3"],
     "expected 2 distinct channel indices"),
    (["--layer", "proj", "--direction", "basis", "--channel", "96"], "channel 96 is out of range"),
    # sizes are exact, as for eval and search: never fewer images than asked for
    (["--layer", "qkv", "--set", "calib.num_images=1000000"],
     "calib.num_images=1000000 asks for 1000000 train images, but the train split has"),
    (["--layer", "qkv", "--test-limit", "1000000"],
     "--test-limit 1000000 asks for 1000000 test images, but the test split has"),
])
def test_command_bad_layer_or_block_is_a_clear_error(tmp_path, capsys, args, message):
  rc = main(["landscape", "--config", "configs/fixture_w3a8.py", "--workdir", str(tmp_path)]
            + args)
  assert rc == 2
  err = capsys.readouterr().err
  assert "evolq landscape: error:" in err and message in err, err
  assert not (tmp_path / "landscape.json").exists()
