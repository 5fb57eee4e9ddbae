"""The package's import graph points one way: no cycle between glm5 modules, counting imports inside functions too
(only `if TYPE_CHECKING:` blocks are exempt). A cycle means two modules hold one idea between them.
An import inside a function says why on its line (`# lazy: <reason>`); all others sit at the top of the module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "glm5"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The glm5 modules `path` imports (a `from pkg import name` counts as pkg.name when that is a module)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("glm5"):
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    found.add(full if full in modules else child.module)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("glm5"))
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found & modules


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_glm5_import_graph_has_no_cycles() -> None:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {m: imports(p, set(files)) - {m} for m, p in files.items()}
    assert len(graph) > 50 and graph["glm5.tokenizer.tokenizer"]  # the scan sees the package
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


LAZY_REASONS = (
    "torch-free CLI start-up",
    "optional dependency",
    "platform-specific",
    "worker process only",
    "cycle with glm5.",
)


def unexplained_lazy_imports(path: Path) -> list[str]:
    """`file:line` of each import inside a function whose (first) line carries no `# lazy: <reason>` comment,
    the reason being one of LAZY_REASONS. Everything else is imported at the top of its module."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[str] = []
    for fn in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                _, _, reason = lines[node.lineno - 1].partition("# lazy: ")
                if not reason.startswith(LAZY_REASONS):
                    found.append(
                        f"{path.relative_to(ROOT.parent) if path.is_relative_to(ROOT) else path}:{node.lineno}"
                    )
    return sorted(set(found), key=lambda s: int(s.rsplit(":", 1)[1]))


def test_imports_inside_functions_say_why() -> None:
    bad = [loc for p in sorted(ROOT.rglob("*.py")) for loc in unexplained_lazy_imports(p)]
    assert not bad, (
        "imports inside functions without a `# lazy: <reason>` comment (reasons: "
        + ", ".join(LAZY_REASONS)
        + "); move them to the top of the module or give the reason:\n"
        + "\n".join(bad)
    )


def test_the_lazy_import_check_finds_an_unexplained_import(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import os\n\n\ndef f():\n    import json\n    from ray import get  # lazy: optional dependency\n"
        "    from glm5 import (  # lazy: torch-free CLI start-up\n        config,\n    )\n"
        "    import math  # lazy: because\n    return os, json, get, config, math\n"
    )
    assert unexplained_lazy_imports(planted) == [f"{planted}:5", f"{planted}:10"]
