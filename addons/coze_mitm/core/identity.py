"""Who is asking, and may they have credentials: the user tag and the page origin.

The tag is `Authorization: Bearer user:<id>` (what the userscript hands the Chat SDK as its token)
or a cookie `coze_user=<id>`. `admit()` turns a request's headers into one decision; it is pure
(no mitmproxy import), so the same rules are easy to test exhaustively.
Headers are read through `get_all(name)` (case-insensitive), which mitmproxy's Headers provide.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import urllib.parse
from typing import NamedTuple, Protocol

from coze_mitm.core.refusal import NO_CREDENTIALS

# A user id: 1-128 of A-Z a-z 0-9 _ - (Coze's own examples use ids like `UserId123`; Coze documents no alphabet
# or length for session_name/user_id, so the id keeps to what is safe unchanged in a JWT claim, a URL, a header
# and a log line, and never holds the ':' of a login's `login:` key). Short ids are fine: what keeps one user
# from naming another is the origin allowlist (and, for a team, the proxy login), not the id's length.
USER_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
PLACEHOLDER_RE = re.compile(r"\s*bearer\s+user:(.*)", re.IGNORECASE | re.DOTALL)
COOKIE_NAME = "coze_user"
# Browsers send Sec-Fetch-Site, -Mode and -Dest together (to trustworthy URLs); Node's fetch (undici, used by
# @coze/api for streams) sends Sec-Fetch-Mode alone, so Mode is no proof of a browser and is not read here.
BROWSER_HEADERS = ("sec-fetch-site", "sec-fetch-dest")


class HeadersLike(Protocol):
    def get_all(self, name: str) -> list[str]: ...


_GATHERED = {name.encode(): name for name in ("authorization", "cookie", "origin", *BROWSER_HEADERS)}


class Gathered:
    """The few headers the rules read, collected in one pass over a mitmproxy `Headers`' fields, with
    exactly its matching and decoding (bytes names lowered, values utf-8 with surrogateescape). Four
    `get_all` calls each walk every field; a browser request has about twenty. Asked with the lower-case
    names above; the lists it returns are its own (read them, do not change them)."""

    __slots__ = ("_found",)

    def __init__(self, fields):
        found: dict[str, list[str]] = {}
        for name, value in fields:
            key = _GATHERED.get(name.lower())
            if key is not None:
                found.setdefault(key, []).append(value.decode("utf-8", "surrogateescape"))
        self._found = found

    def get_all(self, name: str) -> list[str]:
        return self._found.get(name, _NONE)


_NONE: list[str] = []  # what Gathered answers for a header the request does not carry (never changed)


def gather(headers: HeadersLike) -> HeadersLike:
    """mitmproxy's Headers (whose `fields` are (bytes, bytes) pairs) gathered in one pass for the rules
    below; any other mapping with `get_all` is used as it is."""
    fields = getattr(headers, "fields", None)
    return headers if fields is None else Gathered(fields)


@functools.lru_cache(maxsize=256)  # asked per tagged request, of the few addresses clients come from
def is_loopback(host: str) -> bool:
    """Is `host` (a client's or a listen address) this machine only? IPv4-mapped IPv6 included."""
    host = host.strip("[]").lower()
    if host in ("localhost", "localhost."):
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


LOGIN_PREFIX = "login:"  # the key of an identity that comes from the proxy login (login.py), never a tag's


def short_id(user_id: str) -> str:
    """Enough of an id to recognise it in a log, not enough to impersonate it. A proxy login is shown
    whole: knowing a login name does not let anyone act as that user, knowing a tag id does."""
    if user_id.startswith(LOGIN_PREFIX):
        return user_id[len(LOGIN_PREFIX):]
    return user_id if len(user_id) <= 10 else f"{user_id[:4]}…{user_id[-4:]}"


def is_placeholder(authorization: str) -> bool:
    return PLACEHOLDER_RE.fullmatch(authorization) is not None


def _describe(value: str) -> str:
    shown = value if len(value) <= 24 else value[:24] + "…"
    return repr(shown)


class Decision(NamedTuple):
    """What to do with one request to the Coze API.

    action: "pass" (no tag: leave it alone), "inject" (swap in user_id's credential),
    or "refuse" (answer locally with status/code/msg, never forward).
    """

    action: str
    user_id: str = ""
    origin: str | None = None
    status: int = 0
    code: int = 0
    msg: str = ""
    reason: str = ""  # short key for counters and logs

    @classmethod
    def refuse(cls, status: int, code: int, reason: str, msg: str, origin: str | None = None) -> "Decision":
        return cls("refuse", origin=origin, status=status, code=code, msg=msg, reason=reason)


PASS = Decision("pass")


def _cookie_pairs(header: str):
    """(name, value) of each cookie in one Cookie header. Browsers separate cookies with "; "; a comma
    is accepted as a separator too (old servers do, and RFC 6265 forbids commas inside cookie values),
    so `a=b, coze_user=x` cannot smuggle a tag past the checks."""
    for part in re.split(r"[;,]", header):
        key, sep, value = part.strip().partition("=")
        if sep:
            yield key.strip(), value.strip().strip('"')


def cookie_values(headers: HeadersLike, name: str = COOKIE_NAME) -> list[str]:
    return [value for header in headers.get_all("cookie") for key, value in _cookie_pairs(header) if key == name]


def strip_cookie(headers_cookie: list[str], name: str = COOKIE_NAME) -> list[str]:
    """Cookie header values without `name`; empty headers are dropped. Other cookies are kept as sent."""
    kept_headers = []
    for header in headers_cookie:
        kept = []
        for part in header.split(";"):
            pieces = [p for p in part.split(",") if p.partition("=")[0].strip() != name]
            piece = ",".join(pieces).strip()
            if piece:
                kept.append(piece)
        if kept:
            kept_headers.append("; ".join(kept))
    return kept_headers


def query_authorizations(path: str) -> list[str]:
    """The `authorization` query parameters (decoded): where @coze/api puts the token of a WebSocket,
    because a browser cannot set headers on one. Most paths have none, found without parsing."""
    if "authorization=" not in path.lower():
        return []
    query = path.partition("?")[2]
    return [v for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True) if k.lower() == "authorization"]


