"""Which destinations lead back to this machine (loopback, "unspecified", this host's own addresses) or to
its link (link-local: 169.254.0.0/16, where clouds answer their metadata service, and fe80::/10).

No mitmproxy import (parts/local_gate.py asks these questions for clients on other machines, and asks
`is_self` for every client whose destination port is one the proxy listens on).

This host's own addresses are found by asking the operating system to bind a throwaway socket to the
address (port 0, closed at once): only an address of this host can be bound (EADDRNOTAVAIL otherwise) on
Linux, macOS and Windows alike (an IPv6 address with a zone, `fe80::1%eth0`, is bound with the zone as the
scope id: Python drops a zone written in the string, and the bind of a link-local address without its
scope id fails, which made such an address look "not own"; a link-local address without a zone is tried
on every interface), with no interface listing (the standard library has none that is portable;
`getaddrinfo(gethostname())` misses addresses the host name does not resolve to, e.g. a second NIC or a
veth). Two known over-approximations, both on the refusing side: with Linux's `net.ipv4.ip_nonlocal_bind=1`
(or `net.ipv6.ip_nonlocal_bind=1`) every address binds, so every destination counts as own; broadcast
and multicast addresses bind too (no TCP connection goes there anyway). Answers are kept for OWN_TTL
seconds (an interface can gain or lose an address).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

OWN_TTL = 30.0  # seconds an own/not-own answer is kept
NAME_TTL = 5.0  # seconds a resolved name is kept (the gate's HTTP check and its server_connect share it)
RESOLVE_TIMEOUT = 3.0  # seconds; a name that does not resolve in time is refused (never waited on longer)
_MAX_CACHE = 4096

_ZERO_NET = ipaddress.ip_network("0.0.0.0/8")  # "this network": 0.0.0.0 reaches this host on Linux and macOS
_LINK_LOCAL = "link-local (169.254.0.0/16, fe80::/10: this host's own link, where clouds answer their metadata service)"

_own: dict[str, tuple[bool, float]] = {}
_names: dict[tuple[str, int], tuple[tuple[str, ...], float]] = {}


def literal(host: str):
    """The IP address `host` spells (brackets, IPv6 zone and IPv4-mapped IPv6 handled), or None for a name."""
    text = host.strip("[]")
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def zone(host: str) -> str:
    """The IPv6 zone of `host` (`fe80::1%eth0` -> "eth0"), or ""."""
    return host.strip("[]").partition("%")[2]


def is_self(host: str) -> str | None:
    """For an IP address: why it is this machine ("loopback", "unspecified", "this host's address"), or None.
    A name (not an IP) returns None, except `localhost` in any spelling: resolve it first."""
    address = literal(host)
    if address is None:
        return "loopback" if host.strip().rstrip(".").lower() == "localhost" else None
    if address.is_loopback:
        return "loopback"
    if address.is_unspecified or (address.version == 4 and address in _ZERO_NET):
        return "unspecified"
    text = str(address)
    if address.version == 6 and zone(host):
        text = f"{text}%{zone(host)}"
    if is_own(text):
        return "this host's address"
    return None


def why_forbidden(host: str) -> str | None:
    """For an IP address: why a client on another machine may not be relayed there (this machine, see
    `is_self`, or "link-local ..."), or None. A name (not an IP) returns None: resolve it first."""
    why = is_self(host)
    if why is not None:
        return why
    address = literal(host)
    if address is not None and address.is_link_local:
        return _LINK_LOCAL
    return None


def _scope_ids(address: str) -> list[int]:
    """The scope ids to bind an IPv6 address with: its zone's (name or number), else 0 and, for a link-local
    address (which binds only with one), every interface's."""
    text, _, zone_text = address.partition("%")
    if zone_text:
        if zone_text.isdigit():
            return [int(zone_text)]
        try:
            return [socket.if_nametoindex(zone_text)]
        except (OSError, AttributeError):
            return []  # no such interface: no own address there
    if not ipaddress.ip_address(text).is_link_local:
        return [0]
    try:
        return [index for index, _name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return [0]


def _binds(family: int, sockaddr: tuple) -> bool:
    try:
        probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        return False  # no IPv6 here: no own IPv6 address either
    try:
        probe.bind(sockaddr)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def is_own(address: str) -> bool:
    """Can a socket be bound to `address` here, i.e. is it one of this host's addresses? (cached)
    `address`: an IP address as text; an IPv6 one may carry a zone (`fe80::1%eth0`)."""
    now = time.monotonic()
    hit = _own.get(address)
    if hit is not None and hit[1] > now:
        return hit[0]
    if ":" in address:
        text = address.partition("%")[0]
        own = any(_binds(socket.AF_INET6, (text, 0, 0, scope)) for scope in _scope_ids(address))
    else:
        own = _binds(socket.AF_INET, (address, 0))
    if len(_own) >= _MAX_CACHE:
        _own.clear()
    _own[address] = (own, now + OWN_TTL)
    return own


def cached_addresses(host: str, port: int) -> tuple[str, ...] | None:
    """The addresses `host` resolved to within NAME_TTL, or None."""
    hit = _names.get((host.lower(), port))
    if hit is not None and hit[1] > time.monotonic():
        return hit[0]
    return None


async def resolve(host: str, port: int, timeout: float = RESOLVE_TIMEOUT) -> tuple[str, ...]:
    """Every address `host` resolves to (for TCP), in getaddrinfo's order, without blocking the event loop;
    OSError when it does not resolve, asyncio.TimeoutError when that takes longer than `timeout`."""
    cached = cached_addresses(host, port)
    if cached is not None:
        return cached
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    found: list[str] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            text = sockaddr[0]
            if family == socket.AF_INET6 and len(sockaddr) >= 4 and sockaddr[3]:
                text = f"{text.split('%')[0]}%{sockaddr[3]}"  # link-local: keep the zone, binding needs it
            if text not in found:
                found.append(text)
    if not found:
        raise OSError(f"{host} has no IPv4/IPv6 address")
    if len(_names) >= _MAX_CACHE:
        _names.clear()
    _names[(host.lower(), port)] = (tuple(found), time.monotonic() + NAME_TTL)
    return tuple(found)


def clear_caches() -> None:
    _own.clear()
    _names.clear()
