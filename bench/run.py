"""coze-mitm benchmark: one command, every figure measured in the same run, reported as ratios.

    python bench/run.py                 # full run (~25 min, of which a 20-minute soak); writes docs/benchmarks.md
    python bench/run.py --quick         # short variant (~1.5 min), same table
    python bench/run.py --no-write      # print only
    python bench/run.py --only streams  # one or more sections (jwt,memory,latency,sse,first,streams,soak); no write
    python bench/run.py --only leaks    # a soak with tracemalloc in the proxy: the allocation sites that grew
    python bench/run.py --tracemalloc   # the full run plus that traced soak

Everything runs on this machine against the local Coze stand-in (sandbox/coze_standin.py, a
SANDBOX, not Coze): the bundle is a real `mitmdump -s addons/coze.py`, "bare mitmdump" is the same
mitmdump without the script, the streaming reference is `mitmdump -s bench/stream_only.py` (one hook),
"direct" is no proxy at all. Ratios are against references measured in the same run, interleaved or
at the same time. Targets are printed beside the figures; nothing here fails a build.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import gc
import json
import os
import platform
import random
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "addons"))
sys.path.insert(0, str(REPO))

import jwt  # noqa: E402
import mitmproxy.version  # noqa: E402
import requests  # noqa: E402
import requests.adapters  # noqa: E402

import config  # noqa: E402
from sandbox.coze_standin import make_sandbox_app, write_config  # noqa: E402
from tests.harness import Mitmdump  # noqa: E402
from tokens import CozeTokenExchange, IssuedToken, TokenBroker  # noqa: E402

PAGE = "https://chat.example.org"
BOT = "/v1/bots/7000"
CHAT_TEXT = "the quick brown fox jumps over the lazy dog and keeps running far away"  # 14 words
DELTA_GAP = 0.02


# ---------------------------------------------------------------- helpers


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of values."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


class NoDelayAdapter(requests.adapters.HTTPAdapter):
    """urllib3 sets TCP_NODELAY on direct connections but not on connections to an HTTP proxy; there a
    POST (headers and body sent separately) waits ~40 ms for the proxy's delayed ACK. Browsers set
    TCP_NODELAY everywhere: so does this client, or that stall would be measured instead of the proxy."""

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        proxy_kwargs.setdefault("socket_options", [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        return super().proxy_manager_for(proxy, **proxy_kwargs)


def session(proxy: Mitmdump | None) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    adapter = NoDelayAdapter(pool_maxsize=4)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    if proxy is not None:
        s.proxies = proxy.proxies
    return s


def tagged(user_id: str) -> dict:
    return {"Authorization": f"Bearer user:{user_id}", "Content-Type": "application/json", "Origin": PAGE,
            "Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "cross-site"}


def with_token(token: str) -> dict:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json", "Origin": PAGE}


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope dy/dx."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "load": load_average(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


class Row:
    def __init__(self, metric: str, measured: str, reference: str, ratio: str, target: str, ok: bool | None):
        self.cells = [metric, measured, reference, ratio, target, {True: "met", False: "NOT met", None: "info"}[ok]]


def no_nagle(standin) -> None:
    """The stand-in writes an answer's headers and body in two sends; with Nagle's algorithm on, the
    second waits for the client's delayed ACK (~40 ms on Linux) and that stall, not the proxy, would
    dominate every figure. Real servers (and mitmproxy, via asyncio) set TCP_NODELAY: so does this run."""
    handler = standin._server.RequestHandlerClass
    standin._server.RequestHandlerClass = type(handler.__name__, (handler,), {"disable_nagle_algorithm": True})


# ---------------------------------------------------------------- the measurements


def bench_jwt(exchange: CozeTokenExchange, pem: str, n: int) -> list[Row]:
    for _ in range(20):
        exchange.mint_jwt("warm-up-user")
    loaded = []
    for i in range(n):
        t0 = time.perf_counter()
        exchange.mint_jwt(f"user-{i:06d}-bench")
        loaded.append(time.perf_counter() - t0)
    claims = {"iss": exchange.app.client_id, "aud": exchange.audience, "iat": int(time.time()),
              "exp": int(time.time()) + 3600, "jti": secrets.token_urlsafe(24), "session_name": "user-pem-bench"}
    from_pem = []
    for _ in range(max(5, n // 25)):
        t0 = time.perf_counter()
        jwt.encode(claims, pem, algorithm="RS256", headers={"kid": exchange.app.public_key_id})
        from_pem.append(time.perf_counter() - t0)
    med, med_pem = statistics.median(loaded), statistics.median(from_pem)
    return [
        Row("mint one JWT (key loaded once), median / p99", f"{ms(med)} / {ms(pct(loaded, 99))}",
            f"PEM string each time: {ms(med_pem)}", f"{med_pem / med:.0f}x cheaper", "<= 2 ms", med <= 0.002),
    ]


def bench_memory(n_users: int) -> tuple[list[Row], dict]:
    """Memory per cached user: a TokenBroker filled through token_for (its real code path) with a fast fetch."""
    now = time.time()

    def fast_fetch(user_id: str) -> IssuedToken:
        # What Coze hands out: a czs_ token (~50 chars), an absolute expiry, a logid.
        return IssuedToken("czs_" + secrets.token_urlsafe(36), now + 900, now,
                           time.strftime("%Y%m%d%H%M%S") + secrets.token_hex(13).upper())

    def user_ids(k: int, prefix: str) -> list[str]:
        # The userscript's shape: <first-use ms>-<128 random bits, base64url> (36 chars).
        return [f"{int(now * 1000) - i}-{secrets.token_urlsafe(16)}" for i in range(k)]

    async def fill(broker: TokenBroker, ids: list[str]) -> None:
        for user_id in ids:
            await broker.token_for(user_id)

    broker = TokenBroker(fast_fetch, max_users=n_users + 1000, new_users_per_minute=0)
    warm = user_ids(200, "w")
    later = user_ids(n_users, "u")
    asyncio.run(fill(broker, warm))  # worker threads, first allocations: not per-user costs
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    asyncio.run(fill(broker, later))
    del later  # the cache keeps its own references to the ids; the list is the benchmark's
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    cached = len(broker.users())
    broker.close()
    per_user = grown / n_users
    return [Row(f"memory per cached user ({cached:,} cached, tracemalloc)", f"{per_user:,.0f} B",
                f"{grown / 1024 / 1024:.1f} MiB for {n_users:,}", "", "<= 2 KB (2048 B)", per_user <= 2048)], \
        {"per_user": per_user}


def bench_latency(proxies: dict[str, Mitmdump], base: str, token: str, rounds: int) -> tuple[list[Row], dict]:
    """One keep-alive session per path; the paths alternate in a freshly shuffled order each round.

    proxies: "bundle", "bare mitmdump", and optionally more reference proxies (attribution)."""
    paths: dict[str, tuple[requests.Session, dict, int | None]] = {}
    for name, proxy in proxies.items():
        bundle_like = name == "bundle" or name.startswith("settings")
        paths[name] = (session(proxy), tagged("bench-latency-user") if bundle_like else with_token(token), proxy.proc.pid)
    paths["direct"] = (session(None), with_token(token), None)
    url = base + BOT
    for s, headers, _ in paths.values():
        for _ in range(50):
            r = s.get(url, headers=headers)
            if r.status_code != 200:
                raise RuntimeError(f"warm-up: HTTP {r.status_code} {r.text[:200]}")
    times: dict[str, list[float]] = {name: [] for name in paths}
    cpu0 = {name: cpu_seconds(pid) for name, (_, _, pid) in paths.items() if pid}
    order = list(paths)
    rng = random.Random(5)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            s, headers, _ = paths[name]
            t0 = time.perf_counter()
            r = s.get(url, headers=headers)
            times[name].append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise RuntimeError(f"{name}: HTTP {r.status_code} {r.text[:200]}")
    cpu = {name: (cpu_seconds(pid) - cpu0[name]) / rounds for name, (_, _, pid) in paths.items() if pid}
    med = {k: statistics.median(v) for k, v in times.items()}
    p99 = {k: pct(v, 99) for k, v in times.items()}
    bare = "bare mitmdump"
    r_med, r_p99, r_cpu = med["bundle"] / med[bare], p99["bundle"] / p99[bare], cpu["bundle"] / cpu[bare]
    rows = [
        Row(f"cached-token request, median ({rounds} each, interleaved)", ms(med["bundle"]),
            f"bare mitmdump {ms(med[bare])}", f"{r_med:.3f}x", "<= 1.05x bare", r_med <= 1.05),
        Row("cached-token request, p99", ms(p99["bundle"]), f"bare mitmdump {ms(p99[bare])}",
            f"{r_p99:.3f}x", "<= 1.05x bare", r_p99 <= 1.05),
        Row("cached-token request, proxy process CPU per request (/proc/PID/stat)", f"{cpu['bundle'] * 1e6:,.0f} us",
            f"bare mitmdump {cpu[bare] * 1e6:,.0f} us",
            f"{r_cpu:.3f}x ({(cpu['bundle'] - cpu[bare]) * 1e6:+,.0f} us)", "", None),
        Row("cached-token request vs no proxy, median / p99", f"{ms(med['bundle'])} / {ms(p99['bundle'])}",
            f"direct {ms(med['direct'])} / {ms(p99['direct'])}",
            f"{med['bundle'] / med['direct']:.2f}x / {p99['bundle'] / p99['direct']:.2f}x", "", None),
    ]
    attribution = [(name, med[name], p99[name], med[name] / med[bare], cpu.get(name)) for name in paths]
    return rows, {"median": med, "p99": p99, "cpu": cpu, "attribution": attribution}


def attribution_table(attribution) -> str:
    lines = ["| path | median | p99 | median vs bare mitmdump | mitmdump CPU per request |", "|---|---|---|---|---|"]
    for name, med, p99, ratio, cpu in attribution:
        lines.append(f"| {name} | {ms(med)} | {ms(p99)} | {ratio:.3f}x | "
                     f"{f'{cpu * 1e6:,.0f} us' if cpu is not None else ''} |")
    return "\n".join(lines)


def chat_body(text: str) -> dict:
    return {"bot_id": "7000", "user_id": "bench", "stream": True,
            "additional_messages": [{"role": "user", "content": text, "content_type": "text"}]}


def stream_once(s: requests.Session, url: str, headers: dict, text: str = CHAT_TEXT) -> tuple[float, list[float]]:
    """(first delta after the request was sent, gaps between deltas) for one streamed chat."""
    t0 = time.perf_counter()
    arrivals = []
    with s.post(url, headers=headers, json=chat_body(text), stream=True) as r:
        if r.status_code != 200 or not r.headers.get("content-type", "").startswith("text/event-stream"):
            raise RuntimeError(f"chat: HTTP {r.status_code} {r.text[:200]}")
        for chunk in r.iter_content(chunk_size=None):
            now = time.perf_counter()
            arrivals.extend([now] * chunk.count(b"event:conversation.message.delta"))
    if len(arrivals) < 2:
        raise RuntimeError(f"chat: only {len(arrivals)} deltas")
    return arrivals[0] - t0, [b - a for a, b in zip(arrivals, arrivals[1:])]


REFERENCE = "mitmdump -s bench/stream_only.py (1 hook)"


def bench_sse(bundle: Mitmdump, bare: Mitmdump, streamer: Mitmdump, standin, token: str,
              first_rounds: int, gap_rounds: int) -> tuple[list[Row], dict]:
    """First delta and gaps, bundle vs the one-hook streaming reference (and direct), interleaved.

    First-delta rounds use a one-word chat with the stand-in's delta gap at 2 ms (the first delta does
    not depend on the gap; many rounds make the median steady); gap rounds use the 14-word chat at 20 ms."""
    url = standin.base_url + "/v3/chat"
    paths = {"bundle": (session(bundle), tagged("bench-sse-user")), "reference": (session(streamer), with_token(token)),
             "direct": (session(None), with_token(token))}
    first: dict[str, list[float]] = {k: [] for k in paths}
    gaps: dict[str, list[float]] = {k: [] for k in paths}
    for name, (s, headers) in paths.items():
        for _ in range(3):
            stream_once(s, url, headers, "warm")  # warm-up (and the bundle's token)
    rng = random.Random(7)
    old_gap = standin.delta_gap
    try:
        standin.delta_gap = 0.002
        for _ in range(first_rounds):
            order = list(paths)
            rng.shuffle(order)
            for name in order:
                s, headers = paths[name]
                first[name].append(stream_once(s, url, headers, "hi")[0])
        standin.delta_gap = DELTA_GAP
        for _ in range(gap_rounds):
            order = list(paths)
            rng.shuffle(order)
            for name in order:
                s, headers = paths[name]
                gaps[name].extend(stream_once(s, url, headers)[1])
    finally:
        standin.delta_gap = old_gap
    bare_first, _ = stream_once(session(bare), url, with_token(token))  # for contrast: mitmproxy buffers SSE
    fm = {k: statistics.median(v) for k, v in first.items()}
    f99 = {k: pct(v, 99) for k, v in first.items()}
    gm = {k: statistics.median(v) for k, v in gaps.items()}
    g99 = {k: pct(v, 99) for k, v in gaps.items()}
    d_first = fm["bundle"] - fm["reference"]
    rows = [
        Row(f"SSE first delta, median / p99 ({first_rounds} streams each, interleaved)",
            f"{ms(fm['bundle'])} / {ms(f99['bundle'])}",
            f"{REFERENCE} {ms(fm['reference'])} / {ms(f99['reference'])}",
            f"{d_first * 1000:+.2f} ms / {(f99['bundle'] - f99['reference']) * 1000:+.2f} ms",
            "median within 0.5 ms of the reference", abs(d_first) <= 0.0005),
        Row(f"SSE gap between deltas (sent every {DELTA_GAP * 1000:.0f} ms), median / p99",
            f"{ms(gm['bundle'])} / {ms(g99['bundle'])}", f"reference {ms(gm['reference'])} / {ms(g99['reference'])}",
            f"{(gm['bundle'] - gm['reference']) * 1000:+.2f} / {(g99['bundle'] - g99['reference']) * 1000:+.2f} ms",
            "", None),
        Row("SSE first delta / gap p99 with no proxy (direct)", f"{ms(fm['direct'])} / {ms(g99['direct'])}",
            f"reference {ms(fm['reference'])} / {ms(g99['reference'])}",
            f"reference adds {(fm['reference'] - fm['direct']) * 1000:+.2f} ms / "
            f"{(g99['reference'] - g99['direct']) * 1000:+.2f} ms", "", None),
        Row("SSE first delta through bare mitmdump (buffers the stream)", ms(bare_first), "", "", "", None),
    ]
    return rows, {"first_median": fm, "first_p99": f99, "gap_median": gm, "gap_p99": g99, "d_first": d_first,
                  "rounds": first_rounds}


def bench_first_requests(bundle: Mitmdump, standin, base: str, counts: list[int]) -> tuple[list[Row], dict]:
    rows, data = [], {}
    standin.token_delay = 0.5
    try:
        for n in counts:
            users = [f"first-{n}-{i:04d}-{secrets.token_hex(4)}" for i in range(n)]
            barrier = threading.Barrier(n + 1)
            sessions = [session(bundle) for _ in users]
            for s in sessions:  # open the connections to the proxy first: measure the proxy, not TCP set-up
                s.get("http://coze.mitm/status.json")

            def first(i: int) -> tuple[int, float]:
                barrier.wait()
                r = sessions[i].get(base + BOT, headers=tagged(users[i]))
                return r.status_code, time.perf_counter()

            before = standin.exchange_count()
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                futures = [pool.submit(first, i) for i in range(n)]
                barrier.wait()
                t0 = time.perf_counter()
                results = [f.result() for f in futures]
            wall = max(t for _, t in results) - t0
            exchanges = standin.exchange_count() - before
            ok = sum(1 for status, _ in results if status == 200)
            target = n == 30
            rows.append(Row(f"{n} users' first requests at once, token endpoint 0.5 s",
                            f"{wall:.2f} s, {ok}/{n} OK", f"{exchanges} exchanges", f"{wall / 0.5:.1f}x one exchange",
                            "<= 1.5 s, exactly 30 exchanges" if target else "",
                            (wall <= 1.5 and exchanges == n and ok == n) if target else None))
            data[n] = {"wall": wall, "exchanges": exchanges, "ok": ok}
    finally:
        standin.token_delay = 0.0
    return rows, data


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


SOAK_MAX_USERS, SOAK_HOT, SOAK_COLD, SOAK_TTL = 100, 40, 1000, 60


def bench_soak(standin, config_path: Path, workdir: Path, seconds: float, rate: float, trace: bool,
               proxy_env: dict[str, str]) -> tuple[list[Row], dict]:
    """A fresh bundle at a steady request rate for `seconds`; RSS of the mitmdump process sampled all along.

    Mix: 70% cached-token GETs, 20% POSTs, 10% streamed chats. Users: 60% of requests from 40 "hot" users
    (they stay in the LRU, so their 60 s tokens are renewed ahead of expiry all along), 40% from a long tail
    of 1,000 ids against coze_max_users=100 (the LRU keeps dropping and re-minting). With `trace`, the
    proxy also loads bench/tracemalloc_probe.py and is asked for a snapshot at the middle and at the end.
    proxy_env: environment variables for the proxy process (e.g. MALLOC_ARENA_MAX=2, to test a hypothesis).
    """
    sets = [f"coze_config={config_path}", f"coze_origins={PAGE}", "flow_detail=0", "coze_new_users_per_minute=0",
            f"coze_max_users={SOAK_MAX_USERS}", f"coze_token_ttl={SOAK_TTL}"]
    extra = []
    snap_dir = workdir / "snapshots"
    env = dict(proxy_env)
    if trace:
        snap_dir.mkdir(exist_ok=True)
        env["COZE_BENCH_TRACEMALLOC_DIR"] = str(snap_dir)
        extra = ["-s", str(REPO / "bench" / "tracemalloc_probe.py")]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the harness passes the environment on to mitmdump
    try:
        proxy = Mitmdump(workdir / ("soak-traced" if trace else "soak"), sets, extra_args=extra).start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    pid = proxy.proc.pid
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
            user = rng.choice(hot) if rng.random() < 0.6 else rng.choice(cold)
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

    old_gap = standin.delta_gap
    standin.delta_gap = 0.01
    exchanges_before = len(standin.exchanges)
    samples: list[tuple[float, int]] = []
    snaps: list[Path | None] = []
    snap_rss: list[int] = []  # RSS just after the middle snapshot, just before the end one
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(workers)]
    t_start = time.perf_counter()
    cpu0 = cpu_seconds(pid)
    for t in threads:
        t.start()
    try:
        step = max(1.0, seconds / 240)
        next_sample = 0.0
        while (now := time.perf_counter() - t_start) < seconds:
            if trace and not snaps and now >= seconds / 2:
                snaps.append(snapshot(1))
                snap_rss.append(rss_kb(pid))
            if now >= next_sample:
                samples.append((now, rss_kb(pid)))
                next_sample += step
            time.sleep(min(0.25, step))
        samples.append((time.perf_counter() - t_start, rss_kb(pid)))
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
    name = "traced soak" if trace else "soak"
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
    details = {"samples": samples, "errors": errors[:10], "late_growth": late_growth, "late_slope": late_slope,
               "whole_slope": whole_slope, "flat": flat, "trace": trace, "hot_exchanges": hot_ex, "minutes": elapsed / 60,
               "cold_exchanges": cold_ex}
    if trace:
        details["tracemalloc"] = compare_snapshots(*snaps, snap_rss) if len(snaps) == 2 and all(snaps) else \
            "no snapshots were written (see the proxy's output)"
    return rows, details


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


# ---------------------------------------------------------------- report


def table(rows: list[Row]) -> str:
    header = ["measure", "coze-mitm bundle", "reference", "ratio / difference", "target", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r.cells) + " |" for r in rows]
    return "\n".join(lines)


def start_partial(confdir: Path, sets: list[str], parts: str) -> Mitmdump | None:
    """mitmdump -s bench/partial_bundle.py with COZE_BENCH_ADDONS=parts; None (and a line) if the parts did not
    load: after the bundle changes shape, an attribution row must be missing, not silently a bare mitmdump."""
    os.environ["COZE_BENCH_ADDONS"] = parts
    try:
        proxy = Mitmdump(confdir, sets, script=False, extra_args=["-s", str(REPO / "bench" / "partial_bundle.py")]).start()
    finally:
        del os.environ["COZE_BENCH_ADDONS"]
    time.sleep(0.5)
    if re.search(r"Traceback|[Ee]rror", proxy.output):
        print(f"    attribution path {parts!r} skipped: bench/partial_bundle.py did not load:\n{proxy.output[-800:]}")
        proxy.stop()
        return None
    return proxy


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("--requests", type=int, default=None, help="latency rounds per path (default 2000, --quick 300)")
    p.add_argument("--streams", type=int, default=200, help="open streams at once (default 200)")
    p.add_argument("--stream-seconds", type=float, default=None, help="length of each open stream (default 30, --quick 6)")
    p.add_argument("--rate", type=float, default=20.0, help="soak request rate per second (default 20)")
    p.add_argument("--no-write", action="store_true", help="print the table only; do not write docs/benchmarks.md")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--only", default="", help="comma-separated sections to run (jwt,memory,latency,sse,first,streams,"
                   "soak,leaks); implies --no-write")
    args = p.parse_args(argv)
    quick = args.quick
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    if only:
        args.no_write = True
    leaks_too = args.tracemalloc  # the traced soak, beside whatever else runs
    proxy_env = dict(item.split("=", 1) for item in args.proxy_env if "=" in item)

    def want(section: str) -> bool:
        if section == "leaks":
            return "leaks" in only or leaks_too
        return not only or section in only
    rounds = args.requests or (300 if quick else 2000)
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
            if any(want(x) for x in ("latency", "sse", "first", "streams")):
                step("starting the proxies")
                proxies["bundle"] = Mitmdump(work / "bundle", coze_sets).start()
                proxies["bare mitmdump"] = Mitmdump(work / "bare", ["flow_detail=0"], script=False).start()
                streamer = Mitmdump(work / "streamer", ["flow_detail=0"], script=False,
                                    extra_args=["-s", str(REPO / "bench" / "stream_only.py")]).start()
            bundle, bare = proxies.get("bundle"), proxies.get("bare mitmdump")
            if not quick and want("latency"):
                # Attribution: the same request through parts of the bundle (bench/partial_bundle.py).
                proxies[REFERENCE] = streamer
                for name, parts in (("7 addons whose hooks do nothing", "noop7"), ("settings + auth", "settings,auth"),
                                    ("settings + cors + auth + streaming", "settings,cors,auth,streaming")):
                    confdir = work / parts.replace(",", "-")
                    confdir.mkdir()
                    partial = start_partial(confdir, coze_sets if parts != "noop7" else ["flow_detail=0"], parts)
                    if partial:
                        proxies[name] = partial
            token = exchange("bench-reference-user").token  # the same kind of token the bundle injects
            if want("latency"):
                step(f"latency ({rounds} rounds x {len(proxies) + 1} paths)")
                lat_rows, details["latency"] = bench_latency(proxies, standin.base_url, token, rounds)
                rows += lat_rows
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
            soak_rows, details["soak"] = bench_soak(standin, config_path, work, soak_seconds, args.rate, False, proxy_env)
            rows += soak_rows
        if want("leaks"):
            traced_seconds = args.tracemalloc_seconds or soak_seconds
            step(f"traced soak ({traced_seconds:.0f} s at {args.rate:.0f} req/s, tracemalloc in the proxy)")
            leak_rows, details["leaks"] = bench_soak(standin, config_path, work, traced_seconds, args.rate, True,
                                                     {**proxy_env, "COZE_BENCH_TRACEMALLOC_FRAMES": str(args.tracemalloc_frames)})
            rows += leak_rows
    standin.stop()

    total = time.perf_counter() - t_all
    marks.append(("end", time.perf_counter()))
    durations = ", ".join(f"{name} {b - a:.0f} s" for (name, a), (_, b) in zip(marks, marks[1:]))
    info["load_end"] = load_average()
    text = table(rows)
    print()
    print(text)
    if "soak" in details:
        print("\nsoak RSS samples (min, MiB): " + ", ".join(f"{t / 60:.2f} {kb / 1024:.1f}"
                                                          for t, kb in details["soak"]["samples"][::4]))
    if "leaks" in details:
        print("\n" + details["leaks"]["tracemalloc"])
    if "latency" in details and len(details["latency"]["attribution"]) > 3:
        print()
        print(attribution_table(details["latency"]["attribution"]))
    print(f"\n(total {total:.0f} s: {durations}; load average at the end {info['load_end']})")
    if not args.no_write:
        write_report(Path(args.out), info, text, details, quick, total, args, rounds, soak_seconds, stream_seconds)
        print(f"written to {args.out}")
    return 0


SECTIONS = ("jwt", "memory", "latency", "sse", "first", "streams", "soak", "leaks")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def write_report(path: Path, info: dict, text: str, details: dict, quick: bool, total: float, args, rounds: int,
                 soak_seconds: float, stream_seconds: float) -> None:
    samples = details["soak"]["samples"]
    every = max(1, -(-len(samples) // 12))
    rss_line = ", ".join(f"{t / 60:.1f} min {kb / 1024:.1f}" for t, kb in samples[::every])
    attribution = ""
    if len(details["latency"]["attribution"]) > 3:
        attribution = ("## Where the bundle's latency goes\n\nThe same cached-token request, interleaved in the same "
                       "rounds, through parts of the bundle (`bench/partial_bundle.py`); CPU is the mitmdump process's "
                       "user+system time over the timed rounds (`/proc/PID/stat`), divided by the number of requests.\n\n"
                       + attribution_table(details["latency"]["attribution"]) + "\n")
    trace = ""
    if "leaks" in details:
        trace = f"## What grew during the traced soak (tracemalloc)\n\n```\n{details['leaks']['tracemalloc']}\n```\n"
    flags = " ".join([*(["--quick"] if quick else []), *(["--tracemalloc"] if args.tracemalloc else []),
                      *(f"--proxy-env {x}" for x in args.proxy_env)])
    st = details["streams"]
    body = f"""# Benchmarks

