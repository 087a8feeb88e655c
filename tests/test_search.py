"""The search engine against independent references."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evolq_jax.calibrate import calibrate
from evolq_jax.config import QuantConfig
from evolq_jax.losses import batched_loss, info_nce
from evolq_jax.models import get_preset, init_params, quantize_params, quantized_logits
from evolq_jax.search import (SearchConfig, population_fitness, prefix_activations,
                              reference_logits, search, searched_scales, set_scales)
from evolq_jax.search import calibration_fitness, selection
from evolq_jax.search import engine
from evolq_jax.search.fitness import candidate_loss, in_batches, quantized_forward
from evolq_jax.search.hooks import Hook
from evolq_jax.search.state import EngineState
from evolq_jax.search.strategies import evolq, make_strategy

CFG = dataclasses.replace(get_preset("vit_fixture_patch4_28"), depth=2)
QCFG = QuantConfig(w_bits=3, a_bits=8)
N, LB = 40, 20


@pytest.fixture(scope="module")
def setup():
  params = init_params(CFG, jax.random.key(0))
  x = np.asarray(jax.random.normal(jax.random.key(1), (N, 28, 28, 1)))
  qparams = calibrate(CFG, QCFG, params, x, batch_size=N, progress=False)
  return params, jnp.asarray(x), qparams, reference_logits(CFG, params, jnp.asarray(x))


def _population(qparams, block, space, k=5, seed=0):
  vec0, layout = searched_scales(CFG, QCFG, qparams, block, space)
  noise = jax.random.uniform(jax.random.key(seed), (k, vec0.shape[0]), minval=0.8, maxval=1.2)
  return vec0 * noise, layout


def _full_forward_loss(params, qparams, x, fp_ref, block, vec, layout, scfg):
  qp = set_scales(qparams, vec, layout)
  q = quantized_logits(CFG, QCFG, params, qp, x)
  return float(batched_loss(scfg.loss, q, fp_ref, scfg.loss_batch, scfg.temperature))


@pytest.mark.parametrize("block", [0, 1])
@pytest.mark.parametrize("chunk", [0, 2])
def test_population_fitness_equals_a_loop_and_the_full_forward(setup, block, chunk):
  # In float64, so that float reassociation between the vmapped, looped and
  # full-forward programs cannot move values across rounding boundaries of the
  # quantization grid (in float32 a few do, and 3-bit steps amplify them).
  with jax.enable_x64(True):
    _check_paths_agree(_float64(setup), block, SearchConfig(loss_batch=LB, chunk=chunk))


def _float64(tree):
  return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)


def _check_paths_agree(setup, block, scfg):
  params, x, qparams, fp_ref = setup
  chunk = scfg.chunk
  pop, layout = _population(qparams, block, scfg.space)
  tokens = prefix_activations(CFG, QCFG, params, qparams, x, block)
  fq = quantize_params(QCFG, params, qparams)
  got = np.asarray(population_fitness(CFG, QCFG, block, layout, scfg.loss, scfg.temperature, LB,
                                      chunk, pop, params, fq, qparams, tokens, fp_ref))
  one = jax.jit(lambda v: candidate_loss(CFG, QCFG, block, layout, scfg.loss, 3.0, LB, v, params,
                                         fq, qparams, tokens, fp_ref))
  loop = [float(one(v)) for v in pop]  # one candidate at a time, same cached prefix
  np.testing.assert_allclose(got, loop, rtol=1e-5, atol=1e-5)
  full = [_full_forward_loss(params, qparams, x, fp_ref, block, v, layout, scfg) for v in pop]
  np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
  assert np.ptp(full) > 1e-3  # the candidates really differ


def test_search_space_with_mlp_and_acts(setup):
  params, x, qparams, fp_ref = setup
  scfg = SearchConfig(loss_batch=LB, layers=("qkv", "proj", "fc1", "fc2"), acts=True)
  vec0, layout = searched_scales(CFG, QCFG, qparams, 1, scfg.space)
  assert vec0.shape[0] == 288 + 96 + 384 + 96 + 9  # 9 per-tensor activation points
  back = set_scales(qparams, vec0 * 2, layout)
  np.testing.assert_allclose(back.weights["blocks_1"]["mlp"]["fc1"]["scale"],
                             2 * qparams.weights["blocks_1"]["mlp"]["fc1"]["scale"])
  np.testing.assert_allclose(back.acts["blocks_1"]["attn"]["logits"]["scale"],
                             2 * qparams.acts["blocks_1"]["attn"]["logits"]["scale"])
  np.testing.assert_array_equal(back.acts["blocks_1"]["resid1"]["scale"],
                                qparams.acts["blocks_1"]["resid1"]["scale"])
  np.testing.assert_array_equal(back.weights["blocks_0"]["attn"]["qkv"]["scale"],
                                qparams.weights["blocks_0"]["attn"]["qkv"]["scale"])
  with jax.enable_x64(True):
    _check_paths_agree(_float64(setup), 1, scfg)


def test_info_nce_definition():
  r = np.random.default_rng(0)
  q, k = r.standard_normal((8, 5)), r.standard_normal((8, 5))
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  kn = k / np.linalg.norm(k, axis=1, keepdims=True)
  s = qn @ kn.T / 3.0
  ce = -np.mean(np.diag(s) - np.log(np.exp(s).sum(1)))
  assert float(info_nce(jnp.asarray(q), jnp.asarray(k), 3.0)) == pytest.approx(6.0 * ce, rel=1e-5)
  assert float(info_nce(jnp.asarray(k), jnp.asarray(k))) < float(info_nce(jnp.asarray(q),
                                                                           jnp.asarray(k)))


def test_a_loss_batch_larger_than_the_calibration_set_is_a_clear_error(setup):
  params, x, qparams, fp_ref = setup
  with pytest.raises(ValueError, match=rf"search.loss_batch=100 is more than the {N} calib"):
    batched_loss("infonce", fp_ref, fp_ref, 100)
  vec0, layout = searched_scales(CFG, QCFG, qparams, 1, SearchConfig().space)
  tokens = prefix_activations(CFG, QCFG, params, qparams, x, 1)
  with pytest.raises(ValueError, match="lower search.loss_batch"):
    population_fitness(CFG, QCFG, 1, layout, "infonce", 3.0, 100, 0, vec0[None], params,
                       quantize_params(QCFG, params, qparams), qparams, tokens, fp_ref)


def test_evolq_strategy_is_the_tournament():
  s = evolq(pool_size=4, tournament=3, children=2, radius=0.1)
  state = s.init(jax.random.key(0), jnp.ones(6), 5.0)
  assert state.pool.shape == (4, 6) and np.all(np.asarray(state.fitness) == 5.0)
  pop, _ = s.ask(jax.random.key(1), state)
  assert pop.shape == (2, 6) and np.all(np.abs(np.asarray(pop) - 1) <= 0.1 + 1e-6)
  state, _ = s.tell(jax.random.key(2), pop, jnp.asarray([1.0, 9.0]), state)
  assert sorted(np.asarray(state.fitness).tolist()) == [1.0, 5.0, 5.0, 5.0]  # worst dropped
  near_zero = s.init(jax.random.key(0), jnp.full(6, 0.01), 1.0)
  assert np.all(np.asarray(s.ask(jax.random.key(3), near_zero)[0]) >= 0)  # |parent + U|


def _run(setup, **kw):
  params, x, qparams, _ = setup
  kw = {"children": 3, **kw}
  scfg = SearchConfig(passes=2, generations=2, loss_batch=LB, **{
      k: v for k, v in kw.items() if k not in ("workdir", "resume", "seed", "hooks")})
  return search(CFG, QCFG, params, qparams, x, scfg, seed=kw.get("seed", 0),
                workdir=kw.get("workdir"), resume=kw.get("resume", False), progress=False,
                hooks=kw.get("hooks", ()))


class _Recorder(Hook):
  """A caller's hook: what the engine calls, in order, and the state it sees."""

  def __init__(self):
    self.calls = []

  def start(self, run, schedule, per_unit):
    self.calls.append(("start", len(schedule), per_unit, run.state.position))

  def before_unit(self, run, p, unit):
    self.calls.append(("before", p, unit))

  def on_generation(self, run, record):
    self.calls.append(("generation", record["generation"]))

  def after_unit(self, run, p, unit, pass_end):
    self.calls.append(("after", p, unit, pass_end, run.state.candidates,
                       run.state.history[-1]["unit"]))

  def end(self, run):
    self.calls.append(("end", run.state.position))


