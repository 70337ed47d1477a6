"""Benchmark-only mitmproxy script for the soak: what the proxy's two allocators hold, on request.

Loaded with a second `-s` beside addons/coze.py by bench/sections/soak.py. On each SIGUSR2 it writes
$COZE_BENCH_MEMSTATS_DIR/memstats-<n>.json (temporary name, then renamed) with:

* pymalloc (CPython's small-object allocator), from sys._debugmallocstats(): arenas (1 MiB each) held
  now, bytes in live blocks, bytes in free blocks and unused pools (held, not used);
* glibc malloc, from mallinfo2(): bytes taken from the system in arenas (brk heap + per-thread
  arenas) and in mmap'ed blocks, how much of that is in use and how much is free inside the arenas;
* the threads by name, and the garbage collector's figures (collections and objects collected per
  generation).

When it is ready for requests (its `running` hook, which mitmproxy runs after it says it listens) it writes
$COZE_BENCH_MEMSTATS_DIR/ready.

It does nothing per flow; a sample is a few ms on the event loop, when the benchmark asks.
"""

import asyncio
import collections
import ctypes
import gc
import json
import os
import re
import signal
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "addons"))



class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc_figures() -> dict:
    try:
        libc = ctypes.CDLL(None)
        f = libc.mallinfo2
    except (OSError, AttributeError):
        return {}
    f.restype = _Mallinfo2
    m = f()
    return {"libc_arena": m.arena, "libc_mmap": m.hblkhd, "libc_used": m.uordblks, "libc_free": m.fordblks,
            "libc_top_pad": m.keepcost}


_FIGURES = {
    "py_arenas": r"# arenas allocated current\s*=\s*([\d,]+)",
    "py_arenas_highwater": r"# arenas highwater mark\s*=\s*([\d,]+)",
    "py_used": r"# bytes in allocated blocks\s*=\s*([\d,]+)",
    "py_free_blocks": r"# bytes in available blocks\s*=\s*([\d,]+)",
    "py_unused_pools": r"unused pools \* \d+ bytes/pool\s*=\s*([\d,]+)|\d+ unused pools \* \d+ bytes\s*=\s*([\d,]+)",
}


def _pymalloc_figures() -> dict:
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+") as f:
        sys.stderr.flush()
        os.dup2(f.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read()
    out = {}
    for name, pattern in _FIGURES.items():
        m = re.search(pattern, text)
        if m:
            out[name] = int(next(g for g in m.groups() if g).replace(",", ""))
    return out


class MemstatsProbe:
    def __init__(self):
        self.out = os.environ.get("COZE_BENCH_MEMSTATS_DIR", "")
        self.count = 0

    def running(self):
        if self.out:
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, self.dump)
            # mitmproxy says it listens before the scripts' `running` hooks have run: the soak waits for this.
            open(os.path.join(self.out, "ready"), "w").close()

    def dump(self):
        names = collections.Counter(re.sub(r"_\d+$", "", t.name) for t in threading.enumerate())
        figures = {**_pymalloc_figures(), **_libc_figures(), "threads": dict(names), "gc_stats": gc.get_stats()}
        self.count += 1
        path = os.path.join(self.out, f"memstats-{self.count}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(figures, f)
        os.replace(path + ".tmp", path)


# The module is the addon, as addons/coze.py is: no second `addons` list for mitmproxy to walk per event.
addons = [MemstatsProbe()]  # one plain addon beside addons/coze.py's bundle
