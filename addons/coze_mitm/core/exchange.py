"""Minting one access token: the blocking part of the token broker, run in worker threads.

`CozeTokenExchange` signs a JWT (RS256, the key loaded once; session_name = the user's id) and POSTs it
to Coze's token endpoint, reading the answer with a bound in size and time. `ExchangeError` phrases a
failure for the client; `scrub` keeps upstream text that may reach a log or a page free of anything
token-shaped (the signed assertion included).

No mitmproxy import here. Nothing in this module ever logs or raises a token.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Callable

import jwt
import requests
import urllib3

from coze_mitm.core.bounded import decoded_prefix
from coze_mitm.core.config import OAuthApp
from coze_mitm.core.outbound import DIRECT, Outbound, OutboundRefused, SessionSource
from coze_mitm.core.refusal import REASONS, Refusal, Refused

log = logging.getLogger("coze.tokens")

TOKEN_PATH = "/api/permission/oauth2/token"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
JWT_LIFETIME = 3600  # what Coze's own SDKs put between iat and exp
MAX_DURATION = 86399
# Before 2001-09-09 an `expires_in` cannot be an absolute time: it must be a duration.
ABSOLUTE_TIME_FLOOR = 1_000_000_000
# The promised burst is 30 new users at once; with early renewals beside them, 64 workers mean no first
# request of such a burst waits in the queue behind another exchange.
EXCHANGE_WORKERS = 64
MAX_ANSWER = 64 * 1024  # the token endpoint's answer, raw and decoded: a real one is under 1 KB
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.-]{1,48}")

_SECRETISH = re.compile(r"(eyJ[\w-]+\.[\w-]+\.[\w-]*|\b(?:czs|pat|cztei|sat)_[\w-]+|-----BEGIN[^-]*-----)")


def scrub(text: str, limit: int = 300, secrets_sent: tuple[str, ...] = ()) -> str:
    """Upstream text may end up in a log or an error body: cut anything token-shaped, and any run of
    characters that repeats a piece of what we sent (the signed assertion), and keep it short."""
    text = text[: limit * 4]  # bounded work whatever upstream sent
    if secrets_sent:
        text = _RUN.sub(lambda m: "[redacted]" if _echoes(m.group(), secrets_sent) else m.group(), text)
    text = _SECRETISH.sub("[redacted]", text)
    return text if len(text) <= limit else text[:limit] + "…"


_RUN = re.compile(r"[\w.+/=-]{12,}")


def _echoes(run: str, secrets_sent: tuple[str, ...]) -> bool:
    """Does this run of token characters repeat 12 or more characters of a secret (whole or a piece)?"""
    for secret in secrets_sent:
        if run in secret or secret in run:
            return True
        if any(run[i:i + 12] in secret for i in range(0, len(run) - 11, 6)):
            return True
    return False


INVALID_CLIENT_HINT = (
    "check that client_id, public_key_id and private_key come from the same JWT app, and that the app "
    "belongs to the site of coze_api_base: a coze.cn app works only with https://api.coze.cn and a coze.com "
    "app only with https://api.coze.com (the most common cause of 4100)"
)
EXCHANGE_HINTS = {
    "invalid_client": INVALID_CLIENT_HINT,
    "invalid_request": INVALID_CLIENT_HINT,
    "access_deny": "the app is not allowed to do this: check the app's permissions and that it is authorised in the Coze console",
    "unsupported_grant_type": "the app is not a JWT (service) app: create one of type JWT in the Coze console",
    "internal_error": "Coze had an internal error: try again later and quote the logid to Coze support",
}
# Its reasons (exchange-refused:<error> for each of these) are in core/refusal.REASONS, with their codes:
# a hint added here is added to refusal.EXCHANGE_ERRORS too (tests/test_refusal.py checks).


class ExchangeError(Refused):
    """A failed token exchange, phrased for the client: HTTP status for our answer, Coze-style code, reason
    (one of refusal.EXCHANGE_REASONS), message; and Coze's logid when it sent one."""

    def __init__(self, status: int, code: int, reason: str, msg: str, logid: str = ""):
        super().__init__(Refusal(status, code, reason, msg))
        self.logid = logid


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_at: float
    issued_at: float
    logid: str = ""

    def __repr__(self) -> str:  # never show the token, even in a traceback
        return f"IssuedToken(expires_at={self.expires_at:.0f}, logid={self.logid!r})"

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.issued_at

    @property
    def renew_at(self) -> float:
        """Start a background renewal this long before expiry: a quarter of the lifetime, at most 5 min."""
        return self.expires_at - min(300.0, self.lifetime / 4)

    @property
    def usable_until(self) -> float:
        """Stop handing it out shortly before expiry so a request in flight doesn't arrive with a dead token."""
        return self.expires_at - min(30.0, self.lifetime / 10)


