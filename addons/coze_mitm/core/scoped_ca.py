"""What a CA can vouch for: the names coze-mitm intercepts, and the X.509 name constraints that hold a CA to them.

Pure (cryptography only, no mitmproxy): the launcher (launcher/ca.py) makes its CA from `constraints_for`; the
status page reads the CA in mitmproxy's confdir with `describe` and says which names it can vouch for, and which
intercepted hosts it cannot (the CA was made before coze_origins or the API hosts grew).

Name constraints (RFC 5280 4.2.1.10): a permitted dNSName subtree `example.org` covers example.org *and every name
under it* (www.example.org, a.b.example.org); a name type with no permitted subtree is not constrained at all, so
a CA whose origins hold no IP address excludes every IPv4 and IPv6 address explicitly. A CA without the extension
(mitmproxy's own) can vouch for every site.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import re
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

SIGNING_FILE = "mitmproxy-ca.pem"  # key + the certificate mitmproxy signs with (+ the chain it sends)
CERT_FILE = "mitmproxy-ca-cert.pem"  # the certificate users trust
META_FILE = "coze-mitm-ca.json"  # written by launcher/ca.py beside a CA it made: the names it was made for
EVERY_IPV4 = ipaddress.ip_network("0.0.0.0/0")
EVERY_IPV6 = ipaddress.ip_network("::/0")
_CERT_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def dns_name(host: str) -> str:
    """A host as a dNSName holds it: lower case, IDNA (A-labels), no trailing dot."""
    host = host.strip().rstrip(".").lower()
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def _dns_covers(constraint: str, name: str) -> bool:
    """RFC 5280: `example.org` covers example.org and its subdomains; `.example.org` only its subdomains;
    the empty constraint covers every name."""
    constraint = constraint.lower().rstrip(".")
    if not constraint:
        return True
    if constraint.startswith("."):
        return name.endswith(constraint)
    return name == constraint or name.endswith("." + constraint)


@dataclasses.dataclass(frozen=True)
class Scope:
    """The name constraints of one CA certificate (only the DNS and IP forms a TLS server name can take)."""

    dns: tuple[str, ...] = ()
    ips: tuple[Network, ...] = ()
    excluded_dns: tuple[str, ...] = ()
    excluded_ips: tuple[Network, ...] = ()

    def covers(self, host: str) -> bool:
        ip = _ip(host)
        if ip is not None:
            if any(ip in net for net in self.excluded_ips):
                return False
            return not self.ips or any(ip in net for net in self.ips)
        name = dns_name(host)
        if any(_dns_covers(c, name) for c in self.excluded_dns):
            return False
        return not self.dns or any(_dns_covers(c, name) for c in self.dns)

    def names(self) -> list[str]:
        """What it permits, for people: DNS names (each with its subdomains) and IP addresses or networks."""
        return [*self.dns, *(str(n.network_address) if n.num_addresses == 1 else str(n) for n in self.ips)]


def scope_for(hosts: Iterable[str]) -> Scope:
    dns, ips = [], []
    for host in hosts:
        ip = _ip(host)
        if ip is None:
            dns.append(dns_name(host))
        else:
            ips.append(ipaddress.ip_network(ip))  # /32 or /128
    dns_tuple = tuple(dict.fromkeys(dns))
    ip_tuple = tuple(dict.fromkeys(ips))
    # No permitted subtree of a type = that type unconstrained: exclude every address of a version none is given of.
    excluded = tuple(every for every in (EVERY_IPV4, EVERY_IPV6)
                     if not any(n.version == every.version for n in ip_tuple))
    return Scope(dns=dns_tuple, ips=ip_tuple, excluded_ips=excluded)


def constraints_for(hosts: Iterable[str]) -> x509.NameConstraints:
    """The NameConstraints extension (to be marked critical) that permits exactly `hosts` (and subdomains)."""
    scope = scope_for(hosts)
    if not scope.dns and not scope.ips:
        raise ValueError("a scoped CA needs at least one name")
    permitted = [x509.DNSName(n) for n in scope.dns] + [x509.IPAddress(n) for n in scope.ips]
    excluded = [x509.IPAddress(n) for n in scope.excluded_ips] or None
    return x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=excluded)


def scope_of(cert: x509.Certificate) -> Scope | None:
    """The certificate's name constraints; None when it has none (it can vouch for every name)."""
    try:
        nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None

    def split(subtrees):
        dns = tuple(t.value for t in subtrees or () if isinstance(t, x509.DNSName))
        ips = tuple(t.value for t in subtrees or () if isinstance(t, x509.IPAddress)
                    and isinstance(t.value, (ipaddress.IPv4Network, ipaddress.IPv6Network)))
        return dns, ips

    dns, ips = split(nc.permitted_subtrees)
    excluded_dns, excluded_ips = split(nc.excluded_subtrees)
    return Scope(dns=dns, ips=ips, excluded_dns=excluded_dns, excluded_ips=excluded_ips)


