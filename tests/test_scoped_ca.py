"""The CA scoped to what coze-mitm intercepts (launcher/ca.py, core/scoped_ca.py).

* The pure part: the names from the settings, the NameConstraints content, "grown past" detection.
* The files: what mitmproxy reads (the signer first in mitmproxy-ca.pem with its key, the root as chain); the
  root's key is nowhere.
* Verifiers: cryptography's and OpenSSL's (Python's ssl: curl and requests alike) refuse a certificate for a name
  outside the scope, signed with the very key mitmproxy signs with.
* The launcher: its own confdir, made once, kept, --new-ca, a warning when the origins grew past it; a foreign CA
  left alone.
* The status page / status.json: the CA file, its names, "every site" for mitmproxy's own CA, what it cannot
  vouch for.
* Chromium (Debian's, through a real mitmdump) with an NSS database that trusts only the scoped CA: an allowed
  https page and https://coze.mitm load; a host the CA was not made for is refused (net::ERR_CERT_...), both a
  certificate mitmproxy makes for it and one signed directly with the CA's key.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from mitmproxy.certs import CertStore
from mitmproxy.test import taddons

from coze_mitm.core import scoped_ca
from coze_mitm.core.hosts import Handled, ca_hosts_for
from coze_mitm.parts.settings import CozeSettings
from coze_mitm.parts.status import StatusPages
from launcher import ca as launcher_ca
from launcher.common import Fail
from launcher.plan import Plan
from tests.browser import find_chromium, launch_chromium
from tests.harness import Mitmdump
from tests.servers import HostPage, Server, https, server_context, write_chain

PAT = "pat_" + "S3cr3tPat" * 4
HOSTS = Handled.from_settings("https://api.coze.cn", page_origins=["https://allowed.test"]).ca_hosts()


@pytest.fixture(scope="module")
def made_ca(tmp_path_factory):
    """A scoped CA as launcher/ca.py writes it: (confdir, signer key, signer cert, root cert)."""
    confdir = tmp_path_factory.mktemp("scoped-ca")
    launcher_ca.write_ca(confdir, HOSTS)
    raw = (confdir / scoped_ca.SIGNING_FILE).read_bytes()
    key = serialization.load_pem_private_key(raw, None)
    signer, root = x509.load_pem_x509_certificates(raw)
    return confdir, key, signer, root


def leaf(key, issuer: x509.Certificate, *names: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A server certificate for `names`, signed with `key` (the CA's signing key)."""
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    sans = [x509.IPAddress(ipaddress.ip_address(n)) if n[0].isdigit() else x509.DNSName(n) for n in names]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(issuer.subject).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, leaf_key


# ------------------------------------------------------------------------------------------ the pure part

class TestNames:
    def test_hosts_of_tls_origins_and_the_proxys_own(self):
        hosts = ca_hosts_for(
            ["https://api.coze.cn", "wss://ws.coze.cn", "https://Chat.Example.org:8443", "http://plain.example",
             "ws://plain-ws.example", "https://10.0.0.5", "https://[::1]:9443", "https://api.coze.cn:443"],
            ["coze.mitm", "mitm.it", "sandbox.coze.mitm"])
        assert hosts == sorted(["api.coze.cn", "ws.coze.cn", "chat.example.org", "10.0.0.5", "::1", "coze.mitm",
                                "mitm.it", "sandbox.coze.mitm"])

    def test_idn_as_a_labels(self):
        assert "xn--bcher-kva.example" in ca_hosts_for(["https://bücher.example"])

    def test_constraints_permit_exactly_the_hosts_and_exclude_unlisted_ip_versions(self):
        nc = scoped_ca.constraints_for(["allowed.test", "coze.mitm", "10.0.0.5"])
        assert nc.permitted_subtrees == [x509.DNSName("allowed.test"), x509.DNSName("coze.mitm"),
                                         x509.IPAddress(ipaddress.ip_network("10.0.0.5/32"))]
        # an IP version with no permitted subtree would be unconstrained (RFC 5280): every IPv6 address is excluded
        assert nc.excluded_subtrees == [x509.IPAddress(ipaddress.ip_network("::/0"))]
        nc = scoped_ca.constraints_for(["allowed.test"])
        assert nc.excluded_subtrees == [x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
                                        x509.IPAddress(ipaddress.ip_network("::/0"))]
        with pytest.raises(ValueError):
            scoped_ca.constraints_for([])

    def test_a_dns_subtree_covers_its_subdomains_and_nothing_beside_it(self):
        scope = scoped_ca.scope_for(["allowed.test", "10.0.0.5"])
        for ok in ("allowed.test", "www.allowed.test", "a.b.allowed.test", "ALLOWED.test.", "10.0.0.5"):
            assert scope.covers(ok), ok
        for refused in ("other.test", "xallowed.test", "allowed.test.evil", "test", "10.0.0.6", "::1"):
            assert not scope.covers(refused), refused

    def test_grown_past(self, made_ca):
        confdir = made_ca[0]
        grown = Handled.from_settings("https://api.coze.cn", page_origins=["https://allowed.test", "https://new.example"]).ca_hosts()
        info = scoped_ca.describe(confdir, grown)
        assert info["exists"] and info["made_by_coze_mitm"] and not info["every_site"]
        assert info["names"] == HOSTS and info["missing"] == ["new.example"]
        assert scoped_ca.describe(confdir, ["www.allowed.test", "coze.mitm"])["missing"] == []

    def test_mitmproxys_own_ca_vouches_for_every_site(self, tmp_path):
        CertStore.create_store(tmp_path, "mitmproxy", 2048)
        info = scoped_ca.describe(tmp_path, HOSTS)
        assert info["exists"] and info["every_site"] and info["missing"] == [] and not info["made_by_coze_mitm"]

    def test_no_ca_yet(self, tmp_path):
        info = scoped_ca.describe(tmp_path, HOSTS)
        assert not info["exists"] and "no CA yet" in info["error"]


