"""The sandbox's modules form no import circle: no module imports one that imports it back, directly
or through others, counting every import in the source (also those under ``if TYPE_CHECKING:`` and
inside functions). Read with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

SANDBOX = Path(__file__).resolve().parent.parent / "sandbox"


def import_graph(package_dir: Path, package: str = "sandbox") -> dict[str, set[str]]:
    """{module: the package's modules it imports}; modules are file stems, ``__init__`` the package."""
    modules = {p.stem for p in package_dir.glob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}

    def target(dotted: str | None, name: str | None) -> str | None:
        # `from . import x` / `from sandbox import x`: x if it is a module, else a name of __init__
        if not dotted:
            return name if name in modules else "__init__"
        head = dotted.split(".")[0]
        return head if head in modules else None

    for path in package_dir.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = graph[path.stem]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    dotted = node.module
                elif node.level == 0 and node.module and (node.module == package or node.module.startswith(package + ".")):
                    dotted = node.module[len(package) + 1:]
                else:
                    continue  # another package, or above this one
                for alias in node.names:
                    t = target(dotted, alias.name)
                    if t is not None:
                        edges.add(t)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(package + "."):
                        t = target(alias.name[len(package) + 1:], None)
                        if t is not None:
                            edges.add(t)
        edges.discard(path.stem)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path (first module repeated at the end), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        colour[m] = GREY
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if colour.get(n, BLACK) == GREY:
                return stack[stack.index(n):] + [n]
            if colour.get(n) == WHITE:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        colour[m] = BLACK
        return None

    for m in sorted(graph):
        if colour[m] == WHITE:
            found = visit(m)
            if found:
                return found
    return None


def test_sandbox_has_no_import_circle():
    graph = import_graph(SANDBOX)
    assert {"state", "server", "routes", "standin"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle in sandbox/: " + " -> ".join(cycle)


def test_sandbox_roles():
    graph = import_graph(SANDBOX)
    # the state is a leaf; the server knows no endpoint; routes.py is the one place naming the endpoints;
    # go_json (how a Go server reads paths and bodies) is a leaf like common
    assert graph["state"] <= {"common"}
    assert graph["go_json"] == set()
    assert graph["server"] <= {"common", "go_json"}
    endpoint_modules = {"audio", "bots", "chat", "conversations", "files", "messages", "tokens", "ws_events"}
    assert endpoint_modules <= graph["routes"]
    assert {m for m, deps in graph.items() if "routes" in deps} == {"standin"}
    assert "standin" not in set().union(*(deps for m, deps in graph.items() if m not in ("coze_standin", "__init__")))


def test_the_check_sees_type_checking_and_indirect_circles(tmp_path):
    pkg = tmp_path / "sandbox"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from .c import thing\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n")
    assert find_cycle(import_graph(pkg)) == ["a", "b", "c", "a"]
    (pkg / "c.py").write_text("def f():\n    import sandbox.a\n")  # inside a function, absolute: still counts
    assert find_cycle(import_graph(pkg)) == ["a", "b", "c", "a"]
    (pkg / "c.py").write_text("import json\n")
    assert find_cycle(import_graph(pkg)) is None
