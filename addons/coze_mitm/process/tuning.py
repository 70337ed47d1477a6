"""Opt-in tuning of the whole mitmproxy process (option coze_tune_process; run_mitm.py turns it on).

What it changes is process-wide (every addon in the process lives with it), so plain `mitmdump -s
addons/coze.py` leaves all of it alone, and `done` (exit, a script reload, or the option turned off)
puts back what it changed:
  cycles.py     mitmproxy's per-message type check replaced by one with the same verdicts and no reference
                cycles; the start-up objects frozen out of the garbage collector's way (first start only)
  heap_trim.py  glibc's free heap pages handed back to the system once a minute, from its own thread

The soak figures that justify it are in docs/benchmarks.md. Where a mechanism is not available (Windows,
musl, macOS: no malloc_trim) that mechanism does nothing: tuning never stops a start-up. `python -O`
skips mitmproxy's type check altogether, which needs no tuning at all.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx

from coze_mitm.process.cycles import Cycles
from coze_mitm.process.heap_trim import HeapTrim

log = logging.getLogger("coze.tuning")


class ProcessTuning:
    def __init__(self):
        self.cycles = Cycles()
        self.heap_trim = HeapTrim()
        self.wanted = False
        self.active = False
        self._running = False

    def configure(self, updated):
        if "coze_tune_process" not in updated:
            return
        self.wanted = ctx.options.coze_tune_process
        if self._running:
            self._apply()

    def running(self):
        self._running = True
        self._apply()

    def done(self):
        self._running = False
        self._stop()

    def _apply(self) -> None:
        if self.wanted and not self.active:
            self._start()
        elif not self.wanted and self.active:
            self._stop()

    def _start(self) -> None:
        try:
            self.cycles.running()
            self.heap_trim.running()
        except Exception as e:  # tuning is an optimisation: it must never stop the proxy
            log.warning(f"coze-mitm: process tuning not applied ({e}); the proxy works without it")
            self._stop()
            return
        self.active = True

    def _stop(self) -> None:
        self.heap_trim.done()
        self.cycles.done()
        self.active = False