# ------------------------------------------------------------------------------------------ the files

class TestFiles:
    def test_what_mitmproxy_reads(self, made_ca):
        confdir, key, signer, root = made_ca
        names = sorted(os.listdir(confdir))
        assert names == ["coze-mitm-ca.json", "mitmproxy-ca-cert.cer", "mitmproxy-ca-cert.p12", "mitmproxy-ca-cert.pem",
                         "mitmproxy-ca.p12", "mitmproxy-ca.pem", "mitmproxy-dhparam.pem"]
        assert (confdir / "mitmproxy-ca.pem").stat().st_mode & 0o077 == 0
        assert (confdir / "mitmproxy-ca.p12").stat().st_mode & 0o077 == 0
        raw = (confdir / "mitmproxy-ca.pem").read_bytes()
        assert raw.count(b"PRIVATE KEY-----") == 2  # BEGIN and END of one key: the signer's; the root's is nowhere
        assert key.public_key().public_numbers() == signer.public_key().public_numbers()
        assert x509.load_pem_x509_certificate((confdir / "mitmproxy-ca-cert.pem").read_bytes()) == root
        store = CertStore.from_store(confdir, "mitmproxy", 2048)  # as mitmproxy loads it: signs with the first
        assert store.default_ca._cert == signer and [c._cert for c in store.default_chain_certs] == [signer, root]
        meta = json.loads((confdir / scoped_ca.META_FILE).read_text())
        assert meta["names"] == HOSTS and meta["fingerprint_sha256"] == scoped_ca.fingerprint(root)

    @pytest.mark.parametrize("which", ["root", "signer"])
    def test_certificate_content(self, made_ca, which):
        _, _, signer, root = made_ca
        cert = root if which == "root" else signer
        assert cert.signature_hash_algorithm.name == "sha256"
        assert isinstance(cert.public_key(), rsa.RSAPublicKey) and cert.public_key().key_size == 2048
        bc = cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS)
        assert bc.critical and bc.value.ca and bc.value.path_length == (1 if which == "root" else 0)
        ku = cert.extensions.get_extension_for_oid(ExtensionOID.KEY_USAGE)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
        nc = cert.extensions.get_extension_for_oid(ExtensionOID.NAME_CONSTRAINTS)
        assert nc.critical and nc.value == scoped_ca.constraints_for(HOSTS)
        assert cert.issuer == root.subject


# ------------------------------------------------------------------------------------------ verifiers

class TestVerifiers:
    def _verify(self, made_ca, name):
        _, key, signer, root = made_ca
        cert, _ = leaf(key, signer, name)
        verifier = (verification.PolicyBuilder().store(verification.Store([root]))
                    .build_server_verifier(x509.DNSName(name)))
        return verifier.verify(cert, [signer])

    def test_cryptography_accepts_in_scope(self, made_ca):
        for name in ("allowed.test", "www.allowed.test", "api.coze.cn", "coze.mitm"):
            self._verify(made_ca, name)

    def test_cryptography_refuses_out_of_scope(self, made_ca):
        with pytest.raises(verification.VerificationError):
            self._verify(made_ca, "other.test")

    def test_openssl_refuses_out_of_scope(self, made_ca, tmp_path):
        """Python's ssl (OpenSSL: also curl, requests): the root as the only trust anchor."""
        confdir, key, signer, root = made_ca
        with TLSServer(tmp_path, key, signer, root, ["www.allowed.test", "other.test"]) as server:
            client = ssl.create_default_context(cafile=str(confdir / "mitmproxy-ca-cert.pem"))
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                with client.wrap_socket(sock, server_hostname="www.allowed.test"):
                    pass
            with pytest.raises(ssl.SSLCertVerificationError, match="permitted subtree violation"):
                with socket.create_connection(("127.0.0.1", server.port)) as sock:
                    client.wrap_socket(sock, server_hostname="other.test")


