"""Leaves from the scoped CA that clients accept for hosts shaped like real ones (parts/leaf_names.py).

A real API's certificate names a wildcard, the bare domain and other hosts of the company; mitmproxy copies them
into the leaf it makes (`upstream_cert`). Here an HTTPS stand-in whose certificate names
`api.x.test, *.x.test, x.test, cdn.other.example` (and an IP page origin, https://127.0.0.7, whose certificate
names its address) sits behind a real mitmdump whose confdir holds the scoped CA launcher/ca.py makes, both
through run_mitm.py and plain `mitmdump -s addons/coze.py --set confdir=...`. Clients that trust only the scoped
root connect: Python's ssl (OpenSSL), Chromium with an NSS db, Firefox ESR with a profile's NSS db.

mitmproxy must connect to api.x.test before the client's handshake (the default `connection_strategy=eager`, as
users run it) for the names to be copied at all, so the name must resolve: mitmdump runs in a mount namespace of
its own (`unshare --mount`) where /etc/hosts maps api.x.test to 127.0.0.1. Skipped where that cannot be made.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coze_mitm.core import scoped_ca
from launcher import ca as launcher_ca
from tests.browser import find_chromium, launch_chromium
from tests.harness import Mitmdump, end
from tests.servers import HostPage, Server, https, server_context, write_chain

PAT = "pat_" + "LeafNam3s" * 4
API_HOST, IP_HOST = "api.x.test", "127.0.0.7"
REAL_NAMES = ["api.x.test", "*.x.test", "x.test", "cdn.other.example"]  # as a real API's certificate names them
CHROMIUM = find_chromium()
FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")
CERTUTIL = shutil.which("certutil")


# ------------------------------------------------------------------------------------------ the pure part

def _scope(*hosts):
    return scoped_ca.ChainScope((scoped_ca.scope_for(hosts),))


def test_names_outside_the_constraints_are_left_out():
    sans = [x509.DNSName(n) for n in ["api.x.test", *REAL_NAMES]] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cn, kept = scoped_ca.leaf_names(_scope(API_HOST), "api.x.test", sans)
    assert cn == "api.x.test" and kept == [x509.DNSName("api.x.test"), x509.DNSName("api.x.test")]
    # a CA made for the bare domain covers the wildcard and its subdomains too (RFC 5280)
    cn, kept = scoped_ca.leaf_names(_scope("x.test"), "cdn.other.example", sans)
    assert cn == "api.x.test" and x509.DNSName("*.x.test") in kept and x509.DNSName("cdn.other.example") not in kept


def test_an_ip_origin_keeps_its_address_and_no_common_name():
    sans = [x509.IPAddress(ipaddress.ip_address(IP_HOST)), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cn, kept = scoped_ca.leaf_names(_scope(IP_HOST), IP_HOST, sans)
    assert cn is None and kept == [x509.IPAddress(ipaddress.ip_address(IP_HOST))]


def test_mitmproxys_own_ca_and_hosts_it_was_not_made_for_are_left_alone():
    sans = [x509.DNSName(n) for n in REAL_NAMES]
    assert scoped_ca.leaf_names(scoped_ca.ChainScope(()), "api.x.test", sans) == ("api.x.test", sans)
    assert scoped_ca.leaf_names(_scope("other.test"), "api.x.test", sans) == ("api.x.test", sans)


# ------------------------------------------------------------------------------------------ real processes

def _cert(subject_cn, sans, key, issuer_name, issuer_key, ca=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class RealisticServer:
    """HTTPS on `address` with a certificate from a private "public" CA, named like a real host's."""

    def __init__(self, tmp_path: Path, address: str, cn: str, sans, ca_key, ca_cert):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(cn, sans, key, ca_cert.subject, ca_key)
        chain = write_chain(tmp_path / f"server-{address}.pem", key, cert)
        self.httpd = https(Server(HostPage, address), server_context(chain)).start()
        self.port = self.httpd.port

    def stop(self):
        self.httpd.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The two HTTPS hosts, the CA file that verifies them (for mitmproxy), and an /etc/hosts for mitmdump."""
    if shutil.which("unshare") is None:
        pytest.skip("util-linux's unshare is not installed: cannot give mitmdump its own /etc/hosts")
    tmp = tmp_path_factory.mktemp("realistic")
    hosts = tmp / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {API_HOST}\n")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            'mount --bind "$0" /etc/hosts && exec getent hosts "$1"', str(hosts), API_HOST],
                           capture_output=True, text=True, timeout=20)
    if probe.returncode != 0 or "127.0.0.1" not in probe.stdout:
        pytest.skip(f"cannot give mitmdump its own /etc/hosts (unshare --mount needs root): {probe.stderr.strip()}")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _cert("Realistic Public CA (test)", None, ca_key, None, ca_key, ca=True)
    ca_file = tmp / "public-ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    api = RealisticServer(tmp, "127.0.0.1", API_HOST, [x509.DNSName(n) for n in REAL_NAMES], ca_key, ca_cert)
    page = RealisticServer(tmp, IP_HOST, IP_HOST, [x509.IPAddress(ipaddress.ip_address(IP_HOST))], ca_key, ca_cert)
    yield {"api": api.port, "page": page.port, "ca_file": ca_file, "hosts": hosts}
    api.stop()
    page.stop()


def in_own_hosts(args: list[str], hosts: Path) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
            str(hosts), *args]


def coze_sets(world) -> list[str]:
    return [f"coze_pat={PAT}", f"coze_api_base=https://{API_HOST}:{world['api']}",
            f"coze_origins=https://{IP_HOST}:{world['page']}", f"ssl_verify_upstream_trusted_ca={world['ca_file']}"]


@pytest.fixture(scope="module")
def scoped_confdir(tmp_path_factory):
    confdir = tmp_path_factory.mktemp("scoped-ca")
    launcher_ca.write_ca(confdir, sorted([API_HOST, IP_HOST, "coze.mitm", "mitm.it"]))  # as run_mitm.py would
    return confdir


def start_mitmdump(world, confdir: Path, *extra: str) -> Mitmdump:
    proc = Mitmdump(confdir, [*coze_sets(world), *extra])
    proc.args = in_own_hosts(proc.args, world["hosts"])
    return proc.start()


def python_ssl_fetch(proxy_port: int, host: str, port: int, cafile: Path) -> tuple[str, x509.Certificate]:
    """Through the proxy with CONNECT, verified by OpenSSL against `cafile` only: (body, the leaf)."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=15) as sock:
        sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.split()[1] == b"200", head
        context = ssl.create_default_context(cafile=str(cafile))
        with context.wrap_socket(sock, server_hostname=host) as tls:
            leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            body = b""
            while chunk := tls.recv(65536):
                body += chunk
    return body.decode("utf-8", "replace"), leaf


