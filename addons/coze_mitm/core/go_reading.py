"""What Coze's server will read: request paths and JSON read the way a Go server reads them, or refused.

Pure logic, no mitmproxy import. Coze's open-source server (Coze Studio) is Go, served by CloudWeGo's hertz;
the real Coze presumably too (not checkable here). Python and Go disagree on the same bytes, and a budget
decided on Python's reading can be walked around (docs/coze-reading.md has the measured cases):

* Paths. Go routes on the percent-decoded, cleaned path: `/v3/%63hat` is `/v3/chat`. `route()` gives the
  path every Go router we know of could serve the request as: cut at `?` or `#` (hertz drops a fragment),
  percent-decoded once (`%2F` included: hertz and net/http before 1.22 decode it), `\\` as `/`, `//`, `.`
  and `..` segments resolved (hertz cleans them, net/http redirects to the clean path), no trailing `/`.
  Where routers differ, the reading that spends is the one taken (what holds either way).
* JSON. Go's encoding/json fills a struct field from every key equal to its name under Unicode simple
  folding (`"Event_Type"`, `"EVENT_TYPE"`; also U+212A KELVIN SIGN for `k` and U+017F LONG S for `s`);
  with several such keys the last one wins (a `null` changes nothing). `read_object()` parses with
  Python's C decoder, keeps every key/value pair, and refuses what a Go server would read differently
  from Python or not at all: invalid UTF-8 (Go reads it, as U+FFFD), trailing data after the value (a Go
  `Decoder` reads the first value and ignores the rest), NaN/Infinity (Python reads them, Go does not), a
  top level that is no object, and nesting deeper than `MAX_DEPTH` (Go reads up to 10,000 levels; Python's
  parser fails near 1,000, so past the bound nothing is read but refused), and what is too much work for
  the proxy's event loop (`cheap_to_read()`: over 64 KiB with more than 4,096 values). `field()` is Go's reading of one
  field, and says when the keys that could fill it disagree (a reader keyed exactly, like a Go map or gjson,
  would read another value): for a budgeted user such an object is refused, not guessed.
"""

from __future__ import annotations

import json
import re
from urllib.parse import unquote_to_bytes

MAX_DEPTH = 128  # Coze's events and bodies nest a few levels; deeper is refused for budgeted users
WALK_LIMIT = 256  # values of a parsed object looked at for its depth; past that its brackets are counted instead
# What read_object parses on the event loop (docs/decisions.md, "JSON read on the event loop"): Python's parser
# costs per value (a nested list ~0.5 us), a string's bytes cost little. Any input up to ON_LOOP_BYTES (its
# costliest shape, arrays 127 deep, ~18 ms for 64 KiB), a bigger one only with at most MAX_VALUES values.
ON_LOOP_BYTES = 64 * 1024
MAX_VALUES = 4096


class Unreadable(ValueError):
    """The bytes are not read the same by Go and by Python; the message says why (for the client)."""


# -- paths ----------------------------------------------------------------------------------------------
_ODD_PATH = re.compile(rb"[%\\#]|//|/\.")  # anything a Go router reads differently from the raw bytes


def route(path: bytes | str) -> str:
    """The request target's path as Go routers serve it (see the module doc): `/v3/%63hat?x` -> `/v3/chat`.
    Bytes that are not UTF-8 after decoding stay as surrogate escapes (no route of Coze's has any)."""
    raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
    cut = raw.find(b"?")
    if cut >= 0:
        raw = raw[:cut]
    if _ODD_PATH.search(raw) is None:  # the common case: nothing to decode or clean
        return (raw.rstrip(b"/") or b"/").decode("utf-8", "surrogateescape")
    cut = raw.find(b"#")
    if cut >= 0:
        raw = raw[:cut]
    decoded = unquote_to_bytes(raw).replace(b"\\", b"/")  # an invalid escape stays as it is (hertz keeps it)
    segments: list[bytes] = []
    for segment in decoded.split(b"/"):
        if segment in (b"", b"."):
            continue
        if segment == b"..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(s.decode("utf-8", "surrogateescape") for s in segments)


