"""mitmweb loads the bundle too, and its view of a flow never holds the injected token."""

import socket

import mitmproxy.version
import requests

from tests.harness import Mitmdump

PAGE = "https://chat.example.org"
WEB_PASSWORD = "coze-mitm-test-web-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
