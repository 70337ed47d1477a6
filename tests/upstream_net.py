"""A corporate network for tests: a Coze stand-in that only an upstream proxy reaches.

* `corp_net()`: a network namespace joined to this host by a veth pair (tests/netns.py); the
  stand-in listens on STANDIN_ADDR, an address on the namespace's own loopback that this host has no route to
  (an `unreachable` route makes a direct attempt fail at once instead of leaving by a default route). The
  upstream proxy listens on PROXY_ADDR, the namespace's end of the pair: the only way in.
* `python -m tests.upstream_net proxy ...`: a small HTTP proxy (CONNECT and absolute-form) that requires Basic
  authentication and logs one line per request it is asked for: `<method> <target> auth=ok|missing|wrong`.
  Written here rather than Debian's squid or tinyproxy: nothing to install or configure, it starts in
  milliseconds, and its log says exactly what the test asserts (the token endpoint was asked for through it,
  with the right credentials).
* `python -m tests.upstream_net standin ...`: the sandbox stand-in (sandbox/coze_standin.py), plain or HTTPS with
  a given certificate chain, writing its OAuth app config; prints its base URL. Non-streamed chats are answered
  `in_progress`, as Coze answers them. `revoke <session_name>` on its stdin revokes that user's tokens.
Both programs run inside the namespace (`ip netns exec`).
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from tests.harness import end
from tests.netns import Unavailable, ip, run, veth_pair  # noqa: F401 (Unavailable: what corp_net raises)
from tests.sockets import pipe

REPO = Path(__file__).resolve().parent.parent
NEAR_ADDR, PROXY_ADDR = "10.213.81.1", "10.213.81.2"
STANDIN_ADDR = "10.213.82.9"
MAX_HEAD = 64 * 1024


@contextmanager
def corp_net():
    """Yields the namespace's name; raises Unavailable (with the reason) where it cannot be made."""
    pid = os.getpid()
    with veth_pair(f"cozecorp{pid}", f"cc{pid}", NEAR_ADDR, PROXY_ADDR) as ns:
        run("-n", ns, "addr", "add", f"{STANDIN_ADDR}/32", "dev", "lo")
        run("route", "add", "unreachable", f"{STANDIN_ADDR}/32")
        try:
            yield ns
        finally:
            ip("route", "del", "unreachable", f"{STANDIN_ADDR}/32")


class InNamespace:
    """One of this module's programs running inside the namespace; its first stdout line is what it serves."""

    def __init__(self, ns: str, *args: str):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.upstream_net", *args],
            cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.PIPE, text=True,
        )
        self.first_line = self.proc.stdout.readline().strip()
        if not self.first_line or self.proc.poll() is not None:
            rest = self.proc.stdout.read() if self.proc.poll() is not None else ""
            self.stop()
            raise RuntimeError(f"`{' '.join(args)}` did not start: {self.first_line}\n{rest}")
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()  # never block it on a full pipe

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def tell(self, command: str, timeout: float = 10) -> str:
        """Send the stand-in a command (`revoke <session_name>`); its answer line."""
        seen = len(self.lines)
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while len(self.lines) == seen and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.lines[seen] if len(self.lines) > seen else ""

    def stop(self) -> None:
        end(self.proc)


