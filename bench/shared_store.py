"""coze-mitm benchmark, the shared store (issue 28): what a budgeted chat start costs with Redis against SQLite,
and how many requests per second two proxies sharing one Redis sustain against one.

    python bench/shared_store.py                # ~2 min; prints the figures (docs/benchmarks.md quotes them)
    python bench/shared_store.py --rounds 300 --seconds 5    # shorter

Needs Debian's redis-server and the Python package redis. Everything runs on this machine against the local
Coze stand-in (sandbox/, not Coze), Redis on loopback with the persistence docs/team.md recommends
(appendonly, appendfsync always):

1. the decision alone, in process: the SQLite store's budget check + in-flight count (memory only: SQLite is
   written by its own thread) against one Redis round trip of the reserve script; wall time per decision, and
   the CPU the event loop's thread spends on it (what no other flow can use meanwhile), both when the loop
   runs decisions back to back and when it idles 3 ms between them (as a proxy between chats: colder caches);
2. round trips per chat: Redis' MONITOR while one client sends budgeted non-streamed /v3/chat one after the
   other through a proxy with the Redis store; every command a proxy sends (not those a script runs inside
   Redis), the scripts told apart by their SHA;
3. end to end: budgeted non-streamed /v3/chat through a real mitmdump with coze_usage_file=<sqlite file>
   and one with coze_usage_file=redis://..., interleaved, client-measured latency: the difference of the
   medians, and the median of each round's difference (its two chats back to back, so the machine's other load
   falls on both);
4. throughput: client threads sending budgeted chats of 32 users for N seconds through one proxy, then split
   over two proxies sharing the Redis; with --pin (Linux) proxy A runs on CPU 0 and proxy B on CPU 1. Each
   proxy's and Redis' CPU per request (/proc/PID/stat) say what one proxy core and one Redis core can carry,
   which requests per second on this shared 2-core machine cannot.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "addons"))

from bench.sections.common import cpu_seconds, load_average, machine, no_nagle, pct, session  # noqa: E402
from coze_mitm.core import usage_redis  # noqa: E402
from coze_mitm.core.usage_book import UsageBook, budget_refusal, utc_day  # noqa: E402
from coze_mitm.core.usage_flight import InFlight  # noqa: E402
from sandbox.coze_standin import make_sandbox_app, write_config  # noqa: E402
from tests import redis_server  # noqa: E402
from tests.harness import Mitmdump  # noqa: E402

PAGE = "https://chat.example.org"
USERS = [f"1732000000000-benchUser{i:04d}" for i in range(32)]


def chat_body(user: str) -> dict:
    return {"bot_id": "7000", "user_id": user, "stream": False,
            "additional_messages": [{"role": "user", "content": "one two", "content_type": "text"}]}


def headers(user: str) -> dict:
    return {"Authorization": f"Bearer user:{user}", "Content-Type": "application/json"}


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us"


# -- 1. the decision alone ------------------------------------------------------------------------------
def decision_cost(server, rounds: int) -> dict:
    book, flight = UsageBook(), InFlight()
    t0, c0 = time.perf_counter(), time.thread_time()
    for i in range(rounds):
        budget_refusal(book, USERS[i % 32], "u", 10**9, "POST", "/v3/chat")
        flight.count(USERS[i % 32])
        flight.add(str(i), USERS[i % 32])
        flight.release_all(str(i))
    sqlite_wall, sqlite_cpu = (time.perf_counter() - t0) / rounds, (time.thread_time() - c0) / rounds

    async def redis_rounds(idle: float):
        store = usage_redis.RedisUsageStore(server.url, environ={usage_redis.PASSWORD_ENV: server.password},
                                            on_error=print, on_info=lambda _line: None)
        store.load(utc_day(time.time()))
        day = utc_day(time.time())
        for _ in range(50):  # connection up, scripts loaded
            await store.reserve(USERS[0], day, 10**9, 0, "")
        walls, cpus = [], []
        for i in range(rounds):
            if idle:
                await asyncio.sleep(idle)
            member = store.new_member()
            t, c = time.perf_counter(), time.thread_time()
            await store.reserve(USERS[i % 32], day, 10**9, 4, member)
            cpus.append(time.thread_time() - c)
            walls.append(time.perf_counter() - t)
            store.release(member)  # written by the store's task, in the background (not timed)
        await store.aclose()
        return walls, cpus

    out = {"sqlite_wall": sqlite_wall, "sqlite_cpu": sqlite_cpu}
    for policy in ("always", "everysec"):
        server.client().config_set("appendfsync", policy)
        walls, cpus = asyncio.run(redis_rounds(0))
        out[policy] = (statistics.median(walls), pct(walls, 99), statistics.fmean(cpus))
    walls, cpus = asyncio.run(redis_rounds(0.003))  # everysec
    out["idle"] = (statistics.median(walls), pct(walls, 99), statistics.median(cpus))
    server.client().config_set("appendfsync", "always")
    return out


# -- 2. round trips per chat ------------------------------------------------------------------------------
def round_trips(server, proxy, base: str, chats: int) -> dict:
    """Commands the proxies sent Redis per budgeted chat, by kind (MONITOR; scripts by their SHA)."""
    import threading

    import redis

    names = {server.client().script_load(src): name for name, src in (
        ("reserve (awaited by the chat)", usage_redis.RESERVE), ("apply (usage and ended chats, gathered)", usage_redis.APPLY),
        ("renew", usage_redis.RENEW), ("admit", usage_redis.ADMIT))}
    s = session(proxy)
    seen: dict[str, int] = {}
    ready, stop = threading.Event(), threading.Event()

    def watch():
        with redis.Redis(host="127.0.0.1", port=server.port, password=server.password).monitor() as monitor:
            ready.set()
            for command in monitor.listen():
                if command.get("client_type") == "lua":
                    continue  # run by a script inside Redis: no round trip
                words = command["command"].split()
                kind = words[0].upper()
                if kind == "EVALSHA":
                    kind = names.get(words[1].strip('"'), "EVALSHA (other)")
                if kind == "MONITOR":
                    continue
                if stop.is_set() and kind == "ECHO" and "coze-bench-end" in command["command"]:
                    return
                seen[kind] = seen.get(kind, 0) + 1

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    ready.wait(10)
    time.sleep(0.2)
    seen.clear()
    started = time.perf_counter()
    for i in range(chats):
        user = USERS[i % 32]
        r = s.post(f"{base}/v3/chat", headers=headers(user), json=chat_body(user), timeout=10)
        assert r.status_code == 200 and r.json()["code"] == 0, r.text
    elapsed = time.perf_counter() - started
    time.sleep(0.1)  # the last gathered write
    stop.set()
    server.client().echo("coze-bench-end")
    thread.join(10)
    return {"chats": chats, "seconds": elapsed, "per_chat": {k: v / chats for k, v in sorted(seen.items())}}


# -- 3. end to end -----------------------------------------------------------------------------------------
def end_to_end(sqlite_proxy, redis_proxy, base: str, rounds: int) -> dict:
    times = {"sqlite": [], "redis": []}
    clients = {"sqlite": session(sqlite_proxy), "redis": session(redis_proxy)}
    for i in range(rounds + 50):
        for name in (("sqlite", "redis") if i % 2 else ("redis", "sqlite")):
            user = USERS[i % 32]
            t = time.perf_counter()
            r = clients[name].post(f"{base}/v3/chat", headers=headers(user), json=chat_body(user), timeout=10)
            elapsed = time.perf_counter() - t
            assert r.status_code == 200 and r.json()["code"] == 0, r.text
            if i >= 50:  # the first rounds mint tokens and open connections
                times[name].append(elapsed)
    out = {name: (statistics.median(v), pct(v, 99)) for name, v in times.items()}
    # Each round's two chats ran back to back (same user, the order alternating): their difference is free of
    # whatever the machine's other load did between rounds, which moves both medians alike but not equally.
    pairs = sorted(r - q for r, q in zip(times["redis"], times["sqlite"]))
    out["paired"] = (statistics.median(pairs), pairs[len(pairs) // 4], pairs[3 * len(pairs) // 4])
    return out


# -- 4. throughput -------------------------------------------------------------------------------------------
def throughput(proxies, base: str, seconds: float, clients: int, redis_pid: int) -> tuple[float, list[float], float]:
    """(requests/s, each proxy's CPU seconds per request it served, Redis' CPU seconds per request)."""
    stop = time.monotonic() + seconds
    counts = [0] * clients
    cpu0 = [cpu_seconds(p.proc.pid) for p in proxies]
    redis0 = cpu_seconds(redis_pid)

    def client(n: int):
        s = session(proxies[n % len(proxies)])
        user = USERS[n % 32]
        while time.monotonic() < stop:
            r = s.post(f"{base}/v3/chat", headers=headers(user), json=chat_body(user), timeout=10)
            assert r.status_code == 200 and r.json()["code"] == 0, r.text
            counts[n] += 1

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    served = [sum(counts[n] for n in range(clients) if n % len(proxies) == i) for i in range(len(proxies))]
    per_proxy = [(cpu_seconds(p.proc.pid) - c) / max(1, served[i]) for i, (p, c) in enumerate(zip(proxies, cpu0))]
    return sum(counts) / seconds, per_proxy, (cpu_seconds(redis_pid) - redis0) / max(1, sum(counts))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/shared_store.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1000, help="decisions / chats per store (default 1000)")
    p.add_argument("--seconds", type=float, default=15, help="length of each throughput run (default 15)")
    p.add_argument("--clients", type=int, default=16, help="client threads in the throughput runs (default 16)")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=hasattr(os, "sched_setaffinity"),
                   help="throughput: proxy A on CPU 0, proxy B on CPU 1 (Linux; default there)")
    args = p.parse_args(argv)
    if redis_server.binary() is None or usage_redis.redis_available():
        print("needs redis-server (apt-get install redis-server) and the Python package redis")
        return 1
    print(f"== {machine()}")
    print(f"load average at start: {load_average()}")
    standin, app_config = make_sandbox_app(delta_gap=0)
    no_nagle(standin)
    standin.start()
    started = []
    with tempfile.TemporaryDirectory(prefix="coze-bench-redis-") as tmp:
        work = Path(tmp)
        server = redis_server.RedisServer(work / "redis").start()
        try:
            d = decision_cost(server, args.rounds)
            print(f"decision alone ({args.rounds} rounds): SQLite store {us(d['sqlite_wall'])} "
                  f"(loop CPU {us(d['sqlite_cpu'])}); " + "; ".join(
                      f"Redis reserve, appendfsync {policy}: median {us(d[policy][0])}, p99 {us(d[policy][1])} "
                      f"(loop CPU {us(d[policy][2])})" for policy in ("always", "everysec")) +
                  f"; everysec with 3 ms idle before each: median {us(d['idle'][0])}, p99 {us(d['idle'][1])} "
                  f"(loop CPU median {us(d['idle'][2])})")
            config_path = work / "oauth.json"
            write_config(str(config_path), app_config)
            common = [f"coze_config={config_path}", f"coze_origins={PAGE}", "coze_user_daily_tokens=1000000000",
                      "coze_new_users_per_minute=0"]

            def proxy(name: str, store: str) -> Mitmdump:
                confdir = work / name
                confdir.mkdir()
                m = Mitmdump(confdir, [*common, f"coze_usage_file={store}"])
                started.append(m)
                m.start()
                return m

            os.environ[usage_redis.PASSWORD_ENV] = server.password  # the proxies read it from there
            sqlite_proxy = proxy("sqlite", str(work / "usage.sqlite"))
            redis_a = proxy("redis-a", server.url)
            redis_b = proxy("redis-b", server.url)
            assert redis_a.wait_for_output("shared through", 20) and redis_b.wait_for_output("shared through", 20)
            server.client().config_set("appendfsync", "everysec")
            for i in range(64):  # tokens minted, connections open
                user = USERS[i % 32]
                session(redis_a).post(f"{standin.base_url}/v3/chat", headers=headers(user), json=chat_body(user), timeout=10)
            rt = round_trips(server, redis_a, standin.base_url, 300)
            print(f"round trips per budgeted non-streamed /v3/chat ({rt['chats']} one after the other, "
                  f"{rt['seconds'] / rt['chats'] * 1000:.2f} ms each, commands a proxy sent, MONITOR): " +
                  "; ".join(f"{k} {v:.2f}" for k, v in rt["per_chat"].items()))
            for policy in ("always", "everysec"):
                server.client().config_set("appendfsync", policy)
                e = end_to_end(sqlite_proxy, redis_a, standin.base_url, args.rounds)
                print(f"budgeted chat start end to end, appendfsync {policy} ({args.rounds} each, interleaved): "
                      f"SQLite median {e['sqlite'][0] * 1000:.3f} ms p99 {e['sqlite'][1] * 1000:.3f} ms; Redis median "
                      f"{e['redis'][0] * 1000:.3f} ms p99 {e['redis'][1] * 1000:.3f} ms; difference of medians "
                      f"{(e['redis'][0] - e['sqlite'][0]) * 1000:+.3f} ms; median of each round's difference "
                      f"{e['paired'][0] * 1000:+.3f} ms (quartiles {e['paired'][1] * 1000:+.3f} / "
                      f"{e['paired'][2] * 1000:+.3f} ms) (target: within 0.2 ms)")
            server.client().config_set("appendfsync", "everysec")
            pinned = ""
            if args.pin and len(os.sched_getaffinity(0)) >= 2:
                cpus = sorted(os.sched_getaffinity(0))
                os.sched_setaffinity(sqlite_proxy.proc.pid, {cpus[0]})
                os.sched_setaffinity(redis_a.proc.pid, {cpus[0]})
                os.sched_setaffinity(redis_b.proc.pid, {cpus[1]})
                pinned = f"; SQLite proxy and proxy A pinned to CPU {cpus[0]}, proxy B to CPU {cpus[1]}"
            runs: dict[str, list] = {"sqlite": [], "one": [], "two": []}
            slice_s = args.seconds / 3
            rpid = server.proc.pid
            for _ in range(3):  # interleaved thirds: the machine's other load falls on all three alike
                runs["sqlite"].append(throughput([sqlite_proxy], standin.base_url, slice_s, args.clients, rpid))
                runs["one"].append(throughput([redis_a], standin.base_url, slice_s, args.clients, rpid))
                runs["two"].append(throughput([redis_a, redis_b], standin.base_url, slice_s, args.clients, rpid))
            sq, one, two = (statistics.median(r[0] for r in runs[k]) for k in ("sqlite", "one", "two"))

            def cpu(kind: str, i: int) -> float:
                return statistics.median(r[1][i] for r in runs[kind])

            def redis_cpu(kind: str) -> float:
                return statistics.median(r[2] for r in runs[kind])
            print(f"throughput (appendfsync everysec), {args.clients} client threads, 3 x {slice_s:g} s each, medians"
                  f"{pinned}: one proxy (SQLite) {sq:.0f} req/s; one proxy (Redis) {one:.0f} req/s; two proxies "
                  f"sharing the Redis {two:.0f} req/s ({two / one:.2f}x one); all: "
                  f"{ {k: [round(r[0]) for r in v] for k, v in runs.items()} }")
            print(f"CPU per request (medians of the thirds): SQLite proxy {us(cpu('sqlite', 0))}; one Redis proxy "
                  f"{us(cpu('one', 0))} + Redis {us(redis_cpu('one'))}; two proxies A {us(cpu('two', 0))}, "
                  f"B {us(cpu('two', 1))} + Redis {us(redis_cpu('two'))}. So one proxy core carries about "
                  f"{1 / cpu('sqlite', 0):.0f} req/s with SQLite, {1 / cpu('one', 0):.0f} with Redis; one Redis core "
                  f"about {1 / redis_cpu('two'):.0f} req/s for all proxies together")
        finally:
            print(f"load average at end: {load_average()}")
            for m in started:
                m.stop()
            server.stop()
            standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
