"""Reading a module's imports with ``ast`` (nothing is imported), for the layout tests: who may import whom in
addons/coze_mitm (tests/test_package_layout.py) and in tests/ (tests/test_test_layout.py)."""

from __future__ import annotations

import ast
from pathlib import Path


def imported(path: Path) -> set[str]:
    """The dotted names a module imports, also inside functions: each module and each `module.name` of a
    `from module import name` (a relative import is named by its module part)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names
