"""Per-layer bit widths under a budget: the traced-width quantizer against the
static one, the vmapped population against a loop of full forwards, the
budget, the methods, and a run whose export stores mixed widths."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import small_fixture_vit

from evolq_jax.calibrate import calibrate
from evolq_jax.cli import main
from evolq_jax.config import QuantConfig
from evolq_jax.export import build_export
from evolq_jax.integer import int_logits
from evolq_jax.losses import batched_loss
from evolq_jax.models import init_params, quantized_logits, resolve_quant
from evolq_jax.qparams import QParams, load_qparams
from evolq_jax.quant.bits import BitSpec
from evolq_jax.quant.weights import calibrate_weights, quantize_kernel
from evolq_jax.search import bits as bits_lib
from evolq_jax.search.bits import BitsConfig, Problem, choose_bits, fake_quant_at
from evolq_jax.search.fitness import reference_logits

CFG = small_fixture_vit()  # the fixture ViT with 2 blocks, a registered preset
# the mixed run's sizes below (100 calibration images, loss batches of 50): the calibration
# and the scoring programs of the checks and of the run are the same programs
N, LB = 100, 50


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_traced_widths_quantize_as_the_static_ones(bits, signed):
  w = jax.random.normal(jax.random.key(bits), (24, 16)) * 0.1
  spec = BitSpec(bits, signed)
  q = calibrate_weights({"l": {"kernel": w}}, spec, "minmax")["l"]
  want = quantize_kernel(w, q["scale"], q["zero_point"], spec)
  got = fake_quant_at(w, jnp.min(w, 0), jnp.max(w, 0), jnp.float32(bits), signed)
  np.testing.assert_allclose(got, want, atol=1e-7)


@pytest.fixture(scope="module")
def setup():
  params = init_params(CFG, jax.random.key(0))
  x = jnp.asarray(jax.random.normal(jax.random.key(1), (N, 28, 28, 1)))
  # min/max activation ranges, in the mixed run too (OMSE's shrink search would compile and
  # run for seconds on ranges that no check here reads)
  qcfg = QuantConfig(w_bits=4, a_bits=8, a_observer="minmax")
  qparams = calibrate(CFG, qcfg, params, x, batch_size=N, progress=False)
  return qcfg, params, x, qparams, reference_logits(CFG, params, x)


def test_population_equals_a_loop_of_full_forwards(setup):
  qcfg, params, x, qparams, fp_ref = setup
  with jax.enable_x64(True):  # no float reassociation across grid boundaries (3-bit steps)
    f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), t)  # noqa
    params, x, fp_ref, acts = f64(params), f64(x), f64(fp_ref), f64(qparams.acts)
    bcfg = BitsConfig(w_budget=8, images=N, loss_batch=LB, chunk=2)
    problem = Problem(CFG, qcfg, bcfg, params, acts, x, fp_ref)
    rng = np.random.default_rng(0)
    pop = rng.integers(0, len(bcfg.choices), (3, len(problem.paths)))
    fits = problem.score(pop)
    for idx, fit in zip(pop, fits):
      res = problem.result(idx, "test", fit, 0.0, [])
      q = dataclasses.replace(qcfg, layer_bits=res.rules(qcfg.w_bits))
      wq = calibrate_weights(params, q.w_spec, "minmax", q.weight_rules)
      logits = quantized_logits(CFG, q, params, QParams(wq, acts), x)
      assert float(batched_loss("infonce", logits, fp_ref, LB)) == pytest.approx(fit, rel=1e-9)


def test_the_budget_holds_and_the_tournament_keeps_the_best(setup):
  qcfg, params, x, qparams, fp_ref = setup
  bcfg = BitsConfig(w_budget=4.5, images=N, loss_batch=LB, generations=3, popsize=4, pool=4)
  deltas = {}  # the sensitivity table, shared by the fill and the seeded tournament
  run = lambda **kw: choose_bits(CFG, qcfg, dataclasses.replace(bcfg, **kw), params,  # noqa: E731
                                 qparams.acts, x, fp_ref, progress=False, deltas=deltas)
  uniform = run(method="uniform")
  assert set(uniform.bits.values()) == {4} and uniform.avg_bits == 4
  sens = run(method="sensitivity")
  table = sens.history[0]["sensitivity"]
  assert sens.avg_bits <= 4.5 and set(table["head"]) == {2, 3, 4, 6}
  # the default tournament starts from uniform, the sensitivity fill and its mutants:
  # never worse than either (elitism; up to float32 rounding, as the population is scored
  # by another program than a single candidate), and the table is not scored again
  evo = run()
  best = min(uniform.fitness, sens.fitness)
  assert evo.avg_bits <= 4.5 and evo.fitness <= best + 1e-4 * abs(best)
  assert evo.evaluated == 4 + 3 * 4 and len(evo.history) == 3
  assert evo.size_bytes == pytest.approx(
      sum(np.size(params_leaf) for params_leaf in _kernels(params)) * evo.avg_bits / 8, abs=1)
  from_random = run(start="random")  # uniform + random feasible assignments
  assert from_random.avg_bits <= 4.5
  assert from_random.fitness <= uniform.fitness + 1e-4 * abs(uniform.fitness)
  assert from_random.evaluated == 4 + 3 * 4
  rand = run(method="random")
  assert rand.avg_bits <= 4.5


def test_pinned_ends_keep_8_bits_and_count_in_the_budget(setup):
  """quant.keep_ends_8bit with bits.w_budget: the patch embedding and the head stay at 8
  bits, count in the average, and no mutation or repair moves them."""
  qcfg, params, x, qparams, fp_ref = setup
  ends = resolve_quant(CFG, dataclasses.replace(qcfg, keep_ends_8bit=True))
  bcfg = BitsConfig(w_budget=4.5, images=N, loss_batch=LB, generations=1, popsize=4, pool=4,
                    start="random")
  problem = Problem(CFG, ends, bcfg, params, qparams.acts, x, fp_ref)
  pinned = [i for i, p in enumerate(problem.paths) if p[0] in ("patch_embed", "head")]
  assert len(pinned) == 2 and list(np.flatnonzero(~problem.free)) == pinned
  rng = np.random.default_rng(0)
  idx = np.zeros(len(problem.paths), int)  # choice index 0 (2 bits) everywhere
  assert list(problem.widths(idx)[pinned]) == [8, 8]
  for _ in range(50):
    idx = bits_lib._mutate(problem, idx, rng)
    assert problem.feasible(idx) and list(problem.widths(idx)[pinned]) == [8, 8]
  res = choose_bits(CFG, ends, bcfg, params, qparams.acts, x, fp_ref, progress=False)
  assert res.bits["patch_embed"] == res.bits["head"] == 8 and res.avg_bits <= 4.5
  counts = dict(zip(["/".join(p) for p in problem.paths], problem.counts))
  assert res.avg_bits == pytest.approx(
      sum(counts[k] * b for k, b in res.bits.items()) / sum(counts.values()))
  low = dataclasses.replace(bcfg, w_budget=2.0)
  with pytest.raises(ValueError, match=r"bits.w_budget=2.0 is below the smallest average width, "
                     r"2\.\d+: every searched layer at 2 bits with the pinned layers \(2,"):
    Problem(CFG, ends, low, params, qparams.acts, x, fp_ref)


def _kernels(params):
  from flax import traverse_util
  return [v for k, v in traverse_util.flatten_dict(params).items() if k[-1] == "kernel"]


def test_bad_budgets_are_refused():
  with pytest.raises(ValueError, match="bits.w_budget=1.5 is below the narrowest choice 2"):
    BitsConfig(w_budget=1.5)
  with pytest.raises(ValueError, match="bits.method='hawq' is unknown"):
    BitsConfig(method="hawq")
  with pytest.raises(ValueError, match="bits.start='hawq' is unknown"):
    BitsConfig(start="hawq")
  with pytest.raises(ValueError, match="bits.choices entry=9"):
    BitsConfig(choices=(4, 9))


def test_a_mixed_run_records_its_widths_and_exports_them(tmp_path):
  """`evolq search` with bits.w_budget on the 2-block fixture ViT (CFG; random weights):
  the widths it chose are the run's and its export's."""
  model = ["--set", f"model='{CFG.name}'", "--set", "checkpoint='random'"]
  rc = main(["search", "--config", "configs/fixture_w4a8.py", "--workdir", str(tmp_path), *model,
             "--set", "bits.w_budget=3.5", "--set", "bits.generations=2",
             "--set", "bits.popsize=4", "--set", "bits.pool=4", "--set", "bits.images=100",
             "--set", "bits.start='random'",  # no sensitivity table: 105 fewer scorings
             "--set", "calib.num_images=100", "--set", "quant.a_observer='minmax'",
             "--set", "eval.limit=100",
             "--set", "search.passes=1", "--set", "search.generations=1",
             "--set", "search.units=(-1,)", "--set", "search.loss_batch=50"])
  assert rc == 0
  s = json.loads((tmp_path / "summary.json").read_text())
  bits = s["bits"]
  assert bits["avg_bits"] <= 3.5 and len(bits["bits"]) == 2 * 4 + 2 and bits["bops"] > 0
  assert dict(map(tuple, s["quant"]["layer_bits"]))  # the run quantized at those widths
  from evolq_jax.config import bits_config, quant_config
  from evolq_jax.pipeline import load_data, load_model
  c = bits_config("W4A8", CFG.name, checkpoint="random", **{"calib.num_images": 100})
  cfg, params = load_model(c)
  qcfg = dataclasses.replace(quant_config(c), a_observer="minmax",
                             layer_bits=tuple(map(tuple, s["quant"]["layer_bits"])))
  qparams = load_qparams(str(tmp_path / "qparams.safetensors"))
  export = build_export(cfg, qcfg, params, qparams)
  widths = {name: e["bits"] for name, e in export.manifest["weights"].items()}
  assert widths == bits["bits"] and len(set(widths.values())) > 1
  images = load_data(c, cfg)["test"][0][:100]
  fq = np.asarray(quantized_logits(cfg, qcfg, params, qparams, images))
  assert np.mean(fq.argmax(-1) == int_logits(export, images).argmax(-1)) >= 0.98