@dataclasses.dataclass(frozen=True)
class ChainScope:
    """What a chain of CA certificates can vouch for together: a name must pass every constrained one."""

    scopes: tuple[Scope, ...]

    @property
    def every_site(self) -> bool:
        return not self.scopes

    def covers(self, host: str) -> bool:
        return all(s.covers(host) for s in self.scopes)

    def names(self) -> list[str]:
        return self.scopes[0].names() if self.scopes else []

    def missing(self, hosts: Iterable[str]) -> list[str]:
        """The hosts it cannot vouch for (the CA was made for fewer names than are intercepted now)."""
        return [h for h in hosts if not self.covers(h)]


def chain_scope(certs: Iterable[x509.Certificate]) -> ChainScope:
    return ChainScope(tuple(s for s in (scope_of(c) for c in certs) if s is not None))


def leaf_names(scope: ChainScope, commonname: str | None,
               sans: Iterable[x509.GeneralName]) -> tuple[str | None, list[x509.GeneralName]]:
    """The common name and SANs of a leaf a CA with `scope` can sign so that clients accept it.

    mitmproxy puts into a leaf every name of the upstream's certificate (`upstream_cert`: a real API's names a
    wildcard, the bare domain, other hosts), the name the client asked for (SNI) or, without SNI, the proxy's own
    address, and the server's address. Any of them outside the constraints makes OpenSSL, Chromium and NSS refuse
    the whole leaf. Kept: the DNS and IP names the chain permits. The common name is a kept DNS name or none at
    all: OpenSSL checks a DNS-like common name (an IP address in it too) against the dNSName constraints when the
    leaf has no DNS SAN, and clients that matter read only the SANs. When nothing is left (a host the CA was not
    made for) the names are left as they were: clients refuse that leaf either way, naming the constraint."""
    sans = list(sans)
    if scope.every_site:
        return commonname, sans
    kept = [n for n in sans if isinstance(n, (x509.DNSName, x509.IPAddress)) and (host := _san_host(n))
            and scope.covers(host)]
    if not kept:
        return commonname, sans
    dns = [n.value for n in kept if isinstance(n, x509.DNSName)]
    if commonname and _ip(commonname) is None and dns_name(commonname) in dns:
        return commonname, kept
    return (dns[0] if dns else None), kept


def _san_host(name: x509.GeneralName) -> str:
    value = name.value
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return ""  # a network is no server name: never kept
    return str(value)


def read_certs(path: Path) -> list[x509.Certificate]:
    """The certificates of a PEM file (a key in it is skipped, never parsed)."""
    blocks = _CERT_PEM.findall(path.read_bytes())
    return [x509.load_pem_x509_certificate(b) for b in blocks]


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def describe(confdir: str | os.PathLike, hosts: Iterable[str]) -> dict:
    """The CA in a mitmproxy confdir, for status.json: its file, whether it vouches for every site, the names it
    can vouch for, and which of `hosts` it cannot. Reads files: call it off the hot path (the status page)."""
    confdir = Path(confdir).expanduser()
    hosts = list(hosts)
    info = {"confdir": str(confdir), "file": str(confdir / CERT_FILE), "exists": False, "subject": "",
            "fingerprint_sha256": "", "not_after": "", "made_by_coze_mitm": (confdir / META_FILE).is_file(),
            "every_site": True, "names": [], "missing": [], "error": ""}
    try:
        certs = read_certs(confdir / SIGNING_FILE)
        if not certs:
            raise ValueError(f"no certificate in {confdir / SIGNING_FILE}")
    except FileNotFoundError:
        info["error"] = f"no CA yet in {confdir} (mitmproxy makes its own, for every site, when it starts)"
        return info
    except (OSError, ValueError) as e:
        info["error"] = f"cannot read {confdir / SIGNING_FILE}: {e}"
        return info
    scope = chain_scope(certs)
    trusted = certs[-1]  # the root (the last of the chain; the only one for mitmproxy's own CA)
    try:
        trusted = read_certs(confdir / CERT_FILE)[0]
    except (OSError, ValueError, IndexError):
        pass
    info.update(exists=True, subject=trusted.subject.rfc4514_string(), fingerprint_sha256=fingerprint(trusted),
                not_after=trusted.not_valid_after_utc.strftime("%Y-%m-%d"), every_site=scope.every_site,
                names=scope.names(), missing=scope.missing(hosts))
    return info