# -- JSON ------------------------------------------------------------------------------------------------
class GoObject(dict):
    """A JSON object: a dict as Python's json builds it (the last of equal keys wins), and `pairs`, every
    key/value pair in order, for Go's case-insensitive reading (`field`)."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list):
        super().__init__(pairs)
        self.pairs = pairs


_GO_FOLDS = str.maketrans({"\u212a": "k", "\u017f": "s"})  # the only non-ASCII runes Go folds into ASCII letters


def _fold(key: str) -> str:
    """The key as Go's field matching sees it, for ASCII field names: ASCII case ignored, KELVIN SIGN = k,
    LONG S = s. A key that stays non-ASCII can equal no ASCII name (returned as it is)."""
    if key.isascii():
        return key.lower()
    folded = key.translate(_GO_FOLDS)
    return folded.lower() if folded.isascii() else key


_ABSENT = object()


def field(obj: GoObject | dict, name: str) -> tuple[object, bool]:
    """(what Go's encoding/json reads into the struct field `name` (ASCII, lower-case), whether the keys
    that could fill it disagree). Absent: (None, False). Go takes the last matching key; a `null` leaves the
    field as it was. `disagree` is True when two matching keys carry different values (then a reader keyed
    exactly, or one that takes the first, reads something else) or a key matches only by folding a non-ASCII
    letter (Go releases before 1.21 and other decoders differ there)."""
    pairs = getattr(obj, "pairs", None)
    if pairs is None:  # a plain dict (built without read_object): exact keys only
        return obj.get(name), False
    value, seen, disagree = None, _ABSENT, False
    for key, v in pairs:
        if key != name and _fold(key) != name:
            continue
        if not key.isascii():
            disagree = True
        if seen is not _ABSENT and (type(v) is not type(seen) or v != seen):
            disagree = True
        seen = v
        if v is not None:
            value = v
    return value, disagree


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # a JSON string, unrolled (one tight loop per run)
_ROUND = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def _deeper_than(obj, raw: bytes, max_depth: int) -> bool:
    """Whether the parsed value nests deeper than max_depth: its containers walked (an event has a handful:
    a few us), or, past WALK_LIMIT values looked at, its brackets counted in C instead (up to ON_LOOP_BYTES: the
    string regex costs ~40 ms a MiB of escapes; a bigger input has fewer than MAX_VALUES values, all walked)."""
    stack = [(obj, 1)]
    looked = 0
    while stack:
        node, level = stack.pop()
        if level > max_depth:
            return True
        children = node.values() if isinstance(node, dict) else node
        looked += len(children)
        if looked > WALK_LIMIT and len(raw) <= ON_LOOP_BYTES:
            return _deeper_by_brackets(raw, max_depth)
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, level + 1))
    return False


def _deeper_by_brackets(raw: bytes, max_depth: int) -> bool:
    """The same for valid JSON: its brackets outside strings as "(" and ")"; each pass removes every innermost
    "()", one level, so what is left after max_depth passes is deeper. All in C: ~12 ms for 1 MiB of arrays."""
    brackets = _STRING.sub(b"", raw).translate(_ROUND, _NOT_BRACKETS)
    for _ in range(max_depth):
        if not brackets:
            return False
        brackets = brackets.replace(b"()", b"")
    return bool(brackets)


def cheap_to_read(raw: bytes) -> bool:
    """Whether read_object's work on `raw` is small enough for the event loop. Every JSON value is the first
    of the document, follows a `[` or a `:`, or follows a `,`; with every `{` (an object costs most) that
    bounds the values from above (the same bytes inside strings are counted too: never too few). ~1 ms a MiB."""
    if len(raw) <= ON_LOOP_BYTES:
        return True
    return raw.count(b"{") + raw.count(b"[") + raw.count(b",") + raw.count(b":") < MAX_VALUES


def _no_constant(name: str):
    raise Unreadable(f"{name} is not JSON (Go refuses it, Python reads it)")


_DECODER = json.JSONDecoder(object_pairs_hook=GoObject, parse_constant=_no_constant)  # built once (~4 us a time)


def read_object(raw: bytes | str, max_depth: int = MAX_DEPTH) -> GoObject:
    """The JSON object in `raw`, read as Go reads it, or `Unreadable` saying why it cannot be read the same."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")  # strict: encoded surrogates and overlong forms are refused too
        except UnicodeDecodeError:
            raise Unreadable("it is not valid UTF-8 (Go reads invalid bytes as U+FFFD)") from None
    else:
        text, raw = raw, raw.encode("utf-8", "surrogatepass")
    if not cheap_to_read(raw):  # checked before any parse: the parse is the cost
        raise Unreadable(f"it is over {ON_LOOP_BYTES // 1024} KiB with {MAX_VALUES} JSON values or more, too "
                         f"much to read on the proxy's event loop")
    try:
        obj = _DECODER.decode(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            raise Unreadable("it has data after the JSON value (Go's stream decoder reads the value alone)") from None
        raise Unreadable(f"it is not JSON ({e.msg} at character {e.pos})") from None
    except RecursionError:  # Python's parser gives up near 1,000 levels (Go reads 10,000)
        raise Unreadable(f"it nests deeper than {max_depth} levels") from None
    if not isinstance(obj, GoObject):
        raise Unreadable("it is not a JSON object")
    if _deeper_than(obj, raw, max_depth):
        raise Unreadable(f"it nests deeper than {max_depth} levels")
    return obj
