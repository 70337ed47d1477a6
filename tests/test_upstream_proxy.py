"""A corporate network: the Coze stand-in is reachable only through an upstream proxy that wants a login
(tests/upstream_net.py), and a real mitmdump runs with `--mode upstream:http://proxy --set upstream_auth=...`.
The pages' requests went through it before; now coze-mitm's own requests do too: the token exchange, the usage
poller (a non-streamed chat), the transparent retry (a revoked token), and, over HTTPS, with the private CA given
in ssl_verify_upstream_trusted_ca.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.clients import PAGE, session, tagged
from tests.harness import REPO, Mitmdump
from tests.upstream_net import PROXY_ADDR, STANDIN_ADDR, InNamespace, Unavailable, corp_net, wait_for_line
from tests.servers import write_chain

pytestmark = pytest.mark.process  # every test here starts a process (run_tests.py --fast leaves them out)

ALICE = "alice-corp-0001"
PROXY_LOGIN = "corp-user:Pr0xy-Passw0rd-7"


@pytest.fixture(scope="module")
def corp():
    try:
        with corp_net() as ns:
            yield ns
    except Unavailable as e:
        pytest.skip(str(e))


@pytest.fixture
def upstream_proxy(corp, tmp_path):
    log = tmp_path / "proxy.log"
    proc = InNamespace(corp, "proxy", "--host", PROXY_ADDR, "--auth", PROXY_LOGIN, "--log", str(log))
    yield proc.first_line, log
    proc.stop()


def standin_in(corp, tmp_path, chain=None) -> tuple[str, str]:
    config = tmp_path / "coze_oauth_config.json"
    args = ["standin", "--host", STANDIN_ADDR, "--config", str(config)] + (["--chain", str(chain)] if chain else [])
    proc = InNamespace(corp, *args)
    standins.append(proc)
    return proc.first_line, str(config)


def lines_of(log, predicate) -> list[str]:
    return [line for line in log.read_text().splitlines() if predicate(line)]


standins: list[InNamespace] = []


@pytest.fixture(autouse=True)
def stop_standins():
    yield
    while standins:
        standins.pop().stop()


def chat(proxy, base: str, user: str, stream: bool, verify=True):
    body = {"bot_id": "7000", "user_id": user, "stream": stream,
            "additional_messages": [{"role": "user", "content": "hello from the office", "content_type": "text"}]}
    return session(proxy).post(f"{base}/v3/chat", headers=tagged(user), json=body, timeout=30, verify=verify)


def test_only_the_upstream_proxy_reaches_the_standin(corp, tmp_path):
    base, _ = standin_in(corp, tmp_path)
    port = int(base.rsplit(":", 1)[1])
    with pytest.raises(OSError):  # the control: this host cannot reach it directly
        socket.create_connection((STANDIN_ADDR, port), timeout=5).close()


def test_exchange_and_polls_go_through_the_upstream_proxy(corp, tmp_path, upstream_proxy, mitmdump):
    proxy_at, log = upstream_proxy
    base, config = standin_in(corp, tmp_path)
    proxy = mitmdump(f"coze_config={config}", "coze_origins=https://chat.example.org",
                     f"mode=upstream:http://{proxy_at}", f"upstream_auth={PROXY_LOGIN}")
    r = chat(proxy, base, ALICE, stream=True)
    assert r.status_code == 200, r.text
    assert "event:conversation.chat.completed" in r.text
    # the exchange went through the proxy, with the login (the chat itself is mitmproxy's business)
    assert wait_for_line(log, lambda l: l == f"POST {base}/api/permission/oauth2/token auth=ok", timeout=5)
    # a non-streamed chat: the usage poller asks retrieve itself, through the proxy too
    r = chat(proxy, base, ALICE, stream=False)
    assert r.status_code == 200 and r.json()["data"]["status"] == "in_progress", r.text
    assert wait_for_line(log, lambda l: l.startswith(f"GET {base}/v3/chat/retrieve?") and l.endswith("auth=ok"))
    assert "through the upstream proxy" in proxy.output
    # the proxy's own address as the API base (no proxy set in the client, status.json's api_base): through the
    # upstream proxy as well
    plain = requests.Session()
    plain.trust_env = False
    api_base = session(proxy).get("http://coze.mitm/status.json", timeout=10).json()["api_base"]
    assert api_base == proxy.url
    body = {"bot_id": "7000", "user_id": ALICE, "stream": True,
            "additional_messages": [{"role": "user", "content": "hello directly", "content_type": "text"}]}
    sent_on = lambda l: l == f"POST {base}/v3/chat auth=ok"  # noqa: E731  (absolute-form, with the login)
    before = len(lines_of(log, sent_on))
    r = plain.post(f"{api_base}/v3/chat", headers=tagged(ALICE), json=body, timeout=30)
    assert r.status_code == 200 and "event:conversation.chat.completed" in r.text, r.text
    assert len(lines_of(log, sent_on)) == before + 1
    assert PROXY_LOGIN.split(":")[1] not in proxy.output


def test_the_transparent_retry_goes_through_the_upstream_proxy(corp, tmp_path, upstream_proxy, mitmdump):
    proxy_at, log = upstream_proxy
    base, config = standin_in(corp, tmp_path)
    proxy = mitmdump(f"coze_config={config}", "coze_origins=https://chat.example.org",
                     f"mode=upstream:http://{proxy_at}", f"upstream_auth={PROXY_LOGIN}")
    s = session(proxy)
    assert s.get(f"{base}/v1/bots/7000", headers=tagged(ALICE), timeout=30).status_code == 200
    assert standins[-1].tell(f"revoke {ALICE}") == "revoked 1"
    # Coze refuses the cached token: coze-mitm mints a fresh one and sends the request again, itself
    r = s.get(f"{base}/v1/bots/7000", headers=tagged(ALICE), timeout=30)
    assert r.status_code == 200 and r.json()["code"] == 0, r.text
    tokens = lines_of(log, lambda l: l == f"POST {base}/api/permission/oauth2/token auth=ok")
    bots = lines_of(log, lambda l: l == f"GET {base}/v1/bots/7000 auth=ok")
    assert len(tokens) == 2 and len(bots) == 3  # the first, the refused one (mitmproxy's), the retry (coze-mitm's)


def test_wrong_proxy_login_is_said_plainly(corp, tmp_path, upstream_proxy, mitmdump):
    proxy_at, log = upstream_proxy
    base, config = standin_in(corp, tmp_path)
    proxy = mitmdump(f"coze_config={config}", "coze_origins=https://chat.example.org",
                     f"mode=upstream:http://{proxy_at}", "upstream_auth=corp-user:wrong-password")
    r = chat(proxy, base, ALICE, stream=True)
    assert r.status_code == 502
    answer = r.json()
    assert answer["code"] == 5000 and "upstream proxy" in answer["msg"] and "upstream_auth" in answer["msg"]
    assert wait_for_line(log, lambda l: l == f"POST {base}/api/permission/oauth2/token auth=wrong", timeout=5)
    assert "wrong-password" not in proxy.output and "wrong-password" not in r.text


def private_ca(tmp_path):
    """(CA file, chain file for the stand-in): a private CA and a leaf for STANDIN_ADDR (an IP SAN)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp Private CA (test)")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coze api")]))
            .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(STANDIN_ADDR))]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file, chain = tmp_path / "corp-ca.pem", tmp_path / "standin-chain.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return ca_file, write_chain(chain, leaf_key, leaf)


