"""The import graph of the `fer_tune` package, read from the source (nothing is imported).

    python tools/import_graph.py            # the summary table (modules, imports, circles, longest file)
    python tools/import_graph.py --edges    # every edge, "importer -> imported (line, deferred?)"

An edge is one `import fer_tune.x` / `from fer_tune.x import y` (or relative import) anywhere in a
module, at its top or inside a function ("deferred"). A circle is a strongly connected component
of more than one module. `tests/test_layout.py` uses `layer_violations` and `circles` to fail on
a new circle or an import that reaches up a layer.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "fer_tune"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

LAYERS = {
    # module prefix -> layer (the longest matching prefix wins); see README "Layout"
    "fer_tune": 1, "fer_tune.errors": 1, "fer_tune.io": 1, "fer_tune.layout": 1, "fer_tune.yaml_text": 1,
    "fer_tune.spec": 2, "fer_tune.specfile": 2, "fer_tune.weights": 2,
    "fer_tune.model": 3, "fer_tune.losses": 3, "fer_tune.mixing": 3, "fer_tune.metrics": 3,
    "fer_tune.data": 3,
    "fer_tune.engine": 4, "fer_tune.report": 4,
    "fer_tune.commands": 5,
    "fer_tune.search": 5,
    "fer_tune.cli": 6, "fer_tune.__main__": 6,
}
SIBLINGS_APART = (("fer_tune.engine", "fer_tune.report"),)
"""Packages of one layer that must not import each other."""


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    deferred: bool  # inside a function (or class body), not at module level


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def edges(root: Path = ROOT) -> list[Edge]:
    known = modules(root)
    found = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            deferred = id(node) not in top_level and not _in_module_guard(tree, node)
            for target in _targets(node, package, known):
                if target != name:
                    found.append(Edge(name, target, node.lineno, deferred))
    return found


def _in_module_guard(tree: ast.Module, node: ast.AST) -> bool:
    """Imports under a module-level `if TYPE_CHECKING:` or `try:` count as module level."""
    for top in tree.body:
        if isinstance(top, (ast.If, ast.Try)) and any(child is node for child in ast.walk(top)):
            return True
    return False


def _targets(node: ast.AST, package: str, known: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = package.split(".")
            base = base[:len(base) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        # `from fer_tune.data import sources` imports the submodule; `from x import name` the module
        names = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module for alias in node.names]
    else:
        return []
    out = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name.startswith(PACKAGE) and name:
            out.append(name)
    return list(dict.fromkeys(out))


def circles(found: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in found:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                components.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def layer(module: str) -> int | None:
    """The layer of the longest LAYERS prefix naming `module`; the package root only names itself."""
    best = None
    for prefix, level in LAYERS.items():
        if module == prefix or (prefix != PACKAGE and module.startswith(prefix + ".")):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, level)
    return best[1] if best else None


def layer_violations(found: list[Edge]) -> list[str]:
    """Imports of a higher layer, or between packages kept apart, as readable lines."""
    bad = []
    for e in found:
        source, target = layer(e.source), layer(e.target)
        if source is None or target is None:
            bad.append(f"{e.source} -> {e.target}: a module in no layer (add it to LAYERS)")
        elif target > source:
            bad.append(f"{e.source} (L{source}) -> {e.target} (L{target}), line {e.line}")
        for a, b in SIBLINGS_APART:
            for x, y in ((a, b), (b, a)):
                if _under(e.source, x) and _under(e.target, y):
                    bad.append(f"{e.source} -> {e.target}, line {e.line}: {x} and {y} do not import each other")
    return bad


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def summary(root: Path = ROOT) -> dict:
    found = edges(root)
    mods = modules(root)
    lengths = {name: len(path.read_text().splitlines()) for name, path in mods.items()}
    longest = max(lengths, key=lengths.get)
    rings = circles(found)
    pairs = {(e.source, e.target) for e in found}
    return {"modules": len(mods), "imports": len(pairs),
            "deferred imports": len({(e.source, e.target) for e in found if e.deferred}),
            "circles": len(rings), "modules in circles": sum(len(r) for r in rings),
            "longest file": f"{longest} ({lengths[longest]} lines)",
            "files over 400 lines": sum(1 for n in lengths.values() if n > 400),
            "layer violations": len(layer_violations(found)), "_rings": rings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", action="store_true", help="list every import edge")
    parser.add_argument("--root", type=Path, default=ROOT, help="the package folder (default: this checkout's)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.edges:
        for e in sorted(edges(root), key=lambda e: (e.source, e.target, e.line)):
            print(f"{e.source} -> {e.target} (line {e.line}{', deferred' if e.deferred else ''})")
        return 0
    facts = summary(root)
    rings = facts.pop("_rings")
    print("| measure | value |\n|---|---|")
    for key, value in facts.items():
        print(f"| {key} | {value} |")
    for ring in rings:
        print(f"\ncircle of {len(ring)}: {', '.join(m.removeprefix(PACKAGE + '.') for m in ring)}")
    for line in layer_violations(edges(root)):
        print(f"layer: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
