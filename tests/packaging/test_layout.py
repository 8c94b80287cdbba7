"""The package layout: one import namespace, no import cycles, no generic top-level names.

`pip install dcam` installs exactly one top-level import package, `dcam`; the repository's
folders pipeline/, actors/, conf/, evals/, benchmarks/, training/ become dcam.<folder>. Code and
tests import them only through `dcam.` (a bare `import pipeline` would resolve to whatever the
user's working directory holds on a Ray worker).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = ("pipeline", "actors", "conf", "evals", "benchmarks", "training")
GENERIC = re.compile(r"^(pipeline|actors|conf|evals|benchmarks|training)(\.|$)")


def _python_files():
    for top in ("dcam", *SUBPACKAGES, "tests", "scripts", "k8s"):
        yield from (ROOT / top).rglob("*.py")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts if parts[0] == "dcam" else ["dcam", *parts])


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import statement, function-level ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def test_no_code_imports_a_generic_top_level_name():
    bad = [f"{p.relative_to(ROOT)}:{line}: {mod}" for p in _python_files() for line, mod in _imports(p)
           if GENERIC.match(mod)]
    assert not bad, "import through the dcam namespace:\n" + "\n".join(bad)


def test_every_package_folder_is_declared_in_pyproject():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {"dcam"} | {_module_name(p) for top in SUBPACKAGES for p in (ROOT / top).rglob("__init__.py")}
    assert on_disk == declared


def _package_graph() -> dict[str, set[str]]:
    files = [p for top in ("dcam", *SUBPACKAGES) for p in (ROOT / top).rglob("*.py")]
    mods = {_module_name(p): p for p in files}
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        for _, target in _imports(p):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != m and not m.startswith(target + ".") and not target.startswith(m + "."):
                graph[m].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)  # noqa: E702
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop(); on.discard(w); comp.append(w)  # noqa: E702
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif nxt not in index:
                index[nxt] = low[nxt] = counter[0]; counter[0] += 1; stack.append(nxt); on.add(nxt)  # noqa: E702
                work.append((nxt, iter(sorted(graph[nxt]))))
            elif nxt in on:
                low[node] = min(low[node], index[nxt])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_module_or_function_level():
    assert _cycles(_package_graph()) == []


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("runtime", ["dcam.actors", "dcam.pipeline"])
def test_runtime_packages_never_import_evals_benchmarks_or_training(runtime):
    graph = _package_graph()
    offline = ("dcam.evals", "dcam.benchmarks", "dcam.training")
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith(runtime + ".") or m == runtime
                 for t in ts if t.startswith(offline) and not m.endswith(".cli"))
    assert not bad, bad


def test_actors_never_import_pipeline():
    graph = _package_graph()
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith("dcam.actors")
                 for t in ts if t.startswith("dcam.pipeline"))
    assert not bad, bad
