"""mitmweb loads the bundle too, and its view of a flow never holds the injected token."""

import http.client
import json
import re
import secrets
import threading
import time

import mitmproxy.version
import pytest
import requests

from tests import servers
from tests.conftest import write_config

# coze-mitm refuses to run inside mitmweb < 11.1.2 (CVE-2025-23217, parts/web_guard.py; tests/test_local_gate.py
# checks that refusal): these tests run on mitmproxy 12.x (the Python 3.12 pass of .ci/run).
pytestmark = [pytest.mark.skipif(
    tuple(int(x) for x in re.findall(r"\d+", mitmproxy.version.VERSION)[:3]) < (11, 1, 2),
    reason=f"mitmproxy {mitmproxy.version.VERSION}: coze-mitm does not run in mitmweb < 11.1.2 (CVE-2025-23217); "
           "these tests run with mitmproxy 12 (Python 3.12)"),
    pytest.mark.process]  # every test here starts mitmweb (run_tests.py --fast leaves them out)
from tests.harness import Mitmdump, free_port

PAGE = "https://chat.example.org"
WEB_PASSWORD = "coze-mitm-test-web-password"


def test_mitmweb_shows_marked_flows_without_the_token(tmp_path, config_file, standin):
    web_port = free_port()
    sets = [f"coze_config={config_file}", f"coze_origins={PAGE}", "web_open_browser=false",
            f"web_port={web_port}", "web_host=127.0.0.1"]
    if mitmproxy.version.VERSION.split(".")[0] != "11":
        sets.append(f"web_password={WEB_PASSWORD}")  # 12.x requires a token for its API
    web = Mitmdump(tmp_path, sets, tool="mitmweb").start()
    try:
        client = requests.Session()
        client.trust_env = False
        client.proxies = web.proxies
        tagged = {"Authorization": "Bearer user:alice-0001", "Origin": PAGE, "Sec-Fetch-Mode": "cors"}
        assert client.get(f"{standin.base_url}/v1/bots/7000", headers=tagged).json()["code"] == 0
        chat = client.post(f"{standin.base_url}/v3/chat", headers=tagged, stream=True,
                           json={"bot_id": "7000", "user_id": "alice-0001", "stream": True,
                                 "additional_messages": [{"role": "user", "content": "hi", "content_type": "text"}]})
        assert b"[DONE]" in b"".join(chat.iter_content(None))
        refused = client.get(f"{standin.base_url}/v1/bots/7000", headers={**tagged, "Origin": "https://evil.example"})
        assert refused.status_code == 403

        api = requests.Session()
        api.trust_env = False
        api.headers["Authorization"] = f"Bearer {WEB_PASSWORD}"
        flows = api.get(f"http://127.0.0.1:{web_port}/flows", timeout=10)
        assert flows.status_code == 200, flows.text[:200]
        dump = api.get(f"http://127.0.0.1:{web_port}/flows/dump", timeout=10).content
        tokens = [e["access_token"] for e in standin.exchanges]
        assert len(tokens) == 1
        for view in (flows.text, dump.decode("utf-8", "replace")):
            assert tokens[0] not in view
        listed = flows.json()
        comments = [f.get("comment", "") for f in listed]
        assert sum("credential for user" in c for c in comments) == 2
        assert any("answered locally (origin-not-allowed)" in c for c in comments)
        injected = [f for f in listed if "credential for user" in f.get("comment", "")]
        assert all(f["marked"] for f in injected)
        for f in injected:
            headers = dict((k.lower(), v) for k, v in f["request"]["headers"])
            assert headers["authorization"] == "Bearer user:alice-0001"
    finally:
        web.stop()
    for token in tokens:
        assert token not in web.output


class SlowCoze(servers.Server):
    """A Coze API that mints tokens, takes an upload slowly, and answers a chat slowly, each step released by
    the test, so mitmweb's view can be read while a flow is in flight."""

    quiet = True  # a client that went away mid-answer is expected here

    def __init__(self):
        super().__init__(_SlowHandler)
        self.issued: list[str] = []
        self.got_first_chunk, self.finish_upload = threading.Event(), threading.Event()
        self.answer_started, self.finish_answer = threading.Event(), threading.Event()
        self.start()


