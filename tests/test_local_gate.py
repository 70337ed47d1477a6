"""The local gate's decisions on their own (parts/local_gate.py, core/destinations.py), the proxy login in
front of coze.mitm, Proxy-Authorization never forwarded, and the mitmweb < 11.1.2 refusal: through real
mitmdump/mitmweb processes where the behaviour is mitmproxy's."""

from __future__ import annotations

import asyncio
import base64
import shutil
import socket
import subprocess
import time

import pytest
from mitmproxy import connection
from mitmproxy import version as mitmproxy_version
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons

from coze_mitm.core import destinations
from coze_mitm.options import OptionsOnly
from coze_mitm.parts import web_guard
from coze_mitm.parts.local_gate import LocalGate
from tests.harness import Mitmdump
from tests.sockets import read_answer
from tests.team import basic


# ------------------------------------------------------------------ destinations


def test_what_counts_as_this_host():
    assert destinations.why_forbidden("127.0.0.2") == "loopback"
    assert destinations.why_forbidden("127.255.255.254") == "loopback"
    assert destinations.why_forbidden("[::1]") == "loopback"
    assert destinations.why_forbidden("::ffff:127.0.0.1") == "loopback"
    assert destinations.why_forbidden("localhost") == "loopback"
    assert destinations.why_forbidden("LOCALHOST.") == "loopback"
    assert destinations.why_forbidden("0.0.0.0") == "unspecified"
    assert destinations.why_forbidden("0.1.2.3") == "unspecified"
    assert destinations.why_forbidden("::") == "unspecified"
    assert destinations.why_forbidden("192.0.2.1") is None  # TEST-NET-1: nobody's address
    assert destinations.why_forbidden("example.org") is None  # a name: resolved by the caller
    own = next((a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
                if not a[4][0].startswith("127.")), None)
    if own:
        assert destinations.why_forbidden(own) == "this host's address"


def _hook_data(peer, host, port=80):
    client = connection.Client(peername=(peer, 50000), sockname=("0.0.0.0", 8080), timestamp_start=time.time())
    return server_hooks.ServerConnectionHookData(client=client, server=connection.Server(address=(host, port)))


def _run(result):
    if result is not None:
        asyncio.run(result)


def test_server_connect_refuses_remote_clients_and_pins_names():
    gate = LocalGate()
    with taddons.context(OptionsOnly(), gate) as tctx:
        tctx.configure(gate, coze_allow_remote=False)
        # a local client: nothing asked, nothing changed
        data = _hook_data("127.0.0.1", "127.0.0.2")
        assert gate.server_connect(data) is None and data.server.error is None
        # a remote client: loopback, unspecified and names that resolve to loopback are refused
        for host in ("127.0.0.2", "::1", "0.0.0.0", "localhost"):
            data = _hook_data("10.0.0.9", host)
            _run(gate.server_connect(data))
            assert "coze_allow_remote" in (data.server.error or ""), host
        name = socket.gethostname()
        if all(a[4][0].startswith("127.") for a in socket.getaddrinfo(name, 80, socket.AF_INET)):
            data = _hook_data("10.0.0.9", name)
            _run(gate.server_connect(data))
            assert "resolves to 127." in data.server.error
        # a name that does not resolve is refused (never left to a second lookup); one the IDNA codec refuses
        # (an empty label, a label over 63 characters) too, rather than an exception that would fail open
        for bad in ("no-such-host.invalid", "x..y", "a" * 64 + ".example"):
            data = _hook_data("10.0.0.9", bad)
            _run(gate.server_connect(data))
            assert "did not resolve" in data.server.error, bad
        # an outside address passes; an outside name is pinned to the address checked
        data = _hook_data("10.0.0.9", "192.0.2.1")
        assert gate.server_connect(data) is None and data.server.error is None
        destinations._names[("outside.test", 443)] = (("192.0.2.7",), time.monotonic() + 60)
        data = _hook_data("10.0.0.9", "outside.test", 443)
        _run(gate.server_connect(data))
        assert data.server.error is None and data.server.address == ("192.0.2.7", 443)
        # coze_allow_remote gives credentials, not this host (issue 25: it used to switch the gate off)
        tctx.configure(gate, coze_allow_remote=True)
        data = _hook_data("10.0.0.9", "127.0.0.2")
        _run(gate.server_connect(data))
        assert "not this host" in (data.server.error or "")
        data = _hook_data("10.0.0.9", "192.0.2.1")
        assert gate.server_connect(data) is None and data.server.error is None
    destinations.clear_caches()


