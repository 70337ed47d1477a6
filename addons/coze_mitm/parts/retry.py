"""The one transparent retry: Coze said the injected token is invalid, so the request is sent once more,
with a fresh token, to the same Coze API URL; the page sees only the second answer.

Not retried: streamed chats (the answer would be a live stream this hook could only buffer; the Chat
SDK retries by itself), streamed request bodies (nothing to send again), WebSocket handshakes, PAT mode
(a PAT cannot be renewed). The sending itself is resend.py's.
"""

from __future__ import annotations

import asyncio
import logging

import requests
from mitmproxy import http

from coze_mitm.parts.coze_answers import COZE_HINTS, INVALID_TOKEN_CODES, Hints, asks_for_stream, logid_of, unreflect, watched_code
from coze_mitm.core.identity import short_id
from coze_mitm.parts.resend import Resender
from coze_mitm.parts.settings import CozeSettings
from coze_mitm.core.tokens import ExchangeError, LimitError
from coze_mitm.flowmeta import CORS_ORIGIN, TOKEN_RETRY

log = logging.getLogger("coze.auth")



class TokenRetry:
    def __init__(self, settings: CozeSettings, hints: Hints):
        self.settings = settings
        self._hints = hints
        self._resender = Resender(settings.outbound)

    def close(self) -> None:
        self._resender.close()


    def may_retry(self, flow: http.HTTPFlow) -> bool:
        request, response = flow.request, flow.response
        if TOKEN_RETRY in flow.metadata or not flow.live or response.stream:
            return False
        if request.stream or request.raw_content is None:
            return False  # the body was streamed through: there is nothing to send again
        if "upgrade" in request.headers:
            return False  # a WebSocket handshake cannot be re-sent by plain HTTP; the client reconnects
        if self.settings.broker is None or self.settings.broker.mode != "jwt":
            return False  # a PAT cannot be renewed: the same answer would come back
        if asks_for_stream(request):
            # The answer to the retry would be a live event stream, which this hook could only buffer;
            # the page's own retry (the Chat SDK retries once after 401/4100/700012006) streams it.
            flow.metadata[TOKEN_RETRY] = "not retried: a streamed chat; the client's own retry gets a fresh token"
            return False
        if not self.settings.is_coze_api(request):
            return False
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False  # called outside an event loop (a synchronous caller): nothing could await the retry
        return True

    async def retry(self, flow: http.HTTPFlow, stale: str, why: str, user_id: str) -> None:
        try:
            await self._retry_once(flow, stale, why, user_id)
        except Exception:
            flow.metadata[TOKEN_RETRY] = "failed (internal error)"
            log.exception("coze-mitm: unexpected error while re-sending with a fresh token; passing Coze's answer through")

    async def _retry_once(self, flow: http.HTTPFlow, stale: str, why: str, user_id: str) -> None:
        flow.metadata[TOKEN_RETRY] = "started"
        try:
            fresh = await self.settings.broker.token_for(user_id)
        except (ExchangeError, LimitError) as e:
            flow.metadata[TOKEN_RETRY] = "no fresh token"
            log.warning(f"coze-mitm: no fresh token for user {short_id(user_id)}, passing Coze's refusal through: {e.msg}")
            return
        if fresh == stale or not flow.live:
            flow.metadata[TOKEN_RETRY] = "not retried"
            return
        request = flow.request
        try:
            answer = await self._resender.resend(request, fresh)
        except requests.RequestException as e:
            flow.metadata[TOKEN_RETRY] = f"failed ({type(e).__name__})"
            log.warning(f"coze-mitm: re-sending {request.method} {request.path.split('?')[0]} with a fresh token "
                        f"failed ({type(e).__name__}); passing Coze's refusal through")
            return
        old = flow.response
        answer.data.http_version = old.data.http_version
        unreflect(answer, fresh)
        flow.response = answer
        if flow.metadata.get(CORS_ORIGIN):
            # The Cors addon already decided this flow's CORS headers (its hook ran before this one):
            # the answer that replaces the old one keeps them.
            for name in {k.lower() for k in old.headers if k.lower().startswith("access-control-")} | {"vary"}:
                flow.response.headers.set_all(name, old.headers.get_all(name))
        code = watched_code(flow.response)
        if flow.response.status_code == 401 or code in INVALID_TOKEN_CODES:
            self.settings.broker.invalidate(user_id, fresh)
            flow.metadata[TOKEN_RETRY] = f"retried once, refused again (HTTP {flow.response.status_code})"
            log.warning(f"coze-mitm: Coze refused the fresh token of user {short_id(user_id)} too; "
                        f"passing its answer through (logid {logid_of(flow.response) or 'none'})")
        else:
            flow.metadata[TOKEN_RETRY] = f"retried once with a fresh token: HTTP {flow.response.status_code}"
            log.debug(f"coze-mitm: {request.method} {request.path.split('?')[0]} for user {short_id(user_id)} "
                     f"re-sent with a fresh token after {why}: HTTP {flow.response.status_code}")
            if code in COZE_HINTS:
                self._hints.note(flow, code, user_id)
        flow.comment += f"; re-sent once with a fresh token (HTTP {flow.response.status_code})"