Written by `python bench/run.py{' ' + flags if flags else ''}` (total {total / 60:.1f} min). Every figure below comes
from this one run, against the local Coze stand-in (`sandbox/coze_standin.py`, a sandbox, not Coze); every
ratio is against bare mitmdump (or the one-hook streaming reference) measured in the same run. Targets are
from issues 5 and 11; a figure that misses its target says "NOT met" and the notes say why.

* **Date:** {info['date']}
* **Machine:** {info['cpu']}, {info['cores']} cores, {info['memory']} RAM; {info['os']}
* **Load average** (1, 5, 15 min) at the start {info['load']}, at the end {info['load_end']} (a shared machine
  shows here)
* **Python** {info['python']}, **mitmproxy** {info['mitmproxy']}
* **Run:** {rounds} latency rounds per path; {st['n']} open streams per path for {stream_seconds:.0f} s; soak
  {soak_seconds / 60:.1f} min at {args.rate:.0f} req/s

{text}

## How each figure is measured

* **Latency.** One keep-alive `requests` session per path from one client thread: through the bundle
  (`mitmdump -s addons/coze.py`, tagged request, token cached), through bare `mitmdump` (no `-s`, the
  same kind of real access token sent by the client), direct to the stand-in, and (full run) through the
  attribution paths below. Each round sends one `GET /v1/bots/7000` per path in a freshly shuffled order,
  so drift and noise hit all paths alike. `flow_detail=0` on every proxy. Median and p99 (nearest rank).
  CPU per request: the proxy process's user+system time (`/proc/PID/stat`) over the timed rounds / rounds.
