"""Coze behaviours the strict stand-in does not have, put in front of it as a small HTTP server."""

from __future__ import annotations

import http.server
import json
import socketserver
import threading
import time
import urllib.parse

import requests


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

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

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
                self._send(r.status_code, r.content, r.headers.get("content-type", "application/json"))

            def _in_progress(self, s, url, headers, data):
                r = s.post(url, headers=headers, json=dict(data, stream=True), stream=True, timeout=30)
                lines = r.iter_lines()
                chat = None
                for line in lines:
                    if line.startswith(b"data:") and chat is None:
                        chat = json.loads(line[5:])
                        break
                front.answered[chat["id"]] = time.time()
                self._send(200, json.dumps({"code": 0, "msg": "", "data": dict(chat, status="in_progress")}).encode(),
                           "application/json")
                def read_on():
                    try:
                        for _ in lines:
                            pass
                    except requests.RequestException:
                        pass  # the stand-in stopped at the end of the test
                t = threading.Thread(target=read_on, daemon=True)
                t.start()
                front.bg.append(t)

            def _send(self, status, body, ctype):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            request_queue_size = 128  # many chats at once (test_budgets_billed.py): no connection left unaccepted

        self.server = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