def test_decision_cost_for_a_local_client():
    """The gate's price on this machine's own traffic: one cached loopback test of the peer."""
    gate = LocalGate()
    with taddons.context(OptionsOnly(), gate) as tctx:
        tctx.configure(gate, coze_allow_remote=False)
        data = _hook_data("127.0.0.1", "api.coze.cn", 443)
        n = 20000
        start = time.perf_counter()
        for _ in range(n):
            gate.server_connect(data)
        per_call = (time.perf_counter() - start) / n
        print(f"server_connect, local client: {per_call * 1e6:.2f} us per call")
        assert per_call < 50e-6


# ------------------------------------------------------------------ the proxy login


@pytest.fixture
def htpasswd(tmp_path):
    path = tmp_path / "htpasswd"
    if shutil.which("htpasswd") is None:
        pytest.skip("htpasswd (apache2-utils) is not installed")
    done = subprocess.run(["htpasswd", "-B", "-b", "-c", str(path), "alice", "pw-alice"], capture_output=True)
    if done.returncode != 0:
        pytest.skip("htpasswd (apache2-utils) is not installed")
    return path


def _exchange(port: int, data: bytes, *, then: bytes = b"", timeout: float = 10) -> tuple[bytes, bytes]:
    """One socket to the proxy: send `data`, read one answer head (+ body by Content-Length); then `then`
    and its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        first = read_answer(s)
        second = b""
        if then and first.startswith(b"HTTP/1.1 200"):
            s.sendall(then)
            second = read_answer(s)
        return first, second


def test_coze_mitm_pages_need_the_login(mitmdump, config_file, htpasswd):
    proxy = mitmdump(f"coze_config={config_file}", f"proxyauth=@{htpasswd}")
    for path in ("/status.json", "/metrics", "/"):
        plain, _ = _exchange(proxy.port, f"GET http://coze.mitm{path} HTTP/1.1\r\nHost: coze.mitm\r\n\r\n".encode())
        assert plain.startswith(b"HTTP/1.1 407"), plain[:200]
        wrong, _ = _exchange(proxy.port, (f"GET http://coze.mitm{path} HTTP/1.1\r\nHost: coze.mitm\r\n"
                                          f"Proxy-Authorization: {basic('alice', 'nope')}\r\n\r\n").encode())
        assert wrong.startswith(b"HTTP/1.1 407"), wrong[:200]
        good, _ = _exchange(proxy.port, (f"GET http://coze.mitm{path} HTTP/1.1\r\nHost: coze.mitm\r\n"
                                         f"Proxy-Authorization: {basic('alice', 'pw-alice')}\r\n\r\n").encode())
        assert good.startswith(b"HTTP/1.1 200"), good[:200]
    tunnel, _ = _exchange(proxy.port, b"CONNECT coze.mitm:80 HTTP/1.1\r\nHost: coze.mitm:80\r\n\r\n")
    assert tunnel.startswith(b"HTTP/1.1 407"), tunnel[:200]
    tunnel, inner = _exchange(
        proxy.port, f"CONNECT coze.mitm:80 HTTP/1.1\r\nProxy-Authorization: {basic('alice', 'pw-alice')}\r\n\r\n".encode(),
        then=b"GET /status.json HTTP/1.1\r\nHost: coze.mitm\r\n\r\n")
    assert tunnel.startswith(b"HTTP/1.1 200") and inner.startswith(b"HTTP/1.1 200"), (tunnel[:100], inner[:200])


def test_proxy_authorization_never_leaves(mitmdump, config_file, htpasswd, standin, tmp_path):
    flows = tmp_path / "flows.mitm"
    proxy = mitmdump(f"coze_config={config_file}", f"proxyauth=@{htpasswd}", extra_args=["-w", str(flows)])
    host = standin.base_url[len("http://"):]
    login = basic("alice", "pw-alice")
    # inside an authenticated CONNECT tunnel, a client that repeats the header on every request
    tunnel, inner = _exchange(
        proxy.port, f"CONNECT {host} HTTP/1.1\r\nProxy-Authorization: {login}\r\n\r\n".encode(),
        then=(f"GET /v1/bots/7000 HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: {login}\r\n"
              "Authorization: Bearer czs_their_own\r\n\r\n").encode())
    assert tunnel.startswith(b"HTTP/1.1 200") and inner.startswith(b"HTTP/1.1 401"), (tunnel[:100], inner[:200])
    # absolute form (proxyauth removes it there itself)
    plain, _ = _exchange(proxy.port, (f"GET {standin.base_url}/v1/bots/7000 HTTP/1.1\r\nHost: {host}\r\n"
                                      f"Proxy-Authorization: {login}\r\nAuthorization: Bearer czs_their_own\r\n\r\n").encode())
    assert plain.startswith(b"HTTP/1.1 401"), plain[:200]
    assert len(standin.requests_seen) == 2
    assert all("proxy-authorization" not in r["headers"] for r in standin.requests_seen), standin.requests_seen
    proxy.stop()
    saved = flows.read_bytes()
    assert b"pw-alice" not in saved and base64.b64encode(b"alice:pw-alice") not in saved


# ------------------------------------------------------------------ mitmweb < 11.1.2


@pytest.mark.process
def test_mitmweb_with_the_unauthenticated_api_is_refused(tmp_path, config_file):
    version = web_guard.version_tuple(mitmproxy_version.VERSION)
    if version >= web_guard.MITMWEB_FIXED:
        pytest.skip(f"mitmproxy {mitmproxy_version.VERSION} >= 11.1.2: mitmweb's API requires a token, coze-mitm runs in it")
    web = Mitmdump(tmp_path, [f"coze_config={config_file}", "web_open_browser=false", "web_port=0"], tool="mitmweb")
    code = web.run_to_exit(timeout=60)
    lines = [line for line in web.lines if "CVE-2025-23217" in line]
    assert code != 0, web.output
    assert len(lines) == 1 and "11.1.2" in lines[0] and "mitmproxy>=12" in lines[0], web.output
    assert "Web server listening" not in web.output and "proxy listening" not in web.output, web.output


def test_mitmdump_is_not_refused(mitmdump, config_file):
    proxy = mitmdump(f"coze_config={config_file}")
    assert "CVE-2025-23217" not in proxy.output


def test_the_pac_file_needs_no_login(mitmdump, config_file, htpasswd):
    """Browsers never answer a 407 for their PAC file: with proxyauth on, the proxy's own /proxy.pac is served
    anyway (it holds no secret); everything else still needs the login."""
    proxy = mitmdump(f"coze_config={config_file}", f"proxyauth=@{htpasswd}")
    pac_file, _ = _exchange(proxy.port, f"GET /proxy.pac HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n\r\n".encode())
    assert pac_file.startswith(b"HTTP/1.1 200") and b"FindProxyForURL" in pac_file, pac_file[:300]
    page, _ = _exchange(proxy.port, b"GET http://coze.mitm/status.json HTTP/1.1\r\nHost: coze.mitm\r\n\r\n")
    assert page.startswith(b"HTTP/1.1 407"), page[:200]


# ------------------------------------------------------------------ fails closed (issue 25)


def test_the_gate_fails_closed(monkeypatch):
    """A part whose job is to refuse refuses when it raises: the bundle logs a part's exception and goes on with
    the next parts, so a gate that raised used to let a remote client through to coze.mitm's pages (the status
    part serves any flow without an answer) and to this host's loopback services."""
    from mitmproxy.test import tflow

    from coze_mitm.bundle import Bundle
    from coze_mitm.parts import local_gate

    seen = []

    class Later:  # stands for the parts after the gate (demo, status): they serve flows nobody answered
        def requestheaders(self, flow):
            seen.append(flow.response is None)

    gate = LocalGate()
    bundle = Bundle(gate, Later())

    def broken(*args):
        raise RuntimeError("a bug in a check")

    with taddons.context(OptionsOnly(), gate) as tctx:
        tctx.configure(gate, coze_allow_remote=False)
        monkeypatch.setattr(local_gate, "is_loopback", broken)
        for url in ("http://coze.mitm/status.json", "http://127.0.0.1:8790/v1/bots/7000"):
            flow = tflow.tflow()
            flow.client_conn.peername = ("10.0.0.9", 50000)
            flow.request.url = url
            _run(bundle.requestheaders(flow))
            assert flow.response is not None and flow.response.status_code == 502, url
            assert b"local gate failed" in flow.response.content and b"a bug" not in flow.response.content
            assert seen[-1] is False, url  # the later parts saw an answered flow
        data = _hook_data("10.0.0.9", "127.0.0.1", 22)
        _run(bundle.server_connect(data))
        assert "local gate failed" in (data.server.error or "")
        # an exception while resolving (not one of the resolver's own errors) refuses too
        monkeypatch.setattr(local_gate, "is_loopback", lambda host: False)

        async def resolver_bug(host, port):
            raise RuntimeError("resolver bug")

        monkeypatch.setattr(destinations, "resolve", resolver_bug)
        data = _hook_data("10.0.0.9", "somewhere.test", 80)
        _run(gate.server_connect(data))
        assert "local gate failed" in (data.server.error or "")
        flow = tflow.tflow()
        flow.client_conn.peername = ("10.0.0.9", 50000)
        flow.request.url = "http://somewhere.test/"
        _run(gate.requestheaders(flow))
        assert flow.response is not None and flow.response.status_code == 502
    destinations.clear_caches()