* **SSE.** `POST /v3/chat` with `"stream": true`, through the bundle, through `mitmdump -s
  bench/stream_only.py` (the one-hook streaming reference: any SSE-friendly mitmproxy set-up needs that
  much) and direct, interleaved. First delta = from sending the request to receiving the first
  `conversation.message.delta`, over many one-word chats (stand-in gap 2 ms); gaps = between consecutive
  deltas as the client receives them, over 14-word chats with a delta every {DELTA_GAP * 1000:.0f} ms.
  Bare mitmdump is shown for contrast: without a streaming hook, mitmproxy buffers the stream.
* **Open streams.** {st['n']} streamed chats open at once, each on its own connection, started over 2 s; the
  stand-in sends a delta every {st['gap'] * 1000:.0f} ms for {st['seconds']:.0f} s. One path at a time, in the order
  {', '.join(st['order'])} (so a drift in the machine's load hits both proxies alike; both proxies' batches at
  once overloaded the 2-core machine); each of {st['n']} users' tokens minted beforehand. The client is
  `bench/streams_client.py`: its own process, one asyncio loop with raw sockets, no thread per stream; its
  CPU time and how late its loop woke for a 10 ms sleep (loop lag) show whether it kept up. Gap
  percentiles over all of a path's gaps (batches pooled). Proxy CPU from `/proc/PID/stat`, per batch. RSS
  per open stream = (median RSS while all streams are open - RSS just before, after 10 short warm-up
  streams) / {st['n']}, from each proxy's first batch. The stand-in (a thread per stream) runs in the
  benchmark's process.