def wait_for_line(path: Path, predicate, timeout: float = 30) -> str | None:
    """The first line of the log at `path` that satisfies `predicate`, waiting for it up to `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                if predicate(line):
                    return line
        time.sleep(0.05)
    return None


# ------------------------------------------------------------------------------------ the upstream proxy

def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece or len(data) > MAX_HEAD:
            raise ConnectionError("no complete request head")
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _closing_response(upstream: socket.socket, client: socket.socket) -> None:
    """Pass the answer on with `Connection: close`: each request gets its own connection, so the next
    absolute-form request on a kept-alive client connection is never piped to the wrong host."""
    try:
        head, rest = _read_head(upstream)
    except (ConnectionError, OSError):
        client.close()
        return
    lines = [line for line in head.split(b"\r\n") if line.split(b":")[0].strip().lower()
             not in (b"connection", b"keep-alive")]
    client.sendall(b"\r\n".join(lines) + b"\r\nConnection: close\r\n\r\n" + rest)
    pipe(upstream, client)


class UpstreamProxy:
    def __init__(self, host: str, auth: str, log: Path):
        self.expected = "Basic " + base64.b64encode(auth.encode()).decode()
        self.log = log
        self.lock = threading.Lock()
        self.server = socket.create_server((host, 0))

    def note(self, line: str) -> None:
        with self.lock, self.log.open("a") as f:
            f.write(line + "\n")

    def serve(self) -> None:
        while True:
            client, _ = self.server.accept()
            threading.Thread(target=self.handle, args=(client,), daemon=True).start()

    def handle(self, client: socket.socket) -> None:
        try:
            head, rest = _read_head(client)
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ", 2)
            headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:] if ":" in line]
            given = next((v for k, v in headers if k.lower() == "proxy-authorization"), None)
            verdict = "ok" if given == self.expected else "missing" if given is None else "wrong"
            self.note(f"{method} {target} auth={verdict}")
            if verdict != "ok":
                client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=corp"
                               b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                client.close()
                return
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
                upstream.settimeout(None)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if rest:
                    upstream.sendall(rest)
                threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
                pipe(upstream, client)
                return
            scheme, _, after = target.partition("://")
            hostport, slash, path = after.partition("/")
            host, _, port = hostport.rpartition(":") if ":" in hostport.split("]")[-1] else (hostport, "", "80")
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=10)
            upstream.settimeout(None)
            kept = [f"{k}: {v}" for k, v in headers
                    if not k.lower().startswith("proxy-") and k.lower() not in ("connection", "keep-alive")]
            upstream.sendall(f"{method} {slash}{path} {version}\r\n".encode("latin-1")
                             + "\r\n".join(kept + ["Connection: close"]).encode("latin-1") + b"\r\n\r\n" + rest)
            threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
            _closing_response(upstream, client)
        except (OSError, ValueError, ConnectionError) as e:
            self.note(f"error {type(e).__name__}")
            client.close()


# ------------------------------------------------------------------------------------ the stand-in

def run_standin(host: str, config_path: str, chain: str | None) -> None:
    from sandbox.coze_standin import make_sandbox_app, write_config

    standin, config = make_sandbox_app(host, 0, delta_gap=0.0)
    inner = standin.server.dispatch

    def dispatch(req):
        """As Coze does, a non-streamed chat is answered `in_progress`, its usage left for retrieve (the sandbox
        itself answers it completed): the proxy's usage poller then asks retrieve itself."""
        if req.command == "POST" and req.route_path == "/v3/chat":
            ok = req.ok
            req.ok = lambda data, **extra: ok({k: v for k, v in dict(data, status="in_progress").items()
                                               if k not in ("usage", "completed_at")}, **extra)
        inner(req)

    standin.server.dispatch = dispatch
    if chain:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(chain)
        standin.server.socket = context.wrap_socket(standin.server.socket, server_side=True,
                                                    do_handshake_on_connect=False)
        standin.server.handle_error = lambda *a: None  # refused handshakes are part of the tests
        config["coze_api_base"] = config["coze_www_base"] = standin.base_url.replace("http://", "https://")
    write_config(config_path, config)
    standin.start()
    print(config["coze_api_base"], flush=True)
    for line in sys.stdin:  # commands from the test, one a line
        what, _, name = line.strip().partition(" ")
        if what == "revoke":
            print(f"revoked {standin.revoke(session_name=name)}", flush=True)
    while True:  # stdin closed: serve until terminated
        time.sleep(3600)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    px = sub.add_parser("proxy")
    px.add_argument("--host", required=True)
    px.add_argument("--auth", required=True)
    px.add_argument("--log", required=True)
    st = sub.add_parser("standin")
    st.add_argument("--host", required=True)
    st.add_argument("--config", required=True)
    st.add_argument("--chain")
    args = p.parse_args()
    if args.what == "proxy":
        proxy = UpstreamProxy(args.host, args.auth, Path(args.log))
        print(f"{args.host}:{proxy.server.getsockname()[1]}", flush=True)
        proxy.serve()
    else:
        run_standin(args.host, args.config, args.chain)


if __name__ == "__main__":
    main()
