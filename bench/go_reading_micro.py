"""Micro-benchmark: what reading requests as Coze's Go server does (core/go_reading.py) costs per decision.

    python bench/go_reading_micro.py

Each figure is the median of 7 timeit runs, in microseconds per call, on this process alone (no proxy):
the previous reading (Python's json, the raw path) beside the Go-style one, for the decisions the proxy makes
on every tagged answer, every budgeted chat start and every WebSocket client event; then the worst a client
can make one event cost (1 MiB of brackets, the most a budgeted user's event may be).
"""

from __future__ import annotations

import json
import statistics
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "addons"))

from coze_mitm.core import go_reading  # noqa: E402
from coze_mitm.core.usage_book import spends_tokens  # noqa: E402

EVENT = (b'{"id":"1","event_type":"conversation.message.create","data":{"role":"user","content_type":"text",'
         b'"content":"over the socket"}}')
AUDIO = b'{"id":"2","event_type":"input_audio_buffer.append","data":{"delta":"' + b"QUJD" * 16_000 + b'"}}'  # 64 KB
CHAT = b"/v3/chat?conversation_id=7441111111111111111"
BOT = b"/v1/bots/7000"


def us(fn, number: int) -> float:
    return statistics.median(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def old_route(path: str) -> str:  # what usage_book did before: no decoding, no cleaning
    return path.split("?", 1)[0].rstrip("/") or "/"


def old_spends(method: str, path: str) -> bool:
    route = old_route(path)
    return method.upper() == "POST" and any(route.endswith(p) for p in ("/v3/chat", "/v3/chat/submit_tool_outputs",
                                                                          "/v1/workflows/chat", "/v1/workflow/run"))


def main() -> None:
    rows = [
        ("every tagged answer: is it a chat/workflow/retrieve? (GET /v1/bots/7000)",
         us(lambda: b"/chat" not in BOT and b"/workflow/run" not in BOT, 200_000),
         us(lambda: go_reading.route(BOT).lower().endswith("/v3/chat/retrieve"), 200_000)),
        ("budgeted chat start over HTTP: does POST /v3/chat spend?",
         us(lambda: old_spends("POST", CHAT.decode()), 100_000), us(lambda: spends_tokens("POST", CHAT), 100_000)),
        ("... the same for /v3/%63hat (decoded, cleaned)", None, us(lambda: spends_tokens("POST", b"/v3/%63hat"), 100_000)),
        ("WebSocket chat start: read the event, its event_type",
         us(lambda: json.loads(EVENT).get("event_type"), 100_000),
         us(lambda: go_reading.field(go_reading.read_object(EVENT), "event_type"), 100_000)),
        ("WebSocket audio event of 64 KB", us(lambda: json.loads(AUDIO).get("event_type"), 2_000),
         us(lambda: go_reading.field(go_reading.read_object(AUDIO), "event_type"), 2_000)),
    ]
    brackets = b'{"x":[' + b",".join([b"[[]]"] * (1024 * 1024 // 5)) + b"]}"  # ~1 MiB of shallow arrays
    deep = b'{"x":' + b"[" * 2000 + b"]" * 2000 + b"}"

    def refused(raw):
        try:
            go_reading.read_object(raw)
        except go_reading.Unreadable:
            return True
        return False

    rows.append(("1 MiB of shallow arrays (refused unparsed: over 64 KiB with 4096+ values)", None, us(lambda: refused(brackets), 3)))
    rows.append(("... the same read by Python's json alone (what the proxy did before)", None,
                 us(lambda: json.loads(brackets), 3)))
    rows.append(("2,000-deep event (refused)", None, us(lambda: refused(deep), 2_000)))
    print(f"{'decision':78} {'before (us)':>12} {'Go-style (us)':>14}")
    for name, before, after in rows:
        print(f"{name:78} {'' if before is None else f'{before:12.2f}':>12} {after:14.2f}")


if __name__ == "__main__":
    main()
