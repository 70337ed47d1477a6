"""A team behind one proxy: proxy logins (an htpasswd file of {SHA} lines), and a person's client that logs in
and sends tagged requests through the proxy (tests/test_team.py, tests/test_ldap.py, ...)."""

from __future__ import annotations

import base64
import hashlib
import json

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.clients import chat_body, tagged
from tests.harness import Mitmdump

PASSWORDS = {"alice": "alice-Pw-5c1e77a0", "bob": "bob-Pw-90d2b4e1"}
TAG_A, TAG_B = "1732000000001-tagOfBrowserA", "1732000000002-tagOfBrowserB"


def sha_line(user: str, password: str) -> str:
    # {SHA}: read by mitmproxy 11's passlib and mitmproxy 12's own htpasswd parser alike
    return f"{user}:{{SHA}}{base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()}\n"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Client:
    """One person: a proxy login, and the tag of one browser's userscript."""

    def __init__(self, proxy: Mitmdump, standin, name: str, tag: str, password: str | None = None):
        self.proxy, self.standin, self.name, self.tag = proxy, standin, name, tag
        self.auth = basic(name, PASSWORDS[name] if password is None else password)
        self.s = requests.Session()
        self.s.trust_env = False
        self.s.proxies = {"http": proxy.url}

    def call(self, method: str, path: str, origin: str | None = None, **kw) -> requests.Response:
        headers = {**tagged(self.tag, origin=origin), "Proxy-Authorization": self.auth, **kw.pop("headers", {})}
        return self.s.request(method, f"{self.standin.base_url}{path}", headers=headers, timeout=30, **kw)

    def chat(self, text: str, conversation_id: str | None = None, origin: str | None = None) -> dict:
        """A non-streamed /v3/chat: the chat object."""
        r = self.call("POST", "/v3/chat" + (f"?conversation_id={conversation_id}" if conversation_id else ""),
                      origin=origin, json=chat_body(self.tag, text, stream=False))
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["code"] == 0, answer
        return answer["data"]

    def stream(self, text: str) -> tuple[int, list[str], requests.Response]:
        """A streamed /v3/chat read to its end: (token_count the client saw, the stand-in's status of that chat
        at each delta the client received, the response)."""
        r = self.call("POST", "/v3/chat", json=chat_body(self.tag, text, stream=True), stream=True)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        event, statuses, tokens = None, [], None
        for line in r.iter_lines():
            if line.startswith(b"event:"):
                event = line[6:].decode()
            elif line.startswith(b"data:") and event == "conversation.message.delta":
                statuses.append(self._last_status())
            elif line.startswith(b"data:") and event == "conversation.chat.completed":
                tokens = json.loads(line[5:])["usage"]["token_count"]
        return tokens, statuses, r

    def _last_status(self) -> str:
        return self.standin.chats_of(f"login:{self.name}")[-1]["status"]

    def history(self, conversation_id: str) -> dict:
        return self.call("POST", f"/v1/conversation/message/list?conversation_id={conversation_id}",
                         json={"limit": 10}).json()

    def get(self, url: str) -> requests.Response:
        return self.s.get(url, headers={"Proxy-Authorization": self.auth}, timeout=10)

    def status(self) -> dict:
        return self.get("http://coze.mitm/status.json").json()

    def usage(self) -> dict:
        return {u["user"]: u for u in self.status()["usage"]}

    def metrics(self) -> dict:
        text = self.get("http://coze.mitm/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}
