"""coze-mitm's own CA: scoped to the hosts it intercepts, in a confdir of its own (~/.mitmproxy-coze-mitm).

mitmproxy's CA (~/.mitmproxy) can vouch for every site; the one made here carries a critical X.509 NameConstraints
extension that permits only the names coze-mitm intercepts (the Coze API and WebSocket hosts, the hosts of the
https page origins, coze.mitm, mitm.it; each with its subdomains, RFC 5280), so a browser that trusts it still
refuses its certificates for any other site (Chromium and Firefox enforce constraints in a trusted root).

Two certificates, both constrained alike (docs/ca.md says why):
  root          what users trust (mitmproxy-ca-cert.pem/.cer/.p12); its key is never written anywhere: no one can
                make another intermediate under it, so the root cannot be "widened" later
  intermediate  what mitmproxy signs with (first in mitmproxy-ca.pem, with its key; the root follows as chain);
                clients that ignore constraints in a trust anchor (RFC 5280 allows that) still apply them to it
A confdir the user names (--set confdir=DIR) is used as it is; --new-ca makes a scoped CA there only if it holds
none, or one made here. ~/.mitmproxy is never written to.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from launcher.common import EXIT_USAGE, PROG, Fail, tell

DEFAULT_CA_DIR = "~/.mitmproxy-coze-mitm"
BASENAME = "mitmproxy"  # mitmproxy's file names: mitmproxy-ca.pem, mitmproxy-ca-cert.pem, ...
VALIDITY = datetime.timedelta(days=3650)  # as mitmproxy's own CA (certs.CA_EXPIRY)
KEY_SIZE = 2048


def default_dir() -> Path:
    return Path(DEFAULT_CA_DIR).expanduser()


def needed_hosts(pl) -> list[str]:
    """The hosts the launcher intercepts TLS for (plan.allow_hosts) that a certificate is ever made for."""
    from launcher.plan import handled

    return handled(pl).ca_hosts()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "coze-mitm")])


def _ca_cert(subject, issuer, public_key, signing_key, issuer_key, constraints, path_length, now):
    key_usage = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                              encipher_only=False, decipher_only=False)
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=2)).not_valid_after(now + VALIDITY)
               .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
               .add_extension(key_usage, critical=True)
               .add_extension(constraints, critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), critical=False))
    return builder.sign(private_key=signing_key, algorithm=hashes.SHA256())


def make_ca(hosts: list[str], now: datetime.datetime | None = None):
    """(intermediate key, intermediate cert, root cert), both certificates constrained to `hosts`.
    The root's key exists only inside this function."""
    from coze_mitm.core import scoped_ca

    now = now or datetime.datetime.now(datetime.timezone.utc)
    constraints = scoped_ca.constraints_for(hosts)
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_SIZE)
    tag = f"{now:%Y-%m-%d} {os.urandom(3).hex()}"  # tells this CA from an older one in a trust store
    root_name = _name(f"coze-mitm scoped CA {tag}")
    root = _ca_cert(root_name, root_name, root_key.public_key(), root_key, root_key.public_key(), constraints, 1, now)
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_SIZE)
    inter = _ca_cert(_name(f"coze-mitm scoped signer {tag}"), root_name, key.public_key(), root_key,
                     root_key.public_key(), constraints, 0, now)
    del root_key
    return key, inter, root