class TLSServer:
    """HTTPS on 127.0.0.1: for each name, a certificate signed with the CA's key (chosen by SNI)."""

    def __init__(self, tmp_path: Path, key, signer, root, names):
        self.contexts = {}
        for name in names:
            cert, leaf_key = leaf(key, signer, name)
            self.contexts[name] = server_context(write_chain(tmp_path / f"{name}.pem", leaf_key, cert, signer))
        first = self.contexts[names[0]]
        first.sni_callback = self._sni
        self.httpd = https(Server(HostPage), first)  # refused handshakes are the point
        self.port = self.httpd.port

    def _sni(self, sock, name, context):
        if name in self.contexts:
            sock.context = self.contexts[name]

    def __enter__(self):
        self.httpd.start()
        return self

    def __exit__(self, *exc):
        self.httpd.stop()


# ------------------------------------------------------------------------------------------ the launcher

def launcher_plan(*argv, origins=("https://allowed.test",)):
    from launcher.args import check_args, make_parser

    args = make_parser().parse_args([*argv])
    check_args(args)
    return Plan(args, api_bases=["https://api.coze.cn"], page_origins=frozenset(origins))


class TestLauncher:
    @pytest.fixture(autouse=True)
    def own_dir(self, tmp_path, monkeypatch):
        monkeypatch.setattr(launcher_ca, "DEFAULT_CA_DIR", str(tmp_path / "coze-ca"))
        self.dir = tmp_path / "coze-ca"

    def test_needed_hosts(self):
        assert launcher_ca.needed_hosts(launcher_plan()) == HOSTS
        assert "sandbox.coze.mitm" in launcher_ca.needed_hosts(launcher_plan("--demo"))

    def test_made_once_then_kept(self, capsys):
        pl = launcher_plan()
        launcher_ca.prepare(pl)
        assert ("confdir", str(self.dir)) in pl.sets
        assert "made a CA that can vouch only for" in capsys.readouterr().err
        first = (self.dir / "mitmproxy-ca-cert.pem").read_bytes()
        launcher_ca.prepare(launcher_plan())
        assert (self.dir / "mitmproxy-ca-cert.pem").read_bytes() == first
        assert capsys.readouterr().err == ""

    def test_grown_past_warns_then_new_ca(self, capsys):
        launcher_ca.prepare(launcher_plan())
        old = scoped_ca.describe(self.dir, [])
        capsys.readouterr()
        launcher_ca.prepare(launcher_plan(origins=("https://allowed.test", "https://new.example")))
        err = " ".join(capsys.readouterr().err.split())
        assert "cannot vouch for new.example" in err and "--new-ca" in err and old["subject"] in err
        launcher_ca.prepare(launcher_plan("--new-ca", origins=("https://allowed.test", "https://new.example")))
        err = " ".join(capsys.readouterr().err.split())
        assert "new.example" in err and "remove it from those trust stores" in err
        new = scoped_ca.describe(self.dir, ["new.example"])
        assert new["missing"] == [] and new["subject"] != old["subject"]

    def test_a_foreign_ca_is_left_alone(self, tmp_path):
        theirs = tmp_path / "theirs"
        CertStore.create_store(theirs, "mitmproxy", 2048)
        before = (theirs / "mitmproxy-ca.pem").read_bytes()
        with pytest.raises(Fail, match="did not make"):
            launcher_ca.prepare(launcher_plan("--new-ca", "--set", f"confdir={theirs}"))
        pl = launcher_plan("--set", f"confdir={theirs}")
        launcher_ca.prepare(pl)
        assert (theirs / "mitmproxy-ca.pem").read_bytes() == before
        assert not any(n == "confdir" for n, _ in pl.sets)  # the user's own --set stays the one in force
        assert not self.dir.exists()

    def test_intercept_all_keeps_mitmproxys_ca(self):
        pl = launcher_plan("--intercept-all")
        launcher_ca.prepare(pl)
        assert not any(n == "confdir" for n, _ in pl.sets) and not self.dir.exists()
        with pytest.raises(Fail, match="choose one"):
            launcher_ca.prepare(launcher_plan("--intercept-all", "--new-ca"))


# ------------------------------------------------------------------------------------------ the status page

