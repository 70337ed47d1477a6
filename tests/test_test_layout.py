"""The suite's own layout: what tests share lives in helper modules (tests/harness.py, clients.py, pages.py, ...),
so that no test module imports another (one module's run never depends on another's fixtures or skips)."""

from __future__ import annotations

from pathlib import Path

from tests.layout import imported

TESTS = Path(__file__).resolve().parent


def test_no_test_module_imports_another():
    test_modules = {f"tests.{p.stem}" for p in TESTS.glob("test_*.py")}
    offenders = {p.name: sorted(imported(p) & test_modules)
                 for p in sorted(TESTS.glob("test_*.py")) if imported(p) & test_modules}
    assert not offenders, f"move what they share into a helper module (tests/harness.py, clients.py, ...): {offenders}"