def test_straight_through_loss_has_the_same_value_and_a_gradient(setup):
  """The gradient baseline's loss: same value as the search's, non-zero gradient
  w.r.t. the scales (plain fake-quant has a zero gradient almost everywhere)."""
  params, x, qparams, fp_ref = setup
  vec, layout = searched_scales(CFG, QCFG, qparams, 1, SearchConfig().space)
  tokens = prefix_activations(CFG, QCFG, params, qparams, x, 1)
  fq = quantize_params(QCFG, params, qparams)
  loss = lambda v, ste: candidate_loss(CFG, QCFG, 1, layout, "infonce", 3.0, LB, v,  # noqa
                                       params, fq, qparams, tokens, fp_ref, ste=ste)
  np.testing.assert_allclose(loss(vec, True), loss(vec, False), rtol=1e-6)
  assert float(jnp.abs(jax.grad(lambda v: loss(v, False))(vec)).max()) == 0.0
  g = jax.grad(lambda v: loss(v, True))(vec)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_random_search_samples_around_the_start():
  s = make_strategy("random", 5, children=64, radius=0.1)
  x0 = jnp.array([1.0, 2.0, 0.05, 0.5, 3.0])
  state = s.init(jax.random.key(0), x0, 1.0)
  pop, state = s.ask(jax.random.key(1), state)
  state, _ = s.tell(jax.random.key(2), pop, jnp.arange(64.0), state)
  assert pop.shape == (64, 5) and np.array_equal(state, x0)  # no selection, no drift
  assert np.all(np.abs(pop - x0) <= 0.1 + 1e-6) and float(pop.min()) >= 0.0
  assert float(pop[:, 2].std()) > 0.02  # it does spread


