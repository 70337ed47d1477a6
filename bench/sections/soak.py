"""Soak: a fresh bundle at a steady request rate, its RSS sampled all along; with tracemalloc in the proxy
(bench/tracemalloc_probe.py), the allocation sites that grew between the middle and the end."""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import signal
import statistics
import threading
import time
import tracemalloc
from pathlib import Path

import requests

from tests.harness import Mitmdump

from . import REPO
from .common import BOT, PAGE, Row, chat_body, cpu_seconds, ms, pct, rss_kb, session, slope, tagged
from .procmem import KINDS, proc_sample

from coze_mitm.core.usage_store import FILE_NAME


SOAK_MAX_USERS, SOAK_HOT, SOAK_COLD, SOAK_TTL = 100, 40, 1000, 60
HOT_SHARE = 0.6  # of the requests, from the hot users; the rest from the long tail


def bench_soak(standin, config_path: Path, workdir: Path, seconds: float, rate: float, trace: bool,
               proxy_env: dict[str, str], proxy_sets: list[str] = (), label: str = "") -> tuple[list[Row], dict]:
    """A fresh bundle at a steady request rate for `seconds`; RSS of the mitmdump process sampled all along.

    Mix: 70% cached-token GETs, 20% POSTs, 10% streamed chats. Users: 60% of requests from 40 "hot" users
    (they stay in the LRU, so their 60 s tokens are renewed ahead of expiry all along), 40% from a long tail
    of 1,000 ids against coze_max_users=100 (the LRU keeps dropping and re-minting). With `trace`, the
    proxy also loads bench/tracemalloc_probe.py and is asked for a snapshot at the middle and at the end.
    proxy_env: environment variables for the proxy process (e.g. MALLOC_ARENA_MAX=2, to test a hypothesis);
    proxy_sets: more `--set NAME=VALUE` for it (e.g. coze_usage_file=memory).

    Beside RSS, every sample reads the proxy's threads, open fds and sockets, the usage store's SQLite files,
    and its anonymous memory by kind of mapping (procmem.py); bench/memstats_probe.py, loaded beside the
    bundle, reports what pymalloc and glibc malloc hold, a few times per run. The report gives the growth of
    each per window of the run (5 minutes in a 20-minute soak), so a rate that falls can be told from a leak.
    """
    sets = [f"coze_config={config_path}", f"coze_origins={PAGE}", "flow_detail=0", "coze_new_users_per_minute=0",
            f"coze_max_users={SOAK_MAX_USERS}", f"coze_token_ttl={SOAK_TTL}", *proxy_sets]
    confdir = workdir / ("soak-traced" if trace else "soak") / (label.replace(" ", "-") or "plain")
    stats_dir = confdir / "memstats"
    stats_dir.mkdir(parents=True, exist_ok=True)
    extra = ["-s", str(REPO / "bench" / "memstats_probe.py")]
    snap_dir = workdir / "snapshots"
    env = {**proxy_env, "COZE_BENCH_MEMSTATS_DIR": str(stats_dir)}
    if trace:
        snap_dir.mkdir(exist_ok=True)
        env["COZE_BENCH_TRACEMALLOC_DIR"] = str(snap_dir)
        extra += ["-s", str(REPO / "bench" / "tracemalloc_probe.py")]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the harness passes the environment on to mitmdump
    try:
        proxy = Mitmdump(confdir, sets, extra_args=extra).start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    pid = proxy.proc.pid
    ready = time.monotonic() + 30  # the probe's `running` (mitmproxy says it listens before running the hooks)
    while not (stats_dir / "ready").exists() and time.monotonic() < ready:
        time.sleep(0.05)
    base = standin.base_url
    tag = secrets.token_hex(3)
    hot = [f"soak-hot-{tag}-{i:04d}" for i in range(SOAK_HOT)]
    cold = [f"soak-cold-{tag}-{i:05d}" for i in range(SOAK_COLD)]
    stop = threading.Event()
    latencies: list[float] = []
    errors: list[str] = []
    counts = {"requests": 0}
    lock = threading.Lock()
    workers = 4
    interval = workers / rate

    def worker(k: int) -> None:
        s = session(proxy)
        rng = random.Random(k)
        next_at = time.perf_counter() + rng.random() * interval
        while not stop.is_set():
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            next_at += interval
            user = rng.choice(hot) if rng.random() < HOT_SHARE else rng.choice(cold)
            roll = rng.random()
            t0 = time.perf_counter()
            try:
                if roll < 0.7:
                    r = s.get(base + BOT, headers=tagged(user))
                    good = r.status_code == 200 and r.json()["code"] == 0
                elif roll < 0.9:
                    r = s.post(base + "/v1/conversation/create", headers=tagged(user), json={"meta_data": {"k": "v"}})
                    good = r.status_code == 200 and r.json()["code"] == 0
                else:
                    r = s.post(base + "/v3/chat", headers=tagged(user), json=chat_body("hello soak"))
                    good = r.status_code == 200 and b"event:done" in r.content
                elapsed = time.perf_counter() - t0
                with lock:
                    counts["requests"] += 1
                    if roll < 0.9:
                        latencies.append(elapsed)
                    if not good:
                        errors.append(f"{r.status_code} {r.text[:120]}")
            except requests.RequestException as e:
                with lock:
                    errors.append(type(e).__name__)

    def snapshot(n: int) -> Path | None:
        if not trace:
            return None
        os.kill(pid, signal.SIGUSR1)
        path = snap_dir / f"snapshot-{n}.pickle"
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return path if path.exists() else None

    db_files = [confdir / name for name in (FILE_NAME, FILE_NAME + "-wal", FILE_NAME + "-shm")]
    stats_every = max(5.0, seconds / 40)
    memstats: list[tuple[float, dict]] = []

    def ask_memstats(now: float) -> None:
        n = len(list(stats_dir.glob("memstats-*.json"))) + 1  # the probe's count, even after a lost answer
        os.kill(pid, signal.SIGUSR2)
        path = stats_dir / f"memstats-{n}.json"
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            memstats.append((now, json.loads(path.read_text())))
        except (OSError, ValueError):
            memstats.append((now, {}))

    old_gap = standin.delta_gap
    standin.delta_gap = 0.01
    exchanges_before = len(standin.exchanges)
    samples: list[tuple[float, int]] = []
    proc: list[tuple[float, dict]] = []  # the same instants as samples: threads, fds, memory by mapping kind
    snaps: list[Path | None] = []
    snap_rss: list[int] = []  # RSS just after the middle snapshot, just before the end one
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(workers)]
    t_start = time.perf_counter()
    cpu0 = cpu_seconds(pid)
    for t in threads:
        t.start()
    try:
        step = max(1.0, seconds / 240)
        next_sample = next_stats = 0.0

        def sample(now: float) -> None:
            figures = proc_sample(pid, db_files)
            samples.append((now, figures["rss"]))
            proc.append((now, figures))

        while (now := time.perf_counter() - t_start) < seconds:
            if trace and not snaps and now >= seconds / 2:
                snaps.append(snapshot(1))
                snap_rss.append(rss_kb(pid))
            if now >= next_sample:
                sample(now)
                next_sample += step
            if now >= next_stats:
                ask_memstats(now)
                next_stats += stats_every
            time.sleep(min(0.25, step))
        sample(time.perf_counter() - t_start)
        ask_memstats(time.perf_counter() - t_start)
        if trace:
            snap_rss.append(samples[-1][1])
            snaps.append(snapshot(2))
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        standin.delta_gap = old_gap
    elapsed = time.perf_counter() - t_start
    cpu = cpu_seconds(pid) - cpu0
    proxy.stop()
    new = standin.exchanges[exchanges_before:]
    hot_ex = sum(1 for e in new if f"soak-hot-{tag}-" in str(e["session_name"]))
    cold_ex = sum(1 for e in new if f"soak-cold-{tag}-" in str(e["session_name"]))

    xs, ys = [t / 60 for t, _ in samples], [kb / 1024 for _, kb in samples]
    mid_i = min(range(len(xs)), key=lambda i: abs(xs[i] - xs[-1] / 2))
    start_mb, mid_mb, end_mb, peak_mb = ys[0], ys[mid_i], ys[-1], max(ys)
    late_slope = slope(xs[mid_i:], ys[mid_i:])  # MiB/min over the second half
    late_growth = late_slope * (xs[-1] - xs[mid_i])
    whole_slope = slope(xs, ys)
    flat = late_growth <= 0.5
    rate_done = counts["requests"] / elapsed
    traced = " (tracemalloc on: RSS includes its bookkeeping)" if trace else ""
    name = ("traced soak" if trace else "soak") + (f" ({label})" if label else "")
    rows = [
        Row(f"{name} {elapsed / 60:.1f} min at {rate_done:.0f} req/s: mitmdump RSS start / mid / end (peak){traced}",
            f"{start_mb:.1f} / {mid_mb:.1f} / {end_mb:.1f} MiB ({peak_mb:.1f})",
            f"fitted slope: whole run {whole_slope * 1024:+.0f} KiB/min, second half {late_slope * 1024:+.0f} KiB/min",
            f"second half {late_growth:+.2f} MiB fitted ({end_mb - mid_mb:+.2f} MiB end - mid)",
            "second half <= 0.5 MiB", None if trace else flat),
        Row(f"{name}: requests, errors, latency median / p99 (non-stream)",
            f"{counts['requests']:,} requests, {len(errors)} errors",
            f"{hot_ex + cold_ex:,} exchanges: {hot_ex:,} for {SOAK_HOT} hot users ({SOAK_HOT} first tokens; the rest "
            f"renewals, or re-mints when the LRU dropped one), "
            f"{cold_ex:,} for the {SOAK_COLD:,}-id tail (LRU {SOAK_MAX_USERS})",
            f"{ms(statistics.median(latencies))} / {ms(pct(latencies, 99))}" if latencies else "",
            "no errors", not errors),
        Row(f"{name}: mitmdump CPU", f"{cpu / elapsed * 100:.0f}% of one core", "", "", "", None),
    ]
    window = WINDOW if elapsed >= 3 * WINDOW else elapsed / 4
    windows = window_figures(proc, memstats, window)
    threads = [p["threads"] for _, p in proc]
    half = [p for t, p in proc if t >= proc[mid_i][0]]
    rows += [
        Row(f"{name}: RSS growth per {window / 60:.3g}-min window (first window includes start-up)",
            ", ".join(f"{w['rss'] / 1024:+.2f}" for w in windows) + " MiB",
            "anonymous memory per window: " + ", ".join(f"{w['anon'] / 1024:+.2f}" for w in windows) + " MiB",
            f"last window {windows[-1]['rss'] / 1024:+.2f} MiB" if windows else "", "", None),
        Row(f"{name}: proxy threads start / mid / end (max); open sockets end (max)",
            f"{threads[0]} / {threads[mid_i]} / {threads[-1]} ({max(threads)}); "
            f"{proc[-1][1]['sockets']} ({max(p['sockets'] for _, p in proc)})",
            "threads by name at the end: " + thread_names(memstats), "", "", None),
        Row(f"{name}: second half by kind of memory (/proc/PID/smaps, see bench/sections/procmem.py)",
            ", ".join(f"{kind} {(half[-1][kind] - half[0][kind]) / 1024:+.2f}" for kind in KINDS) + " MiB",
            "inside: " + inside_growth(memstats, proc[mid_i][0]),
            f"usage SQLite files {half[0]['file_bytes'] / 1024:.0f} -> {half[-1]['file_bytes'] / 1024:.0f} KiB", "",
            None),
    ]
    details = {"samples": samples, "errors": errors[:10], "late_growth": late_growth, "late_slope": late_slope,
               "whole_slope": whole_slope, "flat": flat, "trace": trace, "hot_exchanges": hot_ex, "minutes": elapsed / 60,
               "cold_exchanges": cold_ex, "proc": proc, "memstats": memstats, "windows": windows, "window": window,
               "attribution": windows_table(windows, window)}
    if trace:
        details["tracemalloc"] = compare_snapshots(*snaps, snap_rss) if len(snaps) == 2 and all(snaps) else \
            "no snapshots were written (see the proxy's output)"
    return rows, details


