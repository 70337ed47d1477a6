"""The bundle's work on a cached-token request, written as one object with three flow hooks and almost no
helper functions: a measurement, not a part of coze-mitm (python bench/run.py's attribution pass).

What it does is what the bundle does to the benchmark's request (a page's tagged GET to the Coze API from
this machine): the destination asked once; the client's address; the tag, Origin and Sec-Fetch headers read
and decided once per distinct set (as identity.Admissions keeps them, with its patterns); the
user's cached token looked up with its expiry; Authorization and Accept-Encoding swapped and a proxy login's
header dropped in one pass; the page's
fields kept for the flow's view; the flow's comment, marker and metadata; the counters. Then, on the answer:
the page's fields put back, the token looked for in the answer's headers, the CORS headers set with Vary
merged, the event-stream question, and Coze's code looked for in the body. Not done: anything the request does
not reach (refusals, minting, budgets, LDAP, WebSockets, the pages coze.mitm serves), and the isolation between
parts (an exception here is mitmproxy's to log).

Why: the bundle's parts make ~115 calls into ~60 distinct Python functions and methods on such a request
(traced in process), through 13 part hooks; timed in the proxy each hook costs microseconds however little it
does (Streaming.responseheaders, one header read: 3-6 us), a sign that what costs is each function's and
object's first touch per request (code, constants, globals, caches) after mitmproxy's own millisecond of work,
more than the instructions. This puts a number on how far fusing the parts would go, against the least swap
(bench/least_swap.py, the floor of any swap) and the bundle, measured in the same pass.

COZE_BENCH_TOKEN: the token; COZE_BENCH_API: the Coze API base (the stand-in's); COZE_BENCH_ORIGIN: the page.
"""

import json
import os
import sys
import time
import urllib.parse
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "addons"))

# The rules' own constants, so that the floor decides what the parts decide.
from coze_mitm.core.identity import BROWSER_HEADERS, PLACEHOLDER_RE, USER_ID_RE, is_loopback  # noqa: E402
from coze_mitm.parts.cors import EXPOSE_HEADERS  # noqa: E402
from coze_mitm.parts.coze_answers import _CODE_RE, MAX_ENVELOPE, WATCHED_CODES  # noqa: E402

TOKEN = os.environ.get("COZE_BENCH_TOKEN", "")
_api = urllib.parse.urlsplit(os.environ.get("COZE_BENCH_API", "http://127.0.0.1:1"))
API = frozenset({(_api.scheme.encode(), (_api.hostname or "").lower(), _api.port or (443 if _api.scheme == "https" else 80))})
ORIGINS = frozenset({os.environ.get("COZE_BENCH_ORIGIN", "https://chat.example.org")})
GATHERED = frozenset({b"authorization", b"cookie", b"origin", *(name.encode() for name in BROWSER_HEADERS)})
EXPOSE = EXPOSE_HEADERS.encode()
CORS_NAMES = (b"access-control-allow-origin", b"access-control-allow-credentials", b"access-control-expose-headers")


class FusedFloor:
    def __init__(self):
        self.decided: dict = {}  # the read headers -> (user, origin), as identity.Admissions keeps them
        self.tokens: dict = {}  # user -> (token, expires at), as the broker's cache
        self.sent = weakref.WeakKeyDictionary()  # flow -> (token, page fields, injected fields)
        self.stats = {"requests": 0, "injected": 0}

    def request(self, flow):
        request = flow.request
        data = request.data
        if flow.response or not flow.live or (data.scheme.lower(), data.host.lower(), data.port) not in API:
            return
        self.stats["requests"] += 1
        peer = flow.client_conn.peername
        if not (peer and is_loopback(str(peer[0]))):
            return
        page = data.headers.fields
        read = tuple([f for f in page if f[0].lower() in GATHERED])
        known = self.decided.get(read)
        if known is None:
            got = {}
            for name, value in read:
                got.setdefault(name.lower(), []).append(value.decode("utf-8", "surrogateescape"))
            tag = PLACEHOLDER_RE.fullmatch(got.get(b"authorization", [""])[0])
            user = tag.group(1) if tag and USER_ID_RE.fullmatch(tag.group(1)) else None
            origins = got.get(b"origin", [])
            origin = origins[0] if len(origins) == 1 and origins[0] in ORIGINS else None
            known = self.decided[read] = (user, origin)
        user, origin = known
        if user is None:
            return
        if origin is not None:
            flow.metadata["cors_origin"] = origin
        entry = self.tokens.get(user)
        if entry is None or entry[1] < time.time() + 60:
            entry = self.tokens[user] = (TOKEN, time.time() + 900)
        token = entry[0]
        out = []
        for field in page:
            name = field[0].lower()
            if name == b"authorization":
                out.append((field[0], b"Bearer " + token.encode()))
            elif name == b"accept-encoding":
                out.append((field[0], b"identity"))
            elif name != b"proxy-authorization":  # a proxy login's password never travels on (login.py)
                out.append(field)
        data.headers.fields = injected = tuple(out)
        self.sent[flow] = (token, page, injected)
        flow.metadata["coze_user"] = user
        flow.comment = f"coze-mitm: OAUTH credential for user {user[:4]}…{user[-4:]} injected (the page's placeholder is shown)"
        flow.marked = ":key:"
        self.stats["injected"] += 1

    def responseheaders(self, flow):
        sent = self.sent.get(flow)
        response = flow.response
        if sent is None or response is None:
            return
        if flow.request.headers.fields is sent[2]:
            flow.request.headers.fields = sent[1]
        theirs = response.headers.fields
        secret = sent[0].encode()
        if secret in b"\n".join([value for _, value in theirs]):
            theirs = tuple((name, value.replace(secret, b"[redacted]")) for name, value in theirs)
        origin = flow.metadata.get("cors_origin")
        event_stream = False
        if origin is not None:
            out = []
            vary = None
            for field in theirs:
                name = field[0].lower()
                if name in CORS_NAMES:
                    continue
                if name == b"vary":
                    vary = field[1] if vary is None else vary + b", " + field[1]
                    continue
                if name == b"content-type":
                    event_stream = field[1].lower().startswith(b"text/event-stream")
                out.append(field)
            out += [(b"Access-Control-Allow-Origin", origin.encode()), (b"Access-Control-Allow-Credentials", b"true"),
                    (b"Access-Control-Expose-Headers", EXPOSE),
                    (b"Vary", b"Origin" if vary is None else vary + (b"" if b"origin" in vary.lower() else b", Origin"))]
            theirs = tuple(out)
        response.headers.fields = theirs
        if event_stream:
            response.stream = True

    def response(self, flow):
        sent = self.sent.pop(flow, None)
        response = flow.response
        if sent is None or response is None or response.stream:
            return
        raw = response.raw_content
        if raw and len(raw) <= MAX_ENVELOPE and any(int(c) in WATCHED_CODES for c in _CODE_RE.findall(raw)):
            body = json.loads(raw)
            if isinstance(body, dict) and body.get("code") in WATCHED_CODES:
                self.stats["watched"] = self.stats.get("watched", 0) + 1


addons = [FusedFloor()]
