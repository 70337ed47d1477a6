"""The SQLite store behind the usage book (usage_book.UsageStore): what makes usage survive a restart.

Pure logic, no mitmproxy import. `SqliteUsageStore` keeps one small row per user per UTC day in a SQLite
file (mitmproxy's confdir; the file 0600, a folder it makes 0700), written by one thread, batched, never on the event loop. A corrupt or
unwritable file is one warning line and the book goes on counting in memory.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Callable

from coze_mitm.core.private_files import private_dir, private_file
from coze_mitm.core.usage_book import StoredUsage

FILE_NAME = "coze-mitm-usage.sqlite"

log = logging.getLogger("coze-mitm.usage")


class SqliteUsageStore:
    """One row per (user, UTC day) in a SQLite file; one writer thread, increments batched per flush."""

    SCHEMA = """CREATE TABLE IF NOT EXISTS usage (
        user TEXT NOT NULL, day TEXT NOT NULL, chats INTEGER NOT NULL DEFAULT 0,
        tokens INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (user, day)) WITHOUT ROWID"""
    UPSERT = """INSERT INTO usage (user, day, chats, tokens) VALUES (?, ?, ?, ?)
        ON CONFLICT (user, day) DO UPDATE SET chats = chats + excluded.chats, tokens = tokens + excluded.tokens"""

    def __init__(self, path: str | Path, *, flush_interval: float = 1.0, max_pending: int = 100_000,
                 on_error: Callable[[str], None] | None = None):
        self.path = Path(path).expanduser()
        self.flush_interval = flush_interval
        self.max_pending = max_pending  # distinct (user, day) rows waiting; beyond it, memory only
        self.on_error = on_error or log.warning
        self.error = ""
        self.writes = 0  # transactions committed (tests and the status page may show it)
        self._pending: dict[tuple[str, str], list[int]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._db: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None

    # -- start-up (before traffic; a few ms even for a year of rows) ------------------------------
    def load(self, today: str) -> list[StoredUsage]:
        try:
            private_dir(self.path.parent)
            private_file(self.path)  # 0600 before the first row; SQLite gives its -wal/-shm files the same mode
            db = sqlite3.connect(str(self.path), timeout=5, check_same_thread=False, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(self.SCHEMA)
                rows = db.execute(
                    """SELECT user, SUM(chats), SUM(tokens),
                              SUM(CASE WHEN day = ? THEN chats ELSE 0 END),
                              SUM(CASE WHEN day = ? THEN tokens ELSE 0 END)
                       FROM usage GROUP BY user ORDER BY SUM(tokens) DESC, user""", (today, today)).fetchall()
            except BaseException:
                db.close()
                raise
        except (sqlite3.Error, OSError) as e:
            self._fail(e)
            return []
        self._db = db
        self._thread = threading.Thread(target=self._run, name="coze-usage-writer", daemon=True)
        self._thread.start()
        return [StoredUsage(str(u), int(c), int(t), int(ct), int(tt)) for u, c, t, ct, tt in rows]

    # -- event loop side: O(1), no I/O -------------------------------------------------------------
    def record(self, user: str, day: str, chats: int, tokens: int) -> None:
        if self.error or self._db is None:
            return
        with self._lock:
            row = self._pending.get((user, day))
            if row is None:
                if len(self._pending) >= self.max_pending:
                    return  # the writer is far behind: this increment stays in memory only
                row = self._pending[(user, day)] = [0, 0]
            row[0] += chats
            row[1] += tokens
        self._wake.set()

    def close(self) -> None:
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass

    # -- writer thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._closing.wait(self.flush_interval)  # let increments gather: one transaction per interval
            self._wake.clear()
            with self._lock:
                batch, self._pending = self._pending, {}
            if batch and not self.error:
                self._write(batch)
            if self._closing.is_set():
                with self._lock:
                    batch, self._pending = self._pending, {}
                if batch and not self.error:
                    self._write(batch)
                return

    def _write(self, batch: dict[tuple[str, str], list[int]]) -> None:
        rows = [(user, day, c, t) for (user, day), (c, t) in batch.items()]
        try:
            self._db.execute("BEGIN")
            self._db.executemany(self.UPSERT, rows)
            self._db.execute("COMMIT")
            self.writes += 1
        except (sqlite3.Error, OSError) as e:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        if self.error:
            return
        self.error = (f"coze-mitm: usage file {self.path} cannot be used ({type(e).__name__}: {e}); usage is "
                      f"counted in memory only from now on and lost at exit — fix or move the file away "
                      f"(a new one is made at the next start)")
        self.on_error(self.error)


def default_path(confdir: str | Path) -> Path:
    """Where the usage file lives: beside mitmproxy's CA, in its confdir (default ~/.mitmproxy)."""
    return Path(confdir).expanduser() / FILE_NAME
