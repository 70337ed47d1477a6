"""What the proxy parses on mitmproxy's event loop stays small (docs/decisions.md, "JSON read on the event
loop"): a workflow run body or a WebSocket client event that would cost Python's parser a lot (many values,
e.g. MiBs of nested arrays) is not parsed; under a budget it is refused with a message naming the limit,
without one it passes uncounted, as an unreadable one always did. Long strings stay readable.

In-process and timing-free: the parse is observed by counting the JSON decoder's calls.
"""

from __future__ import annotations

import json

import pytest
from mitmproxy.test import taddons, tflow

from coze_mitm.core import go_reading
from coze_mitm.flowmeta import COZE_USER
from coze_mitm.options import OptionsOnly
from coze_mitm.parts.accounting import Accounting

USER = "on-loop-user"
NESTED = b",".join([b"[" * 100 + b"]" * 100] * (1024 * 1024 // 201))  # ~1 MiB of arrays 100 deep: costly
LONG_TEXT = "a line of text\n" * (512 * 1024 // 15)  # ~512 KiB of text with escapes, few values: cheap


@pytest.fixture
def parses(monkeypatch):
    """How many times the JSON parser ran."""
    calls = []
    real = go_reading._DECODER

    class Counting:
        def decode(self, text):
            calls.append(len(text))
            return real.decode(text)

    monkeypatch.setattr(go_reading, "_DECODER", Counting())
    return calls


# -- go_reading --------------------------------------------------------------------------------------------
def test_costly_input_is_refused_before_it_is_parsed(parses):
    raw = b'{"event_type":"conversation.message.create","x":[' + NESTED + b"]}"
    assert not go_reading.cheap_to_read(raw)
    with pytest.raises(go_reading.Unreadable, match="over 64 KiB with 4096 JSON values or more"):
        go_reading.read_object(raw)
    assert parses == []


def test_anything_up_to_64_kib_is_read_and_a_bigger_input_with_few_values_too(parses):
    small = b'{"x":[' + b",".join([b"[[]]"] * 13000) + b"]}"  # < 64 KiB, many values
    assert len(small) <= go_reading.ON_LOOP_BYTES and go_reading.read_object(small)["x"][0] == [[]]
    big = json.dumps({"event_type": "conversation.message.create", "text": LONG_TEXT}).encode()
    assert go_reading.read_object(big)["text"] == LONG_TEXT
    assert len(parses) == 2


def test_a_big_input_is_still_refused_past_the_nesting_bound():
    # Over 64 KiB the depth is walked, not counted on brackets: the bound holds all the same.
    head = json.dumps({"text": LONG_TEXT, "many": [[] for _ in range(400)]})[:-1].encode()
    assert go_reading.read_object(head + b',"x":' + b"[" * 127 + b"]" * 127 + b"}")["text"] == LONG_TEXT
    with pytest.raises(go_reading.Unreadable, match="deeper than 128"):
        go_reading.read_object(head + b',"x":' + b"[" * 128 + b"]" * 128 + b"}")


# -- the budget's workflow run check ---------------------------------------------------------------------
@pytest.fixture
def budgeted(tmp_path):
    acc = Accounting()
    with taddons.context(OptionsOnly(), acc) as tctx:
        tctx.configure(acc, confdir=str(tmp_path), coze_usage_file="memory", coze_user_daily_tokens=100000)
        yield acc


def workflow_run(body: bytes):
    flow = tflow.tflow()
    flow.request.method, flow.request.path = "POST", "/v1/workflow/run"
    flow.request.headers["content-type"] = "application/json"
    flow.request.content = body
    return flow


def test_a_costly_workflow_run_is_refused_naming_the_limit_unparsed(budgeted, parses):
    flow = workflow_run(b'{"workflow_id":"7001","is_async":false,"parameters":{"x":[' + NESTED + b"]}}")
    status, code, _, msg, _ = budgeted.budget_refusal(flow, USER, "user")
    assert (status, code) == (400, 4000) and "64 KiB" in msg and "stream_run" in msg
    assert parses == []


def test_a_big_workflow_run_with_few_values_is_read(budgeted, parses):
    body = {"workflow_id": "7001", "parameters": {"text": LONG_TEXT}}
    assert budgeted.budget_refusal(workflow_run(json.dumps(body | {"is_async": False}).encode()), USER, "user") is None
    status, code, _, msg, _ = budgeted.budget_refusal(
        workflow_run(json.dumps(body | {"is_async": True}).encode()), USER, "user")
    assert code == 4000 and "asks to run asynchronously" in msg
    assert len(parses) == 2


# -- WebSocket client events -----------------------------------------------------------------------------
def client_event(acc: Accounting, content: bytes):
    flow = tflow.twebsocketflow(messages=False)
    flow.request.path = "/v1/chat"
    flow.metadata[COZE_USER] = USER
    flow.websocket.messages.append(tflow.websocket.WebSocketMessage(1, True, content))
    refused = []
    original = acc._refuse_event

    def refuse(f, message, code, msg):
        refused.append((code, msg))
        original(f, message, code, msg)

    acc._refuse_event = refuse
    acc.websocket_message(flow)
    del acc._refuse_event
    return flow.websocket.messages[-1], refused


COSTLY_EVENT = b'{"event_type":"conversation.message.create","x":"\\u0041","y":[' + NESTED + b"]}"
BIG_CHAT = json.dumps({"event_type": "conversation.message.create", "data": {"content": LONG_TEXT}}).encode()


def test_without_a_budget_a_costly_event_passes_unparsed_and_a_big_chat_start_is_counted(tmp_path, parses):
    acc = Accounting()
    with taddons.context(OptionsOnly(), acc) as tctx:
        tctx.configure(acc, confdir=str(tmp_path), coze_usage_file="memory")
        message, refused = client_event(acc, COSTLY_EVENT)
        assert not message.dropped and refused == [] and parses == []
        assert acc.book.rows() == []
        message, _ = client_event(acc, BIG_CHAT)
        assert not message.dropped and [r["chats"] for r in acc.book.rows()] == [1]


def test_with_a_budget_a_costly_event_is_refused_naming_the_limit_unparsed(budgeted, parses):
    message, refused = client_event(budgeted, COSTLY_EVENT)
    assert message.dropped and len(refused) == 1
    code, msg = refused[0]
    assert code == 4000 and "64 KiB" in msg
    assert parses == [] and budgeted.book.rows() == []
    message, refused = client_event(budgeted, BIG_CHAT)  # a long message is read, counted and forwarded
    assert not message.dropped and refused == [] and [r["chats"] for r in budgeted.book.rows()] == [1]
