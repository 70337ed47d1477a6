"""Benchmark-only mitmproxy script for the soak: what the proxy's two allocators hold, on request.

Loaded with a second `-s` beside addons/coze.py by bench/sections/soak.py. On each SIGUSR2 it writes
$COZE_BENCH_MEMSTATS_DIR/memstats-<n>.json (temporary name, then renamed) with:

* pymalloc (CPython's small-object allocator), from sys._debugmallocstats(): arenas (1 MiB each) held
  now, bytes in live blocks, bytes in free blocks and unused pools (held, not used);
* glibc malloc, from mallinfo2(): bytes taken from the system in arenas (brk heap + per-thread
  arenas) and in mmap'ed blocks, how much of that is in use and how much is free inside the arenas;
* the threads by name, and the garbage collector's figures (collections and objects collected per
  generation, objects tracked).

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


# Experiments only (the soak leaves it empty): "collect" runs a full collection at each sample, "census" also
# lists the types of the unreachable objects it found (and the errors among them, with where they were raised).
GC_MODE = os.environ.get("COZE_BENCH_MEMSTATS_GC", "")


class MemstatsProbe:
    def __init__(self):
        self.out = os.environ.get("COZE_BENCH_MEMSTATS_DIR", "")
        self.count = 0

    def running(self):
        if self.out:
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, self.dump)

    def dump(self):
        names = collections.Counter(re.sub(r"_\d+$", "", t.name) for t in threading.enumerate())
        figures = {**_pymalloc_figures(), **_libc_figures(), "threads": dict(names),
                   "gc_count": list(gc.get_count()), "gc_stats": gc.get_stats(), "gc_objects": len(gc.get_objects()),
                   "gc_frozen": gc.get_freeze_count()}
        if GC_MODE == "collect":  # an experiment: is what grows cyclic garbage waiting for a full collection?
            figures["gc_collected_now"] = gc.collect()
        elif GC_MODE == "census":  # an experiment: what that garbage is (the types of the unreachable objects)
            gc.set_debug(gc.DEBUG_SAVEALL)
            figures["gc_collected_now"] = gc.collect()
            gc.set_debug(0)
            figures["gc_garbage_types"] = dict(collections.Counter(
                f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage).most_common(40))
            errors = collections.Counter()
            for o in gc.garbage:
                if isinstance(o, BaseException):
                    tb, where = o.__traceback__, []
                    while tb is not None:
                        where.append(f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno} {tb.tb_frame.f_code.co_name}")
                        tb = tb.tb_next
                    errors[f"{type(o).__name__}: {str(o)[:100]} @ " + " <- ".join(reversed(where))] += 1
            figures["gc_garbage_errors"] = dict(errors.most_common(5))
            gc.garbage.clear()
            gc.collect()  # now without DEBUG_SAVEALL: what was saved is freed, not found again next time
        self.count += 1
        path = os.path.join(self.out, f"memstats-{self.count}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(figures, f)
        os.replace(path + ".tmp", path)


addons = [MemstatsProbe()]
