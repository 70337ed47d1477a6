"""login.py: the proxy login as identity, read from a real mitmdump with proxyauth set.

A tiny probe addon (written by the test) uses login.py the way the bundle will: strip_password in
`http_connect` and `requestheaders`, proxy_login in `request` and in the WebSocket hooks. It answers
requests to probe.example itself with what it saw, so no upstream is needed; WebSockets go to a real
local server.
"""

from __future__ import annotations

import base64
import re
import socket
import threading

import pytest
import requests
import requests.adapters
from websockets.sync.server import serve

from coze_mitm.core.identity import USER_ID_RE, short_id
from coze_mitm.core.directory import Cache
from coze_mitm.core.logins import (MAX_LOGIN, auth_mode, identity_problem, is_login_key, ldap_identity_problem,
                                   login_problem, session_name)
from coze_mitm.parts.login import REDACTED
from tests.harness import REPO
from tests.sockets import read_head
from tests.team import basic, sha_line

PROBE = """
import json, logging, sys
sys.path.insert(0, {addons!r})
from coze_mitm.parts import login
from mitmproxy import http


class Probe:
    def http_connect(self, flow):
        login.strip_password(flow)
        logging.info("PROBE connect meta=%r", flow.metadata.get("proxyauth"))

    def requestheaders(self, flow):
        login.strip_password(flow)

    def request(self, flow):
        if flow.response or flow.request.pretty_host != "probe.example":
            return
        seen = {{"login": login.proxy_login(flow), "meta": flow.metadata.get("proxyauth"),
                "proxy_authorization": flow.request.headers.get("proxy-authorization")}}
        flow.response = http.Response.make(200, json.dumps(seen), {{"content-type": "application/json"}})

    def websocket_start(self, flow):
        logging.info("PROBE ws-start %s login=%s", flow.request.path, login.proxy_login(flow))

    def websocket_message(self, flow):
        msg = flow.websocket.messages[-1]
        logging.info("PROBE ws-message %s from_client=%s login=%s meta=%r", flow.request.path,
                     msg.from_client, login.proxy_login(flow), flow.metadata.get("proxyauth"))


addons = [Probe()]
"""

PASSWORDS = {"alice": "alice-pw-7f3a9c", "bob": "bob-pw-51e0d2", "Zoë Müller": "zoe-pw-88aa01"}


@pytest.fixture
def htpasswd(tmp_path):
    path = tmp_path / "htpasswd"
    path.write_text("".join(sha_line(u, p) for u, p in PASSWORDS.items()), encoding="utf-8")
    return path


