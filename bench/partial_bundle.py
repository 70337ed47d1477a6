"""Benchmark-only: a part of the addon bundle, to attribute its cost (python bench/run.py).

COZE_BENCH_ADDONS names the parts, comma-separated, in bundle order: settings, cors, auth,
streaming (behind one Bundle, as addons/coze.py registers them); or "noop7" for seven addons whose
hooks do nothing (mitmproxy's dispatch cost alone).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "addons"))

from auth import Auth  # noqa: E402
from bundle import Bundle  # noqa: E402
from cors import Cors  # noqa: E402
from settings import CozeSettings  # noqa: E402
from streaming import Streaming  # noqa: E402


class Noop:
    def requestheaders(self, flow):
        pass

    def request(self, flow):
        pass

    def responseheaders(self, flow):
        pass

    def response(self, flow):
        pass


parts = [p.strip() for p in os.environ.get("COZE_BENCH_ADDONS", "").split(",") if p.strip()]
if parts == ["noop7"]:
    addons = [Noop() for _ in range(7)]
else:
    settings = CozeSettings()
    make = {"settings": lambda: settings, "cors": lambda: Cors(settings), "auth": lambda: Auth(settings),
            "streaming": Streaming}
    addons = [Bundle(*(make[p]() for p in parts))]  # registered as addons/coze.py registers them
