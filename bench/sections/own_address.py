"""The proxy's own address as the API base (parts/direct_api.py) against the same bundle used as a proxy, bare mitmdump
and no proxy: the same cached-token request (GET /v1/bots/<id>, a page's tag and Origin for the bundle, the real token
for the others), every path on its own keep-alive connection.

Paths take turns in blocks of BLOCK requests, the blocks in a freshly shuffled order each round: the latencies are
interleaved (same machine state for all), and the bundle's CPU over a block is that block's path's (the bundle serves
two of the paths, so its CPU could not be told apart request by request)."""

from __future__ import annotations

import random
import statistics
import time

from tests.harness import Mitmdump

from .common import BOT, Row, cpu_seconds, ms, pct, session, tagged, with_token

BLOCK = 25
OWN = "own address (bundle as the API base, no proxy set)"
PROXIED = "proxied (bundle as the client's proxy)"
BARE = "bare mitmdump (as the client's proxy)"
NONE = "no proxy (the stand-in itself)"


def bench_own_address(bundle: Mitmdump, bare: Mitmdump, base: str, token: str, rounds: int) -> tuple[list[Row], dict]:
    user = "bench-own-address-user"
    paths = {
        OWN: (session(None), tagged(user), bundle.url + BOT, bundle.proc.pid),
        PROXIED: (session(bundle), tagged(user), base + BOT, bundle.proc.pid),
        BARE: (session(bare), with_token(token), base + BOT, bare.proc.pid),
        NONE: (session(None), with_token(token), base + BOT, None),
    }
    for s, headers, url, _ in paths.values():
        for _ in range(50):
            r = s.get(url, headers=headers)
            if r.status_code != 200:
                raise RuntimeError(f"own-address warm-up: HTTP {r.status_code} {r.text[:200]}")
    times: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, float] = dict.fromkeys(paths, 0.0)
    order = list(paths)
    rng = random.Random(7)
    for _ in range(max(1, rounds // BLOCK)):
        rng.shuffle(order)
        for name in order:
            s, headers, url, pid = paths[name]
            c0 = cpu_seconds(pid) if pid else 0.0
            for _ in range(BLOCK):
                t0 = time.perf_counter()
                r = s.get(url, headers=headers)
                times[name].append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise RuntimeError(f"{name}: HTTP {r.status_code} {r.text[:200]}")
            if pid:
                cpu[name] += cpu_seconds(pid) - c0
    for s, *_ in paths.values():
        s.close()
    n = len(times[OWN])
    med = {k: statistics.median(v) for k, v in times.items()}
    p99 = {k: pct(v, 99) for k, v in times.items()}
    per = {k: cpu[k] / n for k in paths if paths[k][3]}
    rows = [
        Row(f"own address: cached-token request, median ({n} each, in blocks of {BLOCK}, interleaved)", ms(med[OWN]),
            f"proxied {ms(med[PROXIED])}; bare mitmdump {ms(med[BARE])}; no proxy {ms(med[NONE])}",
            f"{med[OWN] / med[PROXIED]:.3f}x proxied, {med[OWN] / med[BARE]:.3f}x bare", "", None),
        Row("own address: cached-token request, p99", ms(p99[OWN]),
            f"proxied {ms(p99[PROXIED])}; bare mitmdump {ms(p99[BARE])}",
            f"{p99[OWN] / p99[PROXIED]:.3f}x proxied, {p99[OWN] / p99[BARE]:.3f}x bare", "", None),
        Row("own address: proxy process CPU per request (/proc/PID/stat)", f"{per[OWN] * 1e6:,.0f} us",
            f"proxied {per[PROXIED] * 1e6:,.0f} us; bare mitmdump {per[BARE] * 1e6:,.0f} us",
            f"{per[OWN] / per[PROXIED]:.3f}x proxied ({(per[OWN] - per[PROXIED]) * 1e6:+,.0f} us)", "", None),
    ]
    return rows, {"median": med, "p99": p99, "cpu": per, "n": n}