WINDOW = 300.0  # seconds: the soak's growth is reported per window of this length (shorter runs: quarters)
STAT_NAMES = ("py_arenas", "py_used", "libc_used", "libc_free", "libc_mmap")


def _nearest(series: list[tuple[float, dict]], t: float) -> dict:
    return min(series, key=lambda item: abs(item[0] - t))[1] if series else {}


def window_figures(proc: list[tuple[float, dict]], memstats: list[tuple[float, dict]], window: float) -> list[dict]:
    """Per window of the run: the growth of RSS, anonymous memory and each kind of mapping, the threads and
    sockets at its end, and the growth of what pymalloc and glibc hold (from the nearest probe samples)."""
    end = proc[-1][0]
    out = []
    a = 0.0
    while a < end - window * 0.5:
        b = min(a + window, end)
        p0, p1 = _nearest(proc, a), _nearest(proc, b)
        m0, m1 = _nearest(memstats, a), _nearest(memstats, b)
        w = {"from": a, "to": b, **{k: p1[k] - p0[k] for k in ("rss", "anon", *KINDS)},
             "threads": p1["threads"], "sockets": p1["sockets"], "fds": p1["fds"], "file_bytes": p1["file_bytes"]}
        for k in STAT_NAMES:
            if k in m0 and k in m1:
                w[k] = m1[k] - m0[k]
        if "gc_stats" in m0 and "gc_stats" in m1:  # full collections (of the oldest generation) in the window
            w["gc_full"] = m1["gc_stats"][2]["collections"] - m0["gc_stats"][2]["collections"]
        out.append(w)
        a = b
    return out