DEAD = IssuedToken("", 0.0, 0.0)  # cache entry of a user whose token Coze rejected: known, but no token


class CozeTokenExchange:
    """Mint a JWT for one session_name and exchange it for an access token (blocking: run it in a thread)."""

    def __init__(self, app: OAuthApp, duration_seconds: int = 900, timeout: float = 10.0,
                 clock: Callable[[], float] = time.time, outbound: Callable[[], Outbound] = lambda: DIRECT):
        self.app = app
        self.duration_seconds = duration_seconds
        self.timeout = timeout
        self.clock = clock
        self.url = app.api_base + TOKEN_PATH
        self.audience = app.api_origin.netloc
        self._warned: set[str] = set()  # oddities of Coze's answers already logged
        # the way out mitmproxy's connection options say (upstream proxy, certificate checks), on each exchange
        self._sessions = SessionSource(outbound, pool_maxsize=EXCHANGE_WORKERS)

    def mint_jwt(self, session_name: str | None) -> str:
        now = int(self.clock())
        claims = {
            "iss": self.app.client_id,
            "aud": self.audience,
            "iat": now,
            "exp": now + JWT_LIFETIME,
            "jti": secrets.token_urlsafe(24),
        }
        if session_name:
            claims["session_name"] = session_name
        headers = {"kid": self.app.public_key_id, "typ": "JWT"}
        return jwt.encode(claims, self.app.private_key, algorithm="RS256", headers=headers)

    def __call__(self, user_id: str | None) -> IssuedToken:
        body = {"grant_type": GRANT_TYPE, "duration_seconds": self.duration_seconds}
        assertion = self.mint_jwt(user_id)
        try:
            answer = self._sessions.get().post(
                self.url,
                json=body,
                headers={"Authorization": f"Bearer {assertion}"},
                timeout=self.timeout,
                stream=True,  # read below with a bound, not whatever size upstream chooses
            )
            try:
                raw = _read_raw(answer.raw, MAX_ANSWER + 1, time.monotonic() + self.timeout)
            finally:
                answer.close()
        except (requests.Timeout, urllib3.exceptions.TimeoutError):
            raise self.timed_out() from None
        except OutboundRefused as e:  # the connection options in force cannot be used: nothing was sent
            raise ExchangeError(502, 5000, "exchange-unreachable", str(e)) from None
        except requests.exceptions.ProxyError:
            raise self.proxy_refused("could not open a connection through it") from None
        except requests.exceptions.SSLError:
            raise ExchangeError(
                502, 5000, "exchange-unreachable",
                f"the TLS certificate of Coze's token endpoint {self.app.api_base} could not be verified; where a "
                "private or corporate CA signs it, name that CA with --set ssl_verify_upstream_trusted_ca=FILE "
                "(or ssl_verify_upstream_trusted_confdir=DIR)",
            ) from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:  # raw reads raise urllib3's
            raise ExchangeError(
                502, 5000, "exchange-unreachable",
                f"cannot reach Coze's token endpoint {self.app.api_base} ({type(e).__name__}); "
                "check coze_api_base and this machine's network",
            ) from None
        if answer.status_code == 407:  # an http:// endpoint through a proxy that wants (other) credentials
            raise self.proxy_refused("asked for credentials (HTTP 407) on the way")
        return self._read_answer(answer, raw, assertion)

    def proxy_refused(self, what: str) -> ExchangeError:
        """The upstream proxy (mitmproxy's --mode upstream:..., which the exchange follows) said no."""
        return ExchangeError(
            502, 5000, "exchange-unreachable",
            f"the upstream proxy {what} to Coze's token endpoint {self.app.api_base}; check the proxy in "
            "--mode upstream:... and its credentials in --set upstream_auth=USER:PASS",
        )

    def timed_out(self) -> ExchangeError:
        return ExchangeError(
            504, 5000, "exchange-timeout",
            f"Coze's token endpoint {self.app.api_base} did not answer within {self.timeout:g} s; "
            "check the network, or raise coze_exchange_timeout",
        )

    def _read_answer(self, answer: requests.Response, raw: bytes, assertion: str) -> IssuedToken:
        logid = scrub(answer.headers.get("X-Tt-Logid", ""), 80, (assertion,))
        at = f" (logid {logid})" if logid else ""
        data = None
        text = decoded_prefix(raw, answer.headers.get("Content-Encoding", ""), MAX_ANSWER + 1)
        oversized = len(raw) > MAX_ANSWER or (text is not None and len(text) > MAX_ANSWER)
        if text is not None and not oversized:
            try:
                data = json.loads(text)
            except (ValueError, UnicodeDecodeError, RecursionError):
                data = None
        if not isinstance(data, dict):
            kind = answer.headers.get("Content-Type", "no content type")
            raise ExchangeError(
                502, 5000, "exchange-garbage",
                f"Coze's token endpoint answered HTTP {answer.status_code} with a body that is not a JSON object"
                f"{' of at most 64 KiB' if oversized else ''} ({scrub(kind, 60, (assertion,))}){at}; "
                "check coze_api_base points at the Coze API, or try again later",
                logid,
            )
        error_code = data.get("error_code") or data.get("error")
        if error_code or answer.status_code != 200:
            error_code = str(error_code or f"http_{answer.status_code}")
            if not _ERROR_CODE.fullmatch(error_code) or scrub(error_code, 48, (assertion,)) != error_code:
                error_code = "unrecognised error_code"  # upstream text that is not a code: not repeated
            detail = scrub(str(data.get("error_message") or data.get("msg") or ""), 300, (assertion,))
            hint = EXCHANGE_HINTS.get(error_code, "check the OAuth app config and try again")
            reason = f"exchange-refused:{error_code}" if error_code in EXCHANGE_HINTS else "exchange-refused"
            raise ExchangeError(
                502, REASONS[reason], reason,  # 4100 for invalid_client/invalid_request, else 5000
                f"Coze refused the token exchange: {error_code}: {detail or 'no message'}{at}; {hint}",
                logid,
            )
        token = data.get("access_token")
        if not isinstance(token, str) or not token:
            raise ExchangeError(
                502, 5000, "exchange-no-token",
                f"Coze's token endpoint answered without an access_token{at}; try again later or quote the logid "
                "to Coze support",
                logid,
            )
        return IssuedToken(token, self._expiry(data.get("expires_in")), self.clock(), logid)

    def _expiry(self, expires_in) -> float:
        """When the token stops working, by our clock. Coze documents `expires_in` as an absolute unix time;
        a small number can only be a duration, and an absolute time far from now means one of the two
        clocks is wrong: every reading is tolerated, each oddity is logged once."""
        now = self.clock()
        try:
            expires_in = float(expires_in)
        except (TypeError, ValueError, OverflowError):
            expires_in = float("nan")
        if expires_in != expires_in or expires_in in (float("inf"), float("-inf")) or expires_in <= 0:
            self._warn_once("missing", "Coze's token answer has no usable expires_in; assuming the requested %d s",
                            self.duration_seconds)
            return now + self.duration_seconds
        if expires_in < ABSOLUTE_TIME_FLOOR:
            self._warn_once("duration", "Coze's expires_in=%d looks like a duration, not an absolute time; "
                            "reading it as one", expires_in)
            return now + min(expires_in, self.duration_seconds)
        if expires_in <= now:
            self._warn_once(
                "past", "Coze's token expired %d s before it arrived: this machine's clock is probably ahead "
                "(check it with `date -u`); using each token for 60 s only", now - expires_in,
            )
            return now + 60
        if expires_in > now + self.duration_seconds + 120:
            # Coze never grants more than asked: our clock is behind, and by Coze's clock the token dies sooner.
            self._warn_once(
                "future", "Coze's token expires %d s later than the %d s asked for: this machine's clock is "
                "probably behind (check it with `date -u`); renewing as if it lasted %d s",
                expires_in - now, self.duration_seconds, self.duration_seconds,
            )
            return now + self.duration_seconds
        return expires_in

    def _warn_once(self, kind: str, msg: str, *args) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(msg, *args)


def _read_raw(raw, limit: int, deadline: float) -> bytes:
    """At most `limit` bytes of the body as sent, and not after `deadline`: an answer that trickles in,
    each byte within the socket timeout, must not hold a worker (or the proxy's exit) for minutes."""
    read1 = getattr(raw, "read1", None)
    if read1 is None:  # urllib3 1.x
        return raw.read(limit, decode_content=False)
    out = bytearray()
    while len(out) < limit:
        if time.monotonic() > deadline:
            raise requests.Timeout("the answer did not arrive in time")
        piece = read1(limit - len(out), decode_content=False)
        if not piece:
            break
        out += piece
    return bytes(out)
