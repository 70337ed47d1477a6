"""Coze behaviours the strict stand-in does not have, as small HTTP servers (tests/servers.py): in front of it,
or beside it for an endpoint it does not serve."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse

import requests

from sandbox import go_json
from tests import servers


class InProgressFront:
    """Coze's behaviour for non-streamed chats, in front of the stand-in (which answers them completed):
    POST /v3/chat with stream false is answered at once with the chat `in_progress` while the chat runs on
    (as a stream to the stand-in, read to its end in the background); everything else is passed through
    unchanged. Records what reached it."""

    def __init__(self, standin):
        self.standin = standin
        self.answered: dict[str, float] = {}  # chat id -> when it was answered in_progress
        self.retrieves: list[dict] = []  # {time, authorization, chat_id, status}
        self.bg: list[threading.Thread] = []
        front = self

        class Handler(servers.Handler):
            def do_GET(self):
                self._any()

            def do_POST(self):
                self._any()

            def _any(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
                url = front.standin.base_url + self.path
                s = requests.Session()
                s.trust_env = False
                path = self.path.split("?")[0]
                data = json.loads(body) if body else None
                if self.command == "POST" and path == "/v3/chat" and isinstance(data, dict) and data.get("stream") is not True:
                    return self._in_progress(s, url, headers, data)
                r = s.request(self.command, url, headers=headers, data=body or None, timeout=30)
                if path == "/v3/chat/retrieve":
                    q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                    front.retrieves.append({"time": time.time(), "authorization": self.headers.get("authorization"),
                                            "chat_id": q.get("chat_id", [""])[0], "status": r.json().get("data", {}).get("status")})
                self.send(r.status_code, r.content, r.headers.get("content-type", "application/json"))

            def _in_progress(self, s, url, headers, data):
                r = s.post(url, headers=headers, json=dict(data, stream=True), stream=True, timeout=30)
                lines = r.iter_lines()
                chat = None
                for line in lines:
                    if line.startswith(b"data:") and chat is None:
                        chat = json.loads(line[5:])
                        break
                front.answered[chat["id"]] = time.time()
                self.send(200, json.dumps({"code": 0, "msg": "", "data": dict(chat, status="in_progress")}).encode())
                def read_on():
                    try:
                        for _ in lines:
                            pass
                    except requests.RequestException:
                        pass  # the stand-in stopped at the end of the test
                t = threading.Thread(target=read_on, daemon=True)
                t.start()
                front.bg.append(t)

        self.server = servers.Server(Handler).start()
        self.base_url = self.server.base_url

    def stop(self):
        self.server.stop()


class WorkflowFront:
    """`POST /v1/workflow/run` as Coze answers a synchronous run (the output, and `usage` beside it), routed
    the way a Go server routes (`/v1/workflow/%72un` is `/v1/workflow/run`). Records what it billed. Only the
    real token is accepted (the placeholder must never arrive)."""

    TOKENS = 20

    def __init__(self):
        self.billed = 0
        self.targets: list[str] = []
        front = self

        class Handler(servers.Handler):
            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                body = go_json.decode(self.rfile.read(length)) if length else {}
                front.targets.append(self.path)
                if go_json.route(self.path) != "/v1/workflow/run":
                    return self._send(404, {"code": 4000, "msg": "no such endpoint"})
                if not (self.headers.get("authorization") or "").startswith("Bearer czs_"):
                    return self._send(401, {"code": 4100, "msg": "authentication is invalid"})
                front.billed += WorkflowFront.TOKENS
                usage = {"token_count": WorkflowFront.TOKENS, "input_count": 5, "output_count": 15}
                self._send(200, {"code": 0, "msg": "", "data": json.dumps({"Output": f"ran {body.get('workflow_id')}"}),
                                 "execute_id": str(len(front.targets)), "usage": usage})

            def _send(self, status, obj):
                self.send(status, json.dumps(obj).encode())

        self.server = servers.Server(Handler).start()
        self.base_url = self.server.base_url

    def stop(self):
        self.server.stop()
