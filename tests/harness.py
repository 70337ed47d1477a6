"""Processes the integration tests start: a real mitmdump running addons/coze.py (tests and benchmarks), and
run_mitm.py as a user runs it (`Launcher` in the background, `run` to its end, and reading its messages)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN_MITM = REPO / "run_mitm.py"
LISTENING_RE = re.compile(r"HTTP\(S\) proxy (?:\([^)]*\) )?listening at \S*?:(\d+)")  # "(upstream mode)" in upstream mode


def tool_command(tool: str = "mitmdump") -> list[str]:
    """mitmdump or mitmweb of the Python running the tests (so a venv's mitmproxy is the one tested)."""
    return [sys.executable, "-c", f"from mitmproxy.tools.main import {tool}; {tool}()"]


class Mitmdump:
    def __init__(self, confdir: Path, sets=(), *, script: bool = True, extra_args=(), startup_timeout: float = 30,
                 tool: str = "mitmdump", env: dict | None = None):
        self.confdir = Path(confdir)
        args = [*tool_command(tool), "--listen-host", "127.0.0.1", "--listen-port", "0", "--set", f"confdir={self.confdir}"]
        if script:
            args += ["-s", str(REPO / "addons" / "coze.py")]
        for item in sets:
            args += ["--set", item]
        self.args = args + list(extra_args)
        self.startup_timeout = startup_timeout
        # a developer's PAT must not switch modes
        self.env = env if env is not None else {k: v for k, v in os.environ.items() if k != "COZE_PAT"}
        self.lines: list[str] = []
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._listening = threading.Event()
        self._read_all = threading.Event()  # the process closed its output: self.lines is complete

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def proxies(self) -> dict:
        return {"http": self.url, "https": self.url}

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def session(self):
        """A requests session through this proxy (and nothing from the environment)."""
        import requests
        s = requests.Session()
        s.trust_env = False
        s.proxies = self.proxies
        return s

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = LISTENING_RE.search(line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._listening.set()
        self._listening.set()
        self._read_all.set()

    sigint_as_a_terminal = False  # Launcher: its Ctrl-C tests need SIGINT not ignored, whatever started the suite

    def _popen(self) -> subprocess.Popen:
        default_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if os.name == "posix" else None
        return subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            cwd=str(self.confdir), env=self.env,  # not the repo: the default config path must not depend on the cwd
            preexec_fn=default_sigint if self.sigint_as_a_terminal else None,
        )

    def _spawn(self) -> None:
        self.proc = self._popen()
        threading.Thread(target=self._read, daemon=True).start()

    def start(self) -> "Mitmdump":
        self._spawn()
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
        """Whether pattern shows in the output within timeout (answered at once when the process has ended)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.output):
                return True
            if self._read_all.is_set():
                return bool(re.search(pattern, self.output))
            time.sleep(0.02)
        return False

    def children(self) -> list[int]:
        """The process ids whose parent is this process (Linux: read from /proc)."""
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.proc.pid:
                    found.append(int(proc.name))
        return found

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Ends the process (sig first; its children and it killed if it has not ended in 15 s); its exit code."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                for child in self.children():
                    os.kill(child, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self._read_all.wait(5)
            return self.proc.returncode
        return None


def copied_addons(dest: Path) -> Path:
    """addons/ and userscript/ copied under `dest` (a checkout a test may edit and reload); the copy's coze.py."""
    shutil.copytree(REPO / "addons", dest / "addons", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "userscript", dest / "userscript")
    return dest / "addons" / "coze.py"


def wait_for(condition, timeout: float = 20, what: str = "condition"):
    """What `condition()` returns once it is true (asked every 50 ms); AssertionError naming `what` if it is not
    true within `timeout` s (a process's work seen from outside: a page, a log, a store)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def free_port() -> int:
    """A loopback port nothing listens on now (for a program that must be told its port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    """Ends a helper process (slapd, redis-server, a browser, a program in a namespace): SIGTERM, SIGKILL if it
    has not ended within `timeout` s. Nothing for None or a process that has ended."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
        return
    proc.kill()
    proc.wait()


# --------------------------------------------------------------------------- run_mitm.py as a user runs it

MITMPROXY_11 = tuple(int(x) for x in re.findall(r"\d+", __import__("mitmproxy.version").version.VERSION)[:3]) < (11, 1, 2)


def clean_env(**extra: str) -> dict:
    """The environment without a developer's PAT or proxy settings, plus extra."""
    env = {k: v for k, v in os.environ.items()
           if k != "COZE_PAT" and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(extra)
    return env


class Launcher(Mitmdump):
    """`python run_mitm.py ...` running in the background until stop(); started once its next-steps block
    (which ends "Ctrl-C stops it.") is printed."""

    def __init__(self, confdir: Path, *args: str, env: dict | None = None, timeout: float = 30):
        super().__init__(confdir, startup_timeout=timeout, env=env or clean_env())
        # the cwd is confdir, not the repository: the launcher must not depend on the cwd
        self.args = [sys.executable, str(RUN_MITM), "--port", "0", "--set", f"confdir={confdir}", *args]

    # As from a terminal: Ctrl-C (SIGINT) stops it. A suite started in the background by a non-interactive shell
    # (`... &`, nohup) hands its processes SIGINT ignored, and Python keeps an inherited "ignored".
    sigint_as_a_terminal = True

    def start(self) -> "Launcher":
        self._spawn()
        if not self.wait_for_output(r"Ctrl-C stops it", self.startup_timeout) or self.port is None:
            self.stop()
            raise RuntimeError(f"run_mitm.py did not start:\n{self.output}")
        return self


def run(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 60,
        stdin: str | None = None) -> subprocess.CompletedProcess:
    """run_mitm.py to its end; stdout and stderr kept apart."""
    return subprocess.run([sys.executable, str(RUN_MITM), *args], capture_output=True, text=True, timeout=timeout,
                          env=env or clean_env(), cwd=cwd, input=stdin if stdin is not None else "")


def check(config: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`run_mitm.py --check --config config` from the config's folder."""
    return run("--check", "--config", str(config), *extra, env=env, cwd=config.parent)


def messages(stderr: str) -> list[str]:
    """The launcher's messages on stderr, each unwrapped: a wrapped message continues on indented lines,
    and its lines joined by single spaces give the message back."""
    found: list[str] = []
    for line in stderr.splitlines():
        if not line.strip():
            continue
        assert len(line) <= 100, f"not wrapped: {line!r}"
        if line.startswith("  ") and found:
            found[-1] += " " + line.strip()
        else:
            found.append(line)
    return found


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The launcher's refusals are one message on stderr (wrapped into readable lines), never a traceback."""
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    found = messages(result.stderr)
    assert len(found) == 1, result.stderr
    assert found[0].startswith("run_mitm.py: error: ")
    return found[0]


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