def test_https_through_the_proxy_with_a_private_ca(corp, tmp_path, upstream_proxy, mitmdump):
    proxy_at, log = upstream_proxy
    ca_file, chain = private_ca(tmp_path)
    base, config = standin_in(corp, tmp_path, chain)
    assert base.startswith("https://")
    sets = (f"coze_config={config}", "coze_origins=https://chat.example.org", f"mode=upstream:http://{proxy_at}",
            f"upstream_auth={PROXY_LOGIN}", "connection_strategy=lazy")
    # Without the private CA, mitmproxy's own connection and coze-mitm's exchange both refuse the stand-in;
    # the exchange comes first and says which option fixes it.
    untrusting = mitmdump(*sets)
    r = chat(untrusting, base, ALICE, stream=True, verify=str(untrusting.confdir / "mitmproxy-ca-cert.pem"))
    assert r.status_code == 502 and "ssl_verify_upstream_trusted_ca" in r.json()["msg"], r.text
    assert wait_for_line(log, lambda l: l == f"CONNECT {STANDIN_ADDR}:{base.rsplit(':', 1)[1]} auth=ok", timeout=5)
    # Given the CA: the exchange (CONNECT through the proxy, then TLS verified against it) and the chat work.
    trusting = mitmdump(*sets, f"ssl_verify_upstream_trusted_ca={ca_file}")
    r = chat(trusting, base, ALICE, stream=True, verify=str(trusting.confdir / "mitmproxy-ca-cert.pem"))
    assert r.status_code == 200, r.text
    assert "event:conversation.chat.completed" in r.text


