"""LDAP proxy logins (issue 19 item 4, "one account, one identity"), end to end: a real OpenLDAP (slapd,
started here in a temp dir on a free loopback port), a real mitmdump with `--set proxyauth=ldap:...` running
the bundle, and the strict Coze stand-in.

OpenLDAP matches ` alice`, `alice `, `ａｌｉｃｅ` (full width), `Alice Liddell` (her second cn) and
`alice  liddell` as alice's entry, and mitmproxy's proxyauth logs them all in with her password. coze-mitm
names the user by the entry (its DN, or coze_ldap_identity=uid), so they are one Coze user with one budget,
and none of them is a new user for coze_new_users_per_minute.
"""

from __future__ import annotations

import re
import statistics

import pytest

from tests.slapd import CONTRACTOR_CN, CONTRACTOR_PW, PASSWORDS, SUFFIX, dn_of
from tests.clients import PAGE, chat_body as body, tokens_of
from tests.team import TAG_A, TAG_B, Client
from tests.harness import Mitmdump

pytestmark = pytest.mark.process  # every test here starts a process (run_tests.py --fast leaves them out)

VARIANTS = [" alice", "alice ", "ａｌｉｃｅ", "Alice Liddell", "alice  liddell"]
ALICE = f"login:{dn_of('alice')}"
BOB = f"login:{dn_of('bob')}"


@pytest.fixture
def ldap_proxy(tmp_path, slapd, config_file, standin):
    started = []

    def start(*more: str, key: str = "cn", subtree: str | None = None) -> Mitmdump:
        spec = slapd.spec(key) if subtree is None else slapd.spec(key, subtree=subtree)
        sets = [f"proxyauth={spec}", f"coze_config={config_file}", f"coze_origins={PAGE}",
                "connection_strategy=lazy", *more]
        proxy = Mitmdump(tmp_path / f"confdir{len(started)}", sets)
        proxy.confdir.mkdir()
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()


def login(proxy, standin, name: str, password: str | None = None, tag: str = TAG_A) -> Client:
    """A client logged in to the proxy as `name` (typed as is) with alice's password unless told."""
    return Client(proxy, standin, name, tag, password=PASSWORDS["alice"] if password is None else password)


def test_five_spellings_of_alice_are_one_identity_and_one_budget(ldap_proxy, standin):
    text = "one two three"
    budget = tokens_of(text) * 2  # two chats, then she is over it
    proxy = ldap_proxy(f"coze_user_daily_tokens={budget}")
    alice = login(proxy, standin, "alice")
    alice.chat(text)
    for name in VARIANTS:  # every spelling logs in (mitmproxy asks the directory) and reaches the same user
        r = login(proxy, standin, name).call("POST", "/v1/conversation/message/list?conversation_id=x",
                                               json={"limit": 1})
        assert r.status_code != 407, name
    login(proxy, standin, "Alice Liddell").chat(text)  # her second cn: same user, same budget
    # the budget is spent: every spelling is refused; none got a fresh budget
    for name in ["alice", *VARIANTS]:
        r = login(proxy, standin, name).call("POST", "/v3/chat", json=body(TAG_A, "more", stream=False))
        assert r.status_code == 429 and r.json()["code"] == 4013, (name, r.status_code, r.text)
    names = {e["session_name"] for e in standin.exchanges}
    assert names == {ALICE}, names
    assert standin.exchange_count() == 1
    usage = alice.usage()
    assert list(usage) == [dn_of("alice")], usage
    assert usage[dn_of("alice")]["tokens_today"] == budget
    # bob is still his own user
    login(proxy, standin, "bob", PASSWORDS["bob"], tag=TAG_B).chat("hi from bob")
    assert {e["session_name"] for e in standin.exchanges} == {ALICE, BOB}


def test_spellings_do_not_fill_the_new_user_limit(ldap_proxy, standin):
    proxy = ldap_proxy("coze_new_users_per_minute=2")
    spellings = ["alice", *VARIANTS, "ALICE", " ALICE ", "Alice", "alice   ", "   alice", "ALICE LIDDELL",
                 "ａｌｉｃｅ ", "Ａｌｉｃｅ", "alice liddell "]
    for name in spellings:
        r = login(proxy, standin, name).call("POST", "/v1/conversation/message/list?conversation_id=x",
                                               json={"limit": 1})
        assert r.status_code not in (407, 429), (name, r.status_code, r.text)
    assert standin.exchange_count() == 1
    bob = login(proxy, standin, "bob", PASSWORDS["bob"], tag=TAG_B)
    assert bob.chat("bob's first chat")["status"]  # not 429: alice's spellings were not new users
    assert {e["session_name"] for e in standin.exchanges} == {ALICE, BOB}


