"""The package's shape: no import cycle among alpa_py's modules, imports
that point one way between layers, and module sizes."""

import ast
import pathlib

import alpa_py

ROOT = pathlib.Path(alpa_py.__file__).parent


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """Every alpa_py module this module imports, at any depth of its code
  (function-level imports included)."""
  tree = ast.parse(path.read_text())
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = package.split(".")
        base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
      # `from pkg import mod` imports the submodule pkg.mod
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                 for a in node.names]
    else:
      continue
    for t in targets:
      while t and t not in known:
        t = t.rpartition(".")[0]
      if t and t != name:
        out.add(t)
  return out


def import_graph() -> dict[str, set[str]]:
  mods = _modules()
  known = set(mods)
  return {name: _imports(name, path, known) for name, path in mods.items()}


def _find_cycle(graph):
  """One cycle as a list of modules, or None (iterative DFS)."""
  state = {}
  for start in sorted(graph):
    if start in state:
      continue
    stack = [(start, iter(sorted(graph[start])))]
    path = [start]
    state[start] = "open"
    while stack:
      node, it = stack[-1]
      nxt = next(it, None)
      if nxt is None:
        state[node] = "done"
        stack.pop()
        path.pop()
        continue
      # a package's __init__ importing its own submodules is not a cycle
      # with them unless they import something that imports it back
      if state.get(nxt) == "open":
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        state[nxt] = "open"
        stack.append((nxt, iter(sorted(graph[nxt]))))
        path.append(nxt)
  return None


def _without_package_inits(graph):
  """Edges into a package's ``__init__`` from its own submodules would make
  every re-export a cycle; ``alpa_py`` itself is the public surface and no
  internal module may import it."""
  pkgs = {m for m, p in _modules().items() if p.name == "__init__.py"}
  return {m: {t for t in deps if not (t in pkgs and m.startswith(t + "."))}
          for m, deps in graph.items()}


def test_the_cycle_finder_finds_a_cycle():
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
  graph = _without_package_inits(import_graph())
  assert len(graph) > 40
  cycle = _find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_internal_module_imports_the_public_package():
  offenders = [m for m, deps in import_graph().items()
               if "alpa_py" in deps and m.count(".") >= 1
               and not m.startswith("alpa_py.bench")
               and m != "alpa_py.cli"]
  assert offenders == []


LAYERS = {  # a module may import its own layer and the layers listed
    "kernels": set(),
    "compiler": {"kernels"},
    "runtime": {"kernels", "compiler"},
    "driver": {"kernels", "compiler", "runtime", "methods"},
    "methods": {"compiler"},
    "optim": {"kernels"},
    "models": {"kernels", "optim", "compiler", "matching"},
    "matching": set(),
}


def test_imports_point_one_way():
  bad = []
  for mod, deps in import_graph().items():
    layer = mod.split(".")[1] if mod.count(".") >= 1 else None
    if layer not in LAYERS:
      continue
    for d in deps:
      dl = d.split(".")[1] if d.count(".") >= 1 else "alpa_py"
      if dl != layer and dl not in LAYERS[layer] and dl != "_progress":
        bad.append(f"{mod} -> {d}")
  assert bad == []


def test_no_module_over_500_lines():
  sizes = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
  assert max(sizes.values()) <= 500, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