@pytest.mark.process  # runs `ip`
def test_own_addresses_with_and_without_zones():
    """Issue 25: the own-address test bound `fe80::<own>%<iface>` as a string, Python dropped the zone, the bind
    failed and the address counted as "not own". And link-local addresses (cloud metadata) were not refused."""
    import json as _json
    import shutil

    assert destinations.why_forbidden("169.254.169.254").startswith("link-local")
    assert destinations.why_forbidden("[::ffff:169.254.169.254]").startswith("link-local")
    assert destinations.why_forbidden("fe80::1234%99999").startswith("link-local")  # no such interface
    assert destinations.is_self("169.254.169.254") is None  # link-local, not this host
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed: cannot list this host's link-local addresses")
    links = _json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, text=True, timeout=10).stdout or "[]")
    found = [(info["local"], link["ifname"], link["ifindex"]) for link in links for info in link.get("addr_info", [])
             if info["local"].lower().startswith("fe80:") and not info.get("tentative")]
    if not found:
        pytest.skip("this host has no IPv6 link-local address")
    for address, ifname, ifindex in found:
        for spelling in (f"{address}%{ifname}", f"[{address}%{ifname}]", f"{address}%{ifindex}", f"[{address}]"):
            assert destinations.why_forbidden(spelling) == "this host's address", spelling
            assert destinations.is_self(spelling) == "this host's address", spelling


