"""Reading requests as Coze's Go server reads them (issue 24, item 4): properties over generated variants.

Two readers are driven over the same bytes and compared with a model of what Go reads, written here from Go's
documented rules (encoding/json: a struct field is filled by every key equal to its name under Unicode simple
folding, the last one winning, `null` changing nothing; hertz / net/http: the percent-decoded, cleaned path):

* ours (addons/coze_mitm/core/go_reading.py: Python's json plus checks) either reads what Go reads or refuses
  ("refused rather than guessed"), and refuses exactly the variants Go and Python read differently: invalid
  UTF-8, data after the object, nesting past its bound, keys that could fill the field with different values;
* the stand-in's (sandbox/go_json.py: an iterative Go-style decoder) reads what Go reads, always (it is what
  the integration tests meet in place of Coze).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from coze_mitm.core import go_reading
from coze_mitm.core.usage_book import spends_tokens
from sandbox import go_json

# -- the model of Go's reading (independent of both readers) ------------------------------------------
# Unicode simple folding, for the letters of the field names below: Go's EqualFold/foldName equate an ASCII
# letter with its other case, K with U+212A KELVIN SIGN and s with U+017F LATIN SMALL LETTER LONG S; nothing
# else folds into ASCII (U+0131 dotless i, U+0130 capital I with dot, the ligatures and sharp s do not).
SAME_LETTER = {"k": {"k", "K", "\u212a"}, "s": {"s", "S", "\u017f"}}
LOOKALIKES = ["\u0131", "\u0130", "\ufb00", "\u00df", "\uff25", "\u212b"]  # never fold into ASCII


def go_key_matches(key: str, name: str) -> bool:
    if len(key) != len(name):
        return False
    for k, n in zip(key, name):
        same = SAME_LETTER.get(n, {n, n.upper()})
        if k not in same:
            return False
    return True


def go_field(pairs: list, name: str):
    """What Go's json.Decoder reads into the struct field `name` (None: absent, or only nulls)."""
    value = None
    for key, v in pairs:
        if go_key_matches(key, name) and v is not None:
            value = v
    return value


# -- generated variants -------------------------------------------------------------------------------------
FIELDS = ["event_type", "stream", "is_async"]
VALUES = {"event_type": ["conversation.message.create", "chat.update", "input_audio_buffer.append",
                         "conversation.chat.submit_tool_outputs", ""],
          "stream": [True, False], "is_async": [True, False]}


@st.composite
def spelling(draw, name: str) -> str:
    """The field's name in a random case, K/long-s variants, or a decoy that Go does not match."""
    out = []
    for ch in name:
        choices = sorted(SAME_LETTER.get(ch, {ch, ch.upper()}))
        out.append(draw(st.sampled_from(choices)))
    key = "".join(out)
    decoy = draw(st.integers(0, 5))
    if decoy == 1:
        key = key[:-1]  # event_typ
    elif decoy == 2:
        key = key.replace("_", "-")  # event-type
    elif decoy == 3:
        i = draw(st.integers(0, len(key) - 1))
        key = key[:i] + draw(st.sampled_from(LOOKALIKES)) + key[i + 1:]
    elif decoy == 4:
        key = key + " "
    return key


@st.composite
def event(draw):
    """(the bytes, the pairs at top level, the field read, what is odd about it)"""
    name = draw(st.sampled_from(FIELDS))
    pool = VALUES[name] + [None]
    pairs = [(draw(spelling(name)), draw(st.sampled_from(pool))) for _ in range(draw(st.integers(0, 4)))]
    pairs.insert(draw(st.integers(0, len(pairs))), ("id", "1"))
    ascii_only = draw(st.booleans())
    body = ",".join(json.dumps(k, ensure_ascii=ascii_only) + ":" + json.dumps(v, ensure_ascii=ascii_only)
                    for k, v in pairs)
    odd = set()
    depth = draw(st.sampled_from([0, 0, 0, 5, 127, 129, 2000]))
    if depth:
        body += ',"data":{"nested":' + "[" * depth + "]" * depth + "}"
        if depth + 2 > go_reading.MAX_DEPTH:  # the object and "data" are two levels
            odd.add("deep")
    raw = ("{" + body + "}").encode()
    if draw(st.booleans()) and draw(st.booleans()):
        raw = raw.replace(b'"id":"1"', b'"id":"1\xff"')  # invalid UTF-8 in a value nobody decides on
        odd.add("utf8")
    trailing = draw(st.sampled_from(["", "", " \n", "x", "{}", '{"event_type":"conversation.message.create"}']))
    raw += trailing.encode()
    if trailing.strip():
        odd.add("trailing")
    matching = [v for k, v in pairs if go_key_matches(k, name)]
    if len({json.dumps(v) for v in matching}) > 1:
        odd.add("keys disagree")
    if any(go_key_matches(k, name) and not k.isascii() for k, _ in pairs):
        odd.add("non-ASCII fold")
    return raw, pairs, name, odd


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event())
@example((b'{"id":"1","Event_Type":"conversation.message.create"}', [("id", "1"), ("Event_Type", "conversation.message.create")],
          "event_type", set()))
