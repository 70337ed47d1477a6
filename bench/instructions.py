"""coze-mitm benchmark, the proxy's own work counted in machine instructions: the same cached-token request
through bare mitmdump and through the bundle's paths, each proxy run under valgrind's callgrind.

    python bench/instructions.py                      # ~4 min; prints a table (docs/benchmarks.md quotes it)
    python bench/instructions.py --cache-sim          # also the simulated cache misses (~2x slower)
    python bench/instructions.py --requests 300 bare bundle

Needs Debian's `valgrind` package (callgrind, callgrind_control). The latency passes of bench/run.py measure
time on a shared 2-core machine: their ratios move by a few percent from one run, or one process, to the
next. An instruction count hardly does: the same request through the same code executes the same instructions
(two runs on a quiet machine: within 0.4% per path). Not quite whatever else the machine does: mitmproxy's
once-a-second work (the script's file watcher, timers) is spread over fewer requests when a busy machine slows
the proxy under valgrind (a run beside a test suite: the do-nothing script 1.046x bare against 1.030-1.032x
quiet), so compare paths within one run on a quiet machine. It is not the latency target's measure
(a user waits for time, and cache misses cost time that no instruction count shows); it says how much work each
path adds, without noise, so that a change to the bundle's code can be weighed before and after in one run.

Per path: mitmdump starts under callgrind (its counters cover every thread of the process), answers 100
requests to warm up, its counters are zeroed (`callgrind_control -z`), it answers --requests requests, and
its counters are dumped (`callgrind_control -d`): the totals divided by the requests. The paths are those of
bench/run.py's attribution pass, against the local Coze stand-in (sandbox/, not Coze).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "addons"))

from bench.sections.common import BOT, DELTA_GAP, PAGE, load_average, machine, no_nagle, session, tagged  # noqa: E402
from bench.sections import paths  # noqa: E402
from coze_mitm.core import config  # noqa: E402
from coze_mitm.core.exchange import CozeTokenExchange  # noqa: E402
from sandbox.coze_standin import make_sandbox_app, write_config  # noqa: E402
from tests.harness import Mitmdump  # noqa: E402

PATHS = {
    "bare": "bare mitmdump",
    "noop": "one object, 4 flow hooks that do nothing (any -s script; bench/partial_bundle.py)",
    "least": "least credential swap (bench/least_swap.py)",
    "fused": "the bundle's work on this request fused into one object (bench/fused_floor.py; not coze-mitm)",
    "settings-auth": "settings + auth (bench/partial_bundle.py)",
    "bundle": "plain mitmdump -s addons/coze.py",
    "run-mitm": "as run_mitm.py runs it (python -O, coze_quiet, coze_tune_process)",
    "bare-O": "bare mitmdump under python -O",
}
PARTS = {"settings-auth": "settings,auth"}  # bench/partial_bundle.py's parts, for the paths that run some of them
WARMUP = 100
STARTUP_TIMEOUT = 300  # mitmdump under valgrind takes tens of seconds to start


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", metavar="PATH", help=f"which paths, in this order (default all: {', '.join(PATHS)})")
    p.add_argument("--requests", type=int, default=500, help="requests counted per path (default 500)")
    p.add_argument("--cache-sim", action="store_true", help="also count simulated cache misses (callgrind --cache-sim=yes)")
    args = p.parse_args(argv)
    unknown = [x for x in args.paths if x not in PATHS]
    if unknown:
        p.error(f"unknown path {', '.join(unknown)}: choose from {', '.join(PATHS)}")
    args.paths = args.paths or list(PATHS)
    return args


def start(path: str, confdir: Path, coze_sets: list[str], token: str, api_base: str, out: Path,
          cache_sim: bool) -> tuple[Mitmdump, dict]:
    """The path's mitmdump under callgrind, and the headers its client sends (a tag where the path swaps one)."""
    proxy = paths.make("parts" if path in PARTS else path, confdir, coze_sets, token, api_base=api_base,
                       parts=PARTS.get(path, ""))
    proxy.startup_timeout = STARTUP_TIMEOUT
    proxy.args[0:0] = ["valgrind", "--tool=callgrind", f"--cache-sim={'yes' if cache_sim else 'no'}",
                       f"--callgrind-out-file={out}"]
    # the paths that swap a tag are sent one; the others the token in its place, beside the same other headers
    headers = tagged("bench-instructions-user")
    if not proxy.sent_a_tag:
        headers["Authorization"] = f"Bearer {token}"
    return proxy.start(), headers


