"""Clients on another machine: a real second host (a network namespace joined by a veth pair) talks to a
real mitmdump that listens on every interface, as `mitmdump -s addons/coze.py` does by default."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.clients import chat_body, session, tagged
from tests.harness import REPO
from tests.netns import Unavailable, ip, veth_pair

ALICE = "alice-remote-0001"
HOST_ADDR, PEER_ADDR = "10.213.77.1", "10.213.77.2"  # only inside the pair this test makes


@pytest.fixture(scope="module")
def other_host():
    """The name of a network namespace that reaches this machine at HOST_ADDR from PEER_ADDR."""
    try:
        with veth_pair(f"cozemitm{os.getpid()}", f"cm{os.getpid()}", HOST_ADDR, PEER_ADDR) as ns:
            yield ns
    except Unavailable as e:
        pytest.skip(f"cannot make a second host: {e}")


def remote_get(ns: str, proxy_port: int, url: str, headers: dict) -> tuple[int, dict]:
    """One GET from the other host through the proxy; (status, JSON body)."""
    script = (
        "import json, sys, urllib.request, urllib.error\n"
        "url, proxy, headers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])\n"
        "opener = urllib.request.build_opener(urllib.request.ProxyHandler({'http': proxy}))\n"
        "try:\n"
        "    r = opener.open(urllib.request.Request(url, headers=headers), timeout=15)\n"
        "    print(json.dumps([r.status, json.loads(r.read() or b'null')]))\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(json.dumps([e.code, json.loads(e.read() or b'null')]))\n"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", script, url, f"http://{HOST_ADDR}:{proxy_port}", json.dumps(headers)],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    status, body = json.loads(done.stdout)
    return status, body


def test_remote_clients_get_no_credentials_by_default(other_host, mitmdump, config_file, standin):
    proxy = mitmdump(f"coze_config={config_file}", extra_args=["--listen-host", ""])
    assert proxy.wait_for_output("listens on every interface"), proxy.output
    assert "coze_allow_remote is off" in proxy.output and "--listen-host 127.0.0.1" in proxy.output
    url = f"{standin.base_url}/v1/bots/7000"

    status, body = remote_get(other_host, proxy.port, url, tagged(ALICE, origin=None))
    assert (status, body["code"]) == (403, 4101)
    assert "coze_allow_remote" in body["msg"] and set(body) == {"code", "msg"}
    assert standin.exchanges == [] and standin.requests_seen == []

    # Untagged traffic of remote clients to a service on this machine's loopback (the stand-in) is not
    # relayed either: local means local (issue 19).
    status, body = remote_get(other_host, proxy.port, url, {"Authorization": "Bearer czs_their_own"})
    assert (status, body["code"]) == (403, 4101) and "coze_allow_remote" in body["msg"]
    assert standin.requests_seen == []

    # The same request from this machine gets credentials.
    r = session(proxy).get(url, headers=tagged(ALICE, origin=None))
    assert r.status_code == 200, r.text
    assert standin.exchange_count(ALICE) == 1


def test_allow_remote_lets_them_in(other_host, mitmdump, config_file, standin):
    proxy = mitmdump(f"coze_config={config_file}", "coze_allow_remote=true", extra_args=["--listen-host", ""])
    assert proxy.wait_for_output("coze_allow_remote is on"), proxy.output
    status, body = remote_get(other_host, proxy.port, f"{standin.base_url}/v1/bots/7000", tagged(ALICE, origin=None))
    assert (status, body["code"]) == (200, 0)
    assert standin.exchange_count(ALICE) == 1


def test_loopback_listener_says_nothing(mitmdump, config_file):
    proxy = mitmdump(f"coze_config={config_file}")
    proxy.wait_for_output("no such line", timeout=1)
    assert "listens on" not in proxy.output


def test_plain_http_api_on_another_machine_is_warned(mitmdump, config_file, standin):
    # Tokens for an http:// (or ws://) Coze host that is not this machine would cross the network in clear text.
    proxy = mitmdump(f"coze_config={config_file}", "coze_api_hosts=http://coze.example.org:8080,ws://ws.example.org")
    assert proxy.wait_for_output("http://coze.example.org:8080 is plain http:// on another machine"), proxy.output
    assert "ws://ws.example.org is plain ws://" in proxy.output
    # The loopback stand-in (http://127.0.0.1:PORT) is not warned about.
    assert f"{standin.base_url} is plain" not in proxy.output


RAW_CLIENT = r"""
import json, socket, sys, time
from tests.sockets import read_answer
proxy_host, proxy_port, parts, pause = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((proxy_host, proxy_port), timeout=10)
answers = []
for i, part in enumerate(parts):
    s.sendall(part.encode())
    if part.startswith("CONNECT "):
        head = read_answer(s)
        answers.append(head.decode("latin-1"))
        if not head.startswith(b"HTTP/1.1 200"):
            break
    elif i + 1 < len(parts):
        time.sleep(pause)
