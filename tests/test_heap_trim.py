"""heap_trim: free memory in the middle of glibc's heap goes back to the system (RSS falls), from a thread
of its own that the part starts when the proxy runs and stops when it ends."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from coze_mitm.process import heap_trim
from tests.conftest import REPO

needs_glibc = pytest.mark.skipif(heap_trim._malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")

# Fragments the heap as a proxy does: many small blocks freed, every 64th kept (so the free space is in the
# middle of the heap, not at its top, where glibc would give it back by itself), then one trim.
FRAGMENT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from coze_mitm.process import heap_trim

    def rss_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    blocks = [bytearray(2048) for _ in range(40_000)]  # ~80 MiB of malloc'ed blocks (beyond pymalloc's 512 B)
    kept = blocks[::64]
    del blocks
    before = rss_kib()
    assert heap_trim.trim_now()
    print(before, rss_kib(), len(kept))
""")


@pytest.mark.process
@needs_glibc
def test_trim_gives_free_pages_in_the_middle_of_the_heap_back():
    out = subprocess.run([sys.executable, "-c", FRAGMENT, str(REPO / "addons")], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    before, after = int(out[0]), int(out[1])
    assert before - after > 40 * 1024, (before, after)  # most of the ~80 MiB freed went back


@needs_glibc
def test_the_part_trims_from_its_own_thread_while_running(monkeypatch):
    calls: list[tuple[str, int]] = []
    trimmed = threading.Event()

    def counting_trim(pad):
        calls.append((threading.current_thread().name, pad))
        trimmed.set()
        return 1

    monkeypatch.setattr(heap_trim, "_malloc_trim", lambda: counting_trim)
    part = heap_trim.HeapTrim(interval=0.01)
    part.running()
    try:
        assert trimmed.wait(5)
        assert calls[0] == ("coze-heap-trim", 0)  # malloc_trim(0), off the caller's thread
    finally:
        part.done()
    assert "coze-heap-trim" not in {t.name for t in threading.enumerate()}
    seen = len(calls)
    threading.Event().wait(0.05)
    assert len(calls) == seen  # stopped at done


@pytest.mark.parametrize("refusal", [TypeError("bad argument type for built-in operation"), OSError("no such library"),
                                     AttributeError("function 'malloc_trim' not found")])
def test_a_c_library_without_malloc_trim_is_a_no_op(monkeypatch, refusal):
    """Windows refuses ctypes.CDLL(None) with a TypeError; musl and macOS have no malloc_trim. Tuning then does
    nothing for the heap, and the start-up goes on."""
    def refuse(*args, **kwargs):
        raise refusal

    monkeypatch.setattr(heap_trim.ctypes, "CDLL", refuse)
    assert heap_trim._malloc_trim() is None and heap_trim.trim_now() is False
    part = heap_trim.HeapTrim(interval=0.01)
    part.running()
    assert part._thread is None
    part.done()
