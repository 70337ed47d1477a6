"""Proxy passwords checked off the event loop: a small pool of threads, a bounded queue, verified pairs remembered,
and a growing wait for a client that keeps sending wrong ones. No mitmproxy import (parts/login_check.py asks it).

bcrypt is slow on purpose (htpasswd -B: ~2 ms at cost 5, ~60 ms at cost 10, x2 per cost step); mitmproxy's
proxyauth runs it in its own hook, on the event loop, so every wrong password stalled every user's traffic.
Here it runs in `workers` threads; at most `queue` checks wait for one (the others are answered "busy" at once).
A pair that verified is remembered as an HMAC under a key made at start-up (never the password), `seconds`
long, so the next CONNECT of that user costs a dict lookup. A client (its IP address) with `free_failures` wrong
passwords in a row waits 1 s, then 2, 4, ... up to `max_wait` before its next check; its failures are
forgotten after `forget_after` seconds without one.

The same for LDAP (`verify` = core/directory.py `Passwords`: a search and a bind, network round trips that
mitmproxy makes on the loop, with no time limit). A `verify` that raises could not decide (the directory did
not answer): UNAVAILABLE, neither remembered nor counted against the client; MISCONFIGURED when what it raised
says the proxy's own settings are wrong (`misconfigured`: the LDAP spec's bind DN or password), the same otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import hmac
import os
import time
from typing import Callable

OK, WRONG, BUSY, WAIT, UNAVAILABLE, MISCONFIGURED = "ok", "wrong", "busy", "wait", "unavailable", "misconfigured"


class PasswordChecks:
    def __init__(self, verify: Callable[[str, str], bool], *, workers: int = 2, queue: int = 32,
                 entries: int = 4096, seconds: float = 300.0, free_failures: int = 3, max_wait: float = 60.0,
                 forget_after: float = 600.0, clients: int = 10_000, clock=time.monotonic):
        self.verify = verify
        self.workers, self.queue = workers, queue
        self.entries, self.seconds = entries, seconds
        self.free_failures, self.max_wait, self.forget_after = free_failures, max_wait, forget_after
        self.max_clients = clients
        self.clock = clock
        self._key = os.urandom(32)
        self._good: collections.OrderedDict[bytes, float] = collections.OrderedDict()  # digest -> valid until
        self._failures: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()  # ip -> (n, last)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._waiting = 0  # checks handed to the pool and not answered yet
        self.checked = 0  # checks made in the pool (tests, metrics)

    def _digest(self, user: str, password: str) -> bytes:
        return hmac.new(self._key, f"{user}\0{password}".encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def known_good(self, user: str, password: str) -> bool:
        """Verified lately (no thread, no bcrypt): what mitmproxy's proxyauth asks right after the check."""
        digest = self._digest(user, password)
        until = self._good.get(digest)
        if until is None:
            return False
        if until <= self.clock():
            del self._good[digest]
            return False
        self._good.move_to_end(digest)
        return True

    def wait_left(self, client: str) -> float:
        """Seconds this client must wait before its next check (0 when it may be checked now)."""
        entry = self._failures.get(client)
        if entry is None:
            return 0.0
        count, last = entry
        now = self.clock()
        if now - last >= self.forget_after:
            del self._failures[client]
            return 0.0
        if count < self.free_failures:
            return 0.0
        wait = min(self.max_wait, 2.0 ** (count - self.free_failures))
        return max(0.0, last + wait - now)

    def _failed(self, client: str) -> None:
        count, _ = self._failures.pop(client, (0, 0.0))
        self._failures[client] = (count + 1, self.clock())
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)

    async def check(self, client: str, user: str, password: str) -> tuple[str, float]:
        """(OK | WRONG | BUSY | WAIT | UNAVAILABLE | MISCONFIGURED, seconds to wait before trying again). Call on
        the event loop."""
        if self.known_good(user, password):
            return OK, 0.0
        wait = self.wait_left(client)
        if wait > 0:
            return WAIT, wait
        if self._waiting >= self.workers + self.queue:
            return BUSY, 1.0
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="coze-login")
        self._waiting += 1
        self.checked += 1
        try:
            good = await asyncio.get_running_loop().run_in_executor(self._pool, self._verify, user, password)
        finally:
            self._waiting -= 1
        if good is None:
            return UNAVAILABLE, 0.0
        if good == MISCONFIGURED:
            return MISCONFIGURED, 0.0
        if good:
            self._good[self._digest(user, password)] = self.clock() + self.seconds
            self._good.move_to_end(self._digest(user, password))
            while len(self._good) > self.entries:
                self._good.popitem(last=False)
            return OK, 0.0
        self._failed(client)
        return WRONG, self.wait_left(client)

    def _verify(self, user: str, password: str) -> bool | str | None:
        try:
            return bool(self.verify(user, password))
        except Exception as e:
            # not logged in (as mitmproxy's proxyauth makes of it), but no wrong password either
            return MISCONFIGURED if getattr(e, "misconfigured", False) else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        close = getattr(self.verify, "close", None)  # LDAP: its connections
        if close is not None:
            close()
