"""Benchmark-only client for "many open streams" (python bench/run.py): N streamed chats at once.

Runs in its own process so its CPU is its own (the stand-in serving the streams runs in bench/run.py's
process) and one asyncio loop with raw sockets: no thread per stream, no HTTP library per chunk, so on a
2-core machine the client is not what spaces the deltas out. It reports its own CPU time and how late its
event loop ran (a 10 ms ticker), which show whether it kept up.

    python bench/streams_client.py < spec.json   # prints "OPEN" when every stream has its first delta,
                                                   # then one JSON line with the figures

spec: {"target": [host, port], "path": "/v3/chat", "body": {...}, "ramp": seconds over which the streams start,
       "groups": [{"name": ..., "proxy": [host, port] or null, "headers": [{...} per stream]}, ...]}
Groups run at the same time (stream i of every group starts together); the figures are per group.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time

DELTA = b"event:conversation.message.delta"
DONE = b"event:done"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


async def one_stream(i: int, spec: dict, group: dict, start_at: float, result: dict, first_seen: asyncio.Event,
                     state: dict) -> None:
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    host, port = group["proxy"] or spec["target"]
    thost, tport = spec["target"]
    body = json.dumps(spec["body"]).encode()
    # Through an HTTP proxy the request line carries the absolute URL; direct, the path.
    target = f"http://{thost}:{tport}{spec['path']}" if group["proxy"] else spec["path"]
    head = [f"POST {target} HTTP/1.1", f"Host: {thost}:{tport}", f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in group["headers"][i].items()]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    arrivals: list[float] = []
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:  # like a browser: TCP_NODELAY (see run.py's NoDelayAdapter)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(request)
        await writer.drain()
        header = await reader.readuntil(b"\r\n\r\n")
        status = header.split(b" ", 2)[1]
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()}: {(header + await reader.read(300))[:300]!r}")
        tail = b""
        while True:
            data = await reader.read(65536)
            now = time.perf_counter()
            if not data:
                break
            seen = tail + data
            n = seen.count(DELTA)
            if n:
                if not arrivals:
                    state["first"] += 1
                    if state["first"] == state["n"]:
                        first_seen.set()
                arrivals.extend([now] * n)
            if DONE in seen:
                break
            # A marker split across reads is counted once, in the read that completes it (the marker has no
            # prefix that is also its suffix, so a kept tail never recounts one already counted).
            tail = seen[-(len(DELTA) - 1):]
        writer.close()
    except Exception as e:  # noqa: BLE001 - a failed stream is a figure, not a crash
        result["errors"].append(f"{type(e).__name__}: {e}"[:200])
        if not arrivals:
            state["first"] += 1
            if state["first"] == state["n"]:
                first_seen.set()
        return
    if arrivals:
        result["first"].append(arrivals[0] - t0)
        result["gaps"].extend(b - a for a, b in zip(arrivals, arrivals[1:]))
        result["deltas"] += len(arrivals)
        result["ok"] += 1


async def ticker(lags: list[float], stop: asyncio.Event) -> None:
    """How late the loop wakes for a 10 ms sleep: a busy client shows here first."""
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.01)
        lags.append(time.perf_counter() - t - 0.01)


async def main_async(spec: dict) -> dict:
    groups = spec["groups"]
    n = max(len(g["headers"]) for g in groups)
    results = {g["name"]: {"first": [], "gaps": [], "deltas": 0, "ok": 0, "errors": []} for g in groups}
    state = {"first": 0, "n": sum(len(g["headers"]) for g in groups)}
    first_seen = asyncio.Event()
    lags: list[float] = []
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(lags, stop))
    t_start = time.perf_counter()
    ramp = float(spec.get("ramp", 2.0))
    tasks = [asyncio.create_task(one_stream(i, spec, g, t_start + ramp * i / n, results[g["name"]], first_seen, state))
             for i in range(n) for g in groups if i < len(g["headers"])]

    async def announce() -> None:
        await first_seen.wait()
        print("OPEN", flush=True)

    ann = asyncio.create_task(announce())
    await asyncio.gather(*tasks)
    ann.cancel()
    stop.set()
    await tick
    out = {"wall": time.perf_counter() - t_start, "loop_lag_p99": pct(lags, 99),
           "loop_lag_max": max(lags, default=float("nan")), "groups": {}}
    for g in groups:
        r = results[g["name"]]
        out["groups"][g["name"]] = {
            "streams": len(g["headers"]), "ok": r["ok"], "deltas": r["deltas"], "errors": r["errors"][:5],
            "n_errors": len(r["errors"]),
            "first_median": pct(r["first"], 50), "first_p99": pct(r["first"], 99),
            "gap_median": pct(r["gaps"], 50), "gap_p99": pct(r["gaps"], 99),
            "gap_p999": pct(r["gaps"], 99.9), "gap_max": max(r["gaps"], default=float("nan")), "n_gaps": len(r["gaps"]),
            "gaps": [round(g, 6) for g in r["gaps"]],  # raw, so batches can be pooled
        }
    return out


def main() -> int:
    spec = json.load(sys.stdin)
    out = asyncio.run(main_async(spec))
    t = os.times()
    out["client_cpu"] = t.user + t.system
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
