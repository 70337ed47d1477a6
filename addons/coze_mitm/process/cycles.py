"""The reference cycles every flow leaves behind: fewer of them, and the rest collected sooner.

A part of the bundle, first in its list. Found with the benchmark's soak (bench/sections/soak.py): dead flows
waited in cycles for the collector, and the C allocator's heap, fragmented by them, kept growing with free
memory it could not give back while the live objects stayed flat.

1. mitmproxy's type check of every HTTP message (`install`, at load). Unless Python runs with -O,
   mitmproxy checks the fields of every Request and Response it builds (`http.MessageData.__post_init__`
   calls `utils.typecheck.check_option_type` for each field). For an optional field that is None (a body
   not read yet, no trailers, no end time: most messages) the check of `X | None` first tries X, which
   raises a TypeError made up front and caught at once. That exception's traceback holds the checking
   frame, whose local `e` holds the exception: a cycle; and a frame keeps its callers' frames
   alive (f_back), so the cycle holds the whole stack that built the message: the flow, its
   request and response, their bodies and buffers. `install` puts a check with the same verdicts and the
   same errors in its place: a field whose type is a plain class, or a union with plain classes, is
   accepted by one isinstance against those classes (as mitmproxy decides it, with its one exception: an
   int is a valid float); anything else, and every mismatch, goes to mitmproxy's own function, so its
   messages and rules stay the only ones. The classes are worked out once per type object: mitmproxy's
   function also formats its error message before every check, passed or not (~20 fields per request).

2. The garbage collector (`running`). mitmproxy's layers still make cycles per flow (a layer and its
   context, bound methods kept as state): only the collector frees them, and a flow lives long enough to
   reach its oldest generation. That generation is collected when the objects promoted into it since the
   last full collection reach a quarter of those it held then: ~90,000 start-up objects (modules,
   classes, mitmproxy's options), so ~22,000 promotions (the soak at 20 requests/s saw no full collection
   in its first 5 minutes). Once running, the start-up objects are moved out of the collector's sight
   (`gc.freeze`, after a collection so that no garbage is frozen), and a collection of the then empty
   oldest generation resets that count: the soak then saw a full collection every 2-3 minutes, each
   scanning a few thousand objects.
   This happens once per process, at the first start: at a script reload's `running` the flows in
   flight (in mitmweb, every flow in its view) are alive, and frozen objects are never collected.
   `done` (exit, or mitmproxy reloading this script) unfreezes them, so a reloaded script's old modules
   can still be freed; after a reload full collections are mitmproxy's default again.
"""

from __future__ import annotations

import gc
import types
import typing

from mitmproxy.utils import typecheck

_original = getattr(typecheck, "check_option_type", None)
_UNIONS = (typing.Union, getattr(types, "UnionType", typing.Union))


_ANY = (object,)  # the plan of typing.Any: every value is an instance of object
_MAX_PLANS = 1024  # distinct types checked: the fields of mitmproxy's few message and option classes


def _plain_class(member: typing.Any) -> bool:
    """Is `member` a class whose check in mitmproxy is `isinstance` alone (and isinstance accepts it)?"""
    if not isinstance(member, type) or typing.get_origin(member) is not None:
        return False
    if member in (typing.TextIO, typing.BinaryIO):
        return False  # mitmproxy accepts anything with a `read` for these
    try:
        isinstance(None, member)
    except TypeError:
        return False  # isinstance refuses the class (a Protocol that is not runtime-checkable): mitmproxy decides
    return True


def _plan_for(typeinfo: typing.Any) -> tuple:
    """The classes an instance of which mitmproxy's check accepts for `typeinfo` without a doubt: the plain
    classes of a union (or the class itself), int beside float (mitmproxy's one exception), object for
    Any. Empty when only mitmproxy's own check can tell (a sequence, a tuple, IO)."""
    members = typing.get_args(typeinfo) if typing.get_origin(typeinfo) in _UNIONS else (typeinfo,)
    if typing.Any in members:
        return _ANY
    plain = [m for m in members if _plain_class(m)]
    if float in plain:
        plain.append(int)
    return tuple(plain)


# id(typeinfo) -> (typeinfo, plan): keyed by identity, asked ~20 times per proxied request with the same
# few type objects (a union's own hash is computed in Python each time); the type is kept so its id is never reused.
_plans: dict[int, tuple[typing.Any, tuple]] = {}


def check_option_type(name: str, value: typing.Any, typeinfo: typing.Any) -> None:
    entry = _plans.get(id(typeinfo))
    if entry is not None and entry[0] is typeinfo:
        plan = entry[1]
    else:
        plan = _plan_for(typeinfo)
        if len(_plans) < _MAX_PLANS:
            _plans[id(typeinfo)] = (typeinfo, plan)
    try:
        if plan and isinstance(value, plan):
            return
    except TypeError:
        pass  # a class's own __instancecheck__ refused the value: mitmproxy's check says what that means
    _original(name, value, typeinfo)  # a mismatch (its message), or a type only mitmproxy's check knows


def install() -> None:
    """Replace mitmproxy's check (its callers look it up on the module at each call). Idempotent. A
    mitmproxy without that function (renamed upstream) is left as it is: more memory, nothing broken."""
    if _original is None:
        return
    typecheck.check_option_type = check_option_type


def uninstall() -> None:
    """Put mitmproxy's own check back, unless someone else replaced ours since (theirs stays)."""
    if _original is not None and typecheck.check_option_type is check_option_type:
        typecheck.check_option_type = _original


# Module state, not the part's: a script reload runs coze.py again while this module stays imported (coze.py
# keeps coze_mitm.process in sys.modules for that). Frozen objects are never collected, and at a reload's
# `running` the flows in flight (in mitmweb, every flow in its view) are alive: only the first start of the
# process freezes.
_froze_at_start = False
# What the permanent generation holds before anyone froze anything: 0 on Python 3.11, a few hundred objects on 3.12
# (the interpreter's own). More than this at `running` means another addon froze objects: theirs to undo.
_BASELINE_FROZEN = gc.get_freeze_count()


class Cycles:
    """Both changes, made by `running` and undone by `done` (process/tuning.py decides whether they are wanted)."""

    def __init__(self):
        self._froze = False

    def running(self) -> None:
        global _froze_at_start
        install()
        if _froze_at_start:
            return  # a script reload: freezing now would freeze live flows for good
        _froze_at_start = True
        if gc.get_freeze_count() > _BASELINE_FROZEN:
            return  # someone else froze already: their freeze is theirs to undo, and ours could not be told apart
        gc.collect()
        gc.freeze()
        gc.collect()
        self._froze = True

    def done(self) -> None:
        uninstall()
        if self._froze:
            # gc.unfreeze() thaws everything: we only froze when no other addon had (the interpreter's own few
            # hundred on 3.12 are thawed too, as mitmproxy would find them in any process that never froze)
            gc.unfreeze()
            self._froze = False
