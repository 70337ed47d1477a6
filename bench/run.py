"""coze-mitm benchmark: one command, every figure measured in the same run, reported as ratios.

    python bench/run.py                 # full run (~25 min, of which a 20-minute soak); writes docs/benchmarks.md
    python bench/run.py --quick         # short variant (~1.5 min), same table
    python bench/run.py --no-write      # print only
    python bench/run.py --only streams  # one or more sections (jwt,memory,latency,own,sse,first,streams,soak); no write
    python bench/run.py --only leaks    # a soak with tracemalloc in the proxy: the allocation sites that grew
    python bench/run.py --tracemalloc   # the full run plus that traced soak

Everything runs on this machine against the local Coze stand-in (sandbox/coze_standin.py, a
SANDBOX, not Coze): the bundle is a real `mitmdump -s addons/coze.py`, "bare mitmdump" is the same
mitmdump without the script, the streaming reference is `mitmdump -s bench/stream_only.py` (one hook),
"direct" is no proxy at all. Ratios are against references measured in the same run, interleaved or
at the same time. Targets are printed beside the figures; nothing here fails a build.

This file is the run, in order; each section's measurement is a module of bench/sections/ (common.py:
percentiles, /proc figures, client sessions; report.py: the table, the notes, docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.sections (which adds addons/ in turn)

from bench.sections import REPO, paths  # noqa: E402
from bench.sections.common import DELTA_GAP, PAGE, Row, load_average, machine, no_nagle  # noqa: E402
from bench.sections.first import bench_first_requests  # noqa: E402
from bench.sections.jwt_memory import bench_jwt, bench_memory  # noqa: E402
from bench.sections.latency import PAIRS, bench_attribution, bench_targets, start_attribution  # noqa: E402
from bench.sections.own_address import bench_own_address  # noqa: E402
from bench.sections.report import print_results, write_report  # noqa: E402
from bench.sections.soak import bench_soak  # noqa: E402
from bench.sections.sse import bench_sse  # noqa: E402
from bench.sections.streams import bench_streams  # noqa: E402

from coze_mitm.core import config  # noqa: E402
from sandbox.coze_standin import make_sandbox_app, write_config  # noqa: E402
from tests.harness import Mitmdump  # noqa: E402
from coze_mitm.core.exchange import CozeTokenExchange  # noqa: E402

SECTIONS = ("jwt", "memory", "latency", "own", "sse", "first", "streams", "soak", "leaks")


def parse_args(argv: list[str] | None):
    """The options, and want(section): whether this run measures that section."""
    p = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short variant (~2 min): fewer rounds, 6 s streams, 20 s soak")
    p.add_argument("--soak-seconds", type=float, default=None, help="soak duration (default 1200, --quick 20)")
    p.add_argument("--tracemalloc", action="store_true",
                   help="add the 'leaks' section: after the soak, a second soak whose proxy takes tracemalloc snapshots "
                        "at the middle and the end; prints the allocation sites that grew in between")
    p.add_argument("--tracemalloc-seconds", type=float, default=None, help="length of that soak (default: --soak-seconds)")
    p.add_argument("--tracemalloc-frames", type=int, default=4,
                   help="frames kept per traced allocation (default 4; 8 saturates the proxy on 2 cores)")
    p.add_argument("--proxy-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the soaks' proxy (repeatable), e.g. MALLOC_ARENA_MAX=2")
    p.add_argument("--proxy-set", action="append", default=[], metavar="NAME=VALUE",
                   help="more --set for the soaks' proxy (repeatable), e.g. coze_usage_file=memory")
    p.add_argument("--requests", type=int, default=None, help="latency rounds per path in each target pass, split over its fresh process pairs (default 4000, --quick 300); "
                   "the attribution pass (full run) makes half as many")
    p.add_argument("--streams", type=int, default=200, help="open streams at once (default 200)")
    p.add_argument("--stream-seconds", type=float, default=None, help="length of each open stream (default 30, --quick 6)")
    p.add_argument("--rate", type=float, default=20.0, help="soak request rate per second (default 20)")
    p.add_argument("--no-write", action="store_true", help="print the table only; do not write docs/benchmarks.md")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--only", default="", help="comma-separated sections to run (jwt,memory,latency,own,sse,first,"
                   "streams,soak,leaks; own: the proxy's own address as the API base); implies --no-write")
    args = p.parse_args(argv)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    if only:
        args.no_write = True
    leaks_too = args.tracemalloc  # the traced soak, beside whatever else runs

    def want(section: str) -> bool:
        if section == "leaks":
            return "leaks" in only or leaks_too
        return not only or section in only

    return args, want


def main(argv: list[str] | None = None) -> int:
    args, want = parse_args(argv)
    quick = args.quick
    proxy_env = dict(item.split("=", 1) for item in args.proxy_env if "=" in item)
    rounds = args.requests or (300 if quick else 4000)
    soak_seconds = args.soak_seconds if args.soak_seconds is not None else (20 if quick else 1200)
    stream_seconds = args.stream_seconds if args.stream_seconds is not None else (6 if quick else 30)
    info = machine()
    print(f"coze-mitm benchmark ({'quick' if quick else 'full'}): {info['cpu']}, {info['cores']} cores, "
          f"Python {info['python']}, mitmproxy {info['mitmproxy']}, load average {info['load']}", flush=True)
    t_all = time.perf_counter()

    standin, app_config = make_sandbox_app(delta_gap=DELTA_GAP)
    no_nagle(standin)
    standin.start()
    rows: list[Row] = []
    details: dict = {}
    with tempfile.TemporaryDirectory(prefix="coze-bench-") as tmp:
        work = Path(tmp)
        for name in ("bundle", "bare", "streamer", "soak", "soak-traced"):
            (work / name).mkdir()
        config_path = work / "coze_oauth_config.json"
        write_config(str(config_path), app_config)
        app = config.load_oauth_config(config_path)
        exchange = CozeTokenExchange(app)

        marks: list[tuple[str, float]] = []

        def step(name: str):
            print(f"  {name} ...", flush=True)
            marks.append((name.split(" (")[0].split(":")[0], time.perf_counter()))

        if want("jwt"):
            step("JWT minting")
            rows += bench_jwt(exchange, app_config["private_key"], 200 if quick else 1000)
        if want("memory"):
            step("memory per cached user")
            mem_rows, details["memory"] = bench_memory(10_000)
            rows += mem_rows

        coze_sets = [f"coze_config={config_path}", f"coze_origins={PAGE}", "flow_detail=0", "coze_new_users_per_minute=0"]
        proxies: dict[str, Mitmdump] = {}
        streamer = None
        try:
            if any(want(x) for x in ("latency", "own", "sse", "first", "streams")):
                step("starting the proxies")
                proxies["bundle"] = paths.make("bundle", work / "bundle", coze_sets).start()
                proxies["bare mitmdump"] = paths.make("bare", work / "bare", coze_sets).start()
                streamer = Mitmdump(work / "streamer", ["flow_detail=0"], script=False,
                                    extra_args=["-s", str(REPO / "bench" / "stream_only.py")]).start()
            bundle, bare = proxies.get("bundle"), proxies.get("bare mitmdump")
            token = exchange("bench-reference-user").token  # the same kind of token the bundle injects
            if want("latency"):
                step(f"latency targets ({rounds} rounds x 3 paths, over {PAIRS} fresh pairs, for each of the two targets)")
                lat_rows, details["latency"] = bench_targets(work / "targets", coze_sets, standin.base_url, token, rounds)
                rows += lat_rows
                if not quick:
                    proxies.update(start_attribution(work, coze_sets, streamer, token, standin.base_url))
                    step(f"latency attribution ({rounds // 2} rounds x {len(proxies) + 1} paths)")
                    details["latency"].update(bench_attribution(proxies, standin.base_url, token, max(rounds // 2, 1)))
            if want("own"):
                step(f"the proxy's own address as the API base ({rounds} rounds x 4 paths)")
                own_rows, details["own"] = bench_own_address(bundle, bare, standin.base_url, token, rounds)
                rows += own_rows
            if want("sse"):
                step("SSE timing")
                sse_rows, details["sse"] = bench_sse(bundle, bare, streamer, standin, token,
                                                     40 if quick else 300, 3 if quick else 15)
                rows += sse_rows
            if want("first"):
                step("concurrent first requests")
                first_rows, details["first"] = bench_first_requests(bundle, standin, standin.base_url,
                                                                    [30] if quick else [30, 100])
                rows += first_rows
            if want("streams"):
                step(f"{args.streams} open streams x {stream_seconds:.0f} s: reference, bundle{', bundle, reference' if not quick else ''}, direct")
                st_rows, details["streams"] = bench_streams(bundle, streamer, standin, token, args.streams,
                                                            stream_seconds, 0.1, 1 if quick else 2)
                rows += st_rows
        finally:
            for proxy in {id(p): p for p in [*proxies.values(), streamer] if p}.values():
                proxy.stop()
        if want("soak"):
            step(f"soak ({soak_seconds:.0f} s at {args.rate:.0f} req/s)")
            # Twice: plain `mitmdump -s addons/coze.py`, then the process as run_mitm.py runs it (coze_tune_process),
            # so the report says what the opt-in tuning buys.
            soak_rows, details["soak"] = bench_soak(standin, config_path, work, soak_seconds, args.rate, False, proxy_env,
                                                   args.proxy_set, label="plain mitmdump -s")
            rows += soak_rows
            step(f"soak as run_mitm.py runs it, coze_tune_process ({soak_seconds:.0f} s at {args.rate:.0f} req/s)")
            tuned_rows, details["soak-tuned"] = bench_soak(standin, config_path, work, soak_seconds, args.rate, False,
                                                           proxy_env, [*args.proxy_set, "coze_tune_process=true"],
                                                           label="coze_tune_process")
            rows += tuned_rows
        if want("leaks"):
            traced_seconds = args.tracemalloc_seconds or soak_seconds
            step(f"traced soak ({traced_seconds:.0f} s at {args.rate:.0f} req/s, tracemalloc in the proxy)")
            leak_rows, details["leaks"] = bench_soak(standin, config_path, work, traced_seconds, args.rate, True,
                                                     {**proxy_env, "COZE_BENCH_TRACEMALLOC_FRAMES": str(args.tracemalloc_frames)},
                                                     args.proxy_set)
            rows += leak_rows
    standin.stop()

    total = time.perf_counter() - t_all
    marks.append(("end", time.perf_counter()))
    durations = ", ".join(f"{name} {b - a:.0f} s" for (name, a), (_, b) in zip(marks, marks[1:]))
    info["load_end"] = load_average()
    text = print_results(rows, details, total, durations, info["load_end"])
    if not args.no_write:
        write_report(Path(args.out), info, text, details, quick, total, args, rounds, soak_seconds, stream_seconds)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
