"""HTTP clients for tests that go through a real proxy: a session, a tagged request's headers, a chat's body and
what the stand-in charges for it, a WebSocket client."""

from __future__ import annotations

import json
import os
import socket
import struct
import urllib.parse

import requests
from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, RejectConnection, RejectData, Request,
                            TextMessage)

PAGE = "https://chat.example.org"


def session(proxy) -> requests.Session:
    """A keep-alive session through `proxy` that ignores proxy settings from the environment."""
    s = requests.Session()
    s.trust_env = False
    s.proxies = proxy.proxies
    return s


def tagged(user_id: str, origin: str | None = PAGE, **extra) -> dict:
    """What the Chat SDK sends from page `origin` (None: a non-browser client like cozepy)."""
    headers = {"Authorization": f"Bearer user:{user_id}", "Content-Type": "application/json"}
    if origin:
        headers.update({"Origin": origin, "Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "cross-site"})
    headers.update(extra)
    return headers


def placeholder_query(user_id: str, **more) -> str:
    """A WebSocket URL's query with the placeholder token (browsers cannot set headers on a WebSocket)."""
    return urllib.parse.urlencode({"bot_id": "7000", **more, "authorization": f"Bearer user:{user_id}"},
                                  quote_via=urllib.parse.quote)


def chat_body(user: str, text: str, stream: bool) -> dict:
    """A /v3/chat body: one user message to bot 7000."""
    return {"bot_id": "7000", "user_id": user, "stream": stream,
            "additional_messages": [{"role": "user", "content": text, "content_type": "text"}]}


def tokens_of(text: str) -> int:
    """What the stand-in charges for a chat (common.usage_for): one token per word asked and answered,
    the answer being "Sandbox reply to: <text>"."""
    return 2 * len(text.split()) + 3


def usage_today(s: requests.Session) -> int:
    """Tokens counted today, from the status page (through the session's proxy)."""
    return s.get("http://coze.mitm/status.json", timeout=10).json()["usage_totals"]["tokens_today"]


def ws_reply(events: list[dict]) -> str:
    """The answer's text from a WebSocket chat's events (its message deltas)."""
    return "".join(e["data"]["content"] for e in events if e["event_type"] == "conversation.message.delta")


def masked_text_frame(text: str) -> bytes:
    """One final text frame as a client sends it (RFC 6455: masked)."""
    payload = text.encode()
    n = len(payload)
    head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
                            if n < 65536 else bytes([0x80 | 127]) + struct.pack("!Q", n))
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class WsClient:
    """A WebSocket client over a plain socket to the proxy: CONNECT tunnel (as browsers and Node's agents
    do) or an absolute-URL GET."""

    def __init__(self, proxy_port: int, host: str, port: int, target: str, headers=(), tunnel: bool = True,
                 proxy_auth: str | None = None, origin_form: bool = False, first: tuple[str, dict] | None = None):
        """`proxy_auth`: a Proxy-Authorization value, sent on the CONNECT or on the absolute-URL upgrade.
        `origin_form`: no proxy at all, the upgrade sent to host:port as a server (`GET /v1/chat`, Host: host:port).
        `first`: (event_type, data) of a message sent in the same write as the upgrade request, before any 101."""
        self.sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
        headers = list(headers)
        if origin_form:
            pass
        elif tunnel:
            login = f"Proxy-Authorization: {proxy_auth}\r\n" if proxy_auth else ""
            self.sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n{login}\r\n".encode())
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += self.sock.recv(4096)
            assert answer.split(b"\r\n")[0].split()[1] == b"200", answer
        else:
            target = f"http://{host}:{port}{target}"
            if proxy_auth:
                headers.append(("Proxy-Authorization", proxy_auth))
        self.ws = WSConnection(ConnectionType.CLIENT)
        upgrade = self.ws.send(Request(host=f"{host}:{port}", target=target,
                                       extra_headers=[(k.encode(), v.encode()) for k, v in headers]))
        if first is not None:  # wsproto frames nothing before the 101: a masked text frame written here
            upgrade += masked_text_frame(json.dumps({"id": "0", "event_type": first[0], "data": first[1]}))
        self.sock.sendall(upgrade)
        self.status, self.body, self.accepted = None, b"", False
        self._pending: list = []  # events read from the socket but not handed out yet (several come in one read)
        body_done = False
        while not (self.accepted or body_done):
            for event in self._events():
                if self.accepted:
                    self._pending.append(event)  # messages right behind the 101
                elif isinstance(event, AcceptConnection):
                    self.status, self.accepted = 101, True
                elif isinstance(event, RejectConnection):
                    self.status = event.status_code
                    body_done = not event.has_body
                elif isinstance(event, RejectData):
                    self.body += event.data
                    body_done = event.body_finished

    def _events(self):
        data = self.sock.recv(65536)
        self.ws.receive_data(data or None)
        return list(self.ws.events())

    def next_events(self) -> list:
        """What until() left behind, or else the events of the next read."""
        events, self._pending = (self._pending or self._events()), []
        return events

    def send(self, event_type: str, data: dict) -> None:
        self.sock.sendall(self.ws.send(TextMessage(json.dumps({"id": "1", "event_type": event_type, "data": data}))))

    def chat(self, text: str) -> list[dict]:
        """A chat as the Chat SDK starts one on the socket (chat.update, then the user's message): the events up
        to conversation.chat.completed."""
        self.send("chat.update", {"chat_config": {}})
        self.send("conversation.message.create", {"role": "user", "content_type": "text", "content": text})
        return self.until("conversation.chat.completed")

    def chat_ends(self, n: int) -> tuple[list[dict], int]:
        """Reads until `n` chats started on the socket have ended: (the data of those refused with an `error`,
        how many completed)."""
        errors, completed = [], 0
        while completed + len(errors) < n:
            last = self.until("conversation.chat.completed")[-1]
            if last["event_type"] == "error":
                errors.append(last["data"])
            else:
                completed += 1
        return errors, completed

    def send_raw(self, data: str | bytes) -> None:
        """One message exactly as given: text for a str, binary for bytes."""
        message = TextMessage(data) if isinstance(data, str) else BytesMessage(data)
        self.sock.sendall(self.ws.send(message))

    def until(self, event_type: str) -> list[dict]:
        """The messages up to and including the first `event_type` (or `error`); what came behind it in the same
        read is kept for the next call."""
        seen = []
        while True:
            if not self._pending:
                self._pending = self._events()
            while self._pending:
                event = self._pending.pop(0)
                if isinstance(event, CloseConnection):
                    raise AssertionError(f"closed before {event_type}: {seen}")
                if isinstance(event, TextMessage):
                    seen.append(json.loads(event.data))
                    if seen[-1]["event_type"] in (event_type, "error"):
                        return seen

    def close(self):
        self.sock.close()
