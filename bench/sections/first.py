"""Concurrent first requests: N new users at once while the token endpoint is slow (single-flight, no pile-up)."""

from __future__ import annotations

import concurrent.futures
import secrets
import threading
import time

from tests.harness import Mitmdump

from .common import BOT, Row, session, tagged


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
