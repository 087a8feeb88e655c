"""Helpers shared by the benchmark scripts: provenance and result files."""
from __future__ import annotations

import json
import os
import subprocess

# EVOLQ_RESULTS redirects every script's output (the tests use it).
RESULTS = os.environ.get("EVOLQ_RESULTS") or os.path.join(os.path.dirname(__file__), "results")


def git_commit() -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(__file__), check=True).stdout.strip()
    # The result files are what the scripts write as they go: changes there
    # do not make the code that produced them uncommitted.
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                            ":(top,exclude)benchmarks/results"],
                           capture_output=True, text=True, cwd=os.path.dirname(__file__)).stdout
    return out + ("-dirty" if dirty.strip() else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def write_results(name: str, payload: dict, markdown: str) -> None:
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
    json.dump(payload, f, indent=2)
  with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
    f.write(markdown)
  print(markdown)
