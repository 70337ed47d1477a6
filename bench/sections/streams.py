"""Open streams: many streamed chats at once through one path at a time (bench/streams_client.py as the
client, in its own process); each proxy's RSS and CPU around each batch."""

from __future__ import annotations

import gc
import json
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time

from tests.harness import Mitmdump

from . import REPO
from .common import BOT, Row, chat_body, cpu_seconds, ms, pct, rss_kb, session, tagged, with_token


def run_streams(groups: list[tuple[str, Mitmdump | None, list[dict]]], standin, text: str, seconds: float,
                ramp: float) -> dict:
    """Batches of streamed chats, all at once, from bench/streams_client.py (one group per path, started
    together); each proxy's RSS and CPU around it. Returns the client's figures per group, with the proxy's."""
    spec = {"target": [standin.host, standin.port], "path": "/v3/chat", "body": chat_body(text), "ramp": ramp,
            "groups": [{"name": name, "proxy": ["127.0.0.1", proxy.port] if proxy else None, "headers": headers}
                       for name, proxy, headers in groups]}
    pids = {name: proxy.proc.pid for name, proxy, _ in groups if proxy}
    gc.collect()
    time.sleep(1.0)  # let the previous batch's connections close
    rss_before = {name: rss_kb(pid) for name, pid in pids.items()}
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    own0 = os.times()
    client = subprocess.Popen([sys.executable, str(REPO / "bench" / "streams_client.py")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    client.stdin.write(json.dumps(spec))
    client.stdin.close()
    lines: list[str] = []
    opened: list[float] = []

    def read() -> None:
        for line in client.stdout:
            if line.strip() == "OPEN":
                opened.append(time.perf_counter() - t0)
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    samples: list[tuple[float, dict]] = []
    while client.poll() is None:
        samples.append((time.perf_counter() - t0, {name: rss_kb(pid) for name, pid in pids.items()}))
        time.sleep(0.25)
    reader.join(5)
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    own1 = os.times()
    out = json.loads(lines[-1])
    # While every stream is open: from the moment each has its first delta until the first one may end.
    t_open = opened[0] if opened else ramp
    during = [rss for t, rss in samples if t_open <= t <= seconds - 0.5] or [rss for _, rss in samples]
    for name, figures in out["groups"].items():
        if name in pids:
            series = [rss[name] for rss in during] or [rss_before[name]]
            figures.update(rss_before=rss_before[name], rss_during=statistics.median(series), rss_peak=max(series),
                           proxy_cpu=cpu[name])
    out.update(standin_cpu=(own1.user + own1.system) - (own0.user + own0.system), t_open=t_open)
    return out


def bench_streams(bundle: Mitmdump, streamer: Mitmdump, standin, token: str, n: int, seconds: float,
                  gap: float, rounds: int) -> tuple[list[Row], dict]:
    """n streamed chats open at once (a delta every `gap` s for `seconds`) through the one-hook reference and
    through the bundle, one batch at a time in the order R B B R (R B with rounds=1), so a drift in the
    machine's load hits both alike; then n direct, the floor. Each stream is its own connection.

    One path at a time: both proxies' batches at once (400 streams, two proxies busy) overloaded the 2-core
    machine and measured that, not the proxies."""
    words = max(1, round(seconds / gap) - 3)  # the stand-in answers "Sandbox reply to: <text>", a delta a word
    text = " ".join(f"w{i}" for i in range(words))
    ramp = min(2.0, seconds / 4)  # streams start over 2 s: the stand-in's listen backlog is 128
    users = [f"stream-{i:04d}-{secrets.token_hex(4)}" for i in range(n)]
    s = session(bundle)
    for user in users:  # each user's token minted beforehand: this section is about streams, not minting
        r = s.get(standin.base_url + BOT, headers=tagged(user))
        if r.status_code != 200:
            raise RuntimeError(f"streams warm-up: HTTP {r.status_code} {r.text[:200]}")
    s.close()
    paths = {"bundle": (bundle, [tagged(u) for u in users]), "reference": (streamer, [with_token(token)] * n),
             "direct": (None, [with_token(token)] * n)}
    order = [*(["reference", "bundle", "bundle", "reference"] * rounds)[:2 * rounds], "direct"]
    batches: dict[str, list[dict]] = {k: [] for k in paths}
    old_gap = standin.delta_gap
    standin.delta_gap = gap
    try:
        # A few short streams first: code paths, imports and first buffers are not a per-stream cost.
        # (Few: memory a full-size warm-up took would stay with the process and hide the real figure.)
        run_streams([(name, proxy, headers[:10]) for name, (proxy, headers) in paths.items() if proxy],
                    standin, "warm up " * 5, 1.0, 0.2)
        for name in order:
            print(f"    {n} streams, {name} ...", flush=True)
            proxy, headers = paths[name]
            out = run_streams([(name, proxy, headers)], standin, text, seconds, ramp)
            figures = out["groups"][name]
            figures.update(wall=out["wall"], loop_lag_p99=out["loop_lag_p99"], client_cpu=out["client_cpu"],
                           standin_cpu=out["standin_cpu"])
            batches[name].append(figures)
    finally:
        standin.delta_gap = old_gap
    res = {name: pool_batches(b) for name, b in batches.items()}
    b, r, d = res["bundle"], res["reference"], res["direct"]
    expected = n * (words + 3)

    def per_stream(x: dict) -> float:
        return (x["rss_during"] - x["rss_before"]) / n

    label = f"{n} open streams ({gap * 1000:.0f} ms between deltas, {seconds:.0f} s)"
    each = f"{len(batches['bundle'])} batch{'es' if len(batches['bundle']) > 1 else ''} each"
    rows = [
        Row(f"{label}: gap between deltas as the client sees it, median / p99 / p99.9 ({each})",
            f"{ms(b['gap_median'])} / {ms(b['gap_p99'])} / {ms(b['gap_p999'])}",
            f"reference {ms(r['gap_median'])} / {ms(r['gap_p99'])} / {ms(r['gap_p999'])}",
            f"p99 {(b['gap_p99'] - r['gap_p99']) * 1000:+.2f} ms", "p99 as the reference's (no number set)", None),
        Row(f"{label}: proxy process CPU per batch",
            f"{b['proxy_cpu']:.1f} s ({b['proxy_cpu'] / b['wall'] * 100:.0f}% of a core)",
            f"reference {r['proxy_cpu']:.1f} s ({r['proxy_cpu'] / r['wall'] * 100:.0f}%)",
            f"{b['proxy_cpu'] / r['proxy_cpu']:.2f}x" if r["proxy_cpu"] else "", "", None),
        Row(f"{label}: proxy RSS per open stream (RSS during - before, first batch) / {n}",
            f"{per_stream(b):.1f} KiB ({b['rss_before'] / 1024:.1f} -> {b['rss_during'] / 1024:.1f} MiB)",
            f"reference {per_stream(r):.1f} KiB ({r['rss_before'] / 1024:.1f} -> {r['rss_during'] / 1024:.1f} MiB)",
            f"{per_stream(b) - per_stream(r):+.1f} KiB", "", None),
        Row(f"{label}: streams complete, deltas received (per batch)",
            f"{b['ok']}/{n}, {b['deltas']:,}/{expected:,}", f"reference {r['ok']}/{n}, {r['deltas']:,}/{expected:,}",
            "", "all", b["ok"] == n and b["deltas"] == expected and b["n_errors"] == 0),
        Row(f"{label}: the floor: no proxy (direct), gap median / p99",
            f"{ms(d['gap_median'])} / {ms(d['gap_p99'])}",
            f"client: {b['client_cpu']:.1f} s CPU per bundle batch ({b['client_cpu'] / b['wall'] * 100:.0f}% of a core), "
            f"loop lag p99 {ms(b['loop_lag_p99'])}; stand-in {b['standin_cpu']:.1f} s", "", "", None),
    ]
    return rows, {"res": res, "n": n, "seconds": seconds, "gap": gap, "order": order,
                  "per_stream_kib": {"bundle": per_stream(b), "reference": per_stream(r)}}


def pool_batches(batches: list[dict]) -> dict:
    """One path's batches as one: gaps pooled; CPU, client figures averaged per batch; RSS from the first batch
    (later batches start with memory the first one left in the process's arenas); ok/deltas the worst batch."""
    gaps = [g for b in batches for g in b["gaps"]]
    first = batches[0]
    out = {"gap_median": pct(gaps, 50), "gap_p99": pct(gaps, 99), "gap_p999": pct(gaps, 99.9),
           "ok": min(b["ok"] for b in batches), "deltas": min(b["deltas"] for b in batches),
           "n_errors": sum(b["n_errors"] for b in batches), "errors": [e for b in batches for e in b["errors"]][:5],
           "batch_p99": [b["gap_p99"] for b in batches], "batch_lag": [b["loop_lag_p99"] for b in batches]}
    for key in ("wall", "loop_lag_p99", "client_cpu", "standin_cpu", "proxy_cpu"):
        if key in first:
            out[key] = statistics.fmean(b[key] for b in batches)
    for key in ("rss_before", "rss_during", "rss_peak"):
        if key in first:
            out[key] = first[key]
    return out
