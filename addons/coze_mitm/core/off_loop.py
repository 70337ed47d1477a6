"""Blocking HTTP kept off mitmproxy's event loop: a thread pool of its own and one `requests` session used only
from it. The transparent retry (parts/resend.py) and the usage poller (core/usage_poll.py) send through one each.
No mitmproxy import.

The session follows mitmproxy's connection options (core/outbound.py: upstream proxy, certificate checks), never
a proxy from the environment, and both are made on first use, so a proxy that never needs them starts no thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Callable

import requests

from coze_mitm.core.outbound import DIRECT, Outbound, SessionSource


class OffLoopHttp:
    def __init__(self, workers: int, thread_name: str, *, default_headers: bool = True,
                 outbound: Callable[[], Outbound] = lambda: DIRECT):
        self.workers = workers
        self.thread_name = thread_name
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # default_headers False: send exactly the headers given (the page's own)
        self._sessions = SessionSource(outbound, pool_maxsize=workers, default_headers=default_headers)

    async def run(self, blocking, *args):
        """`blocking(*args)` in the pool; the event loop goes on meanwhile."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix=self.thread_name)
        return await asyncio.get_running_loop().run_in_executor(self._pool, blocking, *args)

    def session(self) -> requests.Session:
        """The session, for code running in the pool: built for the connection options in force."""
        return self._sessions.get()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._sessions.close()