def write_ca(confdir: Path, hosts: list[str]) -> x509.Certificate:
    """A new scoped CA in `confdir`, in the files mitmproxy reads and writes (certs.CertStore.create_store),
    plus coze-mitm-ca.json. Written to a new folder first, then moved in file by file. Returns the root."""
    from coze_mitm.core import scoped_ca

    key, inter, root = make_ca(hosts)
    confdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = confdir / f".new-ca-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    pem = serialization.Encoding.PEM
    root_pem = root.public_bytes(pem)
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    files = {
        # mitmproxy signs with the first certificate (its key in the same file) and sends the rest as the chain
        f"{BASENAME}-ca.pem": (key_pem + inter.public_bytes(pem) + root_pem, 0o600),
        f"{BASENAME}-ca.p12": (pkcs12.serialize_key_and_certificates(
            BASENAME.encode(), key, inter, [root], serialization.NoEncryption()), 0o600),
        # the certificates are public, yet owner-only like every file coze-mitm writes (private_files.py)
        f"{BASENAME}-ca-cert.pem": (root_pem, 0o600),
        f"{BASENAME}-ca-cert.cer": (root_pem, 0o600),
        f"{BASENAME}-ca-cert.p12": (pkcs12.serialize_key_and_certificates(
            BASENAME.encode(), None, root, None, serialization.NoEncryption()), 0o600),
        scoped_ca.META_FILE: (json.dumps({
            "made_by": PROG, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "subject": root.subject.rfc4514_string(), "fingerprint_sha256": scoped_ca.fingerprint(root),
            "names": hosts, "note": "name constraints: each DNS name covers its subdomains too (RFC 5280)",
        }, indent=2).encode() + b"\n", 0o600),
    }
    try:
        from mitmproxy.certs import DEFAULT_DHPARAM  # what create_store writes beside the CA

        files[f"{BASENAME}-dhparam.pem"] = (DEFAULT_DHPARAM, 0o600)
    except ImportError:
        pass
    try:
        for name, (data, mode) in files.items():
            path = staging / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        for name in files:
            os.replace(staging / name, confdir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def prepare(pl) -> None:
    """Choose the confdir mitmproxy runs with, and make or check the scoped CA in it (adds --set confdir)."""
    from coze_mitm.core import scoped_ca

    args = pl.args
    new = getattr(args, "new_ca", False)
    hosts = needed_hosts(pl)
    given = pl.option("confdir")
    if args.demo:
        if new:
            raise Fail("--new-ca and --demo: the demo makes a throwaway CA of its own, nothing to trust; drop --new-ca",
                       EXIT_USAGE)
        # The demo is plain HTTP: no CA to trust, so none to talk about. run_demo makes a throwaway one in its
        # temporary folder (demo_confdir) unless a confdir is named, which is then used as it is.
        return
    if given is None and args.intercept_all:
        if new:
            raise Fail("--new-ca makes a CA that vouches only for the hosts coze-mitm intercepts, and --intercept-all "
                       "intercepts every site: choose one", EXIT_USAGE)
        tell("note", "--intercept-all: mitmproxy's own CA (~/.mitmproxy) is used; it can vouch for every site")
        return
    confdir = Path(given).expanduser() if given is not None else default_dir()
    before = scoped_ca.describe(confdir, hosts)
    if given is None or before["made_by_coze_mitm"]:
        tighten_confdir(confdir)
    if new and before["exists"] and not before["made_by_coze_mitm"]:
        raise Fail(f"--new-ca: {confdir} holds a CA that {PROG} did not make; it is left alone. Drop --set confdir "
                   f"(the scoped CA then lives in {DEFAULT_CA_DIR}) or name an empty folder", EXIT_USAGE)
    if new or (given is None and not before["exists"]):
        root = write_ca(confdir, hosts)
        tell("note", f"made a CA that can vouch only for {', '.join(hosts)} (and their subdomains): trust "
                     f"{confdir / scoped_ca.CERT_FILE} ({root.subject.rfc4514_string()}); README step 5 shows how")
        if before["exists"]:
            tell("WARNING", f"the CA it replaces ({before['subject']}, SHA-256 {before['fingerprint_sha256'][:16]}...) "
                            "is still trusted wherever you installed it: remove it from those trust stores")
    else:
        _check(confdir, before, hosts)
    if given is None:
        pl.sets.append(("confdir", str(confdir)))


def demo_confdir(pl, workdir: str) -> str:
    """The demo's confdir: inside its temporary folder, with a scoped CA nobody is asked to trust (the demo is
    plain HTTP), gone when the demo stops. The user's own confdir gets no CA made for the demo's names, which a
    later real start would then ask to replace (and remove from trust stores)."""
    confdir = Path(workdir) / "confdir"
    write_ca(confdir, needed_hosts(pl))
    return str(confdir)


def tighten_confdir(confdir: Path) -> None:
    """A confdir coze-mitm made (it holds the CA's signing key and the usage file) that others can read, e.g. made
    0755 by an older version or by hand: owner-only, said in one line. POSIX only (private_files.py)."""
    from coze_mitm.core.private_files import DIR_MODE, tighten

    if not confdir.is_dir():
        return
    old = tighten(confdir, DIR_MODE)
    if old is not None:
        tell("note", f"{confdir} could be read by other users of this machine (mode {old:o}); it holds the CA's "
                     "signing key and the usage per user: made it 0700 (owner only)")


def _check(confdir: Path, info: dict, hosts: list[str]) -> None:
    if not info["exists"]:
        return  # a confdir the user named, without a CA yet: mitmproxy makes its own there
    if info["every_site"]:
        tell("note", f"the CA in {confdir} can vouch for every site (it has no name constraints); {PROG} --new-ca "
                     f"makes one that vouches only for what coze-mitm intercepts")
    elif info["missing"]:
        tell("WARNING", f"the CA in {confdir} was made for {', '.join(info['names'])}; it cannot vouch for "
                        f"{', '.join(info['missing'])}, intercepted now, so browsers will refuse those certificates. "
                        f"Start once with --new-ca (the same other flags) to make a new CA, trust it, and remove the "
                        f"old one ({info['subject']}) from every trust store it is in (README step 5)")
