"""mitmproxy's type check of every HTTP message, without the reference cycles it leaves behind.

Unless Python runs with -O, mitmproxy checks the fields of every Request and Response it builds
(`http.MessageData.__post_init__` calls `utils.typecheck.check_option_type` for each field). For an
optional field that is None (a body not read yet, no trailers, no end time: most messages) the check of
`X | None` first tries X, which raises a TypeError made up front and caught at once. That exception's
traceback holds the checking frame, whose local `e` holds the exception: a reference cycle; and since
Python 3.11 a frame object keeps its callers' frames alive, so the cycle holds the whole stack that
built the message: the flow, its request and response, their bodies and buffers. All of it waits for
the cyclic garbage collector, usually for a full collection, since a flow lives long enough to reach
the oldest generation. On a busy proxy that is megabytes of dead flows at any time, freed in bursts,
and the C allocator's heap is left fragmented by it: RSS creeps up (the benchmark's soak measured it).

`install()` puts a check with the same verdicts and the same error in its place: a union is checked
member by member without raising when a member is a plain class (isinstance, as mitmproxy does,
with its one exception: an int is a valid float); anything else, and every mismatch, goes to
mitmproxy's own function, so its messages and rules stay the only ones.
"""

from __future__ import annotations

import types
import typing

from mitmproxy.utils import typecheck

_original = typecheck.check_option_type
_UNIONS = (typing.Union, getattr(types, "UnionType", typing.Union))


def _plain_match(value: typing.Any, member: typing.Any) -> bool | None:
    """True/False when `member` is a plain class (or Any), None when only mitmproxy's check can tell."""
    if member is typing.Any:
        return True
    if not isinstance(member, type) or typing.get_origin(member) is not None:
        return None
    if member in (typing.TextIO, typing.BinaryIO):
        return None
    return isinstance(value, member) or (member is float and isinstance(value, int))


def check_option_type(name: str, value: typing.Any, typeinfo: typing.Any) -> None:
    if typing.get_origin(typeinfo) in _UNIONS:
        for member in typing.get_args(typeinfo):
            if _plain_match(value, member):
                return
    _original(name, value, typeinfo)


def install() -> None:
    """Replace mitmproxy's check (its callers look it up on the module at each call). Idempotent."""
    typecheck.check_option_type = check_option_type