def leaf_sans(leaf: x509.Certificate) -> list[str]:
    return [str(n.value) for n in leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]


def assert_python_ssl_accepts(proxy_port: int, world, root: Path) -> None:
    body, leaf = python_ssl_fetch(proxy_port, API_HOST, world["api"], root)
    assert "id=ok>served" in body
    assert leaf_sans(leaf) == [API_HOST]  # *.x.test, x.test, cdn.other.example were left out
    body, leaf = python_ssl_fetch(proxy_port, IP_HOST, world["page"], root)
    assert "id=ok>served" in body
    assert leaf_sans(leaf) == [IP_HOST] and not leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)


@pytest.mark.process
def test_plain_mitmdump_with_the_scoped_confdir(world, scoped_confdir):
    proxy = start_mitmdump(world, scoped_confdir)
    try:
        assert_python_ssl_accepts(proxy.port, world, scoped_confdir / "mitmproxy-ca-cert.pem")
        assert proxy.wait_for_output(r"the CA may vouch only for .*api\.x\.test.*127\.0\.0\.7: leaves carry"), proxy.output
    finally:
        proxy.stop()


@pytest.mark.process
def test_mitmproxys_own_ca_keeps_every_name(world, tmp_path):
    """With mitmproxy's own CA nothing changes: the leaf carries the upstream's names, as mitmproxy made it."""
    proxy = start_mitmdump(world, tmp_path)
    try:
        body, leaf = python_ssl_fetch(proxy.port, API_HOST, world["api"], tmp_path / "mitmproxy-ca-cert.pem")
        assert "id=ok>served" in body and set(REAL_NAMES) <= set(leaf_sans(leaf))
    finally:
        proxy.stop()


@pytest.mark.process
def test_run_mitm_with_its_scoped_ca(world, tmp_path):
    from tests.harness import Launcher, clean_env

    home = tmp_path / "home"
    home.mkdir()
    launcher = Launcher(tmp_path, "--origins", f"https://{IP_HOST}:{world['page']}",
                        "--set", f"coze_api_base=https://{API_HOST}:{world['api']}",
                        "--set", f"ssl_verify_upstream_trusted_ca={world['ca_file']}",
                        env=clean_env(HOME=str(home), COZE_PAT=PAT))
    # no confdir of ours: run_mitm.py makes its scoped CA in ~/.mitmproxy-coze-mitm, as for a user
    launcher.args = in_own_hosts(_without_confdir(launcher.args), world["hosts"])
    launcher.start()
    try:
        confdir = home / ".mitmproxy-coze-mitm"  # run_mitm.py's own scoped CA, made on this first start
        ca = scoped_ca.describe(confdir, [])
        assert ca["made_by_coze_mitm"] and not ca["every_site"] and {API_HOST, IP_HOST} <= set(ca["names"]), ca
        assert_python_ssl_accepts(launcher.port, world, confdir / "mitmproxy-ca-cert.pem")
    finally:
        launcher.stop()


def _without_confdir(args: list[str]) -> list[str]:
    out = []
    for a in args:
        if a.startswith("confdir="):
            out.pop()  # its --set
            continue
        out.append(a)
    return out


# ------------------------------------------------------------------------------------------ browsers

