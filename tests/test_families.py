"""The checks every registered family must pass, run over the registry on a
tiny random-weight preset of each (conftest.tiny_config). A new family gets
them by registering; its own test file keeps only its quirks (timm parity,
layouts, converters)."""
import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import check_population_fitness, tiny_config, tiny_qcfg, without_ptf
from flax import traverse_util

from evolq_jax.calibrate import calibrate
from evolq_jax.export import build_export, load_export, save_export
from evolq_jax.models import calibration_stats, init_params, quantize_params
from evolq_jax.models.forward import act_rules, model_for, units
from evolq_jax.models.segments import segments
from evolq_jax.models.registry import FAMILIES
from evolq_jax.quant.recipe import rule_for
from evolq_jax.search import fitness, prefix_activations

N, LB = 8, 4  # images; loss batch of the population check
QCFG = tiny_qcfg()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
  cfg = tiny_config(request.param)
  params = init_params(cfg, jax.random.key(0))
  k1, k2 = jax.random.split(jax.random.key(1))  # images of different contrast
  x = np.asarray(jax.random.normal(k1, (N, cfg.img_size, cfg.img_size, cfg.in_chans))
                 * jax.random.uniform(k2, (N, 1, 1, 1), minval=0.3, maxval=2.0))
  return cfg, params, x, calibrate(cfg, QCFG, params, x, batch_size=N, progress=False)


def test_prefix_then_suffix_is_the_full_forward(family):
  """The prefix cache is exact: the activations the search caches for unit b (its
  prefix programs: one per shared segment with the unit's position traced, else one
  per unit), run from b, give the full forward's logits, at every unit. The forwards
  from each unit are one compiled program (a tiny program's compile is mostly its fixed
  cost)."""
  cfg, params, x, qparams = family
  fq = quantize_params(QCFG, params, qparams)  # as the search quantizes: once, outside
  model = model_for(cfg, "quant", QCFG)
  n = len(units(cfg))
  prefix = lambda b: (prefix_activations(cfg, QCFG, params, qparams, x, b) if b < n  # noqa: E731
                      else fitness._prefix(cfg, QCFG, n, fq, qparams.acts, x))  # all units
  starts = [x] + [prefix(b) for b in range(1, n + 1)]

  @jax.jit
  def forwards(fq, acts, starts):  # -> logits from each unit b's input, and units 1-2 alone
    run = lambda b, h, last=None: model.apply({"params": fq}, h, acts, first_unit=b,  # noqa
                                               last_unit=last)
    return [run(b, h) for b, h in enumerate(starts)], run(1, starts[1], 3) if n >= 3 else None

  logits, middle = forwards(fq, qparams.acts, starts)
  fp = np.asarray(fitness.fp_forward(cfg, params, x))  # the quantized model is finite, and
  # neither the FP model nor far from it
  assert np.all(np.isfinite(logits[0]))
  assert 0 < np.max(np.abs(logits[0] - fp)) < np.max(np.abs(fp))
  for b in range(1, n + 1):
    np.testing.assert_allclose(logits[b], logits[0], atol=1e-5, err_msg=f"unit {b}")
  if n >= 3:  # a middle range composes too
    np.testing.assert_allclose(middle, starts[3], atol=1e-5)


def _shared_unit(cfg):
  """The last unit of the longest shared segment (position >= 1: the scan skips units on
  both sides of it), or None."""
  seg = max(segments(cfg), key=lambda s: s[1] - s[0])
  return seg[1] - 1 if seg[1] - seg[0] > 1 else None


def test_shared_programs_equal_the_full_forward(family):
  """A population scored by a shared segment's program (one per segment, the unit's
  position traced) at a unit inside it equals a loop and the full forward
  (test_prefix_then_suffix_is_the_full_forward checks the prefix it caches)."""
  cfg, params, x, qparams = family
  unit = _shared_unit(cfg)
  assert unit is not None, f"{cfg.name}: tiny_config gives it no shared segment"
  qcfg, qparams = without_ptf(QCFG, qparams)
  check_population_fitness(cfg, qcfg, (params, x, qparams), unit, LB, layers=("attn", "mlp"))


