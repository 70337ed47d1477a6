"""Bounded work on what upstream sends (issue 9 §3), through a real mitmdump against a tiny hostile
Coze written here: compression bombs as Coze-looking error envelopes (gzip, br, zstd) from the API and
from the token endpoint, a token endpoint that echoes the signed assertion, an API that reflects the
injected token in a header. Peak memory (VmHWM) of the mitmdump process is read from /proc."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import secrets
import time
import zlib

import brotli
import pytest
import requests
import zstandard

from tests import servers
from tests.clients import PAGE, session, tagged
from tests.conftest import write_config

ALICE = "alice-0001"
BOB = "bob-000002"
MIB = 1 << 20
HEAD = b'{"code":700012006,"msg":"'  # an invalid-token envelope, the kind the auth addon reads
TAIL = b'"}'


def _bomb(encoding: str, mib: int) -> bytes:
    """A JSON envelope of `mib` MiB (mostly spaces) that compresses to a few KB."""
    chunk = b" " * MIB
    if encoding == "gzip":
        c = zlib.compressobj(9, zlib.DEFLATED, 31)
        feed, end = c.compress, c.flush
    elif encoding == "br":
        c = brotli.Compressor(quality=5)
        feed, end = c.process, c.finish
    else:
        c = zstandard.ZstdCompressor(level=19).compressobj()
        feed, end = c.compress, c.flush
    return b"".join([feed(HEAD), *(feed(chunk) for _ in range(mib)), feed(TAIL), end()])


@functools.lru_cache(maxsize=None)
def bomb(encoding: str) -> bytes:
    return _bomb(encoding, 64 if encoding == "gzip" else 256)


class Hostile(servers.Server):
    quiet = True  # a client that went away mid-answer is expected here

    def __init__(self):
        super().__init__(_Handler)
        self.token_mode = "ok"
        self.issued: list[str] = []
        self.assertions: list[str] = []
        self.start()


class _Handler(servers.Handler):
    server: Hostile

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send(status, body, headers=headers)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        assertion = self.headers.get("Authorization", "").removeprefix("Bearer ")
        self.server.assertions.append(assertion)
        mode = self.server.token_mode
        if mode == "echo":
            # A token endpoint that puts the signed assertion where the error code belongs (and in the text).
            body = {"error_code": assertion, "error_message": f"bad assertion {assertion}", "error": assertion}
            return self._send(401, json.dumps(body).encode(), {"X-Tt-Logid": assertion})
        if mode == "drip":
            # Each byte arrives well within a socket timeout; the whole answer would take minutes.
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.3)
            return
        if mode.startswith("bomb-"):
            enc = mode.removeprefix("bomb-")
            return self._send(200, bomb(enc), {"Content-Encoding": enc})
        token = "czs_" + secrets.token_urlsafe(24)
        self.server.issued.append(token)
        self._send(200, json.dumps({"access_token": token, "expires_in": int(time.time()) + 900}).encode())

    def do_GET(self):
        auth = self.headers.get("Authorization", "")
        if self.path.startswith("/v1/bomb/"):
            enc = self.path.rsplit("/", 1)[1]
            return self._send(200, bomb(enc), {"Content-Encoding": enc})
        if self.path == "/v1/reflect":
            return self._send(200, b'{"code":0,"msg":""}', {"X-Debug-Auth": auth, "X-Debug-Token": auth.removeprefix("Bearer ")})
        self._send(200, b'{"code":0,"msg":"","data":{}}')


@pytest.fixture
def hostile():
    server = Hostile()
    yield server
    server.stop()


@pytest.fixture
def proxy(mitmdump, tmp_path, rsa_key, hostile):
    config = write_config(tmp_path, rsa_key, hostile.base_url)
    return mitmdump(f"coze_config={config}", f"coze_origins={PAGE}", "coze_exchange_timeout=20")


def vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def fetch_raw(proxy, url: str, user: str) -> tuple[int, bytes]:
    """A tagged GET whose body is read as sent (never decoded by the test client)."""
    r = session(proxy).get(url, headers=tagged(user), stream=True, timeout=60)
    try:
        return r.status_code, r.raw.read(decode_content=False)
    finally:
        r.close()


def test_compression_bombs_cost_bounded_memory_others_served(proxy, hostile):
    for enc in ("gzip", "br", "zstd"):
        bomb(enc)  # built before measuring
    ok = f"{hostile.base_url}/v1/ok"
    s = session(proxy)
    assert s.get(ok, headers=tagged(BOB), timeout=30).status_code == 200  # Bob's token is cached
    assert s.get(ok, headers=tagged(ALICE), timeout=30).status_code == 200
    before = vm_hwm_mib(proxy.proc.pid)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        bombs = {enc: pool.submit(fetch_raw, proxy, f"{hostile.base_url}/v1/bomb/{enc}", ALICE)
                 for enc in ("gzip", "br", "zstd")}
        bob_answers = 0
        while not all(f.done() for f in bombs.values()) or bob_answers < 3:
            # Another user's cached request keeps being answered meanwhile.
            assert s.get(ok, headers=tagged(BOB), timeout=30).json()["code"] == 0
            bob_answers += 1
        for enc, f in bombs.items():
            status, raw = f.result()
            assert status == 200 and raw == bomb(enc), enc  # passed through as it came, not decoded

    # The token endpoint sends bombs too: a 502 for that user, nothing decoded past the bound.
    for i, enc in enumerate(("gzip", "br", "zstd")):
        hostile.token_mode = f"bomb-{enc}"
        r = s.get(ok, headers=tagged(f"new-user-000{i}"), timeout=30)
        assert r.status_code == 502 and set(r.json()) == {"code", "msg"}, r.text
        assert s.get(ok, headers=tagged(BOB), timeout=30).status_code == 200

    growth = vm_hwm_mib(proxy.proc.pid) - before
    print(f"mitmdump VmHWM {before:.0f} MiB -> +{growth:.1f} MiB")
    assert growth < 48, f"mitmdump's peak memory grew by {growth:.0f} MiB"
    assert "Traceback" not in proxy.output


def test_token_endpoint_echoing_the_assertion_leaks_it_nowhere(proxy, hostile):
    hostile.token_mode = "echo"
    s = session(proxy)
    r = s.get(f"{hostile.base_url}/v1/ok", headers=tagged(ALICE), timeout=30)
    assert r.status_code == 502
    body = r.json()
    assert set(body) == {"code", "msg"} and "Coze refused the token exchange" in body["msg"]
    status = requests.get("http://coze.mitm/status.json", proxies=proxy.proxies, timeout=30).json()
    page = requests.get("http://coze.mitm/", proxies=proxy.proxies, timeout=30).text
    assert set(status["counters"]["refusals"]) == {"exchange-refused"}
    time.sleep(0.2)  # the log line of the refusal is written by another thread of mitmdump
    (assertion,) = hostile.assertions
    for part in [assertion, *assertion.split(".")]:
        for where, text in (("502 body", r.text), ("log", proxy.output), ("status.json", json.dumps(status)),
                            ("status page", page)):
            assert part not in text, f"a piece of the signed assertion reached the {where}"
    assert len(json.dumps(status)) < 20_000


def test_token_reflected_in_a_response_header_never_reaches_the_page(proxy, hostile):
    r = session(proxy).get(f"{hostile.base_url}/v1/reflect", headers=tagged(ALICE), timeout=30)
    assert r.status_code == 200
    (token,) = hostile.issued
    assert "X-Debug-Auth" in r.headers  # the header is there, the token is not
    for name, value in r.headers.items():
        assert token not in value, name


def test_token_endpoint_dripping_its_answer_504_at_the_deadline(mitmdump, tmp_path, rsa_key, hostile):
    config = write_config(tmp_path, rsa_key, hostile.base_url)
    proxy = mitmdump(f"coze_config={config}", f"coze_origins={PAGE}", "coze_exchange_timeout=2")
    s = session(proxy)
    assert s.get(f"{hostile.base_url}/v1/ok", headers=tagged(BOB), timeout=30).status_code == 200
    hostile.token_mode = "drip"
    r = s.get(f"{hostile.base_url}/v1/ok", headers=tagged(ALICE), timeout=30)
    assert r.status_code == 504 and "did not answer within 2 s" in r.json()["msg"], r.text
    assert s.get(f"{hostile.base_url}/v1/ok", headers=tagged(BOB), timeout=30).status_code == 200
    assert "Traceback" not in proxy.output
