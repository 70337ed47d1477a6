"""Clients on another machine: a real second host (a network namespace joined by a veth pair) talks to a
real mitmdump that listens on every interface, as `mitmdump -s addons/coze.py` does by default."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.clients import session, tagged

ALICE = "alice-remote-0001"
HOST_ADDR, PEER_ADDR = "10.213.77.1", "10.213.77.2"  # only inside the pair this test makes


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture(scope="module")
def other_host():
    """The name of a network namespace that reaches this machine at HOST_ADDR from PEER_ADDR."""
    ns, near, far = f"cozemitm{os.getpid()}", f"cm{os.getpid()}a", f"cm{os.getpid()}b"
    try:
        made = _ip("netns", "add", ns)
    except FileNotFoundError:
        pytest.skip("iproute2's `ip` is not installed: cannot make a second host")
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here (needs root/CAP_NET_ADMIN): {made.stderr.strip()}")
    try:
        for cmd in (
            ("link", "add", near, "type", "veth", "peer", "name", far),
            ("link", "set", far, "netns", ns),
            ("addr", "add", f"{HOST_ADDR}/30", "dev", near),
            ("link", "set", near, "up"),
            ("-n", ns, "addr", "add", f"{PEER_ADDR}/30", "dev", far),
            ("-n", ns, "link", "set", far, "up"),
            ("-n", ns, "link", "set", "lo", "up"),
        ):
            done = _ip(*cmd)
            if done.returncode != 0:
                pytest.skip(f"cannot build the veth pair (`ip {' '.join(cmd)}`): {done.stderr.strip()}")
        yield ns
    finally:
        _ip("link", "del", near)
        _ip("netns", "del", ns)


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

    # Untagged traffic of remote clients is not coze-mitm's business: it passes untouched.
    status, _ = remote_get(other_host, proxy.port, url, {"Authorization": "Bearer czs_their_own"})
    assert status == 401 and standin.requests_seen[-1]["headers"]["authorization"] == "Bearer czs_their_own"

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