def test_search_never_worse_and_deterministic(setup):
  hook = _Recorder()
  a, b = _run(setup, hooks=[hook]), _run(setup)
  # the hook saw each unit visit (last unit first, 2 passes), its generations and the counts
  per_unit = ["generation", "generation"]
  visits = [(0, 1, False), (0, 0, True), (1, 1, False), (1, 0, True)]
  want = [("start", 4, 2, 0)]
  for k, (p, u, end) in enumerate(visits):
    want += [("before", p, u), *[(g, i) for i, g in enumerate(per_unit)],
             ("after", p, u, end, (k + 1) * (1 + 2 * 3), u)]
  assert hook.calls == want + [("end", 4)]
  assert a.fitness_final <= a.fitness_init + 1e-5
  assert a.fitness_final < a.fitness_init  # it finds something at 3 bits
  assert a.candidates == 2 * 2 * (1 + 2 * 3)
  for u, v in zip(jax.tree.leaves(a.qparams), jax.tree.leaves(b.qparams)):
    np.testing.assert_array_equal(u, v)
  c = _run(setup, seed=1)
  assert any(not np.array_equal(u, v) for u, v in
             zip(jax.tree.leaves(a.qparams), jax.tree.leaves(c.qparams)))


@pytest.mark.parametrize("strategy, kw", [("Sep_CMA_ES", dict(popsize=4, children=1)),
                                          ("adam", dict(children=1)),
                                          ("random", dict(pool=4))])
def test_other_strategies_run_and_keep_elitism(setup, strategy, kw):
  r = _run(setup, strategy=strategy, **kw)
  assert r.fitness_final <= r.fitness_init + 1e-5
  bests = [h["best"] for h in r.history]
  # 2 passes x 2 units x 2 generations; a gradient method's last step is scored too
  assert all(h["best"] <= h["start"] + 1e-6 for h in r.history)
  assert len(bests) == (12 if strategy == "adam" else 8)