def counters(pid: int, out: Path, requests_done) -> dict[str, int]:
    """Zero the process's counters, run `requests_done()`, dump them: {event: count} over those requests."""
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    requests_done()
    before = set(glob.glob(f"{out}*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        dumps = sorted(set(glob.glob(f"{out}*")) - before, key=os.path.getmtime)
        if dumps:
            text = Path(dumps[-1]).read_text(errors="replace")
            events = re.search(r"^events: (.*)$", text, re.M)
            totals = re.search(r"^(?:summary|totals): (.*)$", text, re.M)
            if events and totals:
                return dict(zip(events.group(1).split(), map(int, totals.group(1).split())))
        time.sleep(0.2)
    raise RuntimeError("callgrind wrote no dump within 60 s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        print(f"{', '.join(missing)} not found: install Debian's valgrind package (apt install valgrind)")
        return 2
    info = machine()
    print(f"coze-mitm instructions per request: {info['cpu']}, Python {info['python']}, mitmproxy {info['mitmproxy']}, "
          f"load average {load_average()} (a busy machine raises the counts a little: see bench/instructions.py's "
          f"docstring)", flush=True)
    standin, app_config = make_sandbox_app(delta_gap=DELTA_GAP)
    no_nagle(standin)
    standin.start()
    results: dict[str, dict[str, float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="coze-instructions-") as tmp:
            work = Path(tmp)
            config_path = work / "coze_oauth_config.json"
            write_config(str(config_path), app_config)
            token = CozeTokenExchange(config.load_oauth_config(config_path))("bench-reference-user").token
            coze_sets = [f"coze_config={config_path}", f"coze_origins={PAGE}", "flow_detail=0",
                         "coze_new_users_per_minute=0"]
            url = standin.base_url + BOT
            for path in args.paths:
                print(f"  {path} ...", flush=True)
                confdir = work / path
                confdir.mkdir()
                out = confdir / "callgrind.out"
                proxy, headers = start(path, confdir, coze_sets, token, standin.base_url, out, args.cache_sim)
                try:
                    client = session(proxy)
                    for _ in range(WARMUP):
                        r = client.get(url, headers=headers)
                        if r.status_code != 200:
                            raise RuntimeError(f"{path}: HTTP {r.status_code} {r.text[:200]}")

                    def timed_requests():
                        for _ in range(args.requests):
                            client.get(url, headers=headers)

                    counted = counters(proxy.proc.pid, out, timed_requests)
                    client.close()
                finally:
                    proxy.stop()
                results[path] = {event: n / args.requests for event, n in counted.items()}
    finally:
        standin.stop()
    print()
    print(table(results))
    return 0


def table(results: dict[str, dict[str, float]]) -> str:
    base = results.get("bare", {}).get("Ir")
    events = [e for e in ("I1mr", "D1mr", "D1mw") if any(e in r for r in results.values())]
    lines = ["| path | instructions per request | vs bare mitmdump |" + "".join(f" {e} per request |" for e in events),
             "|---|---|---|" + "---|" * len(events)]
    for path, r in results.items():
        ratio = f"{r['Ir'] / base:.3f}x ({r['Ir'] - base:+,.0f})" if base else ""
        lines.append(f"| {PATHS[path]} | {r['Ir']:,.0f} | {ratio} |" + "".join(f" {r.get(e, 0):,.0f} |" for e in events))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
