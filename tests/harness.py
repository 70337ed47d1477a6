"""A real mitmdump subprocess running addons/coze.py, for integration tests and benchmarks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LISTENING_RE = re.compile(r"HTTP\(S\) proxy (?:\([^)]*\) )?listening at \S*?:(\d+)")  # "(upstream mode)" in upstream mode

def tool_command(tool: str = "mitmdump") -> list[str]:
    """mitmdump or mitmweb of the Python running the tests (so a venv's mitmproxy is the one tested)."""
    return [sys.executable, "-c", f"from mitmproxy.tools.main import {tool}; {tool}()"]


class Mitmdump:
    def __init__(self, confdir: Path, sets=(), *, script: bool = True, extra_args=(), startup_timeout: float = 30,
                 tool: str = "mitmdump"):
        self.confdir = Path(confdir)
        args = [*tool_command(tool), "--listen-host", "127.0.0.1", "--listen-port", "0", "--set", f"confdir={self.confdir}"]
        if script:
            args += ["-s", str(REPO / "addons" / "coze.py")]
        for item in sets:
            args += ["--set", item]
        self.args = args + list(extra_args)
        self.startup_timeout = startup_timeout
        self.lines: list[str] = []
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._listening = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def proxies(self) -> dict:
        return {"http": self.url, "https": self.url}

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = LISTENING_RE.search(line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._listening.set()
        self._listening.set()

    def _popen(self) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != "COZE_PAT"}  # a developer's PAT must not switch modes
        return subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            cwd=str(self.confdir), env=env,  # not the repo: the default config path must not depend on the cwd
        )

    def start(self) -> "Mitmdump":
        self.proc = self._popen()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(self.startup_timeout) or self.port is None:
            self.stop()
            raise RuntimeError(f"mitmdump did not start:\n{self.output}")
        return self

    def run_to_exit(self, timeout: float = 30) -> int:
        """For start-up failures: run until mitmdump exits by itself; returns its exit code."""
        self.proc = self._popen()
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines = out.splitlines()
        return self.proc.returncode

    def wait_for_output(self, pattern: str, timeout: float = 5) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.output):
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
