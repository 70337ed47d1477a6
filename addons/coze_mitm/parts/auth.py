"""Authorization: swap the user tag for that user's real Coze credential, on the Coze API only.

requestheaders  only when the request body will be streamed (stream_large_bodies): its headers leave
                right after this hook, so the tag is swapped (or the flow killed) here
request         tag valid, origin allowed? -> token broker -> header swapped (or a local JSON answer);
                a tag sent to any other host is refused (placeholder) or removed (cookie)
responseheaders the stored flow gets the page's placeholder back (earlier for a streamed request body:
                at its first chunk, the headers having left); reflected tokens cut from the answer
response        Coze said the token is invalid (HTTP 401 / code 4100, or HTTP 200 / code 700012006):
                drop it, and for a request that was not streamed re-send it once, with a fresh token,
                to the same Coze API URL (retry.py); the page sees only the second answer.
                Coze's own errors (4013, 4101, 4015) pass through with a hint in the log.
Every path that cannot inject answers locally: a flow hook that raised would fail open and
forward the placeholder, so this addon catches its own errors.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from typing import Mapping

from mitmproxy import ctx, http

from coze_mitm.core import fields
from coze_mitm.core import identity
from coze_mitm.core import logins
from coze_mitm.parts.login import proxy_login
from coze_mitm.parts.answers import answer_json
from coze_mitm.parts.coze_answers import COZE_HINTS, INVALID_TOKEN_CODES, Hints, unreflect, watched_code
from coze_mitm.core.identity import short_id
from coze_mitm.parts.retry import TokenRetry
from coze_mitm.parts.refused_origins import RefusedOriginsLog
from coze_mitm.parts.settings import CozeSettings
from coze_mitm.core.refusal import NO_CREDENTIALS
from coze_mitm.core.stats import Stats
from coze_mitm.core.tokens import ExchangeError, LimitError
from coze_mitm.flowmeta import COZE_USER, REFUSED, TOKEN_RETRY

log = logging.getLogger("coze.auth")

IDENTITY = ["identity"]



class _Sent:
    """What auth keeps beside a flow it injected: the token (to know it again in the answer) and, until
    the request has left, what the page sent (authorization, cookie, and the path when its query held
    the tag), to be put back; with the header fields as the page sent them and as auth left them: while
    nothing else has touched them, putting them back is one assignment."""

    __slots__ = ("token", "page", "fields")

    def __init__(self, token: str, page: tuple[list, list, str | None], fields: tuple[tuple, tuple]):
        self.token, self.page, self.fields = token, page, fields


class Auth:
    def __init__(self, settings: CozeSettings, accounting=None, login=None, refused: RefusedOriginsLog | None = None,
                 stats: Stats | None = None):
        self.settings = settings
        self.refused = refused or RefusedOriginsLog()  # pages outside coze_origins: the status page shows them
        self.stats = stats or Stats()  # the counters the status page shows
        self.login = login  # the Login part: its `names` maps a proxy login to a session_name (LDAP: the entry)
        self.accounting = accounting  # the Accounting part: asked about budgets before a token is injected
        # Kept beside the flow, not in flow.metadata, which `-w` saves and tools show. One entry per
        # injected flow (a weak-key lookup is Python code, asked a few times per flow on the fast path).
        self._sent: weakref.WeakKeyDictionary[http.HTTPFlow, _Sent] = weakref.WeakKeyDictionary()
        self._admissions = identity.Admissions()
        self._hints = Hints(self.stats)
        self._retry = TokenRetry(settings, self._hints)
        self._streams_bodies = False

    def done(self):
        # `-w` saves flows still in flight at shutdown (Save.done runs after this script's done):
        # they must hold the page's placeholder by then, not the token.
        for flow in list(self._sent):
            self._restore_page_headers(flow)
        self._retry.close()

    # ------------------------------------------------------------------ request

    def configure(self, updated):
        if "stream_large_bodies" in updated:
            # An option of mitmproxy's proxy server (absent from bare test contexts).
            self._streams_bodies = bool(getattr(ctx.options, "stream_large_bodies", None))

    def requestheaders(self, flow: http.HTTPFlow):
        # A streamed request body (stream_large_bodies) sends the headers right after this hook, before
        # `request` runs: the tag must be dealt with now or it would leave as it is.
        if not flow.request.stream and not self._streams_bodies:
            return None
        return self._early(flow)

    async def _early(self, flow: http.HTTPFlow) -> None:
        pending = self.request(flow)
        if pending is not None:
            await pending
        if flow.response is not None and flow.request.stream and flow.killable:
            # A local answer cannot be combined with a streamed request body: refuse by closing instead.
            log.debug(f"coze-mitm: closed a streamed {flow.request.method} to {flow.request.host} instead of answering it")
            flow.kill()
        elif flow.request.stream is True and self._page_waiting(flow):
            # mitmproxy sends the headers before it hands the first body chunk to a stream callable:
            # from then on the stored request may show the page's placeholder again.
            flow.request.stream = self._restored_once_sent(flow)

    def _restored_once_sent(self, flow: http.HTTPFlow):
        def chunk(data: bytes) -> bytes:
            self._restore_page_headers(flow)
            return data
        return chunk

    def request(self, flow: http.HTTPFlow):
        """Synchronous, except for a tagged request whose user has no token yet: then it returns the
        awaitable that mints one (mitmproxy awaits what a hook returns; other flows keep moving)."""
        # Swapped in requestheaders already (only ever for a streamed request body: asked only then).
        if (self._streams_bodies or flow.request.stream) and flow in self._sent:
            if flow.request.stream:
                self._restore_page_headers(flow)  # streamed: the headers have left
            return None
        if flow.response or not flow.live:
            return None
        try:
            return self._handle(flow)
        except Exception:
            self._internal_error(flow)
            return None

    def _internal_error(self, flow: http.HTTPFlow) -> None:
        log.exception("coze-mitm: unexpected error while adding credentials")
        self._refuse(flow, 502, 5000, "internal-error",
                     "coze-mitm failed while adding credentials; see the mitmproxy log and report the bug")

    def _handle(self, flow: http.HTTPFlow):
        request = flow.request
        in_query = identity.query_authorizations(request.path)
        local = self._is_local(flow)
        if not (self.settings.is_coze_api(request) or self.settings.is_coze_ws(request)):
            if local:
                self._other_host(flow, identity.gather(request.headers), in_query)
                return None
            # A remote client (coze_allow_remote off): local_gate pinned its tunnel to an address, so the host is no
            # name to go by; the rules below refuse a tag as from another machine (403/4101), pass anything else.

        self.stats.requests += 1
        # `seen`: the headers the rules read, gathered in one pass, for every question below
        seen, decision = self._admissions(request.headers.fields, self.settings.page_origins, in_query, local)
        if decision.action == "pass":
            return None
        if decision.action == "refuse":
            self._refuse(flow, decision.status, decision.code, decision.reason, decision.msg)
            if decision.reason == "origin-not-allowed" and decision.origin and decision.origin != "null":
                self.refused.note(decision.origin, "a tagged request", logged_already=True)  # flowlog's line
            return None
        from_page = decision.origin is not None  # a page's refusal is shown by Coze's component only with a 200
        if self.settings.login_mode == "none":
            return self._serve(flow, seen, in_query, decision.user_id, from_page)
        name = self._login_of(flow)
        if name is None:
            return None
        names = self.login.names if self.login is not None else None
        if self.settings.login_mode == "ldap" and (names is None or not names.looks_up):
            self._refuse(flow, 503, 5000, "not-configured", "coze-mitm has no LDAP directory lookup configured "
                         "(see the mitmproxy log): LDAP logins cannot be mapped to their directory entry")
            return None
        user_id = logins.session_name(name) if names is None else names.cached(name)
        if user_id is not None:
            return self._serve(flow, seen, in_query, user_id, from_page)
        return self._resolve_and_serve(flow, seen, in_query, names, name, from_page)  # LDAP, first use of this name

    def _serve(self, flow: http.HTTPFlow, seen, in_query, user_id: str, from_page: bool):
        over = self._over_budget(flow, user_id, from_page)
        if over is True:
            return None
        if over is not False:  # a budget shared through Redis: decided there, asynchronously
            return self._serve_once_budgeted(over, flow, seen, in_query, user_id)
        return self._credentials(flow, seen, in_query, user_id)

    async def _serve_once_budgeted(self, decision, flow: http.HTTPFlow, seen, in_query, user_id: str) -> None:
        try:
            refusal = await decision
            if refusal is not None:
                status, code, reason, msg, headers = refusal
                self._refuse(flow, status, code, reason, msg, headers)
                return
            if not flow.live:  # the client left while the store decided: its chat never starts
                self.accounting.flight.release_all(flow.id)
                return
            pending = self._credentials(flow, seen, in_query, user_id)
            if pending is not None:
                await pending
        except Exception:
            self._internal_error(flow)

    def _credentials(self, flow: http.HTTPFlow, seen, in_query, user_id: str):
        broker = self.settings.broker
        if broker is None:
            self._refuse_unconfigured(flow)
            return None
        token = broker.cached_token(user_id)
        if token is not None:  # the common case: no await, no task
            self._inject(flow, seen, in_query, user_id, token)
            return None
        return self._mint_and_inject(flow, seen, in_query, user_id)

    def _login_of(self, flow: http.HTTPFlow) -> str | None:
        """With proxyauth on, the user is the proxy login (its history follows the login, whatever the tag):
        the name as typed, when it can be one; None (refused) otherwise."""
        name = proxy_login(flow)
        problem = "the request carries no proxy login" if name is None else logins.login_problem(name, self.settings.login_mode)
        if problem:
            self._refuse(flow, 403, NO_CREDENTIALS, "login-unusable",
                         f"{problem}: coze-mitm names Coze users by their proxy login; log in with another name")
            return None
        return name

    async def _resolve_and_serve(self, flow: http.HTTPFlow, seen, in_query, names, name: str, from_page: bool) -> None:
        """LDAP: the directory's identity of a login not seen lately (a worker thread asks the directory;
        other flows keep moving), then on as for any user."""
        from coze_mitm.parts.login import LoginRefused

        try:
            try:
                user_id = await names.resolve(name)
            except LoginRefused as e:
                self._refuse(flow, *e.refusal)
                return
            if flow.response is not None or not flow.live:
                return
            pending = self._serve(flow, seen, in_query, user_id, from_page)
            if pending is not None:
                await pending
        except Exception:
            self._internal_error(flow)

    def _over_budget(self, flow: http.HTTPFlow, user_id: str, from_page: bool):
        """Asked before a token is minted or injected: a request that would spend tokens over the user's
        budget (or beyond coze_user_max_parallel_chats) is answered locally with code 4013; HTTP 200 for a
        page (Coze's chat component shows the msg of a 200 only), 429 + Retry-After for other clients."""
        accounting = self.accounting
        if accounting is None or accounting.daily_tokens <= 0:
            return False  # no budgets: nothing to ask on the fast path
        refusal = accounting.budget_refusal(flow, user_id, short_id(user_id), from_page)
        if refusal is None:
            return False
        if inspect.isawaitable(refusal):
            return refusal  # the caller awaits the shared store's decision
        self._refuse(flow, *refusal)
        return True

    def _is_local(self, flow: http.HTTPFlow) -> bool:
        """May this client have credentials: on this machine, or anyone with coze_allow_remote?"""
        if self.settings.allow_remote:
            return True
        peer = flow.client_conn.peername  # a replay keeps the original client's address
        return peer is not None and identity.is_loopback(str(peer[0]))

    def _other_host(self, flow: http.HTTPFlow, seen, in_query) -> None:
        request = flow.request
        if any(identity.is_placeholder(a) for a in (*seen.get_all("authorization"), *in_query)):
            if self.settings.broker is None:
                self._refuse_unconfigured(flow)
            else:
                self._refuse(flow, 400, 4000, "tag-to-other-host",
                             f"a coze-mitm user tag was sent to {request.host}, which is not a configured Coze API "
                             "host; only the Coze API gets credentials (add it with coze_api_hosts if it is one)")
            return
        cookies = seen.get_all("cookie")
        if cookies and any(identity.COOKIE_NAME in c for c in cookies):
            # The tag names the user to Coze only; no other site learns it.
            request.headers.set_all("cookie", identity.strip_cookie(cookies))

    async def _mint_and_inject(self, flow: http.HTTPFlow, seen, in_query: list[str], user_id: str) -> None:
        try:
            try:
                token = await self.settings.broker.token_for(user_id)
            except ExchangeError as e:
                self.stats.error(e.reason, e.msg, e.logid)
                self._refuse(flow, *e.refusal)
                return
            except LimitError as e:
                self._refuse(flow, *e.refusal)
                return
            if not flow.live:
                # The client gave up while the token was minted (it stays cached for next time). Nothing is
                # forwarded for a dead flow, but it must not keep the placeholder either.
                answer_json(flow, 499, 5000, "the client closed the connection before coze-mitm could add credentials")
                return
            self._inject(flow, seen, in_query, user_id, token)
        except Exception:
            self._internal_error(flow)

    def _inject(self, flow: http.HTTPFlow, seen, in_query: list[str], user_id: str, token: str) -> None:
        request = flow.request
        headers = request.headers
        # What the page sent, put back once the request has left (the path only when its query held the tag).
        original = (seen.get_all("authorization"), seen.get_all("cookie"), request.path if in_query else None)
        page_fields = headers.fields
        # Coze is asked for answers it need not compress: auth reads the code of every non-streamed answer
        # (a revoked token can come as HTTP 200 + 700012006) and accounting the usage in every stream, and
        # a br or zstd decoder costs more per answer than the rest of coze-mitm's work on it
        # (docs/decisions.md, "Compressed answers"). Every HTTP client accepts identity.
        changes = {b"accept-encoding": (IDENTITY, b"Accept-Encoding")}
        if original[0] or original[2] is None:
            changes[b"authorization"] = ([f"Bearer {token}"], b"Authorization")
        fields.replace_each(headers, changes)
        if original[1]:
            headers.set_all("cookie", identity.strip_cookie(original[1]))
        if original[2] is not None:
            request.path = identity.with_query_token(original[2], token)
        self._sent[flow] = _Sent(token, original, (page_fields, headers.fields))
        flow.metadata[COZE_USER] = user_id
        flow.metadata.pop(TOKEN_RETRY, None)
        flow.comment = (
            f"coze-mitm: {self.settings.broker.mode.upper()} credential for user {short_id(user_id)} injected "
            "(the page's placeholder is shown; the token is never stored in the flow)"
        )
        flow.marked = ":key:"
        self.stats.injected += 1

    def _refuse_unconfigured(self, flow: http.HTTPFlow) -> None:
        self._refuse(flow, 503, 5000, "not-configured", f"coze-mitm cannot add credentials: {self.settings.problem}")

    def _refuse(self, flow: http.HTTPFlow, status: int, code: int, reason: str, msg: str,
                headers: Mapping[str, str] | None = None) -> None:
        """Answer locally, not forwarded (the fields of a core.refusal.Refusal: `self._refuse(flow, *refusal)`)."""
        answer_json(flow, status, code, msg, headers)
        self.stats.refused(reason)
        flow.comment = f"coze-mitm: answered locally ({reason}); not forwarded"
        flow.marked = ":no_entry:"
        flow.metadata[REFUSED] = reason
        log.debug(f"coze-mitm: refused {flow.request.method} {flow.request.host}{flow.request.path.split('?')[0]} "
                 f"({reason}): {msg}")

    # ------------------------------------------------------------------ response

    def _page_waiting(self, flow: http.HTTPFlow) -> bool:
        sent = self._sent.get(flow)
        return sent is not None and sent.page is not None

    def _restore_page_headers(self, flow: http.HTTPFlow, sent: _Sent | None = None) -> None:
        """The request has left: put the page's own headers back, so no view of the flow shows the token."""
        sent = sent or self._sent.get(flow)
        if sent is None:
            return
        original, sent.page = sent.page, None
        if original is None:
            return
        headers = flow.request.headers
        page_fields, injected_fields = sent.fields
        if headers.fields is injected_fields:
            headers.fields = page_fields  # untouched since the swap: exactly what the page sent
        else:  # another addon changed the headers after the swap: only ours are put back
            fields.replace(headers, b"authorization", original[0])
            if original[1]:
                headers.set_all("cookie", original[1])
        if original[2] is not None:
            flow.request.path = original[2]

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        sent = self._sent.get(flow)
        if sent is None:
            return
        self._restore_page_headers(flow, sent)
        if flow.response is not None:
            unreflect(flow.response, sent.token)

    def response(self, flow: http.HTTPFlow):
        """Synchronous, except when the request is re-sent: then it returns the awaitable doing that
        (mitmproxy awaits what a hook returns)."""
        sent = self._sent.pop(flow, None)
        if sent is None:
            return None
        self._restore_page_headers(flow, sent)  # a response set by another addon skips responseheaders
        if flow.response is None:
            return None
        token = sent.token
        try:
            code = watched_code(flow.response)
            if flow.response.status_code == 401 or code in INVALID_TOKEN_CODES:
                why = f"HTTP {flow.response.status_code}" + (f", code {code}" if code is not None else "")
                self._drop(flow, token, why)
                if self._retry.may_retry(flow):
                    return self._retry.retry(flow, token, why, flow.metadata.get(COZE_USER, ""))
            elif code in COZE_HINTS:
                self._hints.note(flow, code, flow.metadata.get(COZE_USER, ""))
        except Exception:
            # Coze's answer is still there and goes to the client as it is.
            log.exception("coze-mitm: unexpected error while checking Coze's answer")
        return None

    def error(self, flow: http.HTTPFlow) -> None:
        sent = self._sent.pop(flow, None)
        if sent is not None:
            self._restore_page_headers(flow, sent)

    def _drop(self, flow: http.HTTPFlow, token: str, why: str) -> None:
        user_id = flow.metadata.get(COZE_USER, "")
        if self.settings.broker is not None and self.settings.broker.invalidate(user_id, token):
            log.warning(f"coze-mitm: Coze rejected the token of user {short_id(user_id)} ({why}); "
                        "it is dropped and a fresh one is minted")
            flow.comment += f"; Coze rejected the token ({why}), dropped"