class TestStatus:
    def _status(self, confdir, origins):
        settings = CozeSettings()
        pages = StatusPages(settings)
        with taddons.context(settings, pages) as tctx:
            tctx.configure(settings, confdir=str(confdir), coze_pat=PAT, coze_api_base="https://api.coze.cn",
                           coze_origins=origins)
            return pages.status(), pages.render_html()

    def test_scoped(self, made_ca):
        data, html = self._status(made_ca[0], "https://allowed.test")
        cf = data["ca_file"]
        assert cf["file"] == str(made_ca[0] / "mitmproxy-ca-cert.pem") and not cf["every_site"]
        assert cf["names"] == HOSTS and cf["missing"] == [] and cf["new_ca"] == ""
        assert "It can vouch only for" in html and "<code>allowed.test</code>" in html

    def test_grown_past(self, made_ca):
        data, html = self._status(made_ca[0], "https://allowed.test,https://grown.example")
        assert data["ca_file"]["missing"] == ["grown.example"]
        assert "--new-ca" in data["ca_file"]["new_ca"]
        assert "It cannot vouch for <code>grown.example</code>" in html and "remove the old one" in html

    def test_mitmproxys_own(self, tmp_path):
        CertStore.create_store(tmp_path, "mitmproxy", 2048)
        data, html = self._status(tmp_path, "https://allowed.test")
        assert data["ca_file"]["every_site"] and "--set confdir=~/.mitmproxy-coze-mitm" in data["ca_file"]["new_ca"]
        assert "can vouch for <b>every site</b>" in html


# ------------------------------------------------------------------------------------------ Chromium

CHROMIUM = find_chromium()
CERTUTIL = shutil.which("certutil")


@pytest.fixture(scope="module")
def chromium_trusting_only_the_scoped_ca(made_ca, tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (/usr/bin/chromium): the browser test is skipped")
    if CERTUTIL is None:
        pytest.skip("certutil is not installed (Debian: apt-get install libnss3-tools): the browser test is skipped")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    confdir = made_ca[0]
    home = tmp_path_factory.mktemp("home")
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run([CERTUTIL, "-N", "--empty-password", "-d", f"sql:{nssdb}"], check=True)
    subprocess.run([CERTUTIL, "-A", "-n", "coze-mitm", "-t", "C,,", "-i", str(confdir / "mitmproxy-ca-cert.pem"),
                    "-d", f"sql:{nssdb}"], check=True)
    yield home, sync_api


@pytest.mark.process
def test_chromium_through_mitmdump(made_ca, chromium_trusting_only_the_scoped_ca, tmp_path):
    confdir, key, signer, root = made_ca
    home, sync_api = chromium_trusting_only_the_scoped_ca
    with TLSServer(tmp_path, key, signer, root, ["direct.allowed.test", "other.test"]) as direct, \
            TLSServer(tmp_path, key, signer, root, ["upstream.test"]) as upstream:
        proxy = Mitmdump(confdir, [
            f"coze_pat={PAT}", "coze_api_base=https://api.coze.cn",
            "coze_origins=https://allowed.test,https://grown.test",  # grown.test: not in the CA (made for HOSTS)
            "connection_strategy=lazy", "ssl_insecure=true",
            f"map_remote=~//(allowed|grown)\\.test/~//127.0.0.1:{upstream.port}/",
        ]).start()
        try:
            with sync_api.sync_playwright() as p:
                browser = launch_chromium(
                    p, proxy.port, f"--host-resolver-rules=MAP direct.allowed.test 127.0.0.1:{direct.port}, "
                    f"MAP other.test 127.0.0.1:{direct.port}", bypass="direct.allowed.test;other.test",
                    env={**os.environ, "HOME": str(home)})
                try:
                    page = browser.new_context(ignore_https_errors=False).new_page()
                    # 1. an allowed page, through the proxy: its certificate made by mitmproxy from the scoped CA
                    page.goto("https://allowed.test/")
                    assert page.inner_text("#ok") == "served"
                    # 2. the proxy's own https page, and what it says about its CA
                    page.goto("https://coze.mitm/status.json")
                    cf = json.loads(page.inner_text("body"))["ca_file"]
                    assert cf["names"] == HOSTS and cf["missing"] == ["grown.test"]
                    assert page.goto("https://coze.mitm/ca-probe.png").status == 200
                    # 3. a subdomain of an allowed name, signed directly with the CA's key, no proxy
                    page.goto("https://direct.allowed.test/")
                    assert page.inner_text("#ok") == "served"
                    # 4. a name outside the scope, signed with the same key, served the same way as 3: refused
                    #    (Chromium 1xx on Debian says net::ERR_CERT_INVALID for a name constraint violation)
                    with pytest.raises(sync_api.Error, match=r"net::ERR_CERT_"):
                        page.goto("https://other.test/")
                    # 5. an origin added after the CA was made: mitmproxy's certificate for it is refused too
                    with pytest.raises(sync_api.Error, match=r"net::ERR_CERT_"):
                        page.goto("https://grown.test/")
                finally:
                    browser.close()
        finally:
            proxy.stop()