@pytest.mark.parametrize("name,count", [
    ("deit_tiny_patch16_224", 2), ("levit_128s", 6), ("efficientnet_lite0", 12),
    ("swin_tiny_patch4_window7_224", 8), ("swin_base_patch4_window7_224", 8)])
def test_the_real_presets_share_programs(name, count):
  """Segments (compiled programs shared) of the real presets: a Swin stage's blocks after
  its first are one segment, its alternating window shift traced (12 and 24 units)."""
  from evolq_jax.models import get_preset
  assert len(segments(get_preset(name))) == count


def _richest_unit(cfg) -> int:
  """The first unit with the most layers: a stage's first block with its
  downsampling (Swin, LeViT), an MBConv block with its expansion."""
  return max(units(cfg), key=lambda u: (len(u.layers), -u.index)).index


def test_population_equals_a_loop_and_the_full_forward(family):
  """The vmapped population fitness = one candidate at a time on the cached prefix
  = the full forward with the candidate's scales, in float64. Without PTF: a
  residual quantized by PTF and then by a uniform point on the same range puts
  values exactly on half steps, where programs that sum in another order may
  round apart (LeViT's postblocks). The PTF points get one scale each, their largest."""
  cfg, params, x, qparams = family
  qcfg, qparams = without_ptf(QCFG, qparams)
  unit = _richest_unit(cfg)
  layout = check_population_fitness(cfg, qcfg, (params, x, qparams), unit, LB,
                                    layers=("attn", "mlp"))
  searched = {path[-1] for kind, path, _ in layout if kind == "weights"}
  assert searched == {l.name for l in units(cfg)[unit].layers}  # every layer of the unit


def test_every_point_has_a_rule_and_every_rule_a_point(family):
  """The recipe's patterns and the family's point names agree: a renamed point
  must not silently lose its PTF or log2 quantizer."""
  cfg, params, x, qparams = family
  stats = jax.eval_shape(lambda: calibration_stats(cfg, params, x[:2])[1]["stats"])
  points = [k for k in traverse_util.flatten_dict(stats, sep="/")]
  assert jax.tree.structure(jax.tree.map(lambda a: 0, stats)) == jax.tree.structure(
      jax.tree.map(lambda d: 0, qparams.acts, is_leaf=lambda d: "scale" in d))
  for qcfg in (QCFG, dataclasses.replace(QCFG, log2_softmax=True)):
    rules = act_rules(cfg, qcfg)
    used = {rule_for(rules, p).pattern for p in points}
    assert used == {r.pattern for r in rules}, f"rules matching no point: " \
        f"{sorted({r.pattern for r in rules} - used)}"
  ptf = [p for p in points if rule_for(act_rules(cfg, QCFG), p).quantizer == "ptf"]
  flat = traverse_util.flatten_dict(qparams.acts, sep="/")
  assert all(np.ndim(flat[p + "/scale"]) == 1 for p in ptf)  # PTF points: per channel


def test_every_kernel_is_quantized_and_the_export_round_trips(family, tmp_path):
  cfg, params, x, qparams = family
  kernels = {p[:-1] for p in traverse_util.flatten_dict(params) if p[-1] == "kernel"}
  assert {p[:-1] for p in traverse_util.flatten_dict(qparams.weights)} == kernels
  export = build_export(cfg, QCFG, params, qparams)
  path = str(tmp_path / "model_int.safetensors")
  save_export(path, export)
  again = load_export(path)
  assert again.manifest == json.loads(json.dumps(export.manifest))  # JSON: tuples read as lists
  assert sorted(again.arrays) == sorted(export.arrays)
  assert all(np.array_equal(again.arrays[k], v) for k, v in export.arrays.items())
