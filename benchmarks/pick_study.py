"""Does the held-out pick keep a better pass than the search's last one?

  python benchmarks/pick_study.py [GRID.json ...]
  ->  benchmarks/results/pick_study.json (+ docs/results/pick_study.md)

Reads the accuracy grids' committed records (no search is run): every search
record carries its held-out top-1 per pass, the pass the pick kept with its
test top-1, and the test top-1 of the last pass. Per grid it counts the runs
where keeping the last pass instead would have scored higher or lower on the
test images, with a one-sided sign test over the runs that differ. It also
says what breaking held-out ties by the calibration loss would change: the rule
moves a tie to its pass with the lowest recorded loss (usually the latest, but
the loss is scored in float32 and can rise by a hair), whose test top-1 the
record has only when that pass is the last.

The runs of one grid share a model and data, so they are not independent
samples: the sign test says how lopsided the counts are, not how general.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from common import COMMITTED, git_commit, write_results

from evolq_jax.search.selection import pick, sign_test

# the committed grids (read from the repo even when EVOLQ_RESULTS redirects the output)
GRIDS = ("accuracy.json", "accuracy_cifar10.json", "efficientnet_lite0.json")
# the rules at the CLI's level: the default now and the default before this study
RULES = {"last_unless_worse": ("last_unless_worse", 0.05),
         "best_significant": ("best_significant", 0.05)}


def start_top1(grid: dict) -> dict:
  """(setting, start method) -> the start's test top-1 (the grid's no-search records)."""
  return {(r["setting"], r["method"]): r["test_top1"] for r in grid.get("runs", [])
          if r.get("seed") is None}


def under_rules(run: dict, starts: dict) -> dict:
  """What each rule of RULES would have kept in one search: {rule: [pass, test top-1]},
  the top-1 None where the record lacks that pass's (neither kept, last nor init);
  {} for records written before the held-out records counted fixed and broken images."""
  extra = run["extra"]
  if any("broken" not in r for r in extra["holdout"]):
    return {}
  known = {extra["selected_pass"]: run["test_top1"], max(r["pass"] for r in extra["holdout"]):
           extra["last_pass_test_top1"], 0: starts.get((run["setting"], extra.get("start")))}
  out = {}
  for name, (rule, alpha) in RULES.items():
    kept = pick(extra["holdout"], alpha, rule)
    out[name] = [kept, known.get(kept)]
  return out


def compare(run: dict, starts: dict | None = None) -> dict | None:
  """One search record -> kept against last pass, or None if it has no held-out pick."""
  extra = run.get("extra") or {}
  records, last = extra.get("holdout"), extra.get("last_pass_test_top1")
  if not records or last is None:
    return None
  kept = extra["selected_pass"]
  top = {r["pass"]: r["holdout_top1"] for r in records}
  loss = {r["pass"]: r["fitness"] for r in records}
  # the grids pick with no sign test (--holdout-alpha 1): the kept pass has the best
  # held-out top-1 of all passes, and its ties are the passes level with it
  # ties -> the lowest calibration loss (equal losses: the latest); a kept init (0)
  # has beaten no pass
  tie_pass = (min((p for p, t in top.items() if t == top[kept]), key=lambda p: (loss[p], -p))
              if kept else 0)
  n_passes = max(top)
  return {"setting": run["setting"], "method": run["method"], "seed": run["seed"],
          "kept_pass": kept, "passes": n_passes, "kept_top1": run["test_top1"],
          "last_top1": last, "tie_pass": tie_pass,
          "tie_top1": (run["test_top1"] if tie_pass == kept
                       else last if tie_pass == n_passes else None),
          "rules": under_rules(run, starts or {})}


def rule_tally(rows: list) -> dict:
  """Per rule of RULES: how often it keeps the init or the last pass, how often
  it differs from the grid's pick, and its mean test top-1 where known."""
  rows = [r for r in rows if r["rules"]]  # the rules need per-image counts
  full = [r for r in rows if all(v[1] is not None for v in r["rules"].values())]
  mean = lambda values: sum(values) / len(full) if full else None  # noqa: E731
  rules = {name: {"keeps_init": sum(r["rules"][name][0] == 0 for r in rows),
                  "keeps_last": sum(r["rules"][name][0] == r["passes"] for r in rows),
                  "differs_from_grid": sum(r["rules"][name][0] != r["kept_pass"] for r in rows),
                  "mean_test_top1": mean([r["rules"][name][1] for r in full])}
           for name in RULES}
  return {"rules": rules, "rules_runs": len(rows), "rules_scored_on": len(full),
          "grid_mean_test_top1": mean([r["kept_top1"] for r in full])}


