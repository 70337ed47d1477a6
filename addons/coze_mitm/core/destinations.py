"""Which destinations lead back to this machine: loopback, "unspecified" and this host's own addresses.

No mitmproxy import (parts/local_gate.py asks these questions for clients on other machines).

This host's own addresses are found by asking the operating system to bind a throwaway socket to the
address (port 0, closed at once): only an address of this host can be bound (EADDRNOTAVAIL otherwise) on
Linux, macOS and Windows alike, with no interface listing (the standard library has none that is portable;
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


def why_forbidden(host: str) -> str | None:
    """For an IP address: why a client on another machine may not be relayed there ("loopback",
    "unspecified", "this host's address"), or None. A name (not an IP) returns None: resolve it first."""
    address = literal(host)
    if address is None:
        return "loopback" if host.strip().rstrip(".").lower() == "localhost" else None
    if address.is_loopback:
        return "loopback"
    if address.is_unspecified or (address.version == 4 and address in _ZERO_NET):
        return "unspecified"
    if is_own(host.strip("[]") if address.version == 6 else str(address)):
        return "this host's address"
    return None


def is_own(address: str) -> bool:
    """Can a socket be bound to `address` here, i.e. is it one of this host's addresses? (cached)"""
    now = time.monotonic()
    hit = _own.get(address)
    if hit is not None and hit[1] > now:
        return hit[0]
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        return False  # no IPv6 here: no own IPv6 address either
    try:
        probe.bind((address, 0))
        own = True
    except OSError:
        own = False
    finally:
        probe.close()
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
