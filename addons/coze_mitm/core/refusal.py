"""A local refusal: the one shape of an answer coze-mitm gives instead of forwarding, and the one registry of
the reasons it counts.

A `Refusal` is what a part answers with: HTTP status, Coze-style code, reason (a key of `REASONS`), the msg the
client reads, and extra headers (Retry-After). It is a NamedTuple so that `answer(flow, *refusal)`-style callers
and older tuple readers keep working. `Refused` is the exception that carries one (token exchange, new-user
limit, LDAP login). `REASONS` is the fixed set the status page and /metrics count (anything else is "other", so
no upstream text can grow them), each with the Coze code its answers carry, or None where it depends on the case.

No mitmproxy import here.
"""

from __future__ import annotations

import types
from typing import Mapping, NamedTuple

# The Coze-style codes coze-mitm answers with (Coze's own meanings, coze-facts.md).
BAD_REQUEST = 4000
RATE_LIMITED = 4013
INVALID_TOKEN = 4100
NO_CREDENTIALS = 4101  # "no permission": this client gets no Coze credentials here
FAILED = 5000

NO_HEADERS: Mapping[str, str] = types.MappingProxyType({})


class Refusal(NamedTuple):
    status: int  # HTTP status of the local answer
    code: int  # Coze-style code in its JSON body
    reason: str  # a key of REASONS (counters, flow comment, flowlog)
    msg: str  # what the client reads: cause and fix, never a secret
    headers: Mapping[str, str] = NO_HEADERS


class Refused(Exception):
    """An exception that is answered locally with its `refusal`."""

    def __init__(self, refusal: Refusal):
        super().__init__(refusal.msg)
        self.refusal = refusal

    status = property(lambda self: self.refusal.status)
    code = property(lambda self: self.refusal.code)
    reason = property(lambda self: self.refusal.reason)
    msg = property(lambda self: self.refusal.msg)


# The token exchange's error codes that have their own hint (core/exchange.EXCHANGE_HINTS has the text) and so
# their own counter; `invalid_client`/`invalid_request` are answered 4100 like Coze's invalid token.
EXCHANGE_ERRORS = {"invalid_client": INVALID_TOKEN, "invalid_request": INVALID_TOKEN, "access_deny": FAILED,
                   "unsupported_grant_type": FAILED, "internal_error": FAILED}

# Every reason a refusal may carry -> its Coze code (None: it depends, see the part). Add a new reason here:
# the status page and /metrics count it from then on.
REASONS: Mapping[str, int | None] = types.MappingProxyType({
    "malformed-tag": BAD_REQUEST,
    "duplicate-origin": BAD_REQUEST,
    "browser-without-origin": NO_CREDENTIALS,
    "cookie-without-origin": NO_CREDENTIALS,
    "origin-not-allowed": NO_CREDENTIALS,
    "remote-client": NO_CREDENTIALS,
    "tag-to-other-host": BAD_REQUEST,
    "not-configured": FAILED,
    "internal-error": FAILED,
    "new-user-limit": RATE_LIMITED,
    "login-unusable": NO_CREDENTIALS,
    "login-directory": FAILED,
    "budget": None,  # 4013 over budget / at the parallel cap, 4000 for a workflow run it cannot count
    "budget-store": None,  # 4013 to a page (200), 5000 to other clients (503)
    "exchange-timeout": FAILED,
    "exchange-unreachable": FAILED,
    "exchange-garbage": FAILED,
    "exchange-no-token": FAILED,
    "exchange-refused": FAILED,
    **{f"exchange-refused:{error}": code for error, code in EXCHANGE_ERRORS.items()},
})
EXCHANGE_REASONS = frozenset(r for r in REASONS if r.startswith("exchange-"))


def counted(reason: str) -> str:
    """The counter a reason goes to: itself when registered, else "other"."""
    return reason if reason in REASONS else "other"
