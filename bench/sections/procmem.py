"""What a process's memory is made of, read from /proc (Linux), for the soak's attribution.

`proc_sample(pid, files)` reads, without touching the process: RSS, thread count, open fds (sockets among
them), the sizes of `files` (the usage store's SQLite file and its WAL), and the anonymous memory of
/proc/PID/smaps grouped by the kind of mapping it is, told apart by shape (heuristics, named as such):

* heap:    `[heap]`, the main glibc arena (brk): what the C allocator serves from the main thread;
* tarenas: anonymous read-write mappings that start on a 64 MiB boundary: glibc's per-thread malloc
           arenas (each a 64 MiB reservation, its used part read-write);
* stacks:  anonymous read-write mappings of exactly the thread stack size (8 MiB by default): one per thread;
* other:   the rest of the anonymous memory: CPython's pymalloc arenas (1 MiB each, but the kernel merges
           neighbours, so they cannot be told apart by size: bench/memstats_probe.py counts them from the
           inside), large malloc blocks (mmap'ed), the main thread's stack;
* files:   file-backed pages (shared libraries, the SQLite files if mapped).

Every figure is in KiB (RSS, i.e. resident), except counts.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from .common import proc_numbers

GLIBC_HEAP_ALIGN = 64 * 1024 * 1024
_STACK_LIMIT = resource.getrlimit(resource.RLIMIT_STACK)[0]
STACK_KB = _STACK_LIMIT // 1024 if _STACK_LIMIT > 0 else 8192
KINDS = ("heap", "tarenas", "stacks", "other", "files")


def proc_sample(pid: int, files: list[Path] = ()) -> dict:
    out = {"fds": 0, "sockets": 0, "file_bytes": 0}
    out.update(proc_numbers(f"/proc/{pid}/status", {"VmRSS:": "rss", "Threads:": "threads"}))
    try:
        out.update(proc_numbers(f"/proc/{pid}/smaps_rollup", {"Anonymous:": "anon", "Private_Dirty:": "private_dirty"}))
    except OSError:
        out.update(anon=0, private_dirty=0)
    out.update(mapping_kinds(pid))
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            out["fds"] += 1
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    out["sockets"] += 1
            except OSError:
                pass
    except OSError:
        pass
    for path in files:
        try:
            out["file_bytes"] += path.stat().st_size
        except OSError:
            pass
    return out


def mapping_kinds(pid: int) -> dict:
    """Resident KiB and mapping counts per kind (see the module's doc), from /proc/PID/smaps."""
    rss = dict.fromkeys(KINDS, 0)
    count = dict.fromkeys(KINDS, 0)
    kind = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                first = line.split(maxsplit=6)
                if "-" in first[0] and len(first) >= 5 and ":" not in first[0]:  # a mapping's header line
                    lo, hi = (int(x, 16) for x in first[0].split("-"))
                    size_kb = (hi - lo) // 1024
                    perms, inode = first[1], first[4]
                    name = first[5].strip() if len(first) > 5 else ""
                    if name == "[heap]":
                        kind = "heap"
                    elif inode != "0" or name.startswith("/"):
                        kind = "files"
                    elif name:  # [stack], [vdso], [vvar]...: the main thread's stack and the kernel's pages
                        kind = "other"
                    elif "rw" in perms and lo % GLIBC_HEAP_ALIGN == 0:
                        kind = "tarenas"
                    elif "rw" in perms and size_kb == STACK_KB:
                        kind = "stacks"
                    else:
                        kind = "other"
                    count[kind] += 1
                elif first[0] == "Rss:" and kind is not None:
                    rss[kind] += int(first[1])
    except OSError:
        pass
    return {**{k: rss[k] for k in KINDS}, **{f"n_{k}": count[k] for k in KINDS}}