class _SlowHandler(servers.Handler):
    server: SlowCoze

    def _json(self, obj) -> None:
        self.send(200, json.dumps(obj).encode())

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        if self.path.startswith("/api/permission/oauth2/token"):
            self.rfile.read(length)
            token = "czs_" + secrets.token_urlsafe(24)
            self.server.issued.append(token)
            return self._json({"access_token": token, "expires_in": int(time.time()) + 900})
        if self.path == "/v1/files/upload":
            self.rfile.read(1024)
            self.server.got_first_chunk.set()
            self.server.finish_upload.wait(30)
            self.rfile.read(length - 1024)
            return self._json({"code": 0, "msg": "", "data": {"id": "file-1"}})
        self.rfile.read(length)  # a chat: the answer starts, then streams until released
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        event = b"event: start\ndata:{}\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        self.wfile.flush()
        self.server.answer_started.set()
        self.server.finish_answer.wait(30)
        self.wfile.write(b"0\r\n\r\n")


def start_mitmweb(tmp_path, config_file, *extra):
    web_port = free_port()
    sets = [f"coze_config={config_file}", f"coze_origins={PAGE}", "web_open_browser=false",
            f"web_port={web_port}", "web_host=127.0.0.1", *extra]
    if mitmproxy.version.VERSION.split(".")[0] != "11":
        sets.append(f"web_password={WEB_PASSWORD}")
    web = Mitmdump(tmp_path, sets, tool="mitmweb").start()
    api = requests.Session()
    api.trust_env = False
    api.headers["Authorization"] = f"Bearer {WEB_PASSWORD}"

    def views() -> str:
        flows = api.get(f"http://127.0.0.1:{web_port}/flows", timeout=10)
        assert flows.status_code == 200, flows.text[:200]
        return flows.text + api.get(f"http://127.0.0.1:{web_port}/flows/dump", timeout=10).content.decode("latin-1")

    return web, views


@pytest.fixture
def slow_coze():
    server = SlowCoze()
    yield server
    server.finish_upload.set()
    server.finish_answer.set()
    server.stop()


def test_in_flight_window_ends_when_the_request_has_left(tmp_path, rsa_key, slow_coze):
    # A streamed upload (stream_large_bodies): the placeholder is back as soon as the headers and the first
    # chunk have left, while the rest of the body is still on its way. A chat: as soon as the answer's
    # headers arrive, while its body still streams.
    config_file = write_config(tmp_path, rsa_key, slow_coze.base_url)
    web, views = start_mitmweb(tmp_path, config_file, "stream_large_bodies=1k")
    try:
        host, port = "127.0.0.1", web.port
        body_size = 64 * 1024
        upload = http.client.HTTPConnection(host, port, timeout=30)
        upload.putrequest("POST", f"{slow_coze.base_url}/v1/files/upload", skip_accept_encoding=True)
        for k, v in {"Authorization": "Bearer user:alice-0001", "Content-Type": "application/octet-stream",
                     "Content-Length": str(body_size)}.items():
            upload.putheader(k, v)
        upload.endheaders()
        upload.send(b"x" * 4096)
        assert slow_coze.got_first_chunk.wait(30)
        (token,) = slow_coze.issued
        in_flight = views()
        assert "user:alice-0001" in in_flight and token not in in_flight
        upload.send(b"x" * (body_size - 4096))
        slow_coze.finish_upload.set()
        assert json.loads(upload.getresponse().read())["code"] == 0

        chat = http.client.HTTPConnection(host, port, timeout=30)
        chat.request("POST", f"{slow_coze.base_url}/v3/chat", body=b'{"stream":true}',
                     headers={"Authorization": "Bearer user:alice-0001", "Content-Type": "application/json"})
        answer = chat.getresponse()
        assert slow_coze.answer_started.wait(30) and answer.status == 200
        in_flight = views()
        assert in_flight.count("user:alice-0001") >= 2 and token not in in_flight
        slow_coze.finish_answer.set()
        answer.read()
    finally:
        web.stop()
    assert token not in web.output
