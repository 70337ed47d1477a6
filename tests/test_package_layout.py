"""Who may import whom, read with ``ast`` (every import, also those inside functions; nothing is imported):
the launcher depends on core/ and the package's top level, never on a part (a part is code mitmproxy runs);
core/ and pages/ are pure: no mitmproxy, no part."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.layout import imported

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "addons" / "coze_mitm"


def offending(folder: Path, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        for name in sorted(imported(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{folder.name}/{path.relative_to(folder).as_posix()} imports {name}")
    return found


def test_the_scan_sees_imports_inside_functions(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from coze_mitm.parts import demo\n    import mitmproxy.http\n")
    assert offending(tmp_path, ("coze_mitm.parts", "mitmproxy")) == [
        f"{tmp_path.name}/m.py imports {n}" for n in ("coze_mitm.parts", "coze_mitm.parts.demo", "mitmproxy.http")]


def test_the_launcher_imports_no_part():
    assert offending(ROOT / "launcher", ("coze_mitm.parts",)) == []
    assert not any("coze_mitm.parts" in n for n in imported(ROOT / "run_mitm.py"))


@pytest.mark.parametrize("folder", ["core", "pages"])
def test_core_and_pages_import_neither_mitmproxy_nor_a_part(folder):
    assert offending(PACKAGE / folder, ("mitmproxy", "coze_mitm.parts")) == []


def asserts_in(folder: Path) -> list[str]:
    """Every `assert` statement (and every read of `__debug__`) under folder, as "file:line"."""
    import ast

    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Assert) or (isinstance(node, ast.Name) and node.id == "__debug__"):
                found.append(f"{path.relative_to(folder).as_posix()}:{node.lineno}")
    return found


def test_the_addon_does_the_same_under_python_O(tmp_path):
    """run_mitm.py runs mitmproxy with `python -O`, which drops every assert: no check of the addon may be one."""
    (tmp_path / "m.py").write_text("def f(x):\n    assert x\n    return __debug__\n")
    assert asserts_in(tmp_path) == ["m.py:2", "m.py:3"]
    assert asserts_in(ROOT / "addons") == []
