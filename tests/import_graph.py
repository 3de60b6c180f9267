"""The package's import graph read from the AST (function-level imports included), and its cycles.

    python tests/import_graph.py            # every module and the first-party modules it imports
    python tests/import_graph.py --cycles   # only the import cycles (none is the rule)

``tests/test_codebase.py`` checks the graph has no cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dsf_lightning"
#: where each installed package lives in the source tree (pyproject.toml's package-dir mapping)
SOURCES = {PACKAGE: ROOT / PACKAGE, f"{PACKAGE}.callbacks": ROOT / "callbacks"}


def modules() -> dict[str, Path]:
    """``dotted name -> file`` of every module of the package (``__init__`` files name their package)."""
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module ``name`` points at: itself, or its longest known prefix (``from pkg import name``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def graph() -> dict[str, set[str]]:
    """``module -> first-party modules it imports``, at any level of the file (functions too)."""
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        out = edges.setdefault(name, set())
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, base]) if base else ".".join(anchor)
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                hit = _resolve(t, known) if t.split(".")[0] == PACKAGE else None
                if hit and hit != name:
                    out.add(hit)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


if __name__ == "__main__":
    g = graph()
    if "--cycles" in sys.argv:
        for c in cycles(g):
            print(" <-> ".join(c))
    else:
        for m in sorted(g):
            print(f"{m}: {', '.join(sorted(g[m])) or '-'}")
