"""usage_book.py and usage_store.py: the per-user usage book, budgets, and the SQLite store (real files, real threads)."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from coze_mitm.core.usage import Usage
from coze_mitm.core.usage_book import OTHERS, UsageBook, budget_refusal, is_chat, next_utc_midnight, spends_tokens, utc_day
from coze_mitm.core.usage_store import SqliteUsageStore, default_path

T0 = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC
MIDNIGHT = next_utc_midnight(T0)


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


def store_at(path, **kw):
    errors = []
    store = SqliteUsageStore(path, on_error=errors.append, **kw)
    return store, errors


def db_rows(path):
    with sqlite3.connect(path) as db:
        return sorted(db.execute("SELECT user, day, chats, tokens FROM usage").fetchall())


class TestBook:
    def test_counts_chats_and_tokens_per_user(self):
        book = UsageBook(clock=Clock())
        book.chat("alice-0001")
        book.tokens("alice-0001", Usage(100, chat_id="c1"))
        book.chat("login:bob")
        book.chat("login:bob")
        book.tokens("login:bob", Usage(30, chat_id="c2"))
        book.tokens("login:bob", 5)  # a bare count (no chat id): always counted
        assert book.rows() == [
            {"user": "alice-0001", "chats": 1, "tokens": 100, "tokens_today": 100},
            {"user": "login:bob", "chats": 2, "tokens": 35, "tokens_today": 35},
        ]

    def test_one_chat_counts_once_even_if_reported_twice(self):
        # streamed, then polled with /v3/chat/retrieve: same chat id
        book = UsageBook(clock=Clock())
        assert book.tokens("u-00000001", Usage(50, chat_id="c1")) is True
        assert book.tokens("u-00000001", Usage(50, chat_id="c1")) is False
        assert book.tokens("u-00000002", Usage(50, chat_id="c1")) is True  # another user's chat
        assert [r["tokens"] for r in book.rows()] == [50, 50]

    def test_chat_id_memory_is_bounded(self):
        book = UsageBook(clock=Clock(), max_chat_ids=3)
        for i in range(10):
            book.tokens("u-00000001", Usage(1, chat_id=f"c{i}"))
        assert len(book._chat_ids) == len(book._chat_order) == 3
        assert book.tokens("u-00000001", Usage(1, chat_id="c9")) is False  # the newest are remembered
        assert book.tokens("u-00000001", Usage(1, chat_id="c0")) is True  # the oldest were let go

    def test_budget(self):
        clock = Clock()
        book = UsageBook(clock=clock)
        assert book.over_budget("u-00000001", 100) == (False, 0, MIDNIGHT)
        book.tokens("u-00000001", 99)
        assert book.over_budget("u-00000001", 100) == (False, 99, MIDNIGHT)
        # the chat that crosses the budget was allowed to start; its usage lands afterwards
        book.tokens("u-00000001", 60)
        assert book.over_budget("u-00000001", 100) == (True, 159, MIDNIGHT)
        assert book.over_budget("u-00000001", 0) == (False, 159, MIDNIGHT)  # 0 = no budget
        assert book.over_budget("u-00000002", 100) == (False, 0, MIDNIGHT)

    def test_day_rollover(self):
        clock = Clock()
        book = UsageBook(clock=clock)
        book.chat("u-00000001")
        book.tokens("u-00000001", 500)
        assert book.over_budget("u-00000001", 100)[0]
        clock.t = MIDNIGHT  # 00:00:00 UTC: a new day
        assert book.over_budget("u-00000001", 100) == (False, 0, MIDNIGHT + 86400)
        assert book.rows() == [{"user": "u-00000001", "chats": 1, "tokens": 500, "tokens_today": 0}]
        book.tokens("u-00000001", 7)
        assert book.rows()[0]["tokens_today"] == 7 and book.rows()[0]["tokens"] == 507

    def test_users_are_bounded_and_the_rest_folded(self):
        book = UsageBook(clock=Clock(), max_users=3)
        for i in range(6):
            book.chat(f"user-{i:04d}")
            book.tokens(f"user-{i:04d}", 10 * (i + 1))
        rows = book.rows()
        assert [r["user"] for r in rows] == ["user-0005", "user-0004", "user-0003", OTHERS]
        assert rows[-1] == {"user": OTHERS, "chats": 3, "tokens": 10 + 20 + 30, "tokens_today": 60}
        assert sum(r["tokens"] for r in rows) == sum(10 * (i + 1) for i in range(6))
        assert book.folded == 3

    def test_budget_look_does_not_refresh_a_user(self):
        book = UsageBook(clock=Clock(), max_users=2)
        book.chat("user-a-0001")
        book.chat("user-b-0001")
        book.over_budget("user-a-0001", 10)
        book.chat("user-c-0001")
        assert [r["user"] for r in book.rows()][-1] == OTHERS
        assert "user-a-0001" not in [r["user"] for r in book.rows()]


class TestSqliteStore:
    def test_restart_keeps_usage(self, tmp_path):
        path = default_path(tmp_path)
        clock = Clock()
        store, errors = store_at(path)
        book = UsageBook(store, clock=clock)
        assert book.load() == ""
        book.chat("alice-0001")
        book.tokens("alice-0001", Usage(120, chat_id="c1"))
        book.chat("login:bob")
        book.tokens("login:bob", 30)
        book.close()
        assert errors == []
        assert db_rows(path) == [("alice-0001", utc_day(T0), 1, 120), ("login:bob", utc_day(T0), 1, 30)]

        store2, errors2 = store_at(path)
        book2 = UsageBook(store2, clock=clock)
        assert book2.load() == ""
        assert book2.rows() == book.rows()
        assert book2.over_budget("alice-0001", 100) == (True, 120, MIDNIGHT)
        book2.tokens("alice-0001", 1)
        book2.close()
        assert errors2 == []
        assert db_rows(path)[0] == ("alice-0001", utc_day(T0), 1, 121)

    @pytest.mark.skipif(os.name != "posix", reason="POSIX file modes (Windows: the profile's ACL, docs/portability.md)")
    def test_file_owner_only_and_its_new_folder_too(self, tmp_path):
        """Issue 25 item 5: the usage file (who chatted how much) was 0644 in a 0755 folder."""
        old_umask = os.umask(0o022)  # what most shells have: files 0644, folders 0755 unless asked otherwise
        try:
            path = tmp_path / "made-here" / "deeper" / "u.sqlite"
            book = UsageBook(store_at(path)[0], clock=Clock())
            assert book.load() == ""
            book.chat("alice-0001")
            book.close()
            for made in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                if made.exists():
                    assert stat.S_IMODE(made.stat().st_mode) == 0o600, made
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
            assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
            # a usage file left readable by an older version is made owner-only before it is read
            old = tmp_path / "old.sqlite"
            sqlite3.connect(str(old)).close()
            old.chmod(0o644)
            store, errors = store_at(old)
            UsageBook(store, clock=Clock()).load()
            store.close()
            assert errors == [] and stat.S_IMODE(old.stat().st_mode) == 0o600
        finally:
            os.umask(old_umask)

    def test_restart_on_another_day(self, tmp_path):
        path = tmp_path / "u.sqlite"
        clock = Clock()
        book = UsageBook(store_at(path)[0], clock=clock)
        book.load()
        book.tokens("alice-0001", 120)
        clock.t = MIDNIGHT + 5
        book.tokens("alice-0001", 3)  # the day rolled over while running: a second row
        book.close()
        assert db_rows(path) == [("alice-0001", utc_day(T0), 0, 120), ("alice-0001", utc_day(MIDNIGHT), 0, 3)]
        clock.t = MIDNIGHT + 86400 + 5  # restarted the day after
        book2 = UsageBook(store_at(path)[0], clock=clock)
        book2.load()
        assert book2.rows() == [{"user": "alice-0001", "chats": 0, "tokens": 123, "tokens_today": 0}]
        book2.close()

    def test_corrupt_file_is_one_error_and_memory_counting(self, tmp_path):
        path = tmp_path / "u.sqlite"
        garbage = b"this is not a database " * 200
        path.write_bytes(garbage)
        store, errors = store_at(path)
        book = UsageBook(store, clock=Clock())
        error = book.load()
        assert errors == [error]
        assert str(path) in error and "file is not a database" in error and "in memory only" in error
        for _ in range(5):
            book.chat("alice-0001")
            book.tokens("alice-0001", 10)
        assert book.rows() == [{"user": "alice-0001", "chats": 5, "tokens": 50, "tokens_today": 50}]
        assert book.over_budget("alice-0001", 50)[0]
        book.close()
        assert errors == [error]  # once
        assert path.read_bytes() == garbage  # the user's file is left for them to look at

    def test_unwritable_place_is_one_error_and_memory_counting(self, tmp_path):
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("a file where the confdir should be")
        store, errors = store_at(blocker / "u.sqlite")
        book = UsageBook(store, clock=Clock())
        error = book.load()
        assert len(errors) == 1 and errors[0] == error and "u.sqlite" in error
        book.tokens("alice-0001", 10)
        assert book.rows()[0]["tokens"] == 10
        book.close()

    def test_write_failure_later_is_one_error_and_memory_counting(self, tmp_path):
        path = tmp_path / "u.sqlite"
        store, errors = store_at(path, flush_interval=0.01)
        book = UsageBook(store, clock=Clock())
        book.load()
        with sqlite3.connect(path) as other:  # someone breaks the file while the proxy runs
            other.execute("DROP TABLE usage")
        book.tokens("alice-0001", 10)
        store.close()  # waits for the writer to try
        assert len(errors) == 1 and "no such table" in errors[0]
        book.tokens("alice-0001", 10)  # after the failure: memory only, no new error
        assert errors == [store.error] and book.rows()[0]["tokens"] == 20

    def test_writes_happen_on_the_writer_thread_batched(self, tmp_path):
        path = tmp_path / "u.sqlite"
        store, errors = store_at(path, flush_interval=60)  # only close() ends the gathering
        book = UsageBook(store, clock=Clock())
        book.load()
        threads = []
        store._db.set_trace_callback(lambda sql: threads.append((threading.current_thread().name, sql.split()[0])))
        for i in range(1000):
            book.chat(f"user-{i % 50:04d}")
            book.tokens(f"user-{i % 50:04d}", 2)
        assert threads == []  # nothing touched the file on the counting (event loop) thread
        book.close()
        assert {name for name, _ in threads} == {"coze-usage-writer"}
        assert store.writes == 1  # one transaction for the whole batch
        rows = db_rows(path)
        assert len(rows) == 50 and all(r[2:] == (20, 40) for r in rows)
        assert errors == []

    def test_pending_rows_are_bounded(self, tmp_path):
        path = tmp_path / "u.sqlite"
        store, errors = store_at(path, flush_interval=60, max_pending=10)
        book = UsageBook(store, clock=Clock())
        book.load()
        for i in range(100):
            book.tokens(f"user-{i:04d}", 1)
        assert len(store._pending) == 10
        book.close()
        assert len(db_rows(path)) == 10 and len(book.rows()) == 100  # the book still has everyone

    def test_awkward_user_names_round_trip(self, tmp_path):
        path = tmp_path / "u.sqlite"
        names = ["login:Zoë", "login:a'b\"c", "login:x\ny", "login:\\", "login:" + "n" * 300]
        book = UsageBook(store_at(path)[0], clock=Clock())
        book.load()
        for n in names:
            book.tokens(n, 1)
        book.close()
        book2 = UsageBook(store_at(path)[0], clock=Clock())
        book2.load()
        assert sorted(r["user"] for r in book2.rows()) == sorted(names)
        book2.close()


class TestBudgetRefusal:
    @pytest.mark.parametrize("method,path,spends", [
        ("POST", "/v3/chat", True), ("POST", "/v3/chat?conversation_id=1", True),
        ("POST", "/v1/workflows/chat", True), ("POST", "/v3/chat/submit_tool_outputs?x=1", True),
        ("GET", "/v1/chat?bot_id=7", True), ("POST", "/studio/api/v3/chat", True),
        ("POST", "/v1/workflow/run", True), ("POST", "/v1/workflow/stream_run", True),
        ("POST", "/v1/workflow/stream_resume", True),
        ("POST", "/v3/chat/retrieve", False), ("GET", "/v3/chat/retrieve", False), ("POST", "/v3/chat/cancel", False),
        ("POST", "/v1/conversation/message/list", False), ("GET", "/v1/conversations", False),
        ("OPTIONS", "/v3/chat", False), ("GET", "/v3/chat", False),
    ])
    def test_only_spending_requests_are_budgeted(self, method, path, spends):
        assert spends_tokens(method, path) is spends
        book = UsageBook(clock=Clock())
        book.tokens("u-00000001", 100)
        refusal = budget_refusal(book, "u-00000001", "u-0…0001", 100, method, path)
        assert (refusal is not None) is spends

    def test_the_answer(self):
        book = UsageBook(clock=Clock())
        book.tokens("login:alice", 150)
        assert budget_refusal(book, "login:alice", "alice", 151, "POST", "/v3/chat") is None
        assert budget_refusal(book, "login:alice", "alice", 0, "POST", "/v3/chat") is None
        status, code, reason, msg, headers = budget_refusal(book, "login:alice", "alice", 150, "POST", "/v3/chat")
        assert (status, code, reason) == (429, 4013, "budget")
        assert headers == {"Retry-After": str(int(MIDNIGHT - T0))}
        assert "alice has used 150 Coze tokens today" in msg and "daily budget is 150" in msg
        assert "2026-09-22 00:00 UTC" in msg and "Reading history still works" in msg

    def test_a_page_gets_200_other_clients_and_handshakes_429(self):
        book = UsageBook(clock=Clock())
        book.tokens("login:alice", 150)
        assert budget_refusal(book, "login:alice", "alice", 150, "POST", "/v3/chat", from_page=True)[:2] == (200, 4013)
        assert budget_refusal(book, "login:alice", "alice", 150, "POST", "/v3/chat", from_page=False)[:2] == (429, 4013)
        assert budget_refusal(book, "login:alice", "alice", 150, "GET", "/v1/chat", from_page=True)[:2] == (429, 4013)

    def test_is_chat(self):
        assert is_chat("POST", "/v3/chat?conversation_id=1") and is_chat("POST", "/v1/workflows/chat")
        assert is_chat("GET", "/v1/chat?bot_id=1")
        assert not is_chat("POST", "/v3/chat/submit_tool_outputs") and not is_chat("GET", "/v3/chat/retrieve")