def with_query_token(path: str, token: str) -> str:
    """`path` with its authorization parameter set to `Bearer <token>` (percent-encoded, as @coze/api
    sends it); every other parameter left byte for byte."""
    base, _, query = path.partition("?")
    pieces = []
    for piece in query.split("&"):
        name = piece.partition("=")[0]
        if urllib.parse.unquote_plus(name).lower() == "authorization":
            piece = f"{name}={urllib.parse.quote('Bearer ' + token, safe='')}"
        pieces.append(piece)
    return f"{base}?{'&'.join(pieces)}"


def has_tag(headers: HeadersLike) -> bool:
    """Does the request carry a user tag of any shape (placeholder Authorization or coze_user cookie)?"""
    return any(is_placeholder(a) for a in headers.get_all("authorization")) or bool(cookie_values(headers))


def find_user_id(headers: HeadersLike, query_authorizations: list[str] | tuple = ()) -> str | None:
    """The tagged user id, None when the request carries no tag; ValueError names a malformed tag.
    `query_authorizations`: the `authorization` query parameters of a WebSocket handshake (browsers
    cannot set headers there, so @coze/api puts `Bearer <token>` in the URL)."""
    authorizations = headers.get_all("authorization")
    ids = [m.group(1).strip() for m in map(PLACEHOLDER_RE.fullmatch, authorizations) if m]
    if ids and len(authorizations) > 1:
        raise ValueError("the request carries more than one Authorization header; send exactly one")
    if query_authorizations:
        in_query = [m.group(1).strip() for m in map(PLACEHOLDER_RE.fullmatch, query_authorizations) if m]
        if in_query and len(query_authorizations) > 1:
            raise ValueError("the URL carries more than one authorization parameter; send exactly one")
        ids += in_query
    if headers.get_all("cookie"):
        ids.extend(cookie_values(headers))
    if not ids:
        return None
    malformed = sorted(user_id for user_id in ids if not USER_ID_RE.fullmatch(user_id))
    if malformed:  # sorted: the same message whatever the order of the headers
        raise ValueError(
            f"user tag {_describe(malformed[0])} is malformed: the id after 'user:' (or in the coze_user cookie) "
            "must be 1-128 characters of A-Z a-z 0-9 _ -; reinstall the userscript or reset its identity"
        )
    if len(set(ids)) > 1:
        raise ValueError("the request names two different users (Authorization and/or coze_user cookies); send one")
    return ids[0]