def test_identity_attribute_uid(ldap_proxy, standin):
    proxy = ldap_proxy("coze_ldap_identity=uid")
    for name in ["Alice Liddell", "ａｌｉｃｅ"]:
        login(proxy, standin, name).chat("hello")
    assert {e["session_name"] for e in standin.exchanges} == {"login:alice"}


def test_uid_shared_by_two_entries_is_refused_not_merged(ldap_proxy, standin):
    """Issue 25 item 5: carol in ou=people and a contractor in ou=contractors both have uid carol; with
    coze_ldap_identity=uid they were one Coze user (one history, one budget). Each is refused, saying why."""
    proxy = ldap_proxy("coze_ldap_identity=uid", subtree=SUFFIX)
    for name, password in (("carol", PASSWORDS["carol"]), (CONTRACTOR_CN, CONTRACTOR_PW)):
        r = login(proxy, standin, name, password).call("POST", "/v3/chat", json=body(TAG_A, "x", stream=False))
        assert r.status_code == 403 and r.json()["code"] == 4101, (name, r.status_code, r.text)
        msg = r.json()["msg"]
        assert "more than one directory entry has the uid 'carol'" in msg and "coze_ldap_identity=dn" in msg, msg
    assert standin.exchanges == []
    # a uid only one entry has still works in the same directory
    login(proxy, standin, "Alice Liddell").chat("hello")
    assert {e["session_name"] for e in standin.exchanges} == {"login:alice"}


def test_search_key_uid_and_wrong_password(ldap_proxy, standin):
    proxy = ldap_proxy(key="uid")
    login(proxy, standin, " ALICE").chat("hello")
    r = login(proxy, standin, "alice", "wrong-password").call("POST", "/v3/chat", json=body(TAG_A, "x", stream=False))
    assert r.status_code == 407
    assert {e["session_name"] for e in standin.exchanges} == {ALICE}


def test_multi_valued_identity_attribute_is_refused_with_the_fix(ldap_proxy, standin):
    proxy = ldap_proxy("coze_ldap_identity=cn")  # alice has two cn values
    r = login(proxy, standin, "alice").call("POST", "/v3/chat", json=body(TAG_A, "x", stream=False))
    assert r.status_code == 403 and r.json()["code"] == 4101, r.text
    assert "2 cn values" in r.json()["msg"] and "coze_ldap_identity" in r.json()["msg"]
    assert standin.exchanges == []


def test_bad_identity_option_stops_startup(slapd, config_file, tmp_path):
    proxy = Mitmdump(tmp_path, [f"proxyauth={slapd.spec()}", f"coze_config={config_file}",
                                "coze_ldap_identity=(uid)"])
    assert proxy.run_to_exit() != 0
    assert "coze_ldap_identity='(uid)' is not an LDAP attribute name" in proxy.output


def test_lookup_wait_of_a_new_spelling(ldap_proxy, standin, capsys):
    """The time a login not seen lately waits for the directory, as the proxy measures it (from the hook
    handing the lookup to a worker thread to its answer; the first includes connecting and binding), and
    each spelling looked up once: the second request of a spelling is a cache hit."""
    proxy = ldap_proxy("termlog_verbosity=debug")
    login(proxy, standin, "alice").chat("warm up")  # alice's token is cached from here on
    spellings = [(" " * i) + "alice" for i in range(1, 21)]
    for name in spellings:
        client = login(proxy, standin, name)
        for _ in range(2):
            r = client.call("POST", "/v1/conversation/message/list?conversation_id=x", json={"limit": 1})
            assert r.status_code == 200, r.text
    assert standin.exchange_count() == 1
    assert proxy.wait_for_output(r"(LDAP lookup of a login took [\d.]+ ms[\s\S]*){21}", timeout=5)
    waits = [float(m) for m in re.findall(r"LDAP lookup of a login took ([\d.]+) ms", proxy.output)]
    assert len(waits) == 21, waits  # alice + 20 spellings, each once: the repeats were cache hits
    with capsys.disabled():
        print(f"\nLDAP lookup wait: first (connect + bind + search) {waits[0]:.2f} ms; the next 20: median "
              f"{statistics.median(waits[1:]):.2f} ms, max {max(waits[1:]):.2f} ms")
    assert statistics.median(waits[1:]) < 50