def tally(rows: list) -> dict:
  diffs = [r["last_top1"] - r["kept_top1"] for r in rows]
  higher, lower = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
  moved = [r for r in rows if r["tie_pass"] != r["kept_pass"]]
  known = [r["tie_top1"] - r["kept_top1"] for r in moved if r["tie_top1"] is not None]
  return {"runs": len(rows), "last_higher": higher, "last_lower": lower,
          "same": len(rows) - higher - lower,
          "mean_last_minus_kept": sum(diffs) / len(diffs) if diffs else 0.0,
          "sign_test_p": sign_test(higher, lower),
          "tie_rule_moves": len(moved), "tie_rule_known": len(known),
          "tie_rule_mean_gain": sum(known) / len(known) if known else None,
          **rule_tally(rows)}


def page(payload: dict) -> str:
  per_grid = payload["grids"]
  lines = ["Test top-1 of the pass the held-out pick kept (the best held-out pass, ties to the "
           "earliest) against the search's last pass, from the grids' records. Sign test: "
           "one-sided, over the searches where the two differ.", "",
           "| grid | held-out images | searches | last pass higher | lower | same "
           "| mean last - kept (points) | sign test p "
           "| ties by calib loss: moved (test known) | their mean gain |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for name, t in per_grid.items():
    gain = "" if t["tie_rule_mean_gain"] is None else f"{t['tie_rule_mean_gain']:+.2f}"
    lines.append(f"| {name} | {t.get('holdout_images', '')} | {t['runs']} | "
                 f"{t['last_higher']} | {t['last_lower']} | {t['same']} | "
                 f"{t['mean_last_minus_kept']:+.2f} | {t['sign_test_p']:.3g} | "
                 f"{t['tie_rule_moves']} ({t['tie_rule_known']}) | {gain} |")
  lines += ["", "What the CLI's rules (sign test at alpha 0.05) would have kept in the same "
            "searches: `last_unless_worse` (the default) keeps the last pass unless the "
            "held-out images say it is worse than the init; `best_significant` (the default "
            "before this study) keeps the best pass whose gain over the init passes the test, "
            "else the init. Searches: those whose records count the images each pass fixed and "
            "broke. Mean test top-1 over the searches where the record holds every "
            "rule's pick (the grid's kept pass, the last pass or the start).", "",
            "| grid | searches | rule | keeps the init | keeps the last pass "
            "| differs from the grid's pick | mean test top-1 (searches) | grid's pick |",
            "|---|---|---|---|---|---|---|---|"]
  for name, t in per_grid.items():
    for rule, u in t["rules"].items():
      mean = "" if u["mean_test_top1"] is None else f"{u['mean_test_top1']:.2f}"
      grid_mean = "" if t["grid_mean_test_top1"] is None else f"{t['grid_mean_test_top1']:.2f}"
      lines.append(f"| {name} | {t['rules_runs']} | {rule} | {u['keeps_init']} | {u['keeps_last']} | "
                   f"{u['differs_from_grid']} | {mean} ({t['rules_scored_on']}) | {grid_mean} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("grids", nargs="*", default=[os.path.join(COMMITTED, g) for g in GRIDS],
                  help="accuracy-grid JSON files (default: the committed grids)")
  args = ap.parse_args(argv)
  per_grid, rows_all = {}, {}
  for path in args.grids:
    if not os.path.exists(path):
      sys.exit(f"pick_study: no grid at {path!r}; give the JSON files benchmarks/accuracy.py "
               f"wrote (benchmarks/results/*.json).")
    with open(path) as f:
      grid = json.load(f)
    starts = start_top1(grid)
    rows = [c for c in (compare(r, starts) for r in grid.get("runs", [])) if c]
    name = os.path.splitext(os.path.basename(path))[0]
    per_grid[name] = {"holdout_images": grid.get("holdout_images"), **tally(rows)}
    rows_all[name] = rows
  per_grid["all"] = tally([r for rows in rows_all.values() for r in rows])
  payload = {"git_commit": git_commit(), "grids": per_grid, "runs": rows_all}
  write_results("pick_study", payload, page(payload))


if __name__ == "__main__":
  main()
