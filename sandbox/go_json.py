"""Request bodies and paths read the way a Go server reads them (the sandbox's default, like Coze's server).

Coze's open-source server (Coze Studio) is Go (hertz). What the sandbox does here is what Go's standard
library does, so that tests through the proxy meet a stand-in that reads like the real service would (what
the real Coze does is not checkable here):

* ``decode(raw)`` is ``json.Unmarshal`` into a struct (``decode(raw, rest_ignored=True)``: ``json.Decoder``): an object is a ``GoStruct``, whose ``get(name)`` reads
  a field as Go does (every key equal to ``name`` under Unicode simple folding fills it — ``"Event_Type"``,
  ``"EVENT_TYPE"``, U+212A KELVIN SIGN for ``k``, U+017F LONG S for ``s`` — and the last one wins; a ``null``
  leaves it as it was); invalid UTF-8 is read as U+FFFD; data after the value is an error; nesting is
  allowed to 10,000 levels (Go's limit), which Python's own parser cannot read. Iterative, no recursion.
* ``route(target)`` is the path a Go router serves: cut at ``?`` or ``#``, percent-decoded once, ``//``,
  ``.`` and ``..`` resolved, no trailing slash (hertz cleans the path this way; net/http's ServeMux
  redirects to the same clean path).

Independent of the proxy's own reader (addons/coze_mitm/core/go_reading.py): the tests compare the two.
"""

from __future__ import annotations

import json.decoder
import re
from typing import Any
from urllib.parse import unquote_to_bytes

MAX_DEPTH = 10000  # encoding/json's maxNestingDepth

_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_SURROGATE = re.compile("[\ud800-\udfff]")
_FOLDS = str.maketrans({"\u212a": "k", "\u017f": "s"})


class GoSyntaxError(ValueError):
    pass


def fold(key: str) -> str:
    """Go's folded form of a key, for comparing with ASCII field names."""
    folded = key.translate(_FOLDS)
    return folded.lower() if folded.isascii() else key


class GoStruct(dict):
    """A JSON object as a Go struct sees it: ``get``/``[]``/``in`` read a field case-insensitively, the last
    matching key winning (iteration and ``dict(...)`` still give the keys as sent)."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__(pairs)
        self._fields: dict[str, Any] = {}
        for key, value in pairs:
            if value is not None or fold(key) not in self._fields:
                self._fields[fold(key)] = value

    def get(self, name: str, default: Any = None) -> Any:
        value = self._fields.get(name.lower(), None)
        return default if value is None else value

    def __getitem__(self, name: str) -> Any:
        return self._fields[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._fields


def decode(raw: bytes | str, rest_ignored: bool = False) -> Any:
    """One JSON value, as json.Unmarshal reads it (objects are GoStructs); GoSyntaxError otherwise. With
    `rest_ignored`, as a json.Decoder reads a stream: the first value, whatever follows it."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    pos = _WS.match(text, 0).end()
    stack: list[tuple[bool, list, str | None]] = []  # (an array?, its items or pairs, the key awaiting its value)
    value: Any = None
    while True:
        # -- one value starts at pos
        if pos >= len(text):
            raise GoSyntaxError("unexpected end of JSON input")
        c = text[pos]
        if c in "{[":
            if len(stack) >= MAX_DEPTH:
                raise GoSyntaxError("exceeded max depth")
            pos = _WS.match(text, pos + 1).end()
            close = "}" if c == "{" else "]"
            if pos < len(text) and text[pos] == close:
                value, pos = (GoStruct([]) if c == "{" else []), pos + 1
            else:
                if c == "{":
                    key, pos = _key(text, pos)
                    stack.append((False, [], key))
                else:
                    stack.append((True, [], None))
                continue
        elif c == '"':
            value, pos = _string(text, pos)
        elif text.startswith("true", pos):
            value, pos = True, pos + 4
        elif text.startswith("false", pos):
            value, pos = False, pos + 5
        elif text.startswith("null", pos):
            value, pos = None, pos + 4
        else:
            m = _NUMBER.match(text, pos)
            if m is None:
                raise GoSyntaxError(f"invalid character {c!r} looking for beginning of value")
            n = m.group()
            value, pos = (float(n) if any(ch in n for ch in ".eE") else int(n)), m.end()
        # -- the value is complete: put it in its container, close containers that end here
        while True:
            pos = _WS.match(text, pos).end()
            if not stack:
                if pos != len(text) and not rest_ignored:
                    raise GoSyntaxError(f"invalid character {text[pos]!r} after top-level value")
                return value
            is_array, items, key = stack[-1]
            if is_array:
                items.append(value)
            else:
                items.append((key, value))
            c = text[pos] if pos < len(text) else ""
            if c == ",":
                pos = _WS.match(text, pos + 1).end()
                if not is_array:
                    key, pos = _key(text, pos)
                    stack[-1] = (False, items, key)
                break  # the next value
            if c == ("]" if is_array else "}"):
                stack.pop()
                value, pos = (items if is_array else GoStruct(items)), pos + 1
                continue
            raise GoSyntaxError(f"invalid character {c!r} after {'array element' if is_array else 'object key:value pair'}")


def _string(text: str, pos: int) -> tuple[str, int]:
    try:
        s, end = json.decoder.scanstring(text, pos + 1, True)
    except json.JSONDecodeError as e:
        raise GoSyntaxError(e.msg) from None
    return _SURROGATE.sub("\ufffd", s), end  # Go reads a lone surrogate escape as U+FFFD


def _key(text: str, pos: int) -> tuple[str, int]:
    if pos >= len(text) or text[pos] != '"':
        raise GoSyntaxError("invalid character looking for beginning of object key string")
    key, pos = _string(text, pos)
    pos = _WS.match(text, pos).end()
    if pos >= len(text) or text[pos] != ":":
        raise GoSyntaxError("invalid character after object key")
    return key, _WS.match(text, pos + 1).end()


def route(target: str) -> str:
    """The path a Go router serves for this request target (see the module doc)."""
    for sep in "?#":
        target = target.split(sep, 1)[0]
    segments: list[str] = []
    for segment in unquote_to_bytes(target).decode("utf-8", "replace").split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments)