def test_ours_reads_as_go_or_refuses_and_the_stand_in_reads_as_go(case):
    raw, pairs, name, odd = case
    go = go_field(pairs, name)
    # the stand-in: what Go's json.Decoder reads, whatever is odd about it
    assert go_json.decode(raw, rest_ignored=True).get(name) == go
    # ours: the same, or refused, and refused exactly when Go and Python may read it differently
    try:
        value, disagree = go_reading.field(go_reading.read_object(raw), name)
    except go_reading.Unreadable:
        assert odd & {"deep", "utf8", "trailing"}, (raw[:200], odd)
        return
    assert not odd & {"deep", "utf8", "trailing"}, (raw[:200], odd)
    assert disagree == bool(odd & {"keys disagree", "non-ASCII fold"}), (pairs, odd)
    if not disagree:
        assert value == go, (pairs, value, go)
    else:
        assert value == go  # Go's own reading is still what `field` gives (a budget refuses it all the same)


# -- paths ---------------------------------------------------------------------------------------------------
SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=8)
COZE_PATHS = [["v3", "chat"], ["v1", "workflow", "run"], ["v1", "workflow", "stream_run"], ["v3", "chat", "retrieve"],
              ["v1", "workflows", "chat"], ["v1", "conversations"], ["api", "v3", "chat"]]


@st.composite
def target(draw):
    """(a request target as a client may write it, the path Go routes it to)"""
    segments = draw(st.one_of(st.sampled_from(COZE_PATHS), st.lists(SEGMENT, min_size=0, max_size=4)))
    parts = []
    for seg in segments:
        noise = draw(st.sampled_from(["", "", "", "/", "/.", "/x/..", "/%2e", "/x/%2E%2e"]))
        parts.append(noise)
        parts.append("/" + "".join(f"%{ord(c):02{draw(st.sampled_from('xX'))}}" if draw(st.booleans()) else c
                                   for c in seg))
    raw = "".join(parts) or "/"
    raw += draw(st.sampled_from(["", "/", "//", "?conversation_id=1", "/?a=%2F", "#frag", "?x#y"]))
    if draw(st.booleans()) and "/" in raw[1:]:
        raw = raw[0] + raw[1:].replace("/", "%2F", 1)  # an encoded slash: hertz (and net/http < 1.22) decode it
    return raw, "/" + "/".join(segments)


@settings(max_examples=300, deadline=None)
@given(target())
@example(("/v3/%63hat", "/v3/chat"))
@example(("/v1/workflow/%72un", "/v1/workflow/run"))
def test_paths_are_routed_as_go_routes_them(case):
    raw, go = case
    assert go_reading.route(raw) == go
    assert go_reading.route(raw.encode()) == go
    assert go_json.route(raw) == go  # the stand-in routes the same way
    spends = any(go.endswith(p) for p in ("/v3/chat", "/v3/chat/submit_tool_outputs", "/v1/workflows/chat",
                                          "/v1/workflow/run", "/v1/workflow/stream_run", "/v1/workflow/stream_resume"))
    assert spends_tokens("POST", raw) == spends


# -- what is refused, and why (the messages clients see) -----------------------------------------------------
@pytest.mark.parametrize("raw, why", [
    (b'{"event_type":"conversation.message.create"} trailing', "data after the JSON value"),
    (b'{"event_type":"conversation.message.create","data":{"content":"\xff"}}', "not valid UTF-8"),
    (b'{"event_type":"conversation.message.create","x":' + b"[" * 2000 + b"]" * 2000 + b"}", "deeper than 128"),
    (b'{"event_type":"conversation.message.create","x":' + b"[" * 128 + b"]" * 128 + b"}", "deeper than 128"),
    (b'{"event_type":"conversation.message.create","many":[' + b",".join([b'"]]"', b"[]"] * 200) + b'],"x":'
     + b"[" * 128 + b"]" * 128 + b"}", "deeper than 128"),  # past the walk's limit: counted on the brackets
    (b'{"event_type":NaN}', "NaN is not JSON"),
    (b'["conversation.message.create"]', "not a JSON object"),
    (b"\xef\xbb\xbf{}", "not JSON"),
])
def test_unreadable_says_why(raw, why):
    with pytest.raises(go_reading.Unreadable, match=why):
        go_reading.read_object(raw)


def test_depth_is_of_values_not_brackets():
    text = '{"a":"' + "[" * 500 + '\\"\\\\","b":[[{}]],"c":[' + ",".join(["[]"] * 300) + "]," + '"d":' + "[" * 126 + "]" * 126 + "}"
    assert go_reading.read_object(text.encode())["a"].startswith("[[")  # 127 levels: read
