"""metrics.py: Prometheus text format, checked with prometheus_client's own parser."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from coze_mitm.core.identity import short_id
from coze_mitm.core.metrics import CONTENT_TYPE, escape_label, render
from coze_mitm.core.usage_book import OTHERS, UsageBook


def parse(text: str) -> dict:
    """{family name: (type, help, [(sample name, labels, value)])}"""
    out = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in out, f"family {fam.name} twice"
        out[fam.name] = (fam.type, fam.documentation, [(s.name, s.labels, s.value) for s in fam.samples])
    return out


def samples(parsed: dict, family: str) -> dict:
    return {tuple(sorted(labels.items())): value for _, labels, value in parsed[family][2]}


def book_with_users():
    book = UsageBook()
    book.chat("1732000000000-abcdefghijklmnopQRSTUV")
    book.tokens("1732000000000-abcdefghijklmnopQRSTUV", 120)
    book.chat("login:alice")
    book.chat("login:alice")
    book.tokens("login:alice", 30)
    return book


def display(key: str) -> str:
    return key[len("login:"):] if key.startswith("login:") else short_id(key)


def test_everything_parses_with_help_and_type():
    text = render(usage_rows=book_with_users().rows(), injected=7, preflights=3,
                  refusals={"origin-not-allowed": 2, "budget": 1}, exchanges={"ok": 2, "exchange-timeout": 1},
                  display=display, started=1_790_000_000.5, store_ok=True)
    parsed = parse(text)
    assert {name: kind for name, (kind, _, _) in parsed.items()} == {
        "coze_mitm_tokens": "counter", "coze_mitm_chats": "counter", "coze_mitm_tokens_today": "gauge",
        "coze_mitm_requests": "counter", "coze_mitm_token_exchanges": "counter",
        "coze_mitm_start_time_seconds": "gauge", "coze_mitm_usage_store_ok": "gauge",
    }
    assert all(help_text for _, help_text, _ in parsed.values())
    assert samples(parsed, "coze_mitm_tokens") == {(("user", short_id("1732000000000-abcdefghijklmnopQRSTUV")),): 120.0,
                                                   (("user", "alice"),): 30.0}
    assert samples(parsed, "coze_mitm_chats")[(("user", "alice"),)] == 2.0
    assert samples(parsed, "coze_mitm_requests") == {
        (("outcome", "injected"),): 7.0, (("outcome", "preflight"),): 3.0,
        (("outcome", "refused"), ("reason", "budget")): 1.0,
        (("outcome", "refused"), ("reason", "origin-not-allowed")): 2.0,
    }
    assert samples(parsed, "coze_mitm_token_exchanges") == {(("result", "exchange-timeout"),): 1.0, (("result", "ok"),): 2.0}
    assert samples(parsed, "coze_mitm_start_time_seconds") == {(): 1_790_000_000.5}
    # the sample names carry _total, as counters must
    assert {name for name, _, _ in parsed["coze_mitm_tokens"][2]} == {"coze_mitm_tokens_total"}
    assert "1732000000000-abcdefghijklmnopQRSTUV" not in text  # a full tag id would let a reader act as that user


def test_empty_proxy_parses():
    parsed = parse(render())
    assert samples(parsed, "coze_mitm_requests") == {(("outcome", "injected"),): 0.0, (("outcome", "preflight"),): 0.0}
    assert parsed["coze_mitm_tokens"][2] == []


def test_hostile_user_names_are_escaped():
    names = ['a"b', "back\\slash", "new\nline", "cr\rlf", "nul\x00", "# HELP x", 'x"} coze_mitm_tokens_total{user="evil', "Zoë 你好", "\\n"]
    rows = [{"user": n, "chats": 1, "tokens": i, "tokens_today": 0} for i, n in enumerate(names)]
    text = render(usage_rows=rows)
    assert len([line for line in text.splitlines() if line.startswith("coze_mitm_tokens_total")]) == len(names)
    got = samples(parse(text), "coze_mitm_tokens")
    assert {labels[0][1]: v for labels, v in got.items()} == {n: float(i) for i, n in enumerate(names)}


def test_equal_labels_after_shortening_are_merged_not_repeated():
    # two different ids with the same short form must not make two identical series (an invalid scrape)
    rows = [{"user": "1732000000000-aaaa-WXYZ", "chats": 1, "tokens": 5, "tokens_today": 5},
            {"user": "1732000000000-bbbb-WXYZ", "chats": 2, "tokens": 7, "tokens_today": 1}]
    assert short_id(rows[0]["user"]) == short_id(rows[1]["user"])
    parsed = parse(render(usage_rows=rows, display=short_id))
    assert list(samples(parsed, "coze_mitm_tokens").values()) == [12.0]
    assert list(samples(parsed, "coze_mitm_chats").values()) == [3.0]


def test_folded_users_row():
    book = UsageBook(max_users=1)
    book.tokens("login:a", 1)
    book.tokens("login:b", 2)
    parsed = parse(render(usage_rows=book.rows(), display=display))
    assert samples(parsed, "coze_mitm_tokens") == {(("user", "b"),): 2.0, (("user", OTHERS),): 1.0}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=40), max_size=8, unique=True))
def test_any_user_name_round_trips_through_the_parser(names):
    rows = [{"user": n, "chats": 1, "tokens": i, "tokens_today": i} for i, n in enumerate(names)]
    got = samples(parse(render(usage_rows=rows)), "coze_mitm_tokens")
    expected = {}
    for i, n in enumerate(names):
        clean = n.encode("utf-8", "replace").decode("utf-8")
        expected[clean] = expected.get(clean, 0) + float(i)
    assert {labels[0][1]: v for labels, v in got.items()} == expected


@pytest.mark.parametrize("raw,escaped", [('a"b', 'a\\"b'), ("a\\b", "a\\\\b"), ("a\nb", "a\\nb"), ("\ud800", "?")])
def test_escape_label(raw, escaped):
    assert escape_label(raw) == escaped


def test_content_type():
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