* **First requests at once.** N threads, each with its own connection to the proxy opened beforehand,
  released together; each sends one tagged request for a new user while the stand-in's token endpoint
  takes 0.5 s. Wall time is until the last answer; exchanges are counted by the stand-in.
* **JWT minting.** `CozeTokenExchange.mint_jwt` with the key loaded once (RS256, 2048-bit), versus
  `jwt.encode` given the PEM string each time (what loading the key per token would cost).
* **Memory per cached user.** In-process, `tracemalloc`: a `TokenBroker` filled through its real
  `token_for` path (executor, single-flight, LRU) with a fetch that returns at once a token shaped like
  Coze's (`czs_` + 48 chars, a logid) for ids shaped like the userscript's (36 chars); the growth over
  10,000 users after a 200-user warm-up, divided by 10,000.
* **Soak.** A fresh bundle process; 4 client threads at a steady total rate, 70% cached-token GETs,
  20% POSTs, 10% streamed chats. 60% of requests come from {SOAK_HOT} "hot" users who stay cached, so their
  `coze_token_ttl={SOAK_TTL}` tokens are renewed ahead of expiry all along; 40% from a tail of {SOAK_COLD:,} ids
  against `coze_max_users={SOAK_MAX_USERS}`, so the LRU keeps dropping and re-minting. RSS of the mitmdump
  process from `/proc/PID/status`. The target is about the second half (the first includes warm-up:
  caches filling, arenas, lazy imports): growth = least-squares slope over the second half x its length.
  `--tracemalloc` adds a second, traced soak: its proxy also loads `bench/tracemalloc_probe.py`
  (tracemalloc from start-up, a snapshot at the middle and at the end, on SIGUSR1), and the run lists the
  allocation sites that grew in between beside the RSS growth over the same time. Tracing slows the proxy
  (its achieved rate is in its row), so its RSS is not judged.
  RSS samples (time, MiB): {rss_line}.

