"""The user tag and the origin gate, as pure rules over request headers."""

import pytest
from mitmproxy.http import Headers

from coze_mitm.core.identity import admit, find_user_id, short_id, strip_cookie

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


@pytest.mark.parametrize("bad", ["x" * 129, "has space!", "ümlaut-user", "a/b/c/d/e/f", ""])
def test_malformed_ids_refused(bad):
    with pytest.raises(ValueError, match="malformed"):
        find_user_id(h(("Authorization", f"Bearer user:{bad}")))


@pytest.mark.parametrize("good", ["a", "UserId1", "UserId123", "x" * 128, "alice-1"])
def test_ids_as_short_as_cozes_examples_are_accepted(good):
    """@coze/chat-sdk's and Coze's examples use ids like UserId123: 1-128 characters of A-Z a-z 0-9 _ -."""
    assert find_user_id(h(("Authorization", f"Bearer user:{good}"))) == good


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


def test_websocket_query_tag():
    # @coze/api in a browser puts the token in the URL: ...&authorization=Bearer%20<token>
    d = admit(h(("Origin", "https://chat.example.org")), ALLOWED, query_authorizations=[f"Bearer user:{ID}"])
    assert (d.action, d.user_id) == ("inject", ID)
    d = admit(h(), ALLOWED, query_authorizations=[f"Bearer user:{ID}"])  # Node: no Origin
    assert (d.action, d.user_id) == ("inject", ID)
    d = admit(h(("Origin", "https://evil.example")), ALLOWED, query_authorizations=[f"Bearer user:{ID}"])
    assert (d.action, d.reason) == ("refuse", "origin-not-allowed")
    d = admit(h(), ALLOWED, query_authorizations=[f"Bearer user:{ID}", "Bearer czs_x"])
    assert (d.action, d.status) == ("refuse", 400)
    d = admit(h(("Authorization", "Bearer user:other-user-1")), ALLOWED, query_authorizations=[f"Bearer user:{ID}"])
    assert (d.action, d.status) == ("refuse", 400) and "two different users" in d.msg
    assert admit(h(), ALLOWED, query_authorizations=["Bearer czs_own"]).action == "pass"


def test_remote_client_refused_only_when_tagged():
    d = admit(h(("Authorization", f"Bearer user:{ID}")), ALLOWED, local_client=False)
    assert (d.action, d.status, d.code, d.reason) == ("refuse", 403, 4101, "remote-client")
    assert "coze_allow_remote" in d.msg
    assert admit(h(("Authorization", "Bearer czs_own")), ALLOWED, local_client=False).action == "pass"


@pytest.mark.parametrize("host,local", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("::ffff:127.0.0.1", True),
    ("localhost", True), ("", False), ("0.0.0.0", False), ("10.0.0.2", False), ("::ffff:10.0.0.2", False),
    ("192.168.1.4", False), ("example.org", False), ("fe80::1%eth0", False),
])
def test_is_loopback(host, local):
    from coze_mitm.core.identity import is_loopback
    assert is_loopback(host) is local


# ----------------------------------------------------------------- Admissions: admit() remembered

SAMPLES = [
    [("Authorization", f"Bearer user:{ID}"), ("Origin", "https://chat.example.org"), ("Sec-Fetch-Site", "cross-site")],
    [("Authorization", f"Bearer user:{ID}"), ("Origin", "https://evil.example")],
    [("Authorization", f"Bearer user:{ID}")],
    [("Authorization", "Bearer user:short")],
    [("Cookie", f"coze_user={ID}")],
    [("Cookie", f"coze_user={ID}"), ("Origin", "https://chat.example.org")],
    [("Authorization", f"Bearer user:{ID}"), ("Sec-Fetch-Dest", "document")],
    [("Authorization", "Bearer czs_real"), ("Origin", "https://evil.example")],
    [("Accept", "*/*")],
]


@pytest.mark.parametrize("local", [True, False])
def test_admissions_answer_as_admit_the_first_time_and_every_time_after(local):
    from coze_mitm.core.identity import Admissions
    admissions = Admissions()
    for _ in range(3):  # the first round decides, the later ones are remembered
        for pairs in SAMPLES:
            for query in ([], [f"Bearer user:{ID}"]):
                # Headers the rules do not read vary from request to request; the answer does not.
                headers = h(*pairs, ("Content-Length", str(len(query) + len(pairs))))
                seen, decision = admissions(headers.fields, ALLOWED, query, local)
                assert decision == admit(h(*pairs), ALLOWED, query_authorizations=query, local_client=local), pairs
                assert seen.get_all("authorization") == h(*pairs).get_all("authorization")
                assert seen.get_all("cookie") == h(*pairs).get_all("cookie")


def test_admissions_forget_when_the_allowed_origins_change():
    from coze_mitm.core.identity import Admissions
    admissions = Admissions()
    headers = h(("Authorization", f"Bearer user:{ID}"), ("Origin", "https://chat.example.org"))
    assert admissions(headers.fields, ALLOWED, [], True)[1].action == "inject"
    assert admissions(headers.fields, frozenset({"https://other.example"}), [], True)[1].reason == "origin-not-allowed"


def test_admissions_stay_bounded():
    from coze_mitm.core.identity import Admissions
    admissions = Admissions()
    for i in range(Admissions.MAX_ENTRIES + 100):
        admissions(h(("Authorization", f"Bearer user:user-{i:08d}")).fields, ALLOWED, [], True)
    assert len(admissions._known) == Admissions.MAX_ENTRIES
    # A set of headers larger than a key may be is decided (correctly) but never kept.
    big = h(("Authorization", f"Bearer user:{ID}"), ("Cookie", "a=" + "x" * Admissions.MAX_KEY_BYTES))
    before = dict(admissions._known)
    assert admissions(big.fields, ALLOWED, [], True)[1].action == "inject"
    assert admissions._known == before
