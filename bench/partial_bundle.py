"""Benchmark-only: a part of the addon bundle, to attribute its cost (python bench/run.py).

COZE_BENCH_ADDONS names the parts, comma-separated, in bundle order: settings, cors, auth,
streaming (behind one Bundle, as addons/coze.py registers them); "all" for addons/coze.py's own
list; or "noop" for one object whose four flow hooks do nothing (what any `-s` script costs).

COZE_BENCH_TIMING=<file>: every flow hook of every part is timed (perf_counter around the call, in
the running proxy), and the totals per part and hook are written to <file> as JSON every 256
responses: {"flows": n, "us": {"Auth.request": total_us, ...}}.
"""

import collections
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "addons"))

from coze_mitm.bundle import Bundle, handler_of  # noqa: E402
from coze_mitm.parts.cors import Cors  # noqa: E402
from coze_mitm.parts.auth import Auth  # noqa: E402
from coze_mitm.parts.settings import CozeSettings  # noqa: E402
from coze_mitm.parts.streaming import Streaming  # noqa: E402

FLOW_HOOKS = ("requestheaders", "request", "responseheaders", "response")


class Noop:
    def requestheaders(self, flow):
        pass

    def request(self, flow):
        pass

    def responseheaders(self, flow):
        pass

    def response(self, flow):
        pass


def all_parts():
    """addons/coze.py's parts, in its order."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("coze_bundle_for_bench", Path(__file__).resolve().parent.parent / "addons" / "coze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.bundle.parts)


def timed(parts, out: Path):
    """The parts with each flow hook wrapped in a timer; the totals written to `out` as the flows end."""
    totals: collections.Counter[str] = collections.Counter()
    flows = [0]

    def wrap(part, hook):
        func = getattr(part, hook)
        name = f"{type(part).__name__}.{hook}"

        def timed_hook(*args):
            t0 = time.perf_counter()
            try:
                return func(*args)
            finally:
                totals[name] += time.perf_counter() - t0
                if hook == "response" and name == last_response:
                    flows[0] += 1
                    if flows[0] % 256 == 0:
                        tmp = out.with_suffix(".tmp")
                        tmp.write_text(json.dumps({"flows": flows[0], "us": {k: v * 1e6 for k, v in totals.items()}}))
                        tmp.replace(out)
        return timed_hook

    responders = [p for p in parts if handler_of(p, "response")]
    last_response = f"{type(responders[-1]).__name__}.response" if responders else ""
    for part in parts:
        for hook in FLOW_HOOKS:
            if handler_of(part, hook):
                setattr(part, hook, wrap(part, hook))
    return parts


names = [p.strip() for p in os.environ.get("COZE_BENCH_ADDONS", "").split(",") if p.strip()]
if names == ["noop"]:
    parts = [Noop()]
elif names == ["all"]:
    parts = all_parts()
else:
    settings = CozeSettings()
    make = {"settings": lambda: settings, "cors": lambda: Cors(settings), "auth": lambda: Auth(settings),
            "streaming": Streaming}
    parts = [make[p]() for p in names]
if os.environ.get("COZE_BENCH_TIMING"):
    parts = timed(parts, Path(os.environ["COZE_BENCH_TIMING"]))
# one addon object, as addons/coze.py registers its bundle (Coze API requests skipping the parts that never act on them)
_settings = next((p for p in parts if isinstance(p, CozeSettings)), None)
addons = [Bundle(*parts, name="coze-mitm-partial",
                 coze_api_only=_settings.is_coze_api_only if _settings is not None else None)]
