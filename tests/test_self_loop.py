"""The proxy never connects to itself (issue 25): every spelling of its own address and port that mitmproxy's
loop guard does not know is answered (HTTP 508, JSON) before any connection, for clients on this machine too;
other users are served meanwhile and the proxy's open file descriptors stay bounded.

On the code before the fix each of these made mitmdump connect to itself again and again (one request
`GET http://127.1:<port>/` from any local process) until it ran out of file descriptors."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import threading

import pytest

from coze_mitm.core import destinations
from tests.clients import session, tagged
from tests.sockets import read_answer

BOB = "bob-self-loop-0001"


def _answer(port: int, data: bytes, timeout: float = 20) -> bytes:
    """Send `data` to the proxy on one socket; the answer's head and body (by Content-Length), or b"" when the
    proxy closed without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_answer(s)


def _open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None  # no /proc (macOS, Windows): the answers and the other user's chat are still checked


def _own_addresses() -> list[str]:
    """This host's addresses on the interfaces of its default routes, as URL hosts (IPv6 in brackets, link-local
    with its zone), from `ip -j` (Linux); none elsewhere. Only those interfaces: other engineers' test veths come
    and go on a shared machine."""
    import shutil
    import subprocess
    if shutil.which("ip") is None:
        return []

    def ip_json(*args: str) -> list:
        done = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=10)
        return json.loads(done.stdout or "[]") if done.returncode == 0 else []

    devices = {route["dev"] for family in ("-4", "-6") for route in ip_json(family, "route", "show", "default")
               if "dev" in route}
    found = []
    for link in ip_json("addr"):
        if link.get("ifname") not in devices:
            continue
        for info in link.get("addr_info", []):
            address = ipaddress.ip_address(info["local"])
            if address.is_loopback or info.get("tentative"):
                continue
            if address.version == 4:
                found.append(str(address))
            elif address.is_link_local:
                found.append(f"[{address}%{link['ifname']}]")
            else:
                found.append(f"[{address}]")
    return found


def _spellings(port: int, every_interface: bool) -> list[str]:
    spellings = ["127.1", "0x7f.1", "0x7f000001", "2130706433", "0177.0.0.1", "127.0.0.2", "[::ffff:127.0.0.1]",
                 "[::ffff:7f00:1]", "localhost.", "LOCALHOST", "0.0.0.0", "0"]
    name = socket.gethostname()
    try:
        if any(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(name, port, socket.AF_INET)):
            spellings.append(name)  # a name that resolves to loopback (Debian: 127.0.1.1; here the host name)
    except OSError:
        pass
    if every_interface:
        spellings += _own_addresses()
        spellings.append("[::]")
    return [f"{host}:{port}" for host in spellings]


@pytest.mark.parametrize("listen_host", ["127.0.0.1", ""], ids=["loopback", "every-interface"])
def test_no_spelling_of_the_proxy_makes_it_connect_to_itself(mitmdump, config_file, standin, listen_host):
    proxy = mitmdump(f"coze_config={config_file}", extra_args=["--listen-host", listen_host])
    destinations.clear_caches()
    pid = proxy.proc.pid
    baseline = _open_fds(pid)
    targets = _spellings(proxy.port, every_interface=listen_host == "")
    requests = []
    for target in targets:
        if "%" in target:  # a zoned IPv6 address: CONNECT carries it as it is (a URL cannot)
            requests.append((target, "connect", f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()))
            continue
        requests.append((target, "absolute", f"GET http://{target}/v1/bots/7000 HTTP/1.1\r\nHost: {target}\r\n"
                                             "Connection: close\r\n\r\n".encode()))
        requests.append((target, "origin", f"GET /v1/bots/7000 HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode()))
        requests.append((target, "connect", f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()))

    answers: dict[tuple[str, str], bytes] = {}
    peak = [baseline or 0]

    def send(target, form, data):
        answers[(target, form)] = _answer(proxy.port, data)
        fds = _open_fds(pid)
        if fds is not None:
            peak[0] = max(peak[0], fds)

    threads = [threading.Thread(target=send, args=r, daemon=True) for r in requests]
    for t in threads:
        t.start()
    # another user's chat, meanwhile
    chat = session(proxy).post(f"{standin.base_url}/v3/chat", headers=tagged(BOB, origin=None), timeout=30,
                               json={"bot_id": "7000", "user_id": BOB, "stream": False,
                                     "additional_messages": [{"role": "user", "content": "hi", "content_type": "text"}]})
    for t in threads:
        t.join(40)
    assert chat.status_code == 200 and chat.json()["code"] == 0, chat.text

    # listening on every interface, mitmproxy's own guard knows 0.0.0.0 and :: (its listen addresses)
    known = {f"0.0.0.0:{proxy.port}", f"[::]:{proxy.port}"} if listen_host == "" else set()
    for target, form, _ in requests:
        answer = answers.get((target, form), b"(no answer)")
        head, _, body = answer.partition(b"\r\n\r\n")
        if target in known and head.startswith(b"HTTP/1.1 502"):
            assert b"Request destination unknown" in body, (target, form, answer[:300])
            continue
        assert head.startswith(b"HTTP/1.1 508"), (target, form, answer[:300])
        refusal = json.loads(body)
        assert refusal["code"] == 4000 and "this proxy itself" in refusal["msg"], (target, form, refusal)
    # no request reached anything: the stand-in saw only bob's chat (and his token exchange)
    assert all(r["path"].startswith("/v3/chat") or "token" in r["path"] for r in standin.requests_seen), \
        standin.requests_seen
    if baseline is not None:
        print(f"open fds: {baseline} before, peak {peak[0]} during {len(requests)} self-addressed requests")
        assert peak[0] <= baseline + len(requests) + 20, (baseline, peak[0])


def test_the_spellings_mitmproxy_knows_are_left_to_it(mitmdump, config_file):
    """127.0.0.1:<port> and localhost:<port> (what mitmproxy's own guard refuses, and what a part serving the
    proxy's own address answers in the `request` hook) pass the gate untouched: no 508 from it."""
    proxy = mitmdump(f"coze_config={config_file}")
    for host in ("127.0.0.1", "localhost"):
        answer = _answer(proxy.port, f"GET http://{host}:{proxy.port}/nothing HTTP/1.1\r\nHost: {host}:{proxy.port}\r\n"
                                     "Connection: close\r\n\r\n".encode())
        assert not answer.startswith(b"HTTP/1.1 508"), answer[:300]
        # the own-address part (parts/direct_api.py) answers it: a path that is not the API's is a JSON 404
        assert answer.startswith(b"HTTP/1.1 404") and b"is a Coze API base" in answer, answer[:300]
        api = _answer(proxy.port, f"GET /v1/bots/7001 HTTP/1.1\r\nHost: {host}:{proxy.port}\r\n"
                                  "Connection: close\r\n\r\n".encode())
        assert not api.startswith(b"HTTP/1.1 508"), api[:300]  # sent on to the Coze stand-in, not a loop
        assert b'"code"' in api and not api.startswith(b"HTTP/1.1 5"), api[:300]