else:
    s.settimeout(5)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    answers.append(data.decode("latin-1"))
print(json.dumps(answers))
"""


def remote_raw(ns: str, proxy_port: int, parts: list[str], pause: float = 0.5) -> list[str]:
    """From the other host, over one socket to the proxy: each part sent as one packet (a CONNECT part waits
    for the proxy's answer and stops unless it is 200; other parts are `pause` s apart); then everything the
    proxy sends until it closes (or 5 s). Returns the answers."""
    done = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", RAW_CLIENT, HOST_ADDR, str(proxy_port), json.dumps(parts),
         str(pause)], capture_output=True, text=True, timeout=40, cwd=REPO,  # the script imports tests.sockets
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def chat_request(standin, user: str) -> str:
    """The rest of the split request of the review: an absolute-URL POST /v3/chat with a user tag."""
    body = json.dumps(chat_body(user, "hi", stream=False))
    return (f" {standin.base_url}/v3/chat HTTP/1.1\r\nHost: {standin.base_url[7:]}\r\n"
            f"Authorization: Bearer user:{user}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}")


def json_refusal(answer: str) -> dict:
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 403"), answer
    return json.loads(body)


@pytest.mark.parametrize("strategy", ["eager", "lazy"])
def test_split_packet_self_connect_is_refused(other_host, mitmdump, config_file, standin, strategy):
    """Issue 19: CONNECT 127.0.0.2:<proxy port>, then "POST" alone and the rest 0.5 s later. mitmproxy passes
    such a tunnel through raw to itself, where the inner request arrived from 127.0.0.1 and got the owner's
    credentials (a completed chat at the stand-in on the code before the gate)."""
    proxy = mitmdump(f"coze_config={config_file}", f"connection_strategy={strategy}", extra_args=["--listen-host", ""])
    for target in ("127.0.0.2", HOST_ADDR):  # another loopback address; this host's own (veth) address
        answers = remote_raw(other_host, proxy.port,
                             [f"CONNECT {target}:{proxy.port} HTTP/1.1\r\n\r\n", "POST", chat_request(standin, "lan-attacker-0001")])
        refusal = json_refusal(answers[0])
        assert refusal["code"] == 4101 and "coze_allow_remote" in refusal["msg"], refusal
        assert ("this host's address" if target == HOST_ADDR else "loopback") in refusal["msg"]
    assert standin.exchanges == [] and standin.requests_seen == []


def test_remote_clients_reach_nothing_on_this_host(other_host, mitmdump, config_file, standin):
    proxy = mitmdump(f"coze_config={config_file}", extra_args=["--listen-host", ""])
    api_port = int(standin.base_url.rsplit(":", 1)[1])
    targets = [f"127.0.0.1:{api_port}", f"[::1]:{api_port}", f"0.0.0.0:{api_port}", f"localhost:{api_port}",
               f"{HOST_ADDR}:{api_port}", f"[::ffff:127.0.0.1]:{api_port}"]
    name = socket.gethostname()
    try:
        if any(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(name, None)):
            targets.append(f"{name}:{api_port}")  # a name that resolves to loopback (Debian: 127.0.1.1)
    except OSError:
        pass
    for target in targets:
        # CONNECT: answered 403 before any connection
        refusal = json_refusal(remote_raw(other_host, proxy.port, [f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"])[0])
        assert refusal["code"] == 4101 and "coze_allow_remote" in refusal["msg"], (target, refusal)
        # absolute URL, untagged (their own token): no relay to the host's services either
        status, body = remote_get(other_host, proxy.port, f"http://{target}/v1/bots/7000", {"Authorization": "Bearer czs_own"})
        assert (status, body["code"]) == (403, 4101) and "coze_allow_remote" in body["msg"], (target, body)
    # a WebSocket upgrade (absolute URL) is a request like the others
    answer = remote_raw(other_host, proxy.port, [
        f"GET http://127.0.0.1:{api_port}/v1/chat HTTP/1.1\r\nHost: 127.0.0.1:{api_port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"])[0]
    assert json_refusal(answer)["code"] == 4101
    assert standin.requests_seen == [] and standin.exchanges == []
    # the proxy's own pages
    for path in ("/status.json", "/metrics", "/", "/coze-chat.user.js"):
        status, body = remote_get(other_host, proxy.port, f"http://coze.mitm{path}", {}) if path != "/" else (None, None)
        if path == "/":
            body = json_refusal(remote_raw(other_host, proxy.port, ["GET http://coze.mitm/ HTTP/1.1\r\nHost: coze.mitm\r\n\r\n"])[0])
            status = 403
        assert (status, body["code"]) == (403, 4101) and "coze_allow_remote" in body["msg"], (path, body)
    refusal = json_refusal(remote_raw(other_host, proxy.port, ["CONNECT coze.mitm:443 HTTP/1.1\r\n\r\n"])[0])
    assert refusal["code"] == 4101
    # this machine keeps its pages
    r = session(proxy).get("http://coze.mitm/status.json")
    assert r.status_code == 200 and r.json()["service"] == "coze-mitm"


def open_with_a_chat(mitmdump, config_file, standin):
    """A proxy on every interface with coze_allow_remote and no login, and ALICE's streamed chat from this
    machine through it: (proxy, the chat's answer)."""
    proxy = mitmdump(f"coze_config={config_file}", "coze_allow_remote=true", "coze_usage_file=memory",
                     extra_args=["--listen-host", ""])
    chat = session(proxy).post(f"{standin.base_url}/v3/chat", headers=tagged(ALICE, origin=None),
                               json=chat_body(ALICE, "hi", stream=True))
    return proxy, chat


def test_allow_remote_pages_without_login_show_no_users(other_host, mitmdump, config_file, standin):
    proxy, chat = open_with_a_chat(mitmdump, config_file, standin)
    assert chat.status_code == 200
    local = session(proxy).get("http://coze.mitm/status.json").json()
    assert local["usage"] and local["users"]
    status, remote = remote_get(other_host, proxy.port, "http://coze.mitm/status.json", {})
    assert status == 200 and remote["usage"] == [] and remote["users"] == []
    assert remote["usage_totals"] == local["usage_totals"] and remote["usage_users"] == 1
    script = ("import sys, urllib.request\n"
              "o = urllib.request.build_opener(urllib.request.ProxyHandler({'http': sys.argv[1]}))\n"
              "print(o.open('http://coze.mitm/metrics', timeout=15).read().decode())\n")
    done = subprocess.run(["ip", "netns", "exec", other_host, sys.executable, "-c", script, f"http://{HOST_ADDR}:{proxy.port}"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    users = set(re.findall(r'user="([^"]*)"', done.stdout))
    assert users == {"(all)"}, done.stdout
    assert ALICE[:6] not in done.stdout


# ------------------------------------------------------------------ issue 25: this host and its link, whatever the login

import http.server  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

HOST_LINK_LOCAL = "fe80::77:1"  # this host's own link-local address on the veth (the interface is the zone)
METADATA = "169.254.169.254"  # a cloud's metadata service: here a server on the other side of the link


class _HostService(http.server.ThreadingHTTPServer):
    """A service of this host listening on every interface (`::`, IPv4 too), as many do."""
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"code": 0, "msg": "a service of this host answered"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def host_service():
    """The port of a service on this host listening on `::` (so on 127.0.0.1, ::1, the LAN and link-local
    addresses too): what a client on the LAN must never reach through the proxy."""
    server = _HostService(("::", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def link(other_host):
    """This host's link-local address on the veth (no duplicate detection: usable at once), and a "metadata
    service" at 169.254.169.254:80 on the other side of the link (in the other host's namespace), reachable
    from this host by a route. Yields the near interface's name (the zone)."""
    near = f"cm{os.getpid()}a"
    far = f"cm{os.getpid()}b"
    for cmd in (("addr", "add", f"{HOST_LINK_LOCAL}/64", "dev", near, "nodad"),
                ("-n", other_host, "addr", "add", f"{METADATA}/32", "dev", far),
                ("route", "add", f"{METADATA}/32", "dev", near)):
        done = ip(*cmd)
        if done.returncode != 0:
            pytest.skip(f"cannot set up the link (`ip {' '.join(cmd)}`): {done.stderr.strip()}")
    metadata = subprocess.Popen(
        ["ip", "netns", "exec", other_host, sys.executable, "-c",
         "import http.server, json\n"
         "class H(http.server.BaseHTTPRequestHandler):\n"
         "    def do_GET(self):\n"
         "        body = json.dumps({'code': 0, 'msg': 'instance credentials'}).encode()\n"
         "        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()\n"
         "        self.wfile.write(body)\n"
         "    def log_message(self, *a): pass\n"
         f"http.server.HTTPServer(('{METADATA}', 80), H).serve_forever()\n"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:  # wait until this host reaches it (the route, the server listening)
            try:
                socket.create_connection((METADATA, 80), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or metadata.poll() is not None:
                    pytest.skip("the metadata stand-in in the other namespace did not start")
        yield near
    finally:
        metadata.kill()
        metadata.wait()
        ip("route", "del", f"{METADATA}/32", "dev", near)
        ip("-n", other_host, "addr", "del", f"{METADATA}/32", "dev", far)
        ip("addr", "del", f"{HOST_LINK_LOCAL}/64", "dev", near)


def _refused(answer: str, *, why: str | None = None) -> dict:
    refusal = json_refusal(answer)
    assert refusal["code"] == 4101, refusal
    if why:
        assert why in refusal["msg"], refusal
    return refusal


@pytest.mark.parametrize("sets", [[], ["coze_allow_remote=true"]], ids=["default", "allow-remote"])
def test_remote_clients_reach_nothing_on_this_host_or_its_link(other_host, link, host_service, mitmdump,
                                                                config_file, sets):
    """Issue 25: `[fe80::<this host>%<iface>]:<port>` reached every service of this host listening on `::` (the
    own-address test bound the address without its zone, which fails, so it counted as "not own"), and
    169.254.169.254 (a cloud's metadata service) was relayed to; coze_allow_remote switched the gate off."""
    proxy = mitmdump(f"coze_config={config_file}", *sets, extra_args=["--listen-host", ""])
    port = host_service
    targets = [f"[{HOST_LINK_LOCAL}%{link}]:{port}", f"[{HOST_LINK_LOCAL}]:{port}", f"{METADATA}:80",
               f"[::ffff:{METADATA}]:80", f"169.254.1.1:{port}", f"[fe80::1%{link}]:{port}"]
    if sets:  # with coze_allow_remote the loopback services too (the default refuses them: tests above)
        targets += [f"127.0.0.1:{port}", f"[::1]:{port}", f"localhost:{port}", f"127.1:{port}", f"{HOST_ADDR}:{port}"]
    for target in targets:
        # CONNECT, then a request inside the tunnel
        answers = remote_raw(other_host, proxy.port, [f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n",
                                                      f"GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"])
        _refused(answers[0])
        # absolute form
        answer = remote_raw(other_host, proxy.port, [f"GET http://{target.replace('%', '%25')}/latest/meta-data HTTP/1.1\r\n"
                                                     f"Host: {target}\r\nConnection: close\r\n\r\n"])[0]
        assert "a service of this host" not in answer and "instance credentials" not in answer, (target, answer)
        assert answer.startswith("HTTP/1.1 403") or answer.startswith("HTTP/1.1 400"), (target, answer[:300])
        if answer.startswith("HTTP/1.1 403"):
            _refused(answer)
    # the same services are there: this machine reaches them directly
    socket.create_connection((METADATA, 80), timeout=5).close()
    socket.create_connection((f"{HOST_LINK_LOCAL}%{link}", port), timeout=5).close()


def test_a_logged_in_remote_member_reaches_nothing_on_this_host(other_host, host_service, mitmdump, config_file, standin):
    """Issue 25: with a proxy login and coze_allow_remote, any team member reached 127.0.0.1 / ::1 services of
    the proxy host. The login gives Coze credentials, not this host; the configured Coze API (here a stand-in on
    this host's loopback) stays reachable."""
    proxy = mitmdump(f"coze_config={config_file}", "coze_allow_remote=true", "proxyauth=alice:pw-alice",
                     extra_args=["--listen-host", ""])
    login = "Basic " + __import__("base64").b64encode(b"alice:pw-alice").decode()
    for target in (f"127.0.0.1:{host_service}", f"[::1]:{host_service}", f"localhost:{host_service}",
                   f"{HOST_ADDR}:{host_service}"):
        status, body = remote_get(other_host, proxy.port, f"http://{target}/", {"Proxy-Authorization": login})
        assert (status, body["code"]) == (403, 4101) and "not this host" in body["msg"], (target, body)
        answers = remote_raw(other_host, proxy.port, [f"CONNECT {target} HTTP/1.1\r\nProxy-Authorization: {login}\r\n\r\n"])
        assert _refused(answers[0], why="not this host")
    status, body = remote_get(other_host, proxy.port, f"{standin.base_url}/v1/bots/7000",
                              {**tagged(ALICE, origin=None), "Proxy-Authorization": login})
    assert (status, body["code"]) == (200, 0), body


def test_a_self_connect_does_not_make_a_remote_client_local(other_host, mitmdump, config_file, standin):
    """Issue 25: with coze_allow_remote and no login (--allow-anonymous), `CONNECT 127.0.0.2:<proxy port>` and a
    first packet without a space made mitmproxy pass the tunnel through raw to itself: the inner request came
    from 127.0.0.1 and was shown the per-user usage rows hidden from clients on other machines."""
    proxy, chat = open_with_a_chat(mitmdump, config_file, standin)
    assert chat.status_code == 200
    assert session(proxy).get("http://coze.mitm/status.json").json()["users"]  # this machine sees them
    for target in ("127.0.0.2", "127.0.0.1", HOST_ADDR, "0.0.0.0"):
        answers = remote_raw(other_host, proxy.port, [
            f"CONNECT {target}:{proxy.port} HTTP/1.1\r\n\r\n", "GET",
            " http://coze.mitm/status.json HTTP/1.1\r\nHost: coze.mitm\r\nConnection: close\r\n\r\n"])
        assert ALICE not in "".join(answers) and ALICE[:4] not in "".join(answers[1:]), (target, answers)
        assert not answers[0].startswith("HTTP/1.1 200"), (target, answers)
    # what the remote client is shown as itself: no user
    status, remote = remote_get(other_host, proxy.port, "http://coze.mitm/status.json", {})
    assert status == 200 and remote["users"] == [] and remote["usage"] == []


@pytest.mark.parametrize("allow_remote", [False, True], ids=["default", "allow-remote"])
def test_the_pac_file_names_nothing_private_to_a_remote_client_without_a_login(other_host, mitmdump, config_file,
                                                                                allow_remote):
    """Issue 25: the PAC (served despite proxyauth) listed the team's intranet origins to an unauthenticated LAN
    host. A client that may not use the proxy at all (coze_allow_remote off) gets no file; one without a login
    gets a file that names no origin."""
    intranet = "https://wiki.intranet.corp.example:8443"
    sets = [f"coze_config={config_file}", "proxyauth=alice:pw-alice", f"coze_origins={intranet}"]
    proxy = mitmdump(*sets, *(["coze_allow_remote=true"] if allow_remote else []), extra_args=["--listen-host", ""])
    answer = remote_raw(other_host, proxy.port, [f"GET /proxy.pac HTTP/1.1\r\nHost: {HOST_ADDR}:{proxy.port}\r\n"
                                                 "Connection: close\r\n\r\n"])[0]
    assert "intranet" not in answer and "corp.example" not in answer, answer
    if allow_remote:
        assert answer.startswith("HTTP/1.1 200") and "FindProxyForURL" in answer, answer[:300]
        assert f"PROXY {HOST_ADDR}:{proxy.port}" in answer
    else:
        assert not answer.startswith("HTTP/1.1 200"), answer[:300]
