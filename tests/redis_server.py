"""A real redis-server for the tests (Debian's `redis-server`; run_tests.py installs it as root when missing).

Started with the persistence docs/team.md recommends for budgets: the append-only file, fsync'ed before each
write is acknowledged (`appendonly yes`, `appendfsync always`), so a restart, even after SIGKILL, keeps every
increment Redis answered. A password is required (`requirepass`), so the tests also show it is never printed.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.harness import end, free_port

PASSWORD = "rEdis-Pw-7f3a9c1e55"


def binary() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None, password: str = PASSWORD, extra: tuple = ()):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.extra = list(extra)  # more redis-server arguments (--replicaof ...)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The URL without the password (proxies get it from the URL or COZE_REDIS_PASSWORD)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def url_with_password(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        args = [binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
                "--requirepass", self.password, "--logfile", str(self.dir / "redis.log"), *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return self
            except Exception:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-2000:]}")
                time.sleep(0.05)
        raise RuntimeError("redis-server did not answer within 20 s")

    def client(self):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, decode_responses=True,
                           socket_timeout=5)

    def kill(self) -> None:
        """SIGKILL: no shutdown save, only what the append-only file holds survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        end(self.proc)