@pytest.fixture
def probe(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(PROBE.format(addons=str(REPO / "addons")))
    return path


@pytest.fixture
def proxy(mitmdump, htpasswd, probe, tmp_path):
    flows = tmp_path / "flows.mitm"
    p = mitmdump(f"proxyauth=@{htpasswd}", "connection_strategy=lazy", script=False,
                 extra_args=["-s", str(probe), "-w", str(flows)])
    p.flows = flows
    return p


class LoginAdapter(requests.adapters.HTTPAdapter):
    """Sends Proxy-Authorization on CONNECT as built here (UTF-8, as browsers do; requests would use latin-1)."""

    def __init__(self, auth: str):
        self.auth = auth
        super().__init__()

    def proxy_headers(self, proxy):
        return {"Proxy-Authorization": self.auth}


def through(proxy, user, password, url="http://probe.example/x", session=None, **kw):
    s = session or requests.Session()
    s.trust_env = False
    s.proxies = {"http": proxy.url, "https": proxy.url}
    if url.startswith("http://"):
        kw.setdefault("headers", {})["Proxy-Authorization"] = basic(user, password)
    else:
        if not isinstance(s.get_adapter("https://x"), LoginAdapter):
            s.mount("https://", LoginAdapter(basic(user, password)))
        kw.setdefault("verify", str(proxy.confdir / "mitmproxy-ca-cert.pem"))
    return s.get(url, timeout=10, **kw)


def raw(proxy, data: bytes, more: bytes | None = None) -> tuple[bytes, socket.socket]:
    """Send bytes to the proxy, read one HTTP head; `more` is sent after it (e.g. inside a tunnel)."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(data)
    head = read_head(sock)
    if more is not None:
        sock.sendall(more)
        head = read_head(sock)
    return head, sock



class TestRealProxy:
    def test_two_logins_are_two_identities_password_removed(self, proxy):
        seen = {u: through(proxy, u, p).json() for u, p in PASSWORDS.items()}
        for user, got in seen.items():
            assert got == {"login": user, "meta": [user, REDACTED], "proxy_authorization": None}
        assert len({session_name(s["login"]) for s in seen.values()}) == 3

    def test_connect_tunnel_every_request_inside_has_the_login(self, proxy):
        s = requests.Session()
        for path in ("/one", "/two", "/three"):  # one tunnel: the login is sent once, at CONNECT
            got = through(proxy, "bob", PASSWORDS["bob"], f"https://probe.example{path}", session=s).json()
            assert got == {"login": "bob", "meta": ["bob", REDACTED], "proxy_authorization": None}
        assert proxy.wait_for_output(r"PROBE connect meta=\('bob', '\(password removed by coze-mitm\)'\)")
        assert len(re.findall("PROBE connect", proxy.output)) == 1  # the later requests sent no credentials

    def test_wrong_password_is_407(self, proxy):
        answer = through(proxy, "alice", "not-her-password")
        assert answer.status_code == 407
        assert answer.headers["Proxy-Authenticate"] == 'Basic realm="mitmproxy"'
        assert through(proxy, "mallory", "x").status_code == 407  # unknown user
        head, sock = raw(proxy, b"GET http://probe.example/x HTTP/1.1\r\nHost: probe.example\r\n\r\n")
        sock.close()
        assert head.startswith(b"HTTP/1.1 407")  # no credentials at all

    def test_wrong_password_on_connect_is_407(self, proxy):
        head, sock = raw(proxy, b"CONNECT probe.example:443 HTTP/1.1\r\nHost: probe.example:443\r\n"
                                b"Proxy-Authorization: " + basic("alice", "nope").encode() + b"\r\n\r\n")
        sock.close()
        assert head.startswith(b"HTTP/1.1 407")

    def test_saved_flows_hold_no_password(self, proxy):
        for user, password in PASSWORDS.items():
            through(proxy, user, password)
            through(proxy, user, password, "https://probe.example/tls")
        through(proxy, "alice", "a-wrong-guess-123")  # refused: its header must not be saved either
        proxy.stop()
        data = proxy.flows.read_bytes()
        assert b"alice" in data and REDACTED.encode() in data  # the file holds those flows...
        for password in [*PASSWORDS.values(), "a-wrong-guess-123"]:
            assert password.encode() not in data  # ...but no password, in clear
            assert base64.b64encode(password.encode()) not in data
        assert basic("alice", "a-wrong-guess-123").split()[1].encode() not in data  # nor the refused header

    @pytest.fixture
    def ws_server(self):
        def echo(ws):
            for message in ws:
                ws.send(message)

        with serve(echo, "127.0.0.1", 0) as server:
            threading.Thread(target=server.serve_forever, daemon=True).start()
            yield server.socket.getsockname()[1]
            server.shutdown()

    @staticmethod
    def upgrade(target: str, host: str, auth: str | None) -> bytes:
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
        if auth:
            lines.append(f"Proxy-Authorization: {auth}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    @staticmethod
    def send_text(sock, text: str) -> bytes:
        payload = text.encode()
        mask = b"\x01\x02\x03\x04"
        sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        frame = b""
        while len(frame) < 2 + len(payload):
            frame += sock.recv(4096)
        return frame[2:]

    def test_websocket_upgrade_plain(self, proxy, ws_server):
        host = f"127.0.0.1:{ws_server}"
        head, sock = raw(proxy, self.upgrade(f"http://{host}/v1/chat", host, basic("alice", PASSWORDS["alice"])))
        try:
            assert head.startswith(b"HTTP/1.1 101")
            assert self.send_text(sock, "hello") == b"hello"
        finally:
            sock.close()
        assert proxy.wait_for_output(r"PROBE ws-start /v1/chat login=alice")
        assert proxy.wait_for_output(r"PROBE ws-message /v1/chat from_client=True login=alice "
                                     r"meta=\('alice', '\(password removed by coze-mitm\)'\)")

    def test_websocket_upgrade_inside_connect(self, proxy, ws_server):
        host = f"127.0.0.1:{ws_server}"
        connect = (f"CONNECT {host} HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: "
                   f"{basic('bob', PASSWORDS['bob'])}\r\n\r\n").encode()
        head, sock = raw(proxy, connect, self.upgrade("/v1/audio/speech", host, None))
        try:
            assert head.startswith(b"HTTP/1.1 101")
            assert self.send_text(sock, "hi") == b"hi"
        finally:
            sock.close()
        assert proxy.wait_for_output(r"PROBE ws-start /v1/audio/speech login=bob")
        assert proxy.wait_for_output(r"PROBE ws-message /v1/audio/speech from_client=True login=bob")

    def test_websocket_upgrade_with_wrong_password_is_407(self, proxy, ws_server):
        host = f"127.0.0.1:{ws_server}"
        head, sock = raw(proxy, self.upgrade(f"http://{host}/v1/chat", host, basic("alice", "bad")))
        sock.close()
        assert head.startswith(b"HTTP/1.1 407")
        assert not re.search(r"PROBE ws-start", proxy.output)


def test_single_user_form(mitmdump, probe):
    proxy = mitmdump("proxyauth=carol:carol-pw", "connection_strategy=lazy", script=False,
                     extra_args=["-s", str(probe)])
    assert through(proxy, "carol", "carol-pw").json()["login"] == "carol"
    assert through(proxy, "carol", "wrong").status_code == 407


class TestRules:
    @pytest.mark.parametrize("spec,mode", [
        (None, "none"), ("", "none"), ("any", "any"), ("@/etc/htpasswd", "htpasswd"), ("u:p", "single"),
        ("ldap:localhost:cn=admin:pw:dc=example", "ldap"), ("ldaps:host:636:u:p:dc=x", "ldap"),
    ])
    def test_auth_mode(self, spec, mode):
        assert auth_mode(spec) == mode

    @pytest.mark.parametrize("name", ["alice", "Zoë Müller", "a.b@example.org", "x", "域名", "n" * MAX_LOGIN,
                                      "(others)", "1732000000000-abcdefghijk"])
    def test_usable_logins_stay_unchanged(self, name):
        assert login_problem(name) is None
        assert session_name(name) == "login:" + name and session_name(name).endswith(name)

    @pytest.mark.parametrize("name", ["", "n" * (MAX_LOGIN + 1), "a\nb", "a\x00", "tab\t", "bad\ufffd", "\x85", "a\u2028"])
    def test_unusable_logins(self, name):
        assert login_problem(name)

    def test_no_tag_id_is_a_login_key(self):
        # the token cache keys tag ids and logins alike by session_name: they must never collide
        assert USER_ID_RE.fullmatch(session_name("alice-0001")) is None
        assert is_login_key(session_name("alice-0001")) and not is_login_key("alice-0001-abcdef")

    def test_display(self):
        # identity.short_id shows a login whole (a name lets nobody act as that user) and a tag id shortened
        assert short_id(session_name("Zoë")) == "Zoë"
        assert short_id("1732000000000-abcdefghijklmnop") == "1732…mnop"

    @pytest.mark.parametrize("name", ["a*", "*", "x)(cn=*", "back\\slash", "(admin)"])
    def test_ldap_filter_characters_are_refused_in_ldap_mode(self, name):
        # mitmproxy 11.0.2 builds the LDAP filter from the name unescaped: `a*` would authenticate as some
        # entry and still be a new identity (with a fresh budget) here
        assert login_problem(name, "ldap")
        assert login_problem(name, "htpasswd") is None

    def test_htpasswd_and_single_names_stay_exact(self):
        # mitmproxy compares htpasswd and user:pass names exactly: `Alice` and `alice` are two accounts with two
        # passwords, so two identities (no aliasing to undo). LDAP names become their directory entry instead
        # (core/directory.py; tests/test_ldap.py against a real slapd).
        assert session_name("Alice") == "login:Alice" != session_name("alice")
        assert session_name(" alice") == "login: alice"

    @pytest.mark.parametrize("value", ["dn", "DN", "uid", "sAMAccountName", "employee-id", "0.9.2342.19200300.100.1.1"])
    def test_ldap_identity_values(self, value):
        assert ldap_identity_problem(value) is None

    @pytest.mark.parametrize("value", ["", "(uid)", "uid,cn", "1uid", "u id", "x" * 65])
    def test_bad_ldap_identity_values(self, value):
        assert "coze_ldap_identity" in ldap_identity_problem(value)

    def test_directory_identities(self):
        assert identity_problem("uid=alice,ou=people,dc=example,dc=org", "DN") is None
        assert "shorter single-valued attribute such as uid" in identity_problem("x" * (MAX_LOGIN + 1), "DN")
        assert identity_problem("", "uid") and identity_problem("a\nb", "uid")


class TestDirectoryCache:
    def test_bounded_least_recently_used_first(self):
        cache = Cache(entries=3, seconds=60)
        for name in ["a", "b", "c"]:
            cache.put(name, "dn-" + name)
        assert cache.get("a") == "dn-a"  # a is now the most recently used
        cache.put("d", "dn-d")
        assert len(cache) == 3 and cache.get("b") is None and cache.get("a") == "dn-a"

    def test_answers_expire(self):
        now = [1000.0]
        cache = Cache(entries=10, seconds=300, clock=lambda: now[0])
        cache.put(" alice", "uid=alice")
        now[0] += 299
        assert cache.get(" alice") == "uid=alice"
        now[0] += 2
        assert cache.get(" alice") is None and len(cache) == 0
