"""Benchmark-only: bare mitmdump plus the one part of the bundle that changes mitmproxy itself (addons/cycles.py:
the cycle-free type check of every message, start-up objects frozen out of the collector's way).

Against this reference, the bundle's ratio is the cost of coze-mitm's own work; against bare mitmdump it also
includes what cycles.py saves mitmproxy (python bench/run.py reports both).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "addons"))

from coze_mitm.bundle import Bundle  # noqa: E402
from coze_mitm.process.cycles import Cycles  # noqa: E402

addons = [Bundle(Cycles(), name="coze-mitm-cycles-only")]  # one addon object, as addons/coze.py registers its bundle