def admit(headers: HeadersLike, allowed_origins: frozenset[str] | set[str], *,
          query_authorizations: list[str] | tuple = (), local_client: bool = True) -> Decision:
    """Decide what a request to the Coze API gets. Order of headers never matters.
    `local_client` is False for a client on another machine while coze_allow_remote is off."""
    if not isinstance(headers, Gathered):
        headers = gather(headers)
    try:
        user_id = find_user_id(headers, query_authorizations)
    except ValueError as e:
        return Decision.refuse(400, 4000, "malformed-tag", str(e))
    if user_id is None:
        return PASS
    if not local_client:
        return Decision.refuse(
            403, NO_CREDENTIALS, "remote-client",
            "this client is on another machine, and coze-mitm gives Coze credentials to clients on its own "
            "machine only; the proxy's owner can allow it with --set coze_allow_remote=true "
            "(run_mitm.py --allow-remote), best together with proxyauth",
        )

    origins = headers.get_all("origin")
    if len(origins) > 1:
        return Decision.refuse(400, 4000, "duplicate-origin", "the request carries more than one Origin header")
    origin = origins[0].strip() if origins else None
    is_browser = origin is not None or any(headers.get_all(h) for h in BROWSER_HEADERS)

    if origin is None and is_browser:
        return Decision.refuse(
            403, NO_CREDENTIALS, "browser-without-origin",
            "a browser request without an Origin header gets no Coze credentials; "
            "call the Coze API from a page in coze_origins (the Chat SDK does)",
        )
    if origin is None and not any(is_placeholder(a) for a in (*headers.get_all("authorization"), *query_authorizations)):
        # A browser attaches the cookie by itself, also to top-level GETs of http:// hosts, which carry
        # neither Origin nor Sec-Fetch-*: without an allowed Origin the cookie proves nothing.
        return Decision.refuse(
            403, NO_CREDENTIALS, "cookie-without-origin",
            "the coze_user cookie counts only on requests from a page in coze_origins; a program that is not "
            "a browser names its user with the header Authorization: Bearer user:<id>",
        )
    if origin is not None and origin not in allowed_origins:
        shown = "null" if origin == "null" else _describe(origin)
        return Decision.refuse(
            403, NO_CREDENTIALS, "origin-not-allowed",
            f"page origin {shown} may not use coze-mitm's Coze credentials; "
            "if this is your page, add its exact origin to coze_origins (--set coze_origins=...)",
            origin=origin,
        )
    return Decision("inject", user_id=user_id, origin=origin)


class Admissions:
    """`admit()` of mitmproxy header fields, remembered for the last few distinct sets of the headers it
    reads. A page's requests carry the same tag, Origin and Sec-Fetch-* headers each time; deciding them
    anew (regexes, lists, the Decision) was the largest piece of a cached-token request's own work.
    Keyed by exactly those header fields as they came (bytes), the URL's authorization parameters and
    whether the client is local: the same key, the same answer (admit is pure). Forgotten when the
    allowed origins change; bounded in entries and in the bytes of a key (larger ones are decided each
    time, never kept)."""

    MAX_ENTRIES = 256
    MAX_KEY_BYTES = 4096

    __slots__ = ("_known", "_origins")

    def __init__(self):
        self._known: dict[tuple, tuple[Gathered, Decision]] = {}
        self._origins: frozenset[str] | None = None

    def __call__(self, fields, allowed_origins: frozenset[str], query_authorizations: list[str],
                 local_client: bool) -> tuple[Gathered, Decision]:
        """(the headers the rules read, gathered; the decision)."""
        read = tuple([field for field in fields if field[0].lower() in _GATHERED])
        key = (read, tuple(query_authorizations), local_client)
        if allowed_origins is not self._origins:
            self._known.clear()
            self._origins = allowed_origins
        known = self._known.get(key)
        if known is not None:
            return known
        seen = Gathered(read)
        answer = (seen, admit(seen, allowed_origins, query_authorizations=query_authorizations, local_client=local_client))
        if sum(len(name) + len(value) for name, value in read) + sum(map(len, query_authorizations)) <= self.MAX_KEY_BYTES:
            if len(self._known) >= self.MAX_ENTRIES:
                del self._known[next(iter(self._known))]  # the oldest
            self._known[key] = answer
        return answer
