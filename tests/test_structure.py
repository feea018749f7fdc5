"""The house stays easy to change: no import cycle between scalax's packages, no function over 60 lines (the
argument-parser table excepted)."""

import ast
import pathlib

from tests.conftest import REPO

PACKAGE = pathlib.Path(REPO) / "scalax"
MAX_LINES = 60
TABLES = {("cli.py", "build_parser")}  # argparse tables: long, flat, one flag a line


def _unit(module: str) -> str:
    """scalax.train.loop -> train; scalax.config -> config: the package or top-level module an import lands in."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def import_graph() -> dict[str, set[str]]:
    """Every import between scalax's units, function-local ones too."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = _unit(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module == "scalax":
                targets = [f"scalax.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("scalax."):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("scalax.")]
            for target in targets:
                unit = _unit(target)
                if unit not in (source, "__version__"):
                    graph.setdefault(source, set()).add(unit)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt] if nxt in path else [*path, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_cycle_between_packages():
    graph = import_graph()
    assert {"train", "parallel", "models", "scaling"} <= set(graph)  # the graph is really read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # the check finds a cycle where there is one
    assert find_cycle({**graph, "models": graph.get("models", set()) | {"train"}}) is not None


def test_no_function_over_60_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES and (path.name, node.name) not in TABLES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