def test_every_gradient_step_is_scored(setup):
  """Adam's updates all count: with one step per unit visit the step's result is
  scored (not only the start it began from), and the evaluations stay at
  steps + 1 per visit, the start's loss being the first step's."""
  params, x, qparams, fp_ref = setup
  scfg = SearchConfig(strategy="adam", lr=0.05, passes=1, generations=1, loss_batch=LB)
  qp, records, n, _ = engine.search_block(CFG, QCFG, scfg, params, qparams, x, fp_ref, 1,
                                          jax.random.key(0))
  assert n == 2 and [r["evaluated"] for r in records] == [1, 2]
  start, stepped = records
  assert stepped["gen_min"] != pytest.approx(start["gen_min"], abs=1e-7)  # the update is scored
  vec0, layout = searched_scales(CFG, QCFG, qparams, 1, scfg.space)
  vec, _ = searched_scales(CFG, QCFG, qp, 1, scfg.space)
  # the step's result is kept exactly when it scores better than the start
  assert (stepped["gen_min"] < start["gen_min"]) == (not np.array_equal(vec, vec0))
  assert stepped["best"] == pytest.approx(
      _full_forward_loss(params, qparams, x, fp_ref, 1, vec, layout, scfg), rel=1e-4)


def test_cosine_rate_falls_over_the_passes_and_reaches_every_visit(setup, monkeypatch):
  """search.lr_schedule='cosine': pass p's visits run at lr * (1 + cos(pi p / P)) / 2,
  the first pass at lr itself and none at 0; 'constant' keeps lr throughout."""
  from evolq_jax.search.gradient import pass_lr
  assert pass_lr(0.3, "constant", 7, 10) == 0.3
  rates = [pass_lr(0.3, "cosine", p, 10) for p in range(10)]
  assert rates[0] == pytest.approx(0.3) and all(a > b > 0 for a, b in zip(rates, rates[1:]))
  assert rates[5] == pytest.approx(0.15) and rates[9] < 0.01
  seen, real = [], engine.search_block

  def spy(cfg, qcfg, scfg, *args, **kw):
    seen.append(scfg.lr)
    return real(cfg, qcfg, scfg, *args, **kw)

  monkeypatch.setattr(engine, "search_block", spy)
  _run(setup, strategy="adam", children=1, lr=0.2, lr_schedule="cosine")
  assert seen == pytest.approx([0.2, 0.2, 0.1, 0.1])  # 2 passes x 2 units, last to first
  seen.clear()
  _run(setup, strategy="adam", children=1, lr=0.2)
  assert seen == pytest.approx([0.2] * 4)
  with pytest.raises(ValueError, match=r"search.lr_schedule='step' .*cosine"):
    SearchConfig(strategy="adam", lr_schedule="step")


def _killed_then_resumed(monkeypatch, run, at_block: int = 3):
  """run() killed while searching its `at_block`-th block, then run(resume=True)."""
  real, calls = engine.search_block, {"n": 0}

  def dying(*args, **kw):
    calls["n"] += 1
    if calls["n"] == at_block:
      raise KeyboardInterrupt
    return real(*args, **kw)

  monkeypatch.setattr(engine, "search_block", dying)
  with pytest.raises(KeyboardInterrupt):
    run()
  monkeypatch.setattr(engine, "search_block", real)
  return run(resume=True)


def test_kill_and_resume_equals_uninterrupted(setup, tmp_path, monkeypatch):
  full = _run(setup)
  resumed = _killed_then_resumed(monkeypatch, lambda **kw: _run(setup, workdir=str(tmp_path),
                                                                **kw))
  assert resumed.candidates == full.candidates
  assert len(resumed.history) == len(full.history)
  for u, v in zip(jax.tree.leaves(full.qparams), jax.tree.leaves(resumed.qparams)):
    np.testing.assert_array_equal(u, v)