def test_the_pac_file_without_a_login_names_no_origin(mitmdump, config_file, htpasswd):
    """Issue 25: the PAC served despite proxyauth listed the team's intranet origins to anyone who asked. Without a
    login it names none of them (and routes the same); after the login (http://coze.mitm/proxy.pac through the
    proxy) the plain file."""
    import json as _json
    import shutil

    intranet = "https://wiki.intranet.corp.example:8443"
    proxy = mitmdump(f"coze_config={config_file}", f"proxyauth=@{htpasswd}", f"coze_origins={intranet}")
    anonymous, _ = _exchange(proxy.port, f"GET /proxy.pac HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n\r\n".encode())
    assert anonymous.startswith(b"HTTP/1.1 200") and b"FindProxyForURL" in anonymous, anonymous[:300]
    assert b"intranet" not in anonymous and b"corp.example" not in anonymous
    logged_in, _ = _exchange(proxy.port, (f"GET http://coze.mitm/proxy.pac HTTP/1.1\r\nHost: coze.mitm\r\n"
                                          f"Proxy-Authorization: {basic('alice', 'pw-alice')}\r\n\r\n").encode())
    assert logged_in.startswith(b"HTTP/1.1 200") and b"wiki.intranet.corp.example 8443" in logged_in, logged_in[:300]
    if shutil.which("node"):
        body = anonymous.partition(b"\r\n\r\n")[2].decode()
        program = body + "\nprocess.stdout.write(JSON.stringify([FindProxyForURL('" + intranet + "/x', " \
            "'wiki.intranet.corp.example'), FindProxyForURL('https://example.org/', 'example.org')]));\n"
        out = subprocess.run(["node", "-e", program], capture_output=True, text=True, timeout=30)
        assert _json.loads(out.stdout) == [f"PROXY 127.0.0.1:{proxy.port}", "DIRECT"], out.stderr


