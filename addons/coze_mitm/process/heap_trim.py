"""Memory the C allocator holds free, given back to the system once a minute.

glibc's malloc returns freed memory to the system only from the top of its heap: memory freed in the
middle (a burst of dead flows freed by a full garbage collection, between longer-lived objects) stays in
the process as free space, reused later but counted in its RSS. The benchmark's 20-minute soak saw that
free space grow for minutes (bench/sections/soak.py reports it: "free inside its arenas"). malloc_trim(0)
hands every whole free page back (madvise), wherever it is in the heap.

It runs in its own thread (the call releases the GIL), never on mitmproxy's event loop; glibc locks each
arena while trimming it, so an allocation on the event loop may wait for that, once a minute (on this
project's soak heap, ~25 MiB, a trim takes about a millisecond). Where the C library has no malloc_trim
(not glibc), this part does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import threading

log = logging.getLogger("coze.heap_trim")

INTERVAL = 60.0  # seconds


def _malloc_trim():
    """glibc's malloc_trim, or None where there is none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this Python runs on (no ldconfig subprocess)
    except (OSError, AttributeError, TypeError, ValueError):
        # OSError/AttributeError: no such C library or function (musl, macOS); TypeError: Windows, where
        # CDLL(None) is refused. No malloc_trim means nothing to do, never a failed start.
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def trim_now() -> bool:
    """Give the allocator's whole free pages back now; False where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class HeapTrim:
    def __init__(self, interval: float = INTERVAL):
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def running(self) -> None:
        trim = _malloc_trim()
        if trim is None or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(trim,), name="coze-heap-trim", daemon=True)
        self._thread.start()

    def _run(self, trim) -> None:
        while not self._stop.wait(self.interval):
            trim(0)

    def done(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