def test_carried_optimizer_state_continues_adam_across_visits(setup, tmp_path, monkeypatch):
  """search.carry_optimizer: a unit's second visit starts from the Adam state its first
  ended with (a step count of generations, not 0), so pass 1 is the same and pass 2
  differs; the carried state is checkpointed, and a killed run resumes to the same
  result bit for bit."""
  params, x, qparams, fp_ref = setup
  scfg = SearchConfig(strategy="adam", lr=0.1, generations=2, loss_batch=LB)
  _, _, _, carry = engine.search_block(CFG, QCFG, scfg, params, qparams, x, fp_ref, 1,
                                       jax.random.key(0))
  assert carry[0] == 2  # Adam's step count after 2 steps; then the moments
  assert len(carry) == 3 and np.any(np.asarray(carry[1]) != 0)
  fresh = _run(setup, strategy="adam", children=1, lr=0.1)
  carried = _run(setup, strategy="adam", children=1, lr=0.1, carry_optimizer=True)
  first = len(fresh.history) // 2  # pass 1's records
  assert carried.history[:first] == fresh.history[:first]
  assert carried.history[first:] != fresh.history[first:]
  resumed = _killed_then_resumed(monkeypatch, lambda **kw: _run(
      setup, strategy="adam", children=1, lr=0.1, carry_optimizer=True,
      workdir=str(tmp_path), **kw))
  assert resumed.history == carried.history
  for u, v in zip(jax.tree.leaves(carried.qparams), jax.tree.leaves(resumed.qparams)):
    np.testing.assert_array_equal(u, v)


def test_evaluation_loss_and_held_out_pick_share_one_compiled_forward(setup):
  """pipeline.predict, the FP reference, the whole-model loss and the held-out pick run
  the package's two jitted forwards: at one batch shape, each compiles once for all (a
  shape no other test here uses, so the evaluation compiles it first)."""
  from evolq_jax.compilation import CompileLog
  from evolq_jax.pipeline import predict
  from evolq_jax.search.selection import holdout_correct
  params, x, qparams, _ = setup
  k = 19
  fp = predict(CFG, params, x[:k], batch_size=k)
  logits = predict(CFG, params, x[:k], QCFG, qparams, batch_size=k)
  with CompileLog() as log:  # the whole model neither compiled nor read from the cache again
    fp_ref = reference_logits(CFG, params, x[:k], k)
    loss = calibration_fitness(CFG, QCFG, params, qparams, x[:k], fp_ref,
                               SearchConfig(loss_batch=k), batch_size=k)
    correct = holdout_correct(CFG, QCFG, params, qparams, (x[:k], logits.argmax(-1)), k)
  assert {n: log.by_name.get(n, 0) for n in ("jit(fp_logits)", "jit(quantized_logits)")} == {
      "jit(fp_logits)": 0, "jit(quantized_logits)": 0}, log.by_name
  np.testing.assert_array_equal(fp_ref, fp)
  assert np.isfinite(loss) and correct.all()


def _predict(params, qparams, x):
  """The classes the held-out pick's own program predicts (another program, e.g.
  the unbatched forward, may round a near tie the other way)."""
  logits = in_batches(lambda b: quantized_forward(CFG, QCFG, params, qparams, b), x, 500)
  return np.asarray(jnp.argmax(logits, -1))


