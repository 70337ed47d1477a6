"""Benchmark-only mitmproxy script for `python bench/run.py --tracemalloc`: finds what holds memory.

Loaded with a second `-s` beside addons/coze.py, only in that mode. It starts tracemalloc when loaded and,
on each SIGUSR1, collects garbage and writes a snapshot to $COZE_BENCH_TRACEMALLOC_DIR/snapshot-<n>.pickle
(written to a temporary name, then renamed, so the benchmark reads only whole files). The benchmark signals
at the middle and at the end of the soak and compares the two: the allocation sites that grew are what
holds memory. Tracing costs CPU and memory of its own: RSS figures of such a run are not the bundle's.
"""

import asyncio
import gc
import os
import signal
import tracemalloc

# Frames kept per allocation: 4 cost the soak's proxy ~60% of a core at 20 req/s, 8 saturated it (2 cores).
FRAMES = int(os.environ.get("COZE_BENCH_TRACEMALLOC_FRAMES", "4"))


class TracemallocProbe:
    def __init__(self):
        self.out = os.environ.get("COZE_BENCH_TRACEMALLOC_DIR", "")
        self.count = 0
        if self.out and not tracemalloc.is_tracing():
            tracemalloc.start(FRAMES)

    def running(self):
        if self.out:
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.dump)

    def dump(self):
        # On the event loop: the proxy pauses while the snapshot is taken (seconds); only in this mode.
        gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap*>")]
        )
        self.count += 1
        path = os.path.join(self.out, f"snapshot-{self.count}.pickle")
        snapshot.dump(path + ".tmp")
        os.replace(path + ".tmp", path)


addons = [TracemallocProbe()]