def test_run_mitm_check_and_proxy_through_the_upstream_proxy(corp, tmp_path, upstream_proxy):
    from tests.harness import Launcher, clean_env, cmdline, run

    proxy_at, log = upstream_proxy
    base, config = standin_in(corp, tmp_path)
    env = clean_env(COZE_UPSTREAM_AUTH=PROXY_LOGIN)
    # the password on a command line (ps shows it to every user) is refused, naming the variable to use
    refused = run("--check", "--config", config, "--set", f"upstream_auth={PROXY_LOGIN}")
    assert refused.returncode != 0 and "COZE_UPSTREAM_AUTH" in refused.stderr
    assert PROXY_LOGIN.split(":")[1] not in refused.stdout + refused.stderr
    # --check mints its token the way the proxy will: through the upstream proxy
    checked = run("--check", "--config", config, "--set", f"mode=upstream:http://{proxy_at}", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "OK: Coze accepted the config" in checked.stdout
    assert lines_of(log, lambda l: l == f"POST {base}/api/permission/oauth2/token auth=ok")
    # and the proxy it starts: the login reaches mitmproxy's upstream_auth, never its command line
    launcher = Launcher(tmp_path / "run", "--config", config, "--origins", "https://chat.example.org",
                        "--set", f"mode=upstream:http://{proxy_at}", env=env)
    (tmp_path / "run").mkdir()
    launcher.start()
    try:
        r = chat(launcher, base, ALICE, stream=True)
        assert r.status_code == 200 and "event:conversation.chat.completed" in r.text, r.text
        assert len(lines_of(log, lambda l: l == f"POST {base}/api/permission/oauth2/token auth=ok")) == 2
        for pid in [launcher.proc.pid, *launcher.children()]:
            assert not any(PROXY_LOGIN.split(":")[1] in arg for arg in cmdline(pid))
    finally:
        launcher.stop()


def test_after_a_reload_unusable_options_refuse_own_requests_never_direct(tmp_path, standin, config_file):
    """A script reload builds the parts anew; if the connection options cannot be used then (here: the CA file named
    in ssl_verify_upstream_trusted_ca went away since the start), there is no good way out to keep. coze-mitm's own
    requests must then be refused, naming the option and the fix, and never go DIRECT, past the upstream proxy the
    user configured. The stand-in is on loopback, reachable directly: a token exchange sent DIRECT would succeed."""
    log = tmp_path / "proxy.log"
    upstream = subprocess.Popen([sys.executable, "-m", "tests.upstream_net", "proxy", "--host", "127.0.0.1",
                                 "--auth", PROXY_LOGIN, "--log", str(log)],
                                cwd=str(REPO), stdout=subprocess.PIPE, text=True)
    proxy = None
    try:
        proxy_at = upstream.stdout.readline().strip()
        assert proxy_at.startswith("127.0.0.1:"), proxy_at
        copy = tmp_path / "repo"  # a copy of the addon, so that touching its coze.py reloads this proxy only
        shutil.copytree(REPO / "addons", copy / "addons", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(REPO / "userscript", copy / "userscript")
        ca_file, _ = private_ca(tmp_path)
        (tmp_path / "mitm").mkdir()
        proxy = Mitmdump(tmp_path / "mitm", [
            f"coze_config={config_file}", f"coze_origins={PAGE}", f"mode=upstream:http://{proxy_at}",
            f"upstream_auth={PROXY_LOGIN}", f"ssl_verify_upstream_trusted_ca={ca_file}",
        ], script=False, extra_args=["-s", str(copy / "addons" / "coze.py")]).start()
        token_line = f"POST {standin.base_url}/api/permission/oauth2/token auth=ok"
        token_lines = lambda: lines_of(log, lambda l: l == token_line)  # noqa: E731

        def chat_as(user: str):
            body = {"bot_id": "7000", "user_id": user, "stream": False,
                    "additional_messages": [{"role": "user", "content": "hello", "content_type": "text"}]}
            return session(proxy).post(f"{standin.base_url}/v3/chat", headers=tagged(user), json=body, timeout=30)

        # the control: the options usable, the exchange goes through the upstream proxy
        assert chat_as(ALICE).status_code == 200
        assert wait_for_line(log, lambda l: l in token_lines(), timeout=5)
        exchanges, through_proxy = len(standin.exchanges), len(token_lines())
        assert exchanges == through_proxy == 1

        ca_file.unlink()
        later = time.time() + 5
        os.utime(copy / "addons" / "coze.py", (later, later))
        assert proxy.wait_for_output(r"Loading script[\s\S]*Loading script[\s\S]*sends none of its own requests", 15), \
            proxy.output

        r = chat_as("bob-corp-0002")  # a new user (and the reloaded parts have no token cached): an exchange is due
        assert r.status_code == 502, r.text
        answer = r.json()
        assert answer["code"] == 5000, answer
        assert "ssl_verify_upstream_trusted_ca=" in answer["msg"] and "no such file" in answer["msg"], answer
        assert "set the option again" in answer["msg"] and "sends none of its own requests" in answer["msg"], answer
        # nothing left for the token endpoint: not DIRECT (the stand-in saw no new exchange), nor through the proxy
        assert len(standin.exchanges) == exchanges and len(token_lines()) == through_proxy
        assert PROXY_LOGIN.split(":")[1] not in proxy.output + r.text
    finally:
        if proxy is not None:
            proxy.stop()
        upstream.terminate()
        upstream.wait(10)
