"""Authorization: swap the user tag for that user's real Coze credential, on the Coze API only.

request         tag valid, origin allowed? -> token broker -> header swapped (or a local JSON answer)
responseheaders the stored flow gets the page's placeholder back (mitmweb never shows the token);
                a 401 from Coze drops the cached token
response        HTTP 200 + code 700012006 (or 4100) drops it too
Every path that cannot inject answers locally: a flow hook that raised would fail open and
forward the placeholder, so this addon catches its own errors.
"""

from __future__ import annotations

import json
import logging
import weakref

from mitmproxy import http

import identity
from answers import answer_json
from identity import short_id
from settings import CozeSettings
from tokens import ExchangeError, LimitError

log = logging.getLogger("coze.auth")

COZE_USER = "coze_user"  # flow.metadata: the (full) user id whose credential this flow carries
INVALID_TOKEN_CODES = (4100, 700012006)


class Auth:
    def __init__(self, settings: CozeSettings):
        self.settings = settings
        # Kept beside the flow, not in flow.metadata, which `-w` saves and tools show.
        self._tokens: weakref.WeakKeyDictionary[http.HTTPFlow, str] = weakref.WeakKeyDictionary()
        self._page_headers: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[list, list]] = weakref.WeakKeyDictionary()

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live:
            return
        try:
            await self._handle(flow)
        except Exception:
            log.exception("coze-mitm: unexpected error while adding credentials")
            self._refuse(flow, 502, 5000, "internal-error",
                         "coze-mitm failed while adding credentials; see the mitmproxy log and report the bug")

    async def _handle(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        if not self.settings.is_coze_api(request):
            if not any(identity.is_placeholder(a) for a in request.headers.get_all("authorization")):
                return
            if self.settings.broker is None:
                self._refuse_unconfigured(flow)
            else:
                self._refuse(flow, 400, 4000, "tag-to-other-host",
                             f"a coze-mitm user tag was sent to {request.host}, which is not a configured Coze API "
                             "host; only the Coze API gets credentials (add it with coze_api_hosts if it is one)")
            return

        self.settings.stats.requests += 1
        decision = identity.admit(request.headers, self.settings.page_origins)
        if decision.action == "pass":
            return
        if decision.action == "refuse":
            self._refuse(flow, decision.status, decision.code, decision.reason, decision.msg)
            return

        if self.settings.broker is None:
            self._refuse_unconfigured(flow)
            return
        user_id = decision.user_id
        try:
            token = await self.settings.broker.token_for(user_id)
        except ExchangeError as e:
            self.settings.stats.error(e.reason, e.msg, e.logid)
            self._refuse(flow, e.status, e.code, e.reason, e.msg)
            return
        except LimitError as e:
            self._refuse(flow, 429, 4013, "new-user-limit", e.msg, {"Retry-After": str(e.retry_after)})
            return
        if not flow.live:
            return  # the client gave up while the token was minted; the token stays cached for next time

        original = (request.headers.get_all("authorization"), request.headers.get_all("cookie"))
        request.headers["Authorization"] = f"Bearer {token}"
        remaining_cookies = identity.strip_cookie(original[1])
        request.headers.set_all("cookie", remaining_cookies)
        self._tokens[flow] = token
        self._page_headers[flow] = original
        flow.metadata[COZE_USER] = user_id
        flow.comment = (
            f"coze-mitm: {self.settings.broker.mode.upper()} credential for user {short_id(user_id)} injected "
            "(the page's placeholder is shown; the token is never stored in the flow)"
        )
        flow.marked = ":key:"
        self.settings.stats.injected += 1

    def _refuse_unconfigured(self, flow: http.HTTPFlow) -> None:
        self._refuse(flow, 503, 5000, "not-configured", f"coze-mitm cannot add credentials: {self.settings.problem}")

    def _refuse(self, flow: http.HTTPFlow, status: int, code: int, reason: str, msg: str,
                headers: dict[str, str] | None = None) -> None:
        answer_json(flow, status, code, msg, headers)
        self.settings.stats.refused(reason)
        flow.comment = f"coze-mitm: answered locally ({reason}); not forwarded"
        flow.marked = ":no_entry:"
        log.info(f"coze-mitm: refused {flow.request.method} {flow.request.host}{flow.request.path.split('?')[0]} "
                 f"({reason}): {msg}")

    def _restore_page_headers(self, flow: http.HTTPFlow) -> None:
        """The request has left: put the page's own headers back, so no view of the flow shows the token."""
        original = self._page_headers.pop(flow, None)
        if original is not None:
            flow.request.headers.set_all("authorization", original[0])
            flow.request.headers.set_all("cookie", original[1])

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._restore_page_headers(flow)
        if flow.response.status_code == 401 and flow in self._tokens:
            self._drop(flow, self._tokens.pop(flow), "HTTP 401")

    def response(self, flow: http.HTTPFlow) -> None:
        token = self._tokens.pop(flow, None)
        if token is None or flow.response.stream:
            return
        if "json" not in flow.response.headers.get("content-type", ""):
            return
        try:
            code = json.loads(flow.response.get_content(strict=False) or b"null").get("code")
        except (ValueError, AttributeError):
            return
        if code in INVALID_TOKEN_CODES:
            self._drop(flow, token, f"code {code}")

    def error(self, flow: http.HTTPFlow) -> None:
        self._restore_page_headers(flow)
        self._tokens.pop(flow, None)

    def _drop(self, flow: http.HTTPFlow, token: str, why: str) -> None:
        user_id = flow.metadata.get(COZE_USER, "")
        if self.settings.broker.invalidate(user_id, token):
            log.warning(f"coze-mitm: Coze rejected the token of user {short_id(user_id)} ({why}); "
                        "it is dropped and the next request mints a fresh one")
            flow.comment += f"; Coze rejected the token ({why}), dropped"
