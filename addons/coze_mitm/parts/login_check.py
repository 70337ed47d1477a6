"""Proxy passwords (htpasswd, LDAP) checked off mitmproxy's event loop, before mitmproxy's proxyauth sees the flow.

mitmproxy's proxyauth checks `Proxy-Authorization` in its own `http_connect` / `requestheaders` hooks, on the event
loop: with bcrypt, 8 clients sending wrong passwords took a logged-in user's request from 0.34 s to 1.73 s (issue
25). proxyauth runs before every script, so a script's hooks come too late to spare it the work. `FrontCheck` is
put into mitmproxy's addon chain just before proxyauth (AddonManager.register, "for addons that dynamically manage
addons", and a place in its chain), by the login part, and taken out again when coze-mitm unloads. Its async hooks:

* no or an unreadable header: nothing to do; proxyauth answers 407 as before (no hash computed).
* a pair verified lately: nothing to do; proxyauth asks its validator, which coze-mitm wrapped to answer from
  that memory (`Remembered`): no bcrypt at all.
* otherwise the pair is checked in a worker thread (core/password_checks.py: 2 threads, 32 waiting at most,
  a growing wait for a client that keeps failing). Right: proxyauth's check then hits the memory. Wrong, busy
  or waiting: coze-mitm answers itself (407 with a JSON body saying why; 503 when busy), removes the header,
  and ends the hook there (AddonHalt), so proxyauth never runs bcrypt on the loop for it.

Only for `proxyauth=@htpasswd` and `ldap[s]:...` (`user:pass` and `any` cost nothing). With any other
proxyauth, or none, this addon is not in the chain. A check that could not decide (LDAP: the directory did not
answer; or it refused the bind as the spec's DN: a wrong bind password in the spec, said as such) is a 502, as
coze-mitm's own lookup answers then: mitmproxy's 407 would have the user type a right password again.
docs/decisions.md says why this design.
"""

from __future__ import annotations

import logging
import time

from mitmproxy import ctx, exceptions, http
from mitmproxy.addons import proxyauth as mitm_proxyauth

from coze_mitm.core.directory import BindRefused
from coze_mitm.core.password_checks import BUSY, MISCONFIGURED, OK, UNAVAILABLE, WAIT, PasswordChecks
from coze_mitm.parts.answers import answer_json

log = logging.getLogger("coze.login")

NAME = "coze-mitm-password-check"
SAY_EVERY = 60.0  # seconds between two log lines about the spec's refused bind


class Remembered:
    """proxyauth's validator, answering from coze-mitm's memory of pairs checked off the loop; the original
    validator for anything else (e.g. SOCKS5 logins, which FrontCheck does not see)."""

    def __init__(self, original, checks: PasswordChecks):
        self.original, self.checks = original, checks

    def __call__(self, username: str, password: str) -> bool:
        if self.checks.known_good(username, password):
            return True
        return self.original(username, password)


class FrontCheck:
    name = NAME

    def __init__(self, checks: PasswordChecks):
        self.checks = checks
        self._said = float("-inf")  # when the log last said the spec's bind was refused

    # Plain methods that return a coroutine only when there is a password to check (mitmproxy awaits what a hook
    # returns): most requests (inside a logged-in tunnel) carry none and cost no coroutine.
    def http_connect(self, flow: http.HTTPFlow):
        return self._start(flow)

    def requestheaders(self, flow: http.HTTPFlow):
        if flow.is_replay:
            return None  # proxyauth does not check replays either
        return self._start(flow)

    def _start(self, flow: http.HTTPFlow):
        if flow.response is not None:
            return None
        is_proxy = mitm_proxyauth.is_http_proxy(flow)
        header = mitm_proxyauth.http_auth_header(is_proxy)
        value = flow.request.headers.get(header)
        if not value:
            return None
        try:
            _, user, password = mitm_proxyauth.parse_http_basic_auth(value)
        except Exception:
            return None  # proxyauth cannot read it either: its 407, no hash computed
        return self._check(flow, is_proxy, header, user, password)

    async def _check(self, flow: http.HTTPFlow, is_proxy: bool, header: str, user: str, password: str) -> None:
        client = str((flow.client_conn.peername or ("?",))[0])
        verdict, wait = await self.checks.check(client, user, password)
        if verdict == OK:
            return
        flow.request.headers.pop(header, None)  # never saved (-w) nor seen by the parts after this
        if verdict == BUSY:
            answer_json(flow, 503, 5000, "coze-mitm: too many proxy logins are being checked at once; try again in a "
                                         "second", {"Retry-After": "1"})
        elif verdict == MISCONFIGURED:
            answer_json(flow, 502, 5000, f"coze-mitm: the proxy password could not be checked: {BindRefused.PUBLIC}")
            if time.monotonic() - self._said >= SAY_EVERY:
                self._said = time.monotonic()
                log.warning("coze-mitm: proxy passwords cannot be checked: the LDAP directory refuses the bind as the "
                            "proxyauth spec's DN; check the bind DN and password in the ldap[s]:... spec")
        elif verdict == UNAVAILABLE:
            answer_json(flow, 502, 5000, "coze-mitm: the proxy password could not be checked (the login directory "
                                         "did not answer); try again shortly, or tell the proxy's operator")
        else:
            status = 407 if is_proxy else 401
            challenge = {("Proxy-Authenticate" if is_proxy else "WWW-Authenticate"): f'Basic realm="{mitm_proxyauth.REALM}"'}
            if verdict == WAIT:
                msg = (f"coze-mitm: too many wrong proxy passwords from this address; wait {wait:.0f} s before the "
                       "next try")
                challenge["Retry-After"] = str(max(1, round(wait)))
            else:
                msg = "coze-mitm: wrong proxy user name or password"
            answer_json(flow, status, 4107, msg, challenge)
        flow.comment = f"coze-mitm: proxy login refused ({verdict})"
        raise exceptions.AddonHalt()  # proxyauth's hook would check the password again, on the loop


def install(checks: PasswordChecks) -> FrontCheck | None:
    """Put a FrontCheck just before mitmproxy's proxyauth, and wrap proxyauth's validator; None when this
    mitmproxy has no proxyauth addon as expected (coze-mitm then leaves the check to mitmproxy, as before)."""
    manager = getattr(getattr(ctx, "master", None), "addons", None)
    auth = manager.get("proxyauth") if manager is not None else None
    if auth is None or getattr(auth, "validator", None) is None or auth not in manager.chain:
        return None
    if manager.get(NAME) is not None:
        return None  # a second coze-mitm bundle in this mitmproxy: the first one's check serves both
    front = FrontCheck(checks)
    manager.register(front)
    manager.chain.insert(manager.chain.index(auth), front)
    wrap(checks)
    return front


def wrap(checks: PasswordChecks) -> None:
    """(Re)wrap proxyauth's validator: it makes a new one whenever the proxyauth option changes."""
    auth = ctx.master.addons.get("proxyauth")
    validator = getattr(auth, "validator", None)
    if validator is None or isinstance(validator, Remembered):
        return
    auth.validator = Remembered(validator, checks)


def uninstall(front: FrontCheck | None) -> None:
    if front is None:
        return
    manager = ctx.master.addons
    if manager.get(NAME) is front:
        manager.remove(front)
    auth = manager.get("proxyauth")
    if isinstance(getattr(auth, "validator", None), Remembered):
        auth.validator = auth.validator.original
    front.checks.close()
