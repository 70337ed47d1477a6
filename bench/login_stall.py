"""Wrong proxy passwords against a logged-in user (issue 25 item 3): how long one logged-in user's requests take
while N clients keep sending wrong passwords, with `proxyauth=@htpasswd` (bcrypt) or, with `--ldap`, with
`proxyauth=ldap:...` against a real OpenLDAP (tests/slapd.py; slapd on loopback).

    python3 bench/login_stall.py                                  # this checkout's addons/coze.py
    python3 bench/login_stall.py --script /path/to/old/addons/coze.py --cost 10 --attackers 8
    python3 bench/login_stall.py --ldap --ldap-delay 20        # a directory 20 ms away (each way), as over a WAN

A real mitmdump (tests/harness.py) answers http://coze.mitm/status.json itself, so nothing but the proxy is
measured. The logged-in user ("alice") sends `--requests` requests on one keep-alive connection, each with its
Proxy-Authorization (absolute-form, as plain-http proxy clients do), first alone, then while the attackers send
wrong passwords as fast as they are answered, each on a new connection. Prints median and p95 of both phases,
and what the attackers were answered. Nothing here fails a build.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from tests.harness import Mitmdump  # noqa: E402
from tests.sockets import pipe  # noqa: E402

URL = "http://coze.mitm/status.json"


def session(port: int, user: str, password: str) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.proxies = {"http": f"http://{user}:{password}@127.0.0.1:{port}"}
    return s


def timed(s: requests.Session) -> float:
    started = time.perf_counter()
    r = s.get(URL, timeout=60)
    assert r.status_code == 200, r.status_code
    return time.perf_counter() - started


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.95) - 1)]


class Delayed:
    """A loopback TCP relay to `port` that holds every chunk `delay` seconds each way: a directory further away
    than the local slapd, without touching the machine's network."""

    def __init__(self, port: int, delay: float):
        self.target, self.delay = port, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pipe, args=(a, b, self.delay), daemon=True).start()

    def close(self) -> None:
        self.listener.close()


def run(script: Path, cost: int, attackers: int, requests_n: int, ldap: bool = False, delay: float = 0.0) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="coze-login-stall-"))
    slapd = None
    if ldap:
        from tests.slapd import PASSWORDS, Slapd

        slapd = Slapd(workdir / "slapd").start()
        spec, password = slapd.spec(), PASSWORDS["alice"]
        if delay:
            relay = Delayed(slapd.port, delay)
            spec = spec.replace(f":{slapd.port}:", f":{relay.port}:")
    else:
        htpasswd = workdir / "team.htpasswd"
        subprocess.run(["htpasswd", "-b", "-c", "-B", "-C", str(cost), str(htpasswd), "alice", "alice-Pw-1"],
                       check=True, capture_output=True)
        spec, password = f"@{htpasswd}", "alice-Pw-1"
    proxy = Mitmdump(workdir, [f"proxyauth={spec}", "coze_pat=pat_bench_only", "flow_detail=0"],
                     script=False, extra_args=["-s", str(script)]).start()
    try:
        alice = session(proxy.port, "alice", password)
        for _ in range(3):
            timed(alice)
        alone = [timed(alice) for _ in range(requests_n)]
        stop = threading.Event()
        answers: dict[str, int] = {}
        lock = threading.Lock()

        def attack(i: int) -> None:
            while not stop.is_set():
                s = session(proxy.port, "alice", f"wrong-{i}")
                try:
                    r = s.get(URL, timeout=60)
                    key = f"{r.status_code}" + (f" {r.json().get('code')}" if r.headers.get("content-type", "").startswith(
                        "application/json") else "")
                except (requests.RequestException, ValueError) as e:
                    key = type(e).__name__
                finally:
                    s.close()
                with lock:
                    answers[key] = answers.get(key, 0) + 1

        threads = [threading.Thread(target=attack, args=(i,), daemon=True) for i in range(attackers)]
        for t in threads:
            t.start()
        while sum(answers.values()) < attackers:  # every attacker has been answered once: the storm is on
            time.sleep(0.01)
        under = [timed(alice) for _ in range(requests_n)]
        stop.set()
        for t in threads:
            t.join(60)
        return {"alone": alone, "under": under, "answers": answers}
    finally:
        proxy.stop()
        if slapd is not None:
            slapd.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--script", type=Path, default=ROOT / "addons" / "coze.py")
    ap.add_argument("--cost", type=int, default=10, help="bcrypt cost of the htpasswd line (htpasswd -B -C)")
    ap.add_argument("--attackers", type=int, default=8)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--ldap", action="store_true", help="proxyauth=ldap:... against a local slapd, not htpasswd")
    ap.add_argument("--ldap-delay", type=float, default=0.0, help="ms each LDAP packet is held, each way")
    a = ap.parse_args()
    result = run(a.script.resolve(), a.cost, a.attackers, a.requests, a.ldap, a.ldap_delay / 1000)
    for phase in ("alone", "under"):
        values = result[phase]
        print(f"{phase:5}: median {statistics.median(values) * 1000:7.1f} ms, p95 {p95(values) * 1000:7.1f} ms, "
              f"max {max(values) * 1000:7.1f} ms ({len(values)} requests)")
    delay = f", {a.ldap_delay:g} ms added each way" if a.ldap_delay else ""
    what = f"LDAP (slapd on loopback{delay})" if a.ldap else f"bcrypt cost {a.cost}"
    print(f"attackers ({a.attackers}, {what}) were answered: {dict(sorted(result['answers'].items()))}")


if __name__ == "__main__":
    main()
