"""What the Bundle saves: mitmproxy's own AddonManager dispatching one request's events to coze.py's parts,
registered one by one versus behind the one Bundle object. The parts here do nothing: each has exactly the
hook methods the real part has, so only mitmproxy's walk and our dispatch are timed.

    python bench/bundle_dispatch.py [--requests 20000]

Prints microseconds per request (the median of 5 rounds) for each way, and the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "addons"))

from mitmproxy import eventsequence, hooks  # noqa: E402
from mitmproxy.test import taddons, tflow  # noqa: E402

from coze_mitm.bundle import LIFECYCLE, Bundle, handler_of  # noqa: E402


def real_parts() -> list:
    import importlib.util

    spec = importlib.util.spec_from_file_location("coze_bench_entry", REPO / "addons" / "coze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.bundle.parts)


def do_nothing_like(part) -> object:
    """An object with the same flow hooks as `part`, each doing nothing."""
    names = [h for h in hooks.all_hooks if h not in LIFECYCLE and handler_of(part, h) is not None]
    attrs = {name: (lambda self, data: None) for name in names}
    return type(type(part).__name__ + "Shape", (), attrs)()


async def per_request_us(master, requests: int) -> float:
    flow = tflow.tflow(resp=True)
    events = list(eventsequence.iterate(flow))
    started = time.perf_counter()
    for _ in range(requests):
        for event in events:
            await master.addons.handle_lifecycle(event)
    return (time.perf_counter() - started) / requests * 1e6


def measure(register_one_by_one: bool, shapes: list, requests: int) -> float:
    with taddons.context() as tctx:
        if register_one_by_one:
            for shape in shapes:
                tctx.master.addons.add(shape)
        else:
            tctx.master.addons.add(Bundle(*shapes, name="bench-bundle"))
        rounds = [asyncio.run(per_request_us(tctx.master, requests)) for _ in range(5)]
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    shapes = [do_nothing_like(p) for p in real_parts()]
    one_by_one = measure(True, shapes, args.requests)
    bundled = measure(False, shapes, args.requests)
    import mitmproxy.version

    print(f"Python {sys.version.split()[0]}, mitmproxy {mitmproxy.version.VERSION}, {len(shapes)} parts, "
          f"{args.requests} requests x 5 rounds (median)")
    print(f"  parts registered one by one: {one_by_one:6.1f} us per request")
    print(f"  one Bundle:                  {bundled:6.1f} us per request")
    print(f"  the Bundle saves             {one_by_one - bundled:6.1f} us per request")


if __name__ == "__main__":
    main()
