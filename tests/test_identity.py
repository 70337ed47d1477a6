"""The user tag and the origin gate, as pure rules over request headers."""

import pytest
from mitmproxy.http import Headers

from identity import admit, find_user_id, short_id, strip_cookie

ALLOWED = frozenset({"https://chat.example.org"})
ID = "1732700000000-AbCdEfGhIjKlMnOpQrStUv"


def h(*pairs) -> Headers:
    return Headers([(k.encode(), v.encode("latin-1")) for k, v in pairs])


def test_placeholder_and_cookie_tags():
    assert find_user_id(h(("Authorization", f"Bearer user:{ID}"))) == ID
    assert find_user_id(h(("authorization", f"bearer   user:{ID}"))) == ID
    assert find_user_id(h(("Cookie", f"a=1; coze_user={ID}; b=2"))) == ID
    assert find_user_id(h(("Authorization", "Bearer czs_real"))) is None
    assert find_user_id(h()) is None


@pytest.mark.parametrize("bad", ["short", "x" * 129, "has space!", "ümlaut-user", "a/b/c/d/e/f", ""])
def test_malformed_ids_refused(bad):
    with pytest.raises(ValueError, match="malformed"):
        find_user_id(h(("Authorization", f"Bearer user:{bad}")))


def test_conflicting_or_duplicated_tags_refused():
    with pytest.raises(ValueError, match="two different users"):
        find_user_id(h(("Authorization", f"Bearer user:{ID}"), ("Cookie", "coze_user=other-user-1")))
    with pytest.raises(ValueError, match="more than one Authorization"):
        find_user_id(h(("Authorization", f"Bearer user:{ID}"), ("Authorization", "Bearer czs_x")))


def test_allowed_browser_origin_injects():
    d = admit(h(("Authorization", f"Bearer user:{ID}"), ("Origin", "https://chat.example.org"),
                ("Sec-Fetch-Mode", "cors")), ALLOWED)
    assert (d.action, d.user_id, d.origin) == ("inject", ID, "https://chat.example.org")


def test_non_browser_client_injects():
    assert admit(h(("Authorization", f"Bearer user:{ID}")), ALLOWED).action == "inject"


@pytest.mark.parametrize("origin", [
    "null", "https://evil.example", "https://chat.example.org.evil.test", "http://chat.example.org",
    "https://chat.example.org:8443", "HTTPS://CHAT.EXAMPLE.ORG",
])
def test_other_origins_refused(origin):
    d = admit(h(("Authorization", f"Bearer user:{ID}"), ("Origin", origin)), ALLOWED)
    assert (d.action, d.status, d.reason) == ("refuse", 403, "origin-not-allowed")


def test_browser_without_origin_refused():
    d = admit(h(("Authorization", f"Bearer user:{ID}"), ("Sec-Fetch-Site", "same-origin")), ALLOWED)
    assert (d.action, d.status) == ("refuse", 403)


def test_untagged_request_passes_whatever_its_origin():
    assert admit(h(("Origin", "https://evil.example"), ("Authorization", "Bearer pat_x")), ALLOWED).action == "pass"


def test_duplicate_origin_refused():
    d = admit(h(("Authorization", f"Bearer user:{ID}"), ("Origin", "https://chat.example.org"),
                ("Origin", "https://evil.example")), ALLOWED)
    assert (d.action, d.status) == ("refuse", 400)


def test_strip_cookie_keeps_the_rest():
    assert strip_cookie([f"a=1; coze_user={ID}; b=2", f"coze_user={ID}"]) == ["a=1; b=2"]


def test_short_id_hides_most_of_the_id():
    assert short_id(ID) == "1732…StUv"
    assert ID not in short_id(ID) and len(short_id(ID)) <= 9


def test_node_fetch_is_not_a_browser():
    # undici (Node's fetch, @coze/api's stream transport) sends Sec-Fetch-Mode alone and no Origin.
    d = admit(h(("Authorization", f"Bearer user:{ID}"), ("Sec-Fetch-Mode", "cors")), ALLOWED)
    assert (d.action, d.user_id) == ("inject", ID)
    d = admit(h(("Authorization", f"Bearer user:{ID}"), ("Sec-Fetch-Mode", "cors"), ("Sec-Fetch-Dest", "empty")), ALLOWED)
    assert (d.action, d.reason) == ("refuse", "browser-without-origin")


def test_cookie_tag_counts_only_beside_an_allowed_origin():
    # A top-level GET to an http:// host carries the cookie but neither Origin nor Sec-Fetch-*.
    d = admit(h(("Cookie", f"coze_user={ID}")), ALLOWED)
    assert (d.action, d.status, d.reason) == ("refuse", 403, "cookie-without-origin")
    assert "Authorization: Bearer user:" in d.msg
    d = admit(h(("Cookie", f"coze_user={ID}"), ("Origin", "https://chat.example.org")), ALLOWED)
    assert (d.action, d.user_id) == ("inject", ID)
    d = admit(h(("Cookie", f"coze_user={ID}"), ("Origin", "https://evil.example")), ALLOWED)
    assert (d.action, d.reason) == ("refuse", "origin-not-allowed")
