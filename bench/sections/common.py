"""What every section shares: the paths and texts requested, percentiles, /proc figures, client sessions.

Client sessions set TCP_NODELAY (as browsers do) and the stand-in is patched to, so that Nagle's algorithm
and delayed ACKs are not what is measured.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import statistics
import subprocess
import time

import mitmproxy.version
import requests
import requests.adapters

from tests.harness import LISTENING_RE, Mitmdump

PAGE = "https://chat.example.org"
BOT = "/v1/bots/7000"
CHAT_TEXT = "the quick brown fox jumps over the lazy dog and keeps running far away"  # 14 words
DELTA_GAP = 0.02
REFERENCE = "mitmdump -s bench/stream_only.py (1 hook)"


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of values."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


class NoDelayAdapter(requests.adapters.HTTPAdapter):
    """urllib3 sets TCP_NODELAY on direct connections but not on connections to an HTTP proxy; there a
    POST (headers and body sent separately) waits ~40 ms for the proxy's delayed ACK. Browsers set
    TCP_NODELAY everywhere: so does this client, or that stall would be measured instead of the proxy."""

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        proxy_kwargs.setdefault("socket_options", [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        return super().proxy_manager_for(proxy, **proxy_kwargs)


def session(proxy: Mitmdump | None) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    adapter = NoDelayAdapter(pool_maxsize=4)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    if proxy is not None:
        s.proxies = proxy.proxies
    # Every path gets the same upstream answer: coze-mitm asks Coze for identity (auth), and the stand-in
    # compresses when offered; with requests' default offer, bare mitmdump and direct would carry a br
    # answer the client decodes, and the comparison would be of the encoder, not of the proxies.
    s.headers["Accept-Encoding"] = "identity"
    return s


def tagged(user_id: str) -> dict:
    return {"Authorization": f"Bearer user:{user_id}", "Content-Type": "application/json", "Origin": PAGE,
            "Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "cross-site"}


def with_token(token: str) -> dict:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json", "Origin": PAGE}


def proc_numbers(path: str, wanted: dict[str, str]) -> dict[str, int]:
    """The first number of each line of a /proc file that starts with a key of `wanted`, under its name
    there; 0 for the keys the file does not have."""
    found = dict.fromkeys(wanted.values(), 0)
    with open(path) as f:
        for line in f:
            name = wanted.get(line.split(maxsplit=1)[0] if line.strip() else "")
            if name is not None:
                found[name] = int(line.split()[1])
    return found


def rss_kb(pid: int) -> int:
    return proc_numbers(f"/proc/{pid}/status", {"VmRSS:": "rss"})["rss"]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope dy/dx."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "load": load_average(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


class Row:
    def __init__(self, metric: str, measured: str, reference: str, ratio: str, target: str, ok: bool | None):
        self.cells = [metric, measured, reference, ratio, target, {True: "met", False: "NOT met", None: "info"}[ok]]


def no_nagle(standin) -> None:
    """The stand-in writes an answer's headers and body in two sends; with Nagle's algorithm on, the
    second waits for the client's delayed ACK (~40 ms on Linux) and that stall, not the proxy, would
    dominate every figure. Real servers (and mitmproxy, via asyncio) set TCP_NODELAY: so does this run."""
    handler = standin.server.RequestHandlerClass
    standin.server.RequestHandlerClass = type(handler.__name__, (handler,), {"disable_nagle_algorithm": True})


def chat_body(text: str) -> dict:
    return {"bot_id": "7000", "user_id": "bench", "stream": True,
            "additional_messages": [{"role": "user", "content": text, "content_type": "text"}]}


class FileLoggedMitmdump(Mitmdump):
    """A mitmdump whose output goes to a file, read when asked: for a proxy that prints a line per flow
    (run_mitm.py's coze_quiet), whose lines a pipe would deliver to a reader thread in this process, the
    measuring client, at the moment each answer arrives. A user's terminal is not in the client's process."""

    def _popen(self) -> subprocess.Popen:
        self._log = self.confdir / "mitmdump-output.log"
        with open(self._log, "w") as out:
            return subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    text=True, cwd=str(self.confdir), env=self.env)

    def _read(self) -> None:
        """Until mitmdump says where it listens (or ends): then nothing more is read until asked."""
        while self.port is None and self.proc.poll() is None:
            m = LISTENING_RE.search(self.output)
            if m:
                self.port = int(m.group(1))
                break
            time.sleep(0.05)
        self._listening.set()
        self._read_all.set()

    @property
    def output(self) -> str:
        try:
            return self._log.read_text(errors="replace")
        except (AttributeError, OSError):
            return ""


def pin(pid: int, cpus: set[int]) -> set[int] | None:
    """Every thread of process `pid` (0: this one) on `cpus`; the affinity it had, or None where it cannot be set
    (not Linux). Used by the latency section: every proxy on the same core, the client and the stand-in on
    another, so that two proxies differ by their own work and not by where the scheduler happened to put them."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    tasks = f"/proc/{pid or os.getpid()}/task"
    try:
        before = os.sched_getaffinity(pid)
        for tid in os.listdir(tasks):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass  # a thread that just ended
        return before
    except OSError:
        return None