def windows_table(windows: list[dict], window: float) -> str:
    kib = lambda v: f"{v:+,}" if v is not None else "?"  # noqa: E731
    head = (f"Growth per {window / 60:.3g}-min window, KiB (proxy RSS; anonymous memory; by kind of mapping: "
            "heap = main malloc arena, tarenas = glibc per-thread arenas, stacks = thread stacks, other = pymalloc "
            "arenas and other anonymous maps, files = file-backed; inside the process: pymalloc arenas x 1 MiB, "
            "Python blocks in use, glibc in use / free; full garbage collections); threads, sockets at the window's end")
    lines = [head, ""]
    lines.append(f"  {'minutes':>11} {'RSS':>7} {'anon':>7} {'heap':>7} {'tarenas':>7} {'stacks':>7} {'other':>7} "
                 f"{'files':>7} {'pyarenas':>8} {'py used':>8} {'libc use':>8} {'libc free':>9} {'full gc':>7} {'threads':>7} "
                 f"{'socks':>5}")
    for w in windows:
        py = w.get("py_arenas")
        lines.append(
            f"  {w['from'] / 60:5.1f}-{w['to'] / 60:<5.1f} {kib(w['rss']):>7} {kib(w['anon']):>7} {kib(w['heap']):>7} "
            f"{kib(w['tarenas']):>7} {kib(w['stacks']):>7} {kib(w['other']):>7} {kib(w['files']):>7} "
            f"{(f'{py:+d}' if py is not None else '?'):>8} "
            f"{kib(w['py_used'] // 1024 if 'py_used' in w else None):>8} "
            f"{kib(w['libc_used'] // 1024 if 'libc_used' in w else None):>8} "
            f"{kib(w['libc_free'] // 1024 if 'libc_free' in w else None):>9} {w.get('gc_full', '?'):>7} "
            f"{w['threads']:>7} {w['sockets']:>5}")
    return "\n".join(lines)


