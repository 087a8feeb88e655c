"""The README and docs/: results pages equal their regeneration from the
committed JSON, prose states only figures the records hold, links resolve and
the README's library snippet runs (`pytest -k docs`)."""
import glob
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
HAND_WRITTEN = ([os.path.join(ROOT, "README.md")]
                + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))))
ALL_PAGES = HAND_WRITTEN + sorted(glob.glob(os.path.join(ROOT, "docs", "results", "*.md")))


@pytest.fixture(scope="module")
def pages():
  import sys
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import pages as mod
  return mod


def _read(path):
  with open(path) as f:
    return f.read()


def test_docs_readme_is_a_front_page():
  text = _read(os.path.join(ROOT, "README.md"))
  assert len(text.splitlines()) <= 250, "README.md is the front page: at most 250 lines"
  first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
  assert first_block == ['pip install -e . && evolq demo', 'pip install -e ".[test]" && pytest']


@pytest.mark.parametrize("name", sorted(
    os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(RESULTS, "*.json"))
    if os.path.basename(p) != "accuracy_w4a8.json"))  # merged into accuracy.json; no page
def test_docs_results_page_is_generated_from_its_json(pages, name):
  assert name in pages.PAGES, f"{name}.json has no page in benchmarks/pages.py:PAGES"
  committed = _read(os.path.join(ROOT, "docs", "results", f"{name}.md"))
  assert pages.render(name) == committed, (
      f"docs/results/{name}.md differs from its regeneration from {name}.json: run "
      "python benchmarks/pages.py and commit the page")


def test_docs_results_folder_holds_only_generated_pages(pages):
  here = {os.path.splitext(os.path.basename(p))[0]
          for p in glob.glob(os.path.join(ROOT, "docs", "results", "*.md"))}
  assert here == set(pages.PAGES)


def test_docs_readme_headline_is_generated_from_its_records(pages):
  text = _read(os.path.join(ROOT, "README.md"))
  assert pages.readme_with_headline(text) == text, (
      "README.md's headline table differs from its records: run python benchmarks/pages.py")


def _record_figures() -> set:
  """Every number the records hold, as it would be written at 0-4 decimals (and
  as a percentage for fractions), plus every figure of a generated page."""
  out = set()

  def add(x):
    for v in (x, abs(x), 100 * x):
      out.update(f"{v:.{d}f}" for d in range(5))

  def walk(o):
    if isinstance(o, bool):
      return
    if isinstance(o, (int, float)):
      add(o)
    elif isinstance(o, dict):
      for v in o.values():
        walk(v)
    elif isinstance(o, list):
      for v in o:
        walk(v)
    elif isinstance(o, str):
      for m in re.findall(r"\d+\.\d+", o):
        add(float(m))

  for path in glob.glob(os.path.join(RESULTS, "*.json")) + glob.glob(
      os.path.join(ROOT, "evolq_jax", "checkpoints", "*.json")):
    walk(json.loads(_read(path)))
  for path in glob.glob(os.path.join(ROOT, "docs", "results", "*.md")):
    for m in re.findall(r"\d+\.\d+", _read(path)):
      add(float(m))
  return out


def _prose(text: str) -> str:
  text = re.sub(r"```.*?```", "", text, flags=re.S)
  return re.sub(r"`[^`\n]*`", "", text)


def test_docs_prose_states_only_figures_the_records_hold():
  """A decimal figure in hand-written text (README, docs/*.md; code and
  inline code aside) must be a value some committed record or generated page
  holds, at the precision written: a figure copied by hand and left behind
  when its record changed fails here."""
  held = _record_figures()
  stray = []
  for path in HAND_WRITTEN:
    for i, line in enumerate(_prose(_read(path)).splitlines(), 1):
      stray += [f"{os.path.relpath(path, ROOT)}: {m}" for m in
                re.findall(r"(?<![\w.])(\d+\.\d+)(?![\w.])", line) if m not in held]
  assert not stray, "figures no record holds: " + ", ".join(stray)


def test_docs_links_resolve():
  broken = []
  for path in ALL_PAGES:
    for target in re.findall(r"\]\(([^)\s]+)\)", _read(path)):
      if re.match(r"[a-z]+:", target) or target.startswith("#"):
        continue
      file = os.path.normpath(os.path.join(os.path.dirname(path), target.split("#")[0]))
      if not os.path.exists(file):
        broken.append(f"{os.path.relpath(path, ROOT)} -> {target}")
  assert not broken, "links to nothing: " + ", ".join(broken)


def test_docs_readme_library_snippet_runs():
  """The README's library example, as written, on the bundled fixture."""
  text = _read(os.path.join(ROOT, "README.md"))
  code = re.search(r"<!-- library-snippet -->\n```python\n(.*?)```", text, re.S).group(1)
  scope = {}
  exec(compile(code, "README library snippet", "exec"), scope)
  result, eq = scope["result"], scope["eq"]
  assert result.candidates > 0
  assert isinstance(result.qparams, eq.QParams)