{attribution}{trace}
## Notes

{notes(details, info)}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)


def batch_figures(x: dict) -> str:
    return ", ".join(f"{ms(p)} (client loop lag {ms(lag)})" for p, lag in zip(x["batch_p99"], x["batch_lag"]))


def notes(details: dict, info: dict) -> str:
    """The notes, from this run's figures: each target not met says why, with the figures that show it."""
    out = []
    lat = details.get("latency")
    if lat:
        med, p99, cpu = lat["median"], lat["p99"], lat["cpu"]
        bare = "bare mitmdump"
        r_med, r_p99 = med["bundle"] / med[bare], p99["bundle"] / p99[bare]
        extra_cpu = (cpu["bundle"] - cpu[bare]) * 1e6
        head = (f"median {r_med:.3f}x, p99 {r_p99:.3f}x bare mitmdump; the bundle's process spent "
                f"{extra_cpu:+,.0f} us of CPU per request over bare mitmdump's {cpu[bare] * 1e6:,.0f} us "
                f"(5% of that is {cpu[bare] * 0.05 * 1e6:,.0f} us)")
        if r_med <= 1.05 and r_p99 <= 1.05:
            out.append(f"* **Latency target (<= 1.05x bare mitmdump, median and p99): met.** {head}.")
        else:
            why = [f"* **Latency target (<= 1.05x bare mitmdump, median and p99): not met.** {head}."]
            att = {name: (ratio, c) for name, _, _, ratio, c in lat["attribution"]}
            if len(att) > 3:
                def share(a: str, b: str) -> str:
                    if a not in att or b not in att:
                        return "n/a"
                    return f"{(att[a][0] - att[b][0]) * 100:+.1f}% ({(att[a][1] - att[b][1]) * 1e6:+,.0f} us CPU)"
                why.append(
                    f"  Attribution in this run (latency vs bare, CPU per request): a one-hook script "
                    f"{share(REFERENCE, bare)}; seven addon objects whose hooks do nothing "
                    f"{share('7 addons whose hooks do nothing', bare)} (that is mitmproxy calling each hook of each "
                    f"addon object, 4 events per request: the share a single dispatcher object removes); settings + "
                    f"auth {share('settings + auth', bare)}; adding cors + streaming "
                    f"{share('settings + cors + auth + streaming', 'settings + auth')}; the rest of the bundle "
                    f"(demo, status, CSP) {share('bundle', 'settings + cors + auth + streaming')}.")
            else:
                why.append("  (The attribution by parts runs in the full benchmark, not with --quick.)")
            if r_med <= 1.05 < r_p99:
                why.append(f"  The median is within target and the p99 is not: tails on a shared 2-core machine follow "
                           f"other load (load average {info['load']} at the start).")
            out.append("\n".join(why))
    sse = details.get("sse")
    if sse:
        fm = sse["first_median"]
        line = (f"bundle {ms(fm['bundle'])}, one-hook reference {ms(fm['reference'])} ({sse['d_first'] * 1000:+.2f} ms), "
                f"direct {ms(fm['direct'])}, medians of {sse['rounds']} interleaved streams each")
        if abs(sse["d_first"]) <= 0.0005:
            out.append(f"* **SSE first delta (within 0.5 ms of the one-hook reference): met.** {line}.")
        else:
            because = ""
            if lat:
                extra = (lat["cpu"]["bundle"] - lat["cpu"]["bare mitmdump"]) * 1e6
                because = (f" Why: the first delta waits, once, for the bundle's request hooks (tag, token, header "
                           f"swap) and response-header hooks (CORS, streaming); the reference runs one hook. The "
                           f"latency section measures that per-request work: {extra:+,.0f} us of proxy CPU per "
                           f"request over bare mitmdump (its attribution splits it by part).")
            out.append(f"* **SSE first delta (within 0.5 ms of the one-hook reference): not met.** {line}.{because}")
    st = details.get("streams")
    if st:
        b, r, d = st["res"]["bundle"], st["res"]["reference"], st["res"]["direct"]
        client_ok = max(b["loop_lag_p99"], r["loop_lag_p99"]) < 0.005
        out.append(
            f"* **{st['n']} open streams.** Gap p99 as the client sees it: bundle {ms(b['gap_p99'])}, one-hook reference "
            f"{ms(r['gap_p99'])}, direct {ms(d['gap_p99'])} (the stand-in sends every {st['gap'] * 1000:.0f} ms; what "
            f"direct adds to that is the stand-in's and the client's own jitter; batches in the order "
            f"{', '.join(st['order'])}; p99 of each batch: reference {batch_figures(r)}, bundle {batch_figures(b)}). "
            f"Proxy CPU per batch {b['proxy_cpu']:.1f} s vs {r['proxy_cpu']:.1f} s for the "
            f"reference; RSS per open stream {st['per_stream_kib']['bundle']:.1f} KiB vs "
            f"{st['per_stream_kib']['reference']:.1f} KiB. The client used {b['client_cpu'] / b['wall'] * 100:.0f}% of a "
            f"core and its loop woke up to {ms(max(b['loop_lag_p99'], r['loop_lag_p99']))} late (p99): "
            + ("it kept up; the gaps are not the client's." if client_ok else
               "it was short of CPU at times (a shared machine); that lag is in the gaps too."))
    soak = details.get("soak")
    if soak:
        growth = f"second half {soak['late_growth']:+.2f} MiB fitted ({soak['late_slope'] * 1024:+.0f} KiB/min)"
        short = (f" (A {soak['minutes']:.1f}-minute soak says little: the target is about a 20-minute one.)"
                 if soak["minutes"] < 10 else "")
        if soak["flat"]:
            out.append(f"* **Memory flat (second half <= 0.5 MiB): met.** {growth}, through "
                       f"{max(0, soak['hot_exchanges'] - SOAK_HOT):,} renewals (or LRU re-mints) for the hot users and "
                       f"{soak['cold_exchanges']:,} tokens for the {SOAK_COLD:,}-id tail (first tokens and re-mints "
                       f"after the LRU of {SOAK_MAX_USERS} dropped them).{short}")
        else:
            where = ("The traced soak below lists the Python allocation sites that grew between its middle and "
                     "its end, and how much of the RSS growth they explain." if "leaks" in details else
                     "To see what holds it: `python bench/run.py --only leaks` (or `--tracemalloc` with the full run) "
                     "lists the Python allocation sites that grew between the middle and the end of a traced soak, "
                     "and how much of the RSS growth they explain.")
            out.append(f"* **Memory flat (second half <= 0.5 MiB): not met.** {growth}. {where}{short}")
    out.append(
        "* **Client set-up.** The stand-in writes an answer's headers and body in two sends; with Nagle's\n"
        "  algorithm on, every answer waits ~40 ms for the client's delayed ACK, and urllib3 does not set\n"
        "  `TCP_NODELAY` on connections to an HTTP proxy. Both would swamp every figure; this run sets\n"
        "  `TCP_NODELAY` on the stand-in and on the clients (browsers always do).")
    out.append("* Absolute figures on a shared 2-core VM are noisy; the ratios, measured with interleaved paths in one "
               "run, are what the targets are about.")
    out.append("* The same command in a Python 3.12 venv with `requirements-dev.txt` installed runs the benchmark with "
               "mitmproxy 12.")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
