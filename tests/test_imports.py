"""The import graph between the packages of energy_jax has no cycle.

Every module is parsed (nothing is imported), its imports read at module level and inside
functions alike: a function-local import still ties its package to the other at run time. Nodes
are the subpackages (``config``, ``data``, ``detectors``, ...), each top-level module
(``inference``, ``export``, ...) and the root package's ``__init__`` (``energy_jax``).

The root is the public facade: it imports from the rest, and Python runs it before any module of
the package, so a module that takes a name from it would close a cycle. One name is the
exception, ``__version__``: the root assigns it before its first import, so it is there for any
module the facade's imports start; importing it adds no edge.
"""

import ast
import pathlib

import energy_jax

PACKAGE = pathlib.Path(energy_jax.__file__).parent
ROOT = "energy_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
  relative = pathlib.Path(*name.split(".")[1:]) if "." in name else pathlib.Path()
  base = PACKAGE / relative
  return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _node(module: str) -> str:
  """The graph node of a module: its subpackage or top-level module; ``energy_jax`` for the
  root package itself."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ROOT


def _imported_modules(path: pathlib.Path):
  """``(line, module)`` of every energy_jax module ``path`` imports, at any depth of the file."""
  this = _module_name(path)
  package = this if path.name == "__init__.py" else this.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == ROOT:
          yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[:len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module or ""
      if source.split(".")[0] != ROOT:
        continue
      for alias in node.names:     # `from energy_jax.ood import scores` imports a module
        full = f"{source}.{alias.name}"
        yield node.lineno, full if _is_module(full) else source


def _names_from_root(path: pathlib.Path):
  """``(line, name)`` of every name ``path`` imports from the root that is no module."""
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.ImportFrom) and node.module == ROOT and not node.level:
      for alias in node.names:
        if not _is_module(f"{ROOT}.{alias.name}"):
          yield node.lineno, alias.name


def package_graph():
  """``{(from_node, to_node): [where, ...]}`` between different nodes (``from energy_jax import
  __version__`` is no edge: see the module docstring)."""
  edges = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    this = _node(_module_name(path))
    for line, module in _imported_modules(path):
      target = _node(module)
      if target == ROOT and path.name != "__init__.py" and all(
          name == "__version__" for l, name in _names_from_root(path) if l == line):
        continue
      if target != this:
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
        edges.setdefault((this, target), []).append(where)
  return edges


def cycles(edges):
  """The strongly connected components of more than one node, each as a sorted list: every node
  of one lies on a cycle through all of them."""
  successors = {}
  for a, b in edges:
    successors.setdefault(a, set()).add(b)
    successors.setdefault(b, set())
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def connect(node):                          # Tarjan's algorithm
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for nxt in sorted(successors[node]):
      if nxt not in index:
        connect(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in on_stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for node in sorted(successors):
    if node not in index:
      connect(node)
  return sorted(components)


def find_cycle(edges):
  """A cycle ``[a, b, ..., a]`` of the directed graph, or None."""
  successors = {}
  for a, b in edges:
    successors.setdefault(a, set()).add(b)
  state = {}                 # 1: on the current path, 2: done
  path = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(successors.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for start in sorted(successors):
    if start not in state:
      found = visit(start)
      if found:
        return found
  return None


def test_find_cycle_finds_a_cycle_and_only_one():
  assert find_cycle({("a", "b"): [], ("b", "c"): [], ("a", "c"): []}) is None
  assert find_cycle({("a", "b"): [], ("b", "c"): [], ("c", "a"): []}) == ["a", "b", "c", "a"]


def test_cycles_are_the_strongly_connected_components():
  edges = {("a", "b"): [], ("b", "a"): [], ("b", "c"): [], ("c", "d"): [], ("d", "c"): []}
  assert cycles(edges) == [["a", "b"], ["c", "d"]]
  assert cycles({("a", "b"): [], ("b", "c"): []}) == []


def test_the_graph_reads_function_local_imports():
  edges = package_graph()
  # evaluation.run imports checkpoints inside the function only.
  assert any("energy_jax/ood/evaluation.py" in w for w in edges.get(("ood", "checkpoints"), ()))
  assert all(a != b for a, b in edges)


def test_only_the_version_is_imported_from_the_root():
  assert energy_jax.__version__
  text = (PACKAGE / "__init__.py").read_text()
  assert text.index("__version__ =") < text.index("\nfrom energy_jax"), (
      "the root must assign __version__ before its imports: modules import it from there")
  taken = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name} from energy_jax"
           for path in sorted(PACKAGE.rglob("*.py")) if path.name != "__init__.py" or
           path.parent != PACKAGE for line, name in _names_from_root(path)
           if name != "__version__"]
  assert not taken, "\n".join(taken)


def test_no_import_cycle_between_packages():
  edges = package_graph()
  found = cycles(edges)
  lines = []
  for component in found:
    cycle = find_cycle({e: w for e, w in edges.items() if set(e) <= set(component)})
    lines.append(f"import cycle between packages: {' -> '.join(cycle)} (all of {component} "
                 "import each other); the edges among them:")
    for (a, b), where in sorted(edges.items()):
      if a in component and b in component:
        lines += [f"  {a} -> {b}:"] + [f"    {w}" for w in where]
  assert not found, "\n".join(lines)
