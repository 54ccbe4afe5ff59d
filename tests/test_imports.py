"""The shape of the package: no import cycles among attnlab's modules, and no process-wide side effects on import.

The import graph is read from the source with ``ast``: every ``import`` and ``from ... import`` statement,
at module level or inside a function (a late import is still a dependency), with relative imports resolved.
Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``, so those count as dependencies too
(except the importer's own parent packages, which are already being imported).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import attnlab

PACKAGE_DIR = Path(attnlab.__file__).parent
# Cycles tolerated, each as the late import that closes it, with why.
# Any other cycle fails test_no_import_cycles.
KNOWN_CYCLES: dict[str, set[tuple[str, str]]] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def is_type_checking_block(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, (ast.Name, ast.Attribute)) and ast.unparse(test).endswith("TYPE_CHECKING")


def import_statements(tree: ast.AST):
    """Every Import/ImportFrom node, skipping ``if TYPE_CHECKING:`` blocks (never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not is_type_checking_block(node):
            yield from import_statements(node)


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The attnlab modules that module ``name`` (file ``path``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in import_statements(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        found.add(target)
        found |= {f"{target}.{a.name}" for a in node.names}  # `from pkg import submodule`
    found = {m for m in found if m in known}
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)}
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    return (found | parents) - own


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported_modules(name, path, set(mods)) for name, path in mods.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the groups of modules that import each other, directly or through others."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [g for g in groups if len(g) > 1 or next(iter(g)) in graph[next(iter(g))]]


def shortest_path(graph: dict[str, set[str]], start: str, end: str) -> list[str] | None:
    """The modules from ``start`` to ``end`` along imports (breadth-first), or None."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        if path[-1] == end:
            return path
        for w in sorted(graph[path[-1]] - seen):
            seen.add(w)
            paths.append(path + [w])
    return None


def a_cycle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """One short concrete cycle through a strongly connected group, ending where it starts."""
    start = min(group)
    inside = {v: graph[v] & group for v in group}
    return min(([start] + shortest_path(inside, w, start) for w in inside[start]), key=len)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    return [a_cycle(graph, g) for g in strongly_connected(graph)]


def without(graph: dict[str, set[str]], edges: set[tuple[str, str]]) -> dict[str, set[str]]:
    return {v: {w for w in ws if (v, w) not in edges} for v, ws in graph.items()}


def test_graph_reader_resolves_relative_late_and_package_imports():
    graph = import_graph()
    assert "attnlab.data.image_format" in graph["attnlab.data.store"]  # from .image_format import ...
    assert "attnlab.training.checkpoint" in graph["attnlab.run.open"]  # from ..training import checkpoint
    assert "attnlab.eval.metrics.scoring" in graph["attnlab.eval.inspection.attention_stats"]  # late import, ../
    assert "attnlab.eval" in graph["attnlab.training.trainer"]  # a package's __init__ runs too
    assert "attnlab.eval" not in graph["attnlab.eval.generation.loop"]  # but not the importer's own
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert a_cycle({"a": {"c"}, "b": {"a"}, "c": {"b", "a"}}, {"a", "b", "c"}) == ["a", "c", "a"]
    assert shortest_path({"a": {"b"}, "b": set()}, "b", "a") is None


def test_no_import_cycles():
    found = cycles(without(import_graph(), set().union(*KNOWN_CYCLES.values())))
    assert not found, "import cycles among attnlab modules:\n" + "\n".join(" -> ".join(p) for p in found)


@pytest.mark.parametrize("reason", list(KNOWN_CYCLES))
def test_known_cycle_is_gone(reason):
    """Expected to fail while the cycle exists; when it passes, remove its entry from KNOWN_CYCLES."""
    graph = import_graph()
    for v, w in sorted(KNOWN_CYCLES[reason]):
        back = shortest_path(graph, w, v) if w in graph[v] else None
        if back:
            pytest.xfail(f"{reason} ({' -> '.join([v] + back)})")


def calls_and_imports(path: Path):
    """(line, what) for each ``matplotlib.use(...)`` call and each import of ``matplotlib.pyplot`` in a file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            found = ast.unparse(node.func) in ("matplotlib.use", "mpl.use")
        elif isinstance(node, ast.Import):
            found = any(a.name == "matplotlib.pyplot" for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names = {a.name for a in node.names}
            found = node.module == "matplotlib.pyplot" or (node.module == "matplotlib" and "pyplot" in names)
        else:
            found = False
        if found:
            yield node.lineno, ast.unparse(node)


def test_library_never_selects_a_matplotlib_backend_or_uses_pyplot():
    found = [
        f"{path.relative_to(PACKAGE_DIR.parent)}:{line}: {what}"
        for path in modules().values()
        for line, what in calls_and_imports(path)
    ]
    assert not found, "use matplotlib.figure.Figure and fig.savefig instead:\n" + "\n".join(found)


def test_importing_and_plotting_leave_matplotlib_alone(tmp_path):
    """In a fresh interpreter: import all of attnlab and draw a run's curves; pyplot stays unloaded, no backend
    is chosen."""
    names = sorted(n for n in modules() if n != "attnlab.__main__")  # __main__ runs the CLI
    run = tmp_path / "run"
    run.mkdir()
    events = [{"event": "training_step", "step": s, "loss": 3.0 / s} for s in (1, 2, 3)]
    events.append({"event": "validation_step", "step": 3, "val_loss": 1.5, "val_bits_per_byte": 2.0, "final": True})
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    code = f"""
import importlib, json, sys
for name in {names!r}:
    importlib.import_module(name)
from attnlab.eval.metrics.curves import plot_curves
plot_curves({str(run)!r}, image=False)
import matplotlib
backend = matplotlib.rcParams._get_backend_or_none()  # None until something chooses one
print(json.dumps({{"pyplot": "matplotlib.pyplot" in sys.modules, "backend": backend}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_DIR.parent), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"pyplot": False, "backend": None}
    assert (run / "plots" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
