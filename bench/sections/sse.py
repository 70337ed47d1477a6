"""SSE: first delta and gaps between deltas, bundle vs the one-hook streaming reference and direct."""

from __future__ import annotations

import random
import statistics
import time

import requests

from tests.harness import Mitmdump

from .common import CHAT_TEXT, DELTA_GAP, REFERENCE, Row, chat_body, ms, pct, session, tagged, with_token


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