@pytest.mark.parametrize("allow_remote", [False, True])
def test_names_resolving_to_the_link_are_refused(allow_remote):
    """A name that resolves to a link-local address (the metadata service, an IPv6 one with its zone) is refused
    for a client on another machine, with or without coze_allow_remote (issue 25)."""
    from mitmproxy.test import tflow

    gate = LocalGate()
    cases = {"metadata.test": "169.254.169.254", "link6.test": "fe80::1%1", "mapped.test": "::ffff:169.254.1.1"}
    with taddons.context(OptionsOnly(), gate) as tctx:
        tctx.configure(gate, coze_allow_remote=allow_remote)
        for name, address in cases.items():
            destinations._names[(name, 80)] = ((address,), time.monotonic() + 60)
            data = _hook_data("10.0.0.9", name, 80)
            _run(gate.server_connect(data))
            assert f"resolves to {address}" in (data.server.error or ""), (name, data.server.error)
            flow = tflow.tflow()
            flow.client_conn.peername = ("10.0.0.9", 50000)
            flow.request.url = f"http://{name}/latest/meta-data"
            _run(gate.requestheaders(flow))
            assert flow.response is not None and flow.response.status_code == 403, name
            assert f"resolves to {address}" in flow.response.get_text()
    destinations.clear_caches()


def test_self_loop_checks_follow_the_mode():
    """The proxy's own port at 127.1 is answered 508 for a local client in regular mode; in upstream mode the
    request goes to the upstream proxy, which the spelling cannot turn into this proxy: left alone."""
    from mitmproxy.proxy import mode_specs
    from mitmproxy.test import tflow

    gate = LocalGate()
    with taddons.context(OptionsOnly(), gate) as tctx:
        tctx.configure(gate, coze_allow_remote=False, listen_port=8080)
        for mode, answered in (("regular", True), ("upstream:http://192.0.2.9:3128", False)):
            flow = tflow.tflow()
            flow.client_conn.peername = ("127.0.0.1", 50000)
            flow.client_conn.proxy_mode = mode_specs.ProxyMode.parse(mode)
            flow.request.url = "http://127.1:8080/v1/bots/7000"
            _run(gate.requestheaders(flow))
            assert (flow.response is not None) == answered, mode
            if answered:
                assert flow.response.status_code == 508 and b"this proxy itself" in flow.response.content
    destinations.clear_caches()