def test_holdout_picks_among_passes_and_resumes(setup, tmp_path, monkeypatch):
  params, x, qparams, _ = setup
  scfg = SearchConfig(passes=2, generations=2, children=3, pool=4, loss_batch=LB)
  run = lambda labels, **kw: search(CFG, QCFG, params, qparams, x, scfg, progress=False,  # noqa
                                    holdout=(x, labels), holdout_alpha=1.0,
                                    holdout_rule="best_significant", **kw)
  # Labels = the init's own predictions: init scores 100 and no pass beats it.
  r = run(_predict(params, qparams, x))
  assert r.selected_pass == 0 and [h["pass"] for h in r.holdout] == [0, 1, 2]
  assert r.holdout[0]["holdout_top1"] == 100.0
  for u, v in zip(jax.tree.leaves(r.qparams), jax.tree.leaves(qparams)):
    np.testing.assert_array_equal(u, v)
  assert any(not np.array_equal(u, v) for u, v in
             zip(jax.tree.leaves(r.last_qparams), jax.tree.leaves(qparams)))
  # Labels = the last pass's predictions: the pick is the earliest pass at 100.
  labels = _predict(params, r.last_qparams, x)
  r2 = run(labels)
  tops = [h["holdout_top1"] for h in r2.holdout]
  assert tops[-1] == 100.0 and r2.selected_pass == tops.index(100.0)
  assert np.array_equal(_predict(params, r2.qparams, x), labels) or r2.selected_pass == 0
  # Killed in pass 2 (after pass 1 was scored), resumed: the same pick and QParams.
  r3 = _killed_then_resumed(monkeypatch, lambda **kw: run(labels, workdir=str(tmp_path), **kw))
  assert r3.selected_pass == r2.selected_pass and r3.holdout == r2.holdout
  for u, v in zip(jax.tree.leaves(r2.qparams), jax.tree.leaves(r3.qparams)):
    np.testing.assert_array_equal(u, v)


def test_engine_state_reads_an_older_checkpoints_json():
  old = {"position": 2, "history": [{"pass": 0, "block": 1, "best": 0.5}], "candidates": 14,
         "elapsed": 3.0, "fitness_init": 0.7, "holdout": [], "selected_pass": 0}
  state = EngineState.from_json(old)  # no "optimizer" then, and units were called blocks
  assert state.optimizer == {} and state.history == [{"pass": 0, "unit": 1, "best": 0.5}]
  assert EngineState.from_json(state.to_json()) == state


def test_sign_test_and_the_pick():
  assert selection.sign_test(5, 0) == pytest.approx(1 / 32) and selection.sign_test(0, 0) == 1.0
  assert selection.sign_test(10, 10) == pytest.approx(0.5881, abs=1e-4)
  assert selection.sign_test(0, 7) == 1.0
  rec = lambda p, top1, fixed, broken: {"pass": p, "holdout_top1": top1,  # noqa: E731
                                        "fixed": fixed, "broken": broken,
                                        "p_value": selection.sign_test(fixed, broken)}
  init = rec(0, 90.0, 0, 0)
  best = functools.partial(selection.pick, rule="best_significant")
  # +0.25 points from 30 fixed vs 25 broken: noise (p ~ 0.3), the init stays ...
  assert best([init, rec(1, 90.25, 30, 25)], 0.05) == 0
  # ... unless the test is off; a clear gain passes it; the best of those wins.
  assert best([init, rec(1, 90.25, 30, 25)], 1.0) == 1
  assert best([init, rec(1, 90.5, 40, 10), rec(2, 90.4, 38, 10)], 0.05) == 1
  assert best([init, rec(1, 89.0, 5, 25)], 1.0) == 0
  # The default keeps the last pass, better or not, unless it is significantly worse.
  assert selection.pick([init, rec(1, 90.5, 40, 10), rec(2, 90.4, 38, 10)], 0.05) == 2
  assert selection.pick([init, rec(1, 89.75, 25, 30)], 0.05) == 1  # -0.25: noise
  assert selection.pick([init, rec(1, 89.0, 5, 25)], 0.05) == 0  # p ~ 2e-4: worse
  assert selection.pick([init, rec(1, 89.0, 5, 25)], 1.0) == 1  # no test
  with pytest.raises(ValueError, match="holdout.rule='best'.*last_unless_worse"):
    selection.pick([init], 0.05, rule="best")


