"""Leaves that clients accept from a name-constrained CA (the scoped CA run_mitm.py makes, docs/ca.md).

mitmproxy makes each leaf with the names of the upstream's certificate (`upstream_cert`, on by default), the
name the client asked for (SNI; without SNI, an IP origin, the proxy's own address) and the server's address.
A real API's certificate names a wildcard, the bare domain and often other hosts; with a CA that may vouch only
for the hosts coze-mitm intercepts, one name outside its constraints makes every client refuse the leaf
(OpenSSL "permitted subtree violation", Chromium ERR_CERT_INVALID, Firefox SEC_ERROR_CERT_NOT_IN_NAME_SPACE).

So the certificate store mitmproxy signs with is given the names the chain permits only (core/scoped_ca.py
`leaf_names`): the store's `get_cert` is wrapped, once per store, before mitmproxy's tlsconfig asks it for the
first client handshake (this part's tls_start_client runs before tlsconfig's: scripts come first). A CA without
name constraints (mitmproxy's own) is left alone entirely. It holds for run_mitm.py and for plain
`mitmdump -s addons/coze.py --set confdir=<a scoped CA>` alike, and whatever `upstream_cert` is set to.
docs/decisions.md says why this rather than `upstream_cert=false`.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, tls

from coze_mitm.core import scoped_ca

log = logging.getLogger("coze.leaf_names")


def _cryptography(cert):
    """A mitmproxy Cert as a cryptography certificate (12.x has to_cryptography; 11.0.2 keeps it in _cert)."""
    convert = getattr(cert, "to_cryptography", None)
    return convert() if convert is not None else cert._cert


class LeafNames:
    def __init__(self):
        self._store = None  # the certificate store whose get_cert is wrapped (or found unconstrained)

    def tls_start_client(self, tls_start: tls.TlsData) -> None:
        if tls_start.ssl_conn is not None:
            return  # another addon made the connection itself: no leaf of mitmproxy's
        tlsconfig = ctx.master.addons.get("tlsconfig")
        store = getattr(tlsconfig, "certstore", None)
        if store is None or store is self._store:
            return  # already done for this store (a new confdir makes a new one)
        self._store = store
        try:
            scope = scoped_ca.chain_scope(
                [_cryptography(store.default_ca)] + [_cryptography(c) for c in store.default_chain_certs]
            )
        except (AttributeError, TypeError, ValueError) as e:  # a mitmproxy whose store looks different
            log.warning(f"coze-mitm: cannot read the CA's name constraints ({type(e).__name__}); leaves keep "
                        "every name mitmproxy gives them (with a scoped CA, try --set upstream_cert=false)")
            return
        if scope.every_site:
            return  # mitmproxy's own CA: every name may stay
        store.get_cert = _held_to(scope, store.get_cert)
        log.info(f"coze-mitm: the CA may vouch only for {', '.join(scope.names())}: leaves carry those names only")


def _held_to(scope: scoped_ca.ChainScope, get_cert):
    def get_cert_within_scope(commonname, sans, *args, **kwargs):
        commonname, sans = scoped_ca.leaf_names(scope, commonname, sans)
        return get_cert(commonname, sans, *args, **kwargs)

    get_cert_within_scope.coze_mitm_scope = scope  # for tests and a curious reader
    return get_cert_within_scope
