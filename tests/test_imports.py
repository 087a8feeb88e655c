"""The package's import graph has no cycles (imports inside functions count):
data -> models -> calibrate -> search -> evaluate -> export, one way."""
import ast
import pathlib

import evolq_jax

ROOT = pathlib.Path(evolq_jax.__file__).parent


def _graph() -> dict:
  mods = {}
  for f in ROOT.rglob("*.py"):
    name = ".".join(("evolq_jax",) + f.relative_to(ROOT).with_suffix("").parts)
    mods[name.removesuffix(".__init__")] = f
  graph = {m: set() for m in mods}
  for m, f in mods.items():
    for node in ast.walk(ast.parse(f.read_text())):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      # a package's __init__ only re-exports: importing through it is not a dependency on it
      graph[m] |= {t for t in names if t in mods and t != m and mods[t].name != "__init__.py"}
  return graph


def _cycles(graph) -> list:
  state, stack, found = {}, [], []

  def visit(u):
    state[u] = "open"
    stack.append(u)
    for v in sorted(graph[u]):
      if state.get(v) == "open":
        found.append(" -> ".join(stack[stack.index(v):] + [v]))
      elif v not in state:
        visit(v)
    stack.pop()
    state[u] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)
  return found


def test_the_import_graph_has_no_cycles():
  graph = _graph()
  assert "evolq_jax.search.engine" in graph and graph["evolq_jax.search.engine"]
  assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