def thread_names(memstats: list[tuple[float, dict]]) -> str:
    names = memstats[-1][1].get("threads", {}) if memstats else {}
    return ", ".join(f"{k} {v}" for k, v in sorted(names.items(), key=lambda kv: -kv[1])) or "not known"


def inside_growth(memstats: list[tuple[float, dict]], mid: float) -> str:
    """Second-half growth of what the allocators hold, from the in-process probe."""
    if not memstats:
        return "no probe samples"
    m0, m1 = _nearest(memstats, mid), memstats[-1][1]
    if not all(k in m0 and k in m1 for k in STAT_NAMES):
        return "probe figures missing"
    return (f"pymalloc arenas {m0['py_arenas']} -> {m1['py_arenas']} (1 MiB each; Python blocks in use "
            f"{(m1['py_used'] - m0['py_used']) / 1024:+,.0f} KiB), glibc in use "
            f"{(m1['libc_used'] - m0['libc_used']) / 1024:+,.0f} KiB, free inside its arenas "
            f"{(m1['libc_free'] - m0['libc_free']) / 1024:+,.0f} KiB, mmap'ed blocks "
            f"{(m1['libc_mmap'] - m0['libc_mmap']) / 1024:+,.0f} KiB")


def compare_snapshots(mid: Path, end: Path, rss: list[int], top: int = 15) -> str:
    """The allocation sites that grew between the middle and the end of the soak, largest growth first; and
    how much of the RSS growth over the same time those Python allocations explain."""
    ignore = [tracemalloc.Filter(False, pattern, all_frames=True)
              for pattern in (tracemalloc.__file__, "*/fnmatch.py", str(REPO / "bench" / "tracemalloc_probe.py"))]
    old = tracemalloc.Snapshot.load(str(mid)).filter_traces(ignore)
    new = tracemalloc.Snapshot.load(str(end)).filter_traces(ignore)
    total = sum(s.size_diff for s in new.compare_to(old, "filename"))
    grown = sorted((s for s in new.compare_to(old, "lineno") if s.size_diff > 0), key=lambda s: -s.size_diff)
    rss_growth = (rss[1] - rss[0]) if len(rss) == 2 else 0
    lines = [f"tracemalloc, middle -> end of the soak: Python allocations alive {total / 1024:+,.1f} KiB "
             f"({sum(s.size for s in new.statistics('filename')) / 1024 / 1024:,.2f} MiB traced at the end, all made "
             f"since the proxy started); RSS over the same time {rss_growth:+,} KiB.",
             "RSS growth that traced Python allocations do not explain is outside Python objects: the C allocator's "
             "arenas and fragmentation, or C libraries (OpenSSL); try --proxy-env MALLOC_ARENA_MAX=2.", "",
             f"The {top} lines whose allocations grew most:", ""]
    for stat in grown[:top]:
        frame = stat.traceback[0]
        lines.append(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks  "
                     f"{short_path(frame.filename)}:{frame.lineno}")
    lines += ["", "the 3 largest growths by call stack (innermost last):"]
    stacks = sorted((s for s in new.compare_to(old, "traceback") if s.size_diff > 0), key=lambda s: -s.size_diff)
    for stat in stacks[:3]:
        lines.append(f"  {stat.size_diff / 1024:+.1f} KiB {stat.count_diff:+d} blocks")
        lines += [f"      {short_path(f.filename)}:{f.lineno}" for f in list(stat.traceback)[-8:]]
    return "\n".join(lines)


def short_path(filename: str) -> str:
    if filename.startswith(str(REPO) + "/"):
        return filename[len(str(REPO)) + 1:]
    m = re.search(r"(?:site-packages|lib/python3\.\d+)/(.*)$", filename)
    return m.group(1) if m else filename
