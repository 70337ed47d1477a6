"""The suite's own layout: what tests share lives in helper modules (tests/harness.py, clients.py, pages.py, ...),
so that no test module imports another (one module's run never depends on another's fixtures or skips)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_test_module_imports_another():
    test_modules = {f"tests.{p.stem}" for p in TESTS.glob("test_*.py")}
    offenders = {p.name: sorted(imported_modules(p) & test_modules)
                 for p in sorted(TESTS.glob("test_*.py")) if imported_modules(p) & test_modules}
    assert not offenders, f"move what they share into a helper module (tests/harness.py, clients.py, ...): {offenders}"
