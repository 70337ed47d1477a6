"""accounting.py through a real mitmdump running the bundle (addons/coze.py, where Accounting is one of the
addons), against the Coze stand-in; usage is read back from http://coze.mitm/metrics.

The bundle's auth addon marks each flow it injected with flow.metadata["coze_user"]; Accounting counts
from there. (tests/test_team.py covers logins, budgets and the status pages end to end.)
"""

from __future__ import annotations

import json
import logging
import sqlite3

import pytest

from prometheus_client.parser import text_string_to_metric_families

from coze_mitm.options import OptionsOnly
from tests.clients import session, tagged

PAGE = "https://chat.example.org"
ALICE = "alice-0001"
BOB = "bob-000002"


def start(mitmdump, config_file, usage_file):
    return mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}", "connection_strategy=lazy",
                    f"coze_usage_file={usage_file}")


def read_metrics(proxy) -> dict:
    text = session(proxy).get("http://coze.mitm/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def streamed_chat(proxy, standin, user, text):
    """A streamed /v3/chat; returns (token_count the client saw, chat status at the first delta)."""
    body = {"bot_id": "7000", "user_id": user, "stream": True,
            "additional_messages": [{"role": "user", "content": text, "content_type": "text"}]}
    r = session(proxy).post(f"{standin.base_url}/v3/chat", headers=tagged(user, origin=None), json=body,
                            stream=True, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    event, at_first_delta, tokens = None, None, None
    for line in r.iter_lines():
        if line.startswith(b"event:"):
            event = line[6:].decode()
        elif line.startswith(b"data:") and event == "conversation.message.delta" and at_first_delta is None:
            at_first_delta = [c["status"] for c in standin.chats_of() if c["user_id"] == user][-1]
        elif line.startswith(b"data:") and event == "conversation.chat.completed":
            tokens = json.loads(line[5:])["usage"]["token_count"]
    return tokens, at_first_delta


def test_streamed_chat_counted_exactly_and_still_streamed(mitmdump, config_file, standin, tmp_path):
    standin.delta_gap = 0.05
    proxy = start(mitmdump, config_file, tmp_path / "usage.sqlite")
    tokens1, status1 = streamed_chat(proxy, standin, ALICE, "one two three four five six")
    tokens2, _ = streamed_chat(proxy, standin, ALICE, "and again")
    # The first delta reached the client while Coze was still producing the reply: not buffered.
    assert status1 == "in_progress"
    m = read_metrics(proxy)
    assert m[("coze_mitm_tokens_total", (("user", ALICE),))] == tokens1 + tokens2
    assert m[("coze_mitm_chats_total", (("user", ALICE),))] == 2
    assert m[("coze_mitm_usage_store_ok", ())] == 1


def test_non_streamed_chat_and_retrieve_count_once(mitmdump, config_file, standin, tmp_path):
    proxy = start(mitmdump, config_file, tmp_path / "usage.sqlite")
    s = session(proxy)
    body = {"bot_id": "7000", "user_id": BOB, "stream": False,
            "additional_messages": [{"role": "user", "content": "hello you", "content_type": "text"}]}
    chat = s.post(f"{standin.base_url}/v3/chat", headers=tagged(BOB, origin=None), json=body, timeout=30).json()["data"]
    seen = []
    for _ in range(3):  # a client polling retrieve after completion: the chat's usage counts once
        r = s.get(f"{standin.base_url}/v3/chat/retrieve", headers=tagged(BOB, origin=None), timeout=30,
                  params={"conversation_id": chat["conversation_id"], "chat_id": chat["id"]})
        seen.append(r.json()["data"]["usage"]["token_count"])
    assert seen[0] > 0 and len(set(seen)) == 1
    m = read_metrics(proxy)
    assert m[("coze_mitm_tokens_total", (("user", BOB),))] == seen[0]
    assert m[("coze_mitm_chats_total", (("user", BOB),))] == 1


def test_restart_keeps_usage(mitmdump, config_file, standin, tmp_path):
    standin.delta_gap = 0
    usage_file = tmp_path / "usage.sqlite"
    proxy = start(mitmdump, config_file, usage_file)
    tokens, _ = streamed_chat(proxy, standin, ALICE, "remember me")
    proxy.stop()  # mitmdump's done hook writes what is pending
    with sqlite3.connect(usage_file) as db:
        assert db.execute("SELECT user, chats, tokens FROM usage").fetchall() == [(ALICE, 1, tokens)]
    again = start(mitmdump, config_file, usage_file)
    m = read_metrics(again)
    assert m[("coze_mitm_tokens_total", (("user", ALICE),))] == tokens
    assert m[("coze_mitm_tokens_today", (("user", ALICE),))] == tokens


def test_corrupt_usage_file_is_one_warning_and_the_proxy_serves(mitmdump, config_file, standin, tmp_path):
    usage_file = tmp_path / "usage.sqlite"
    usage_file.write_bytes(b"garbage " * 1000)
    proxy = start(mitmdump, config_file, usage_file)
    assert proxy.wait_for_output(r"usage file .* cannot be used \(DatabaseError: file is not a database\)")
    tokens, _ = streamed_chat(proxy, standin, ALICE, "still counted")
    m = read_metrics(proxy)
    assert m[("coze_mitm_tokens_total", (("user", ALICE),))] == tokens
    assert m[("coze_mitm_usage_store_ok", ())] == 0
    assert proxy.output.count("cannot be used") == 1


class TestOptions:
    def test_negative_budget_is_refused(self, tmp_path, caplog):
        from mitmproxy.test import taddons

        from coze_mitm.parts.accounting import Accounting

        acc = Accounting()
        with taddons.context(OptionsOnly(), acc) as tctx:
            tctx.configure(acc, confdir=str(tmp_path), coze_usage_file="memory")
            tctx.configure(acc, coze_user_daily_tokens=500)
            with caplog.at_level(logging.ERROR):
                tctx.configure(acc, coze_user_daily_tokens=-1)
            # one error line (at start-up it stops mitmdump), and the last good budget stays
            assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
                "coze-mitm: coze_user_daily_tokens must be 0 (no budget) or a number of tokens per user and day"]
            assert acc.daily_tokens == 500 and acc.store is None
        assert list(tmp_path.iterdir()) == []  # "memory": no file

    @pytest.mark.process
    def test_negative_budget_stops_a_real_mitmdump(self, tmp_path, config_file):
        from tests.harness import Mitmdump

        proc = Mitmdump(tmp_path, [f"coze_config={config_file}", "coze_user_daily_tokens=-5"])
        assert proc.run_to_exit() == 1
        assert "coze_user_daily_tokens must be 0 (no budget)" in proc.output
        assert "listening at" not in proc.output and "Error logged during startup" not in proc.output  # a quiet failing start
        assert "Traceback" not in proc.output

    def test_demo_users_stay_out_of_later_runs(self, tmp_path):
        """coze_demo without a named file: usage in memory only; a later run with the same confdir starts empty."""
        from mitmproxy.test import taddons

        from coze_mitm.parts.accounting import Accounting

        demo_run = Accounting()
        with taddons.context(OptionsOnly(), demo_run) as tctx:
            tctx.configure(demo_run, confdir=str(tmp_path), coze_demo=True)
            assert demo_run.store is None
            demo_run.book.tokens("sandbox-user-0001", 7)
            demo_run.done()
        assert not (tmp_path / "coze-mitm-usage.sqlite").exists() and list(tmp_path.glob("*.sqlite")) == []
        later = Accounting()
        with taddons.context(OptionsOnly(), later) as tctx:
            tctx.configure(later, confdir=str(tmp_path))
            assert later.store is not None and later.book.rows() == []
            later.done()
        named = Accounting()  # an explicit file is used even in the demo
        with taddons.context(OptionsOnly(), named) as tctx:
            tctx.configure(named, confdir=str(tmp_path), coze_demo=True, coze_usage_file=str(tmp_path / "d.sqlite"))
            assert named.store is not None and named.store.path == tmp_path / "d.sqlite"
            named.done()

    def test_default_file_is_in_the_confdir(self, tmp_path):
        from mitmproxy.test import taddons

        from coze_mitm.parts.accounting import Accounting

        acc = Accounting()
        with taddons.context(OptionsOnly(), acc) as tctx:
            tctx.configure(acc, confdir=str(tmp_path))
            acc.book.tokens("login:alice", 5)
            acc.done()
        assert (tmp_path / "coze-mitm-usage.sqlite").is_file()
        with sqlite3.connect(tmp_path / "coze-mitm-usage.sqlite") as db:
            assert db.execute("SELECT user, tokens FROM usage").fetchall() == [("login:alice", 5)]
