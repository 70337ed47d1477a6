"""fields.py answers header questions from mitmproxy's raw fields: it must answer exactly what mitmproxy's
own Headers.get / get_all / set_all would, for any header list (names in any case, repeats, non-UTF-8)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http

from coze_mitm.core import fields

NAMES = [b"Origin", b"origin", b"ORIGIN", b"Authorization", b"authorization", b"Content-Type", b"Cookie", b"X-Other"]
VALUES = st.binary(max_size=12) | st.sampled_from([b"https://a.example", b"Bearer user:abcdefgh", "é".encode(), b"\xff\xfe"])
HEADER_LISTS = st.lists(st.tuples(st.sampled_from(NAMES), VALUES), max_size=8)
ASKED = st.sampled_from([b"origin", b"authorization", b"content-type", b"cookie", b"x-missing"])


@settings(max_examples=300, deadline=None)
@given(HEADER_LISTS, ASKED)
def test_get_and_every_answer_what_mitmproxy_does(pairs, name):
    headers = http.Headers(pairs)
    assert fields.every(headers, name) == headers.get_all(name.decode())
    assert fields.get(headers, name) == headers.get(name.decode(), "")
    assert fields.get(headers, name, "absent") == headers.get(name.decode(), "absent")


@settings(max_examples=300, deadline=None)
@given(HEADER_LISTS, ASKED, st.lists(st.sampled_from(["Bearer czs_x", "a=b", "", "é"]), max_size=3))
def test_replace_leaves_the_fields_mitmproxy_would(pairs, name, values):
    ours, theirs = http.Headers(pairs), http.Headers(pairs)
    fields.replace(ours, name, values)
    theirs.set_all(name.decode(), values)
    assert ours.fields == theirs.fields


def test_replace_spells_a_new_header_as_asked():
    headers = http.Headers([(b"Host", b"x")])
    fields.replace(headers, b"authorization", ["Bearer czs_1"], spelled=b"Authorization")
    assert headers.fields == ((b"Host", b"x"), (b"Authorization", b"Bearer czs_1"))
    # An existing copy keeps its own spelling and place; later copies go.
    headers = http.Headers([(b"AUTHORIZATION", b"Bearer user:abcdefgh"), (b"Host", b"x"), (b"authorization", b"2")])
    fields.replace(headers, b"authorization", ["Bearer czs_1"], spelled=b"Authorization")
    assert headers.fields == ((b"AUTHORIZATION", b"Bearer czs_1"), (b"Host", b"x"))
