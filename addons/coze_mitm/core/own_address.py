"""The proxy's own address as a Coze API base: which requests are addressed to it, and which of them are API calls.

No mitmproxy import (parts/direct_api.py asks these questions of every request).

A request is "to the proxy's own address" when the socket the client reached is a loopback one and the request's
host and port name exactly that socket: its address as an IP literal in canonical form (`127.0.0.1`, `::1`, or
another loopback address the proxy was asked for and listens on), or `localhost` when that socket is 127.0.0.1 or
::1. Nothing else is: not `127.1`, `0x7f.1`, `localhost.`, `x.localhost`, nor a name that resolves to 127.0.0.1
(`evil.example:8080`, the DNS-rebinding door: a public page whose name points at 127.0.0.1 is same-origin with the
answers and could read them), nor this host's LAN address. The browser sends the Host it was given, so a page can
only reach the API base through one of the spellings above, i.e. an origin the page did not choose to be its own.
"""

from __future__ import annotations

import ipaddress
import re

from coze_mitm.core.config import WS_SCHEME_OF_HTTP, Origin, default_ws_origin, parse_api_origin

# The Coze API's paths (/v1/..., /v3/..., /api/permission/oauth2/token, /open_api/knowledge/...). Anything else sent
# to the proxy's own address is no Coze call: answered here, never forwarded.
API_PATH = re.compile(r"/(?:v\d{1,2}|api|open_api)/")
LOCALHOST_OF = frozenset({"127.0.0.1", "::1"})  # the socket addresses `localhost` names (hosts files, RFC 6761)
# An http(s) origin as a browser serializes it (lower case, IDN as punycode, no default port, no path): the only
# Origin a refusal on the own address is made readable for (it is echoed in a header and in the message).
SERIALIZED_ORIGIN = re.compile(r"https?://(?:[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*|\[[0-9a-f:.]{2,45}\])(?::[0-9]{1,5})?")
MAX_ORIGIN = 200
ANY_HOST = frozenset({"", "*", "0.0.0.0", "::"})  # listen_host values meaning every interface, loopback included


_canonical: dict[str, str | None] = {}  # a socket's address as the OS gives it -> canonical loopback text, or None
_MAX_CACHE = 64  # a proxy listens on a few addresses


def socket_address(sockname) -> tuple[str, int] | None:
    """(canonical loopback address, port) of the socket a client reached, or None when it is not loopback (or
    unknown). An IPv4 client on a dual-stack socket shows as ::ffff:127.0.0.1: named 127.0.0.1."""
    if not sockname or len(sockname) < 2 or not sockname[0]:
        return None
    raw = str(sockname[0])
    try:
        canonical = _canonical[raw]
    except KeyError:
        canonical = _canonical_loopback(raw)
        if len(_canonical) >= _MAX_CACHE:
            _canonical.clear()
        _canonical[raw] = canonical
    return None if canonical is None else (canonical, int(sockname[1]))


def _canonical_loopback(raw: str) -> str | None:
    try:
        address = ipaddress.ip_address(raw.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address) if address.is_loopback else None


def names_socket(host: str, port: int, sock: tuple[str, int]) -> bool:
    """Do `host` and `port` (as the request names its destination) spell exactly the socket `sock`?"""
    if port != sock[1]:
        return False
    host = host.lower()
    return host == sock[0] or (host == "localhost" and sock[0] in LOCALHOST_OF)


def api_base(host: str, port: int) -> str:
    """The base URL a client pastes, as the request named the proxy (`http://127.0.0.1:8080`, `http://[::1]:8080`)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listen_api_base(listen_host: str | None, port: int | None) -> str | None:
    """The API base a program on this machine pastes, for a proxy listening on `listen_host`:`port`, or None when it
    does not listen on loopback (a LAN address, a host name: its own address is no API base, see names_socket).
    Every interface includes 127.0.0.1; `localhost` binds a loopback address named 127.0.0.1 here."""
    host = (listen_host or "").strip().lower()
    port = 8080 if port is None else port
    if host in ANY_HOST or host == "localhost":
        return api_base("127.0.0.1", port)
    canonical = _canonical_loopback(host.strip("[]"))
    return None if canonical is None else api_base(canonical, port)


def is_serialized_origin(origin: str) -> bool:
    """Is `origin` an http(s) origin exactly as a browser sends it (so safe to echo, and one coze_origins takes)?"""
    return len(origin) <= MAX_ORIGIN and SERIALIZED_ORIGIN.fullmatch(origin) is not None


def is_api_path(path: str) -> bool:
    return API_PATH.match(path) is not None


def targets(api_base: str, api_hosts: str = "") -> tuple[Origin, Origin | None]:
    """Where requests to the proxy's own address go: (coze_api_base's origin, its WebSocket host). The WebSocket host
    is the one the base implies (api.coze.cn -> wss://ws.coze.cn), else the first ws(s):// entry of coze_api_hosts
    (a self-hosted or local API implies none), else None. Raises config.ConfigError for a bad entry."""
    base = parse_api_origin(api_base)
    ws = default_ws_origin(base)
    for url in filter(None, map(str.strip, api_hosts.split(","))):
        if ws is not None:
            break
        origin = parse_api_origin(url, "coze_api_hosts", websocket=True)
        if origin.scheme not in WS_SCHEME_OF_HTTP:
            ws = origin
    return base, ws