def nss_db(directory: Path, root: Path) -> None:
    """An NSS database in `directory` that trusts `root` (and nothing else) for websites."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([CERTUTIL, "-N", "--empty-password", "-d", f"sql:{directory}"], check=True, capture_output=True)
    subprocess.run([CERTUTIL, "-A", "-n", "coze-mitm scoped", "-t", "C,,", "-i", str(root), "-d", f"sql:{directory}"],
                   check=True, capture_output=True)


@pytest.fixture
def proxy(world, scoped_confdir):
    p = start_mitmdump(world, scoped_confdir)
    yield p
    p.stop()


@pytest.mark.process
def test_chromium_trusting_only_the_scoped_ca(world, scoped_confdir, proxy, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (/usr/bin/chromium): the browser test is skipped")
    if CERTUTIL is None:
        pytest.skip("certutil is not installed (Debian: apt-get install libnss3-tools): the browser test is skipped")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    home = tmp_path / "home"
    nss_db(home / ".pki" / "nssdb", scoped_confdir / "mitmproxy-ca-cert.pem")
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p, proxy.port, env={**os.environ, "HOME": str(home)})
        try:
            page = browser.new_context(ignore_https_errors=False).new_page()
            for url in (f"https://{API_HOST}:{world['api']}/", f"https://{IP_HOST}:{world['page']}/"):
                page.goto(url)
                assert page.inner_text("#ok") == "served", url
        finally:
            browser.close()


def firefox_bidi(profile: Path, urls: list[str], timeout: float = 60) -> list[str]:
    """Firefox ESR driven over WebDriver BiDi (Playwright's BiDi client asks for commands ESR lacks): for each url,
    the page's #ok text, or where the browser ended up (about:certerror?...) when it refused."""
    from websockets.sync.client import connect

    proc = subprocess.Popen([FIREFOX, "--headless", "--no-remote", "--profile", str(profile),
                             "--remote-debugging-port=0", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        endpoint = None
        deadline = time.monotonic() + timeout
        while endpoint is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError("firefox exited before WebDriver BiDi listened")
            m = re.search(r"WebDriver BiDi listening on (ws://\S+)", line)
            endpoint = m.group(1) if m else None
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        with connect(endpoint + "/session", open_timeout=timeout) as ws:
            ids = iter(range(1, 1000))

            def call(method, params):
                n = next(ids)
                ws.send(json.dumps({"id": n, "method": method, "params": params}))
                while True:
                    answer = json.loads(ws.recv(timeout=timeout))
                    if answer.get("id") == n:
                        return answer

            call("session.new", {"capabilities": {}})
            context = call("browsingContext.getTree", {})["result"]["contexts"][0]["context"]
            seen = []
            for url in urls:
                call("browsingContext.navigate", {"context": context, "url": url, "wait": "complete"})
                answer = call("script.evaluate", {
                    "expression": "document.getElementById('ok') ? document.getElementById('ok').textContent"
                                  " : document.documentURI",
                    "target": {"context": context}, "awaitPromise": False})
                seen.append(answer.get("result", {}).get("result", {}).get("value", json.dumps(answer)[:300]))
            call("session.end", {})
            return seen
    finally:
        end(proc, 15)


@pytest.mark.process
def test_firefox_trusting_only_the_scoped_ca(world, scoped_confdir, proxy, tmp_path):
    if FIREFOX is None:
        pytest.skip("Firefox is not installed (Debian: apt-get install firefox-esr): the Firefox test is skipped")
    if CERTUTIL is None:
        pytest.skip("certutil is not installed (Debian: apt-get install libnss3-tools): the Firefox test is skipped")
    pytest.importorskip("websockets.sync.client", reason="the websockets package (mitmproxy's) is not importable")
    profile = tmp_path / "profile"
    nss_db(profile, scoped_confdir / "mitmproxy-ca-cert.pem")  # the profile's own cert9.db: Firefox's trust store
    prefs = {
        "network.proxy.type": 1, "network.proxy.ssl": "127.0.0.1", "network.proxy.ssl_port": proxy.port,
        "network.proxy.http": "127.0.0.1", "network.proxy.http_port": proxy.port,
        "network.proxy.allow_hijacking_localhost": True, "network.proxy.no_proxies_on": "",
        "browser.shell.checkDefaultBrowser": False, "app.update.enabled": False, "network.dns.disableIPv6": True,
        "security.enterprise_roots.enabled": False, "network.captive-portal-service.enabled": False,
        "network.connectivity-service.enabled": False, "browser.safebrowsing.update.enabled": False,
        "datareporting.policy.dataSubmissionEnabled": False, "toolkit.telemetry.enabled": False,
        "remote.prefs.recommended": True,
    }
    (profile / "user.js").write_text("".join(f'user_pref("{k}", {json.dumps(v)});\n' for k, v in prefs.items()))
    seen = firefox_bidi(profile, [f"https://{API_HOST}:{world['api']}/", f"https://{IP_HOST}:{world['page']}/"])
    assert seen == ["served", "served"], seen
