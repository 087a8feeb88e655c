"""The accuracy grid script end to end, on a tiny budget and untrained weights."""
import json
import os
import subprocess
import sys
import tempfile

import pytest
from conftest import small_fixture_vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the 2-block fixture ViT: the grid's many programs (six recipes' calibrations and
# evaluations, the search's) are small; every forward runs batches of 40 images (the
# calibration set, the test batches, the held-out images), so that each recipe compiles
# its quantized forward once
GRID_MODEL = small_fixture_vit().name
SMALL = ["checkpoint='random'", f"model='{GRID_MODEL}'", "calib.num_images=40",
         "calib.batch_size=40", "eval.limit=100", "eval.batch_size=40", "search.loss_batch=20"]
FIELDS = ("setting", "method", "seed", "calibration_fitness", "test_top1", "test_top5",
          "agreement_with_fp", "candidates_evaluated", "seconds", "git_commit", "config")


def _script(tmp_path, *args):
  """benchmarks/accuracy.py as a user runs it -> its stdout."""
  cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "accuracy.py"), *args]
  env = {**os.environ, "EVOLQ_RESULTS": str(tmp_path),
         "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def _grid_here(tmp_path, monkeypatch, *extra, stop_after=None):
  """The grid of _grid, run in this process -> the number of unit visits it
  searched. With `stop_after`, killed (KeyboardInterrupt) at the next visit."""
  monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
  import accuracy
  import common
  from evolq_jax.search import engine
  monkeypatch.setattr(accuracy, "RESULTS", str(tmp_path))
  monkeypatch.setattr(common, "RESULTS", str(tmp_path))
  monkeypatch.setattr(common, "PAGES_DIR", str(tmp_path))
  # the baselines' cache (the temp folder) of this test only: an earlier run's must not
  # stand in for the calibration this test checks (nor make its time depend on it)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  real, visits = getattr(engine.search_block, "__wrapped__", engine.search_block), []

  def search_block(*a, **k):
    if len(visits) == stop_after:
      raise KeyboardInterrupt
    visits.append(1)
    return real(*a, **k)
  search_block.__wrapped__ = real  # a second call in the same test counts afresh
  monkeypatch.setattr(engine, "search_block", search_block)
  monkeypatch.setattr(sys, "argv", ["accuracy.py", "--settings", "W4A8", "--only",
                                    "evolq-infonce", "--seeds", "0", "--passes", "2",
                                    "--generations", "1", "--children", "2", "--holdout", "40",
                                    "--name", "grid", *extra, "--set", *SMALL])
  monkeypatch.chdir(tmp_path)
  if stop_after is None:
    accuracy.main()
  else:
    with pytest.raises(KeyboardInterrupt):
      accuracy.main()
  return len(visits)


def test_accuracy_grid_records_every_field_and_resumes(tmp_path, monkeypatch):
  # killed in the search's fourth unit visit (2 passes over 2 units): the baselines are in
  # grid.json and the cell has 3 checkpoints; --resume searches the last visit only
  _grid_here(tmp_path, monkeypatch, stop_after=3)
  assert {r["method"] for r in json.loads((tmp_path / "grid.json").read_text())["runs"]} == \
      {"init-reference", "init-reference-ends8", "init-minmax", "init-omse", "init-percentile",
       "clip-ratio"}
  cells = tmp_path / "runs" / "accuracy" / "grid"
  (cell,) = cells.iterdir()
  assert cell.name.startswith("W4A8_evolq-infonce_s0_")
  assert sorted(int(d) for d in os.listdir(cell / "checkpoints") if d.isdigit())[-1] == 3
  run = json.loads((cell / "run.json").read_text())  # a run folder like the CLI's
  assert run["command"] == "search" and run["config"]["search"]["strategy"] == "evolq"
  assert run["config"]["start"] == "reference"
  from evolq_jax import workdir
  with workdir.lock(str(cell)):  # another grid process runs the cell: skipped, not run twice
    assert _grid_here(tmp_path, monkeypatch, "--resume") == 0
  assert "evolq-infonce" not in {r["method"] for r in
                                 json.loads((tmp_path / "grid.json").read_text())["runs"]}
  assert _grid_here(tmp_path, monkeypatch, "--resume") == 1
  assert not list(cells.iterdir())  # a finished cell's checkpoints are removed
  runs = json.loads((tmp_path / "grid.json").read_text())["runs"]
  by_method = {r["method"]: r for r in runs}
  assert set(by_method) == {"init-reference", "init-reference-ends8", "init-minmax", "init-omse",
                            "init-percentile", "clip-ratio", "evolq-infonce"}
  ends = by_method["init-reference-ends8"]["config"]["quant"]
  assert ends["keep_ends_8bit"] and ends["end_layers"] == ["patch_embed", "head"]
  for r in runs:
    assert all(k in r for k in FIELDS), sorted(set(FIELDS) - set(r))
    assert r["setting"] == "W4A8" and 0 <= r["test_top1"] <= r["test_top5"] <= 100
    assert r["model"] == GRID_MODEL
    assert r["config"]["quant"]["w_bits"] == 4 and r["config"]["quant"]["a_bits"] == 8
  r = by_method["evolq-infonce"]
  assert r["seed"] == 0 and r["candidates_evaluated"] == 4 * (1 + 1 * 2)
  assert [p["from_unit_visit"] for p in r["extra"]["resumed"]] == [0, 3]
  assert r["config"]["search"]["strategy"] == "evolq"
  # the paper's rows start where the reference's run script starts
  assert r["extra"]["start"] == "init-reference"
  assert by_method["init-reference"]["config"]["quant"]["bias_correction"]
  assert not by_method["init-minmax"]["config"]["quant"]["bias_correction"]
  assert r["config"]["search"]["loss_batch"] == 20  # the config's search settings reach it
  # the budget curve: the start, then one point after every unit visit
  assert [p["candidates"] for p in r["extra"]["curve"]] == [0, 3, 6, 9, 12]
  assert sum(r["extra"]["best_no_search_by_calibration"] for r in runs if r["seed"] is None) == 1
  md = (tmp_path / "grid.md").read_text()
  assert "## W4A8" in md and "| evolq-infonce | 1 |" in md and "## Targets" in md
  for png in ("grid_top1.png", "grid_budget_W4A8.png"):
    assert (tmp_path / png).stat().st_size > 1000
  # --resume: every cell is there, so nothing runs again
  assert _grid_here(tmp_path, monkeypatch, "--resume") == 0
  again = json.loads((tmp_path / "grid.json").read_text())["runs"]
  assert [(r["method"], r["seed"], r["test_top1"]) for r in again] == \
      [(r["method"], r["seed"], r["test_top1"]) for r in runs]
  # and the script runs as a script, from another folder
  assert "--resume" in _script(tmp_path, "--help")


def test_targets_table_resolves_best_and_margins(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
  import accuracy

  def run(method, top1, seed=0, best=False):
    return {"method": method, "seed": seed, "test_top1": top1,
            "extra": {"best_no_search_by_calibration": best}}
  runs = [run("init-minmax", 88.0, None), run("init-bc", 89.0, None, best=True),
          run("evolq-infonce-from-best", 89.5), run("evolq-infonce-from-best", 90.3, seed=1),
          run("grad-adam", 90.0), run("grad-adam", 90.0, seed=1)]
  groups = accuracy._group([{**r, "setting": "W3A8"} for r in runs])
  rows = [l for l in accuracy._targets(groups) if l.startswith("| W3A8")]
  # mean 89.9: not >= 89.0 + 1.0, but >= grad-adam's 90.0? no (-0.10); other targets lack runs
  assert rows == [
      "| W3A8 | evolq-infonce-from-best (2) | init-bc (-) | +1.0 | 89.90 | 89.00 | +0.90 | no |",
      "| W3A8 | evolq-infonce-from-best (2) | grad-adam (2) | +0.0 | 89.90 | 90.00 | -0.10 | no |"]
  assert accuracy._deterministic("grad-adam") and not accuracy._deterministic("sep-cma-es")


def test_budget_curves_follow_the_hard_setting_once_resolved(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
  import accuracy
  curves = accuracy.PLANS["cifar10"][1]
  assert accuracy.wants_curve(curves, "W3A8", "evolq-infonce-4x", hard="W3A4")
  assert accuracy.wants_curve(curves, "W3A4", "evolq-infonce-4x", hard="W3A4")
  assert not accuracy.wants_curve(curves, "W4A4", "evolq-infonce-4x", hard="W3A4")
  assert not accuracy.wants_curve(curves, "W3A4", "evolq-infonce-4x")  # not yet resolved
  assert not accuracy.wants_curve(curves, "W3A4", "random-search", hard="W3A4")


def test_pretrained_reading_sets_each_search_against_the_interval(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
  import accuracy

  def run(setting, method, top1, seed=0):
    return {"setting": setting, "method": method, "seed": seed, "test_top1": top1}
  runs = [run("W4A8", "init-reference", 69.6, None), run("W4A8", "init-minmax", 13.8, None),
          run("W4A8", "evolq-infonce", 71.0), run("W4A8", "evolq-infonce", 73.0, seed=1),
          run("W4A8", "grad-adam", 75.0), run("W8A8", "init-reference", 90.0, None)]
  rows = [l for l in accuracy._interval_reading(accuracy._group(runs), 2.7) if l.startswith("| W")]
  # the searches against the best baseline (init-reference), +2.4 inside +-2.7, +5.4 beyond
  assert rows == [
      "| W4A8 | evolq-infonce (2) | init-reference | 72.00 | 69.60 | +2.40 | no |",
      "| W4A8 | grad-adam (1) | init-reference | 75.00 | 69.60 | +5.40 | yes |"]


def test_budget_shapes_of_the_test_bed(monkeypatch):
  """Equal evaluations in another shape, 4x the budget, and Adam at the wall
  time of the tournament with the learning rate picked on calibration loss."""
  monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
  import accuracy
  from accuracy_plans import evaluations, hardest_setting
  ref = dict(passes=10, generations=3, children=1)  # 240 evaluations on 6 units
  assert evaluations(10, 6, 3, 1) == 240
  assert accuracy.method_budget("evolq-infonce", ref, 6) == ref
  par = accuracy.method_budget("evolq-parallel4", ref, 6)
  assert par == dict(passes=8, generations=1, children=4) and evaluations(8, 6, 1, 4) == 240
  snes = accuracy.method_budget("snes-eq", ref, 6)
  assert snes == dict(passes=3, generations=3, popsize=4)  # 234, the nearest to 240
  assert accuracy.method_budget("evolq-infonce-4x", ref, 6)["passes"] == 40
  assert accuracy.method_budget("grad-adam-lr0.03", ref, 6) == dict(passes=10, generations=3)
  runs = [{"method": "evolq-infonce", "seed": 0, "seconds": 100.0,
           "config": {"search": {"generations": 3}}},
          {"method": "grad-adam-lr0.03", "seed": 0, "seconds": 300.0, "calibration_fitness": 2.0,
           "config": {"search": {"generations": 3, "lr": 0.03}}},
          {"method": "grad-adam-lr0.1", "seed": 0, "seconds": 300.0, "calibration_fitness": 1.0,
           "config": {"search": {"generations": 3, "lr": 0.1}}}]
  assert accuracy.best_adam(runs) == "grad-adam-lr0.1"
  wall = accuracy.method_budget("grad-adam-wall", ref, 6, runs)
  assert wall == dict(passes=10, generations=1, lr=0.1)  # Adam steps cost 3x here
  assert hardest_setting({"W3A8": 80.0, "W4A4": 55.0, "W2A8": 20.0}) == "W4A4"
  assert hardest_setting({"W2A8": 20.0}) is None


def test_testbed_targets_pick_the_setting_with_the_largest_gap(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
  import accuracy

  def run(setting, method, seed, top1):
    return {"setting": setting, "method": method, "seed": seed, "test_top1": top1}
  runs = [run("W3A8", "init-reference", None, 79.0), run("W3A8", "evolq-infonce", 0, 79.5),
          run("W4A4", "init-reference", None, 60.0), run("W4A4", "init-minmax", None, 58.0)]
  runs += [run("W4A4", "evolq-infonce", s, t) for s, t in enumerate((62.0, 62.4, 61.6))]
  runs += [run("W4A4", "random-search", s, t) for s, t in enumerate((60.5, 60.0, 60.2))]
  runs += [run("W4A4", "grad-adam-wall", 0, 61.5)]
  lines = accuracy._testbed_targets(accuracy._group(runs), {"fp_top1": 80.0})
  assert "In W4A4" in lines[2] and "(20.00 points)" in lines[2]
  rows = [l for l in lines if l.startswith("| best search") or l.startswith("| tournament")]
  assert rows[0].endswith("| +2.00 | yes |")  # 62.0 vs init-reference 60.0
  assert rows[1].split("|")[-2].strip() == "yes"  # +1.77 > the larger seed std
  assert rows[2].endswith("| +0.50 | yes |")


def test_save_keeps_the_runs_another_process_wrote(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
  import accuracy
  monkeypatch.setattr(accuracy, "RESULTS", str(tmp_path))
  run = lambda method, seed: {"setting": "W4A8", "method": method, "seed": seed}  # noqa: E731
  budget = {"passes": 1}
  accuracy._save({"budget": budget, "runs": [run("a", 0)]}, "g")
  other = {"budget": budget, "runs": [run("a", 0), run("b", 1)]}  # another process's file
  accuracy._save(other, "g")
  mine = accuracy._save({"budget": budget, "runs": [run("a", 0), run("c", 0)]}, "g", merge=True)
  keys = lambda p: sorted((r["method"], r["seed"]) for r in p["runs"])  # noqa: E731
  assert keys(mine) == keys(json.loads((tmp_path / "g.json").read_text())) == \
      [("a", 0), ("b", 1), ("c", 0)]
  # what a --resume grid skips: the cells on disk, only if the budget is its own
  assert accuracy._finished("g", budget) == {("W4A8", m, s) for m, s in keys(mine)}
  assert accuracy._finished("g", {"passes": 9}) == set()
  # a file of another budget is not merged: its runs don't compare
  accuracy._save({"budget": {"passes": 2}, "runs": [run("d", 0)]}, "g")
  assert keys(accuracy._save({"budget": budget, "runs": [run("a", 0)]}, "g", merge=True)) == \
      [("a", 0)]


def test_pass_losses_place_each_pass_at_its_evaluations(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
  import accuracy

  def run(method, setting, fits, cands=624):
    return {"method": method, "setting": setting, "seed": 0, "candidates_evaluated": cands,
            "extra": {"holdout": [{"pass": i, "fitness": f} for i, f in enumerate(fits)]}}
  runs = [run("snes-eq", "W4A4", [3.0, 2.0, 1.5, 1.2]), run("snes-eq", "W4A8", [3.0, 2.5]),
          run("evolq-infonce", "W4A4", [3.0] * 11, 640), run("init-reference", "W4A4", []),
          run("adaround-qdrop", "W4A4", [3.0, 1.0], 3200)]
  # the start, then every 208 of the 624 evaluations; other settings, curved
  # methods, runs without passes and one-pass runs (reconstruction) are left out
  assert accuracy._pass_losses(runs, "W4A4", skip={"evolq-infonce"}) == [
      ("snes-eq", 0, [0.0, 208.0, 416.0, 624.0], [3.0, 2.0, 1.5, 1.2])]


def test_pick_study_counts_last_against_kept_and_moves_ties(monkeypatch, tmp_path):
  monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
  import pick_study

  def run(kept, holdout, kept_top1, last_top1, loss=(4.0, 3.0, 2.0, 1.0)):
    return {"setting": "W4A8", "method": "evolq-infonce", "seed": 0, "test_top1": kept_top1,
            "extra": {"selected_pass": kept, "last_pass_test_top1": last_top1,
                      "holdout": [{"pass": p, "holdout_top1": t, "fitness": f}
                                  for p, (t, f) in enumerate(zip(holdout, loss))]}}
  runs = [run(1, [50, 64, 60, 64], 64.8, 71.6),   # tie 1-3: the tie rule keeps the last
          run(2, [50, 60, 70, 65], 80.0, 78.0),   # the pick gained
          run(0, [50, 40, 45, 50], 70.0, 70.0),   # init kept: a tie with it moves nothing
          run(1, [50, 60, 60, 55], 75.0, 74.0),   # tie 1-2, not the last: test top-1 unknown
          {"setting": "W4A8", "method": "init-reference", "seed": None, "test_top1": 1.0}]
  rows = [c for c in map(pick_study.compare, runs) if c]
  assert [r["tie_pass"] for r in rows] == [3, 2, 0, 2]
  assert [r["tie_top1"] for r in rows] == [71.6, 80.0, 70.0, None]
  # the tie goes by the recorded loss, not by lateness: a later pass scored a hair higher
  assert pick_study.compare(run(1, [50, 64, 60, 64], 64.8, 71.6,
                                (4.0, 2.0, 2.0, 2.0001)))["tie_pass"] == 1
  assert pick_study.compare(run(1, [50, 64, 64, 60], 64.8, 71.6,
                                (4.0, 2.0, 2.0, 1.0)))["tie_pass"] == 2  # equal: the latest
  t = pick_study.tally(rows)
  assert (t["runs"], t["last_higher"], t["last_lower"], t["same"]) == (4, 1, 2, 1)
  assert t["mean_last_minus_kept"] == pytest.approx((6.8 - 2.0 + 0.0 - 1.0) / 4)
  assert t["sign_test_p"] == pytest.approx(7 / 8)  # P(>= 1 of 3 go the last pass's way)
  assert (t["tie_rule_moves"], t["tie_rule_known"]) == (2, 1)
  assert t["tie_rule_mean_gain"] == pytest.approx(6.8)
  # the CLI's rules, where the records count fixed and broken images: the last pass broke
  # 30 and fixed 5 (p ~ 1e-5 worse): last_unless_worse keeps the init, whose test top-1 is
  # the start's record; best_significant keeps pass 1 (20 fixed, 10 broken: p = 0.049)
  counted = run(1, [50, 60, 48], 61.0, 55.0, (3.0, 2.0, 1.0))
  for h, (fixed, broken) in zip(counted["extra"]["holdout"], [(0, 0), (20, 10), (5, 30)]):
    h.update(fixed=fixed, broken=broken,
             p_value=pick_study.sign_test(fixed, broken))
  counted["extra"]["start"] = "init-reference"
  r = pick_study.compare(counted, {("W4A8", "init-reference"): 58.0})
  assert r["rules"] == {"last_unless_worse": [0, 58.0], "best_significant": [1, 61.0]}
  assert pick_study.rule_tally([r])["rules"]["last_unless_worse"]["keeps_init"] == 1
  (tmp_path / "g.json").write_text(json.dumps({"runs": runs, "holdout_images": 100}))
  out = {}
  monkeypatch.setattr(pick_study, "write_results", lambda name, payload, md: out.update(payload))
  pick_study.main([str(tmp_path / "g.json")])
  assert out["grids"]["g"] == {"holdout_images": 100, **t} and out["grids"]["all"] == t
  with pytest.raises(SystemExit, match="no grid at"):
    pick_study.main([str(tmp_path / "missing.json")])


def test_a_stacked_method_runs_its_stages_in_order_from_each_others_result(tmp_path,
                                                                           monkeypatch):
  """accuracy_plans.STACKED: the second stage starts from the first's qparams, each stage in
  a folder of its own (a killed cell resumes in its stage), and the record sums the stages'
  candidates and seconds and keeps each stage's figures. (The searches are stand-ins here:
  the grid test above runs a real cell.)"""
  monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
  import accuracy
  from accuracy_plans import SEARCHES, STACKED, stages
  assert stages("adaround-qdrop+evolq") == ("adaround-qdrop", "evolq-infonce")
  assert SEARCHES["evolq+adaround-qdrop"] == SEARCHES["evolq-infonce"]  # starts where it starts
  calls = []

  def cell(ctx, setting, method, seed, best, start, scfg, qcfg, qp, folder):
    calls.append((scfg, qp, folder))
    assert os.path.isdir(folder)
    n = len(calls)
    return ({"setting": setting, "method": method, "seed": seed, "calibration_fitness": 10 - n,
             "test_top1": 50.0 + n, "candidates_evaluated": 100 * n, "seconds": 7.0 * n,
             "config": {"quant": {"w_bits": 3}, "search": {"strategy": scfg}},
             "extra": {"start": "init-reference", "own_loss_init": 11 - n}}, f"qparams{n}")
  monkeypatch.setattr(accuracy, "_run_cell", cell)
  r = accuracy._run_stacked({}, "W3A4", "adaround-qdrop+evolq", 0, None, "reference",
                            ["adaround", "evolq"], None, "qparams0", str(tmp_path))
  assert [c[1] for c in calls] == ["qparams0", "qparams1"]  # each from the one before
  assert [os.path.basename(c[2]) for c in calls] == ["stage1", "stage2"]
  assert r["method"] == "adaround-qdrop+evolq" and r["test_top1"] == 52.0
  assert r["candidates_evaluated"] == 300 and r["seconds"] == 21.0
  assert [s["method"] for s in r["extra"]["stages"]] == list(STACKED["adaround-qdrop+evolq"])
  assert [s["test_top1"] for s in r["extra"]["stages"]] == [51.0, 52.0]
  assert r["config"]["stages"] == [{"strategy": "adaround"}, {"strategy": "evolq"}]