@pytest.mark.parametrize("kw, message", [
    (dict(pool=1), "pool=1 must be >= 2"),
    (dict(strategy="SNES", popsize=1), "popsize=1 must be >= 2"),
    (dict(strategy="adam", lr=0.0), "lr=0.0 must be > 0"),
    (dict(strategy="SNES", children=4), "search.popsize"),
    (dict(strategy="adam", children=4), "set search.generations"),
    (dict(radius=-1e-3), "radius=-0.001 must be >= 0"),
    (dict(strategy="hill"), "strategy='hill' is unknown"),
    (dict(loss="hinge"), "loss='hinge' is unknown"),
    (dict(temperature=0.0), "temperature=0.0 must be > 0"),
    (dict(layers=()), "search.layers"),
])
def test_bad_search_config(kw, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    SearchConfig(**kw)
  with pytest.raises(ValueError):
    make_strategy("nope", 4)


def test_gradient_strategy_is_adam_on_log_scales():
  """The Adam baseline through the strategy contract equals optax Adam on z,
  scales = scales0 * exp(z), fed the loss's gradient."""
  import optax
  s = make_strategy("adam", 3, lr=0.1)
  scales0 = jnp.array([0.5, 1.0, 2.0])
  state = s.init(jax.random.key(0), scales0, 1.0)
  tx, z = optax.adam(0.1), jnp.zeros(3)
  opt = tx.init(z)
  for step in range(3):
    x, state = s.ask(jax.random.key(step), state)
    np.testing.assert_allclose(s.to_scales(state, x)[0], scales0 * jnp.exp(z), rtol=1e-6)
    grad = jnp.array([[1.0, -2.0, 0.5]]) * (step + 1)
    state, _ = s.tell(jax.random.key(step), x, jnp.zeros(1), state, grad)
    updates, opt = tx.update(grad[0], opt, z)
    z = optax.apply_updates(z, updates)
  np.testing.assert_allclose(state.z, z, rtol=1e-6)
  assert s.needs_grad and s.population_size == 1


def test_renamed_search_fields_name_their_replacement():
  from evolq_jax.config import apply_overrides, base_config
  with pytest.raises(ValueError, match=r"search.pool .*search.popsize"):
    apply_overrides(base_config(), ["search.population=4"])


def test_relative_step_moves_each_scale_by_a_fraction_of_itself():
  x0 = jnp.array([1e-3, 1.0, 100.0])
  for name in ("evolq", "random"):
    s = make_strategy(name, 3, children=256, radius=0.05, relative=True)
    pop, _ = s.ask(jax.random.key(1), s.init(jax.random.key(0), x0, 1.0))
    ratio = np.asarray(pop) / np.asarray(x0)
    assert np.all(np.abs(ratio - 1) <= 0.05 + 1e-6) and float(ratio.std()) > 0.02
  with pytest.raises(ValueError, match="step='relative' needs search.radius"):
    SearchConfig(step="relative")
  with pytest.raises(ValueError, match="step='sideways' is unknown"):
    SearchConfig(step="sideways", radius=0.1)


def test_units_of_one_segment_share_their_compiled_programs():
  """A 4-block ViT has two segments, the first block (it embeds the images) and blocks
  1-3: a search over every unit builds one scoring and one prefix program per segment,
  not per unit, and a second search of the same shapes builds none (summary.json
  reports the counts: compilation.CompileLog)."""
  from evolq_jax.compilation import CompileLog
  from evolq_jax.models.segments import segments
  cfg = dataclasses.replace(CFG, depth=4, name="vit_fixture_depth4_test")
  params = init_params(cfg, jax.random.key(0))
  x = jnp.asarray(jax.random.normal(jax.random.key(1), (N, 28, 28, 1)))
  # min/max activations: the programs counted here are the search's, not calibration's
  qparams = calibrate(cfg, dataclasses.replace(QCFG, a_observer="minmax"), params, x,
                      batch_size=N, progress=False)
  assert segments(cfg) == ((0, 1), (1, 4))
  scfg = SearchConfig(passes=1, generations=1, children=2, loss_batch=LB)
  with CompileLog() as first:
    search(cfg, QCFG, params, qparams, x, scfg, progress=False)
  # per segment: the start alone (1 candidate) and a generation (2): 4 programs, not 8
  assert first.by_name.get("jit(segment_fitness)") == 4
  assert first.by_name.get("jit(_segment_prefix)") == 1  # units 1-3; unit 0's prefix: images
  assert "jit(_prefix)" not in first.by_name
  with CompileLog() as again:
    search(cfg, QCFG, params, qparams, x, dataclasses.replace(scfg, children=2), seed=1,
           progress=False)
  assert "jit(segment_fitness)" not in again.by_name
