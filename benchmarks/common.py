"""Helpers shared by the benchmark scripts: provenance and result files."""
from __future__ import annotations

import hashlib
import os
import subprocess

from evolq_jax.workdir import write_atomic, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The committed records (JSON, plots) and their pages (docs/results/NAME.md, see pages.py).
COMMITTED = os.path.join(ROOT, "benchmarks", "results")
# EVOLQ_RESULTS redirects every script's output, pages included (the tests use it).
RESULTS = os.environ.get("EVOLQ_RESULTS") or COMMITTED
PAGES_DIR = os.environ.get("EVOLQ_RESULTS") or os.path.join(ROOT, "docs", "results")


def git_commit() -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(__file__), check=True).stdout.strip()
    # The result files are what the scripts write as they go: changes there
    # do not make the code that produced them uncommitted.
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                            ":(top,exclude)benchmarks/results", ":(top,exclude)docs/results"],
                           capture_output=True, text=True, cwd=os.path.dirname(__file__)).stdout
    return out + ("-dirty" if dirty.strip() else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def code_key(*paths: str) -> str:
  """A hash of the code under `paths` (relative to the repo root) as it is on
  disk: their committed trees plus any uncommitted change to them. Unlike the
  commit, it stays the same across commits that touch only other files
  (results, the README), so caches keyed by it survive those. Outside git (or
  for a path git does not know): git_commit()."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=root, check=True).stdout
    trees = run("rev-parse", *(f"HEAD:{p}" for p in paths))
    diff = run("diff", "HEAD", "--", *paths)
  except (OSError, subprocess.CalledProcessError):
    return git_commit()
  return hashlib.sha1((trees + diff).encode()).hexdigest()[:16]


def top1_interval(top1: float, images: int) -> float:
  """Half-width, in points, of the 95% interval of a top-1 (%) measured on `images` test
  images (the normal approximation of the binomial)."""
  p = top1 / 100
  return float(196 * (p * (1 - p) / images) ** 0.5)


def write_results(name: str, payload: dict, page: str) -> None:
  """The record RESULTS/NAME.json and its page PAGES_DIR/NAME.md, which must be
  the writing script's `page(payload)` (tests/test_docs.py regenerates it)."""
  for folder in (RESULTS, PAGES_DIR):
    os.makedirs(folder, exist_ok=True)
  write_json(os.path.join(RESULTS, f"{name}.json"), payload)
  write_atomic(os.path.join(PAGES_DIR, f"{name}.md"), page)
  print(page)
