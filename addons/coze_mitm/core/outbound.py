"""How coze-mitm's own requests leave this machine: the same way mitmproxy's do.

The token exchange, the usage poller and the transparent retry are requests coze-mitm makes itself, with
`requests`, not through mitmproxy. `Outbound` holds mitmproxy's connection options as they apply to them:

* `--mode upstream:http(s)://host:port`: every request goes through that proxy (absolute-form for http://,
  CONNECT for https://), with `upstream_auth` (user:pass) as `Proxy-Authorization: Basic ...`, exactly
  the header mitmproxy's own upstream_auth addon sends;
* `ssl_insecure`: no certificate verification;
* `ssl_verify_upstream_trusted_ca` (a PEM file) and `ssl_verify_upstream_trusted_confdir` (a c_rehash'ed
  directory): the CAs trusted instead of the default bundle, as mitmproxy does (either, or both).

It is built in one place (parts/settings.py, from the option values; no mitmproxy import here) and every
client asks for it on each use through a `SessionSource`, so a changed option takes effect on the next
request. The proxy password is never in a URL, a repr or a log line: `describe()` says where requests go.

When the options in force cannot be used and no good ones came before (a script reload after a CA file named
in ssl_verify_upstream_trusted_ca went away, say), the settings part makes a `refusing` one: every request
then fails at once with `OutboundRefused`, whose message names the option and the fix, and none leaves this
machine. Never DIRECT instead: that would go past the upstream proxy the user configured.
"""

from __future__ import annotations

import base64
import os
import threading
from dataclasses import dataclass, field
from typing import Callable

import requests
import requests.adapters


class OutboundError(ValueError):
    """A connection option coze-mitm cannot use for its own requests: the message names cause and fix."""


class OutboundRefused(requests.exceptions.ConnectionError):
    """A request of coze-mitm's own not sent: the connection options in force cannot be used (the message says
    which, and the fix)."""


@dataclass(frozen=True)
class Outbound:
    proxy: str | None = None  # "http://host:port" or "https://host:port"; None: straight to the destination
    proxy_authorization: str | None = field(default=None, repr=False)  # "Basic ..."; never shown
    verify: bool = True  # False: ssl_insecure
    ca_file: str | None = None
    ca_dir: str | None = None
    refused: str | None = None  # why no request may leave (the options cannot be used); None: they may

    @classmethod
    def refusing(cls, problem: str) -> Outbound:
        """No request leaves, each fails with OutboundRefused saying `problem` (an OutboundError's message)."""
        return cls(refused=(f"coze-mitm sends none of its own requests (token exchange, usage polls, retries) rather "
                            f"than send them past the upstream proxy: {problem}; once fixed, set the option again "
                            "(mitmweb's options, `set` in the console) or restart the proxy"))

    @classmethod
    def from_options(cls, upstreams: list[tuple[str, str, int]], upstream_auth: str | None, ssl_insecure: bool,
                     trusted_ca: str | None, trusted_dir: str | None) -> Outbound:
        """From mitmproxy's option values; `upstreams` are the (scheme, host, port) of the `upstream:` entries
        of `mode`, as mitmproxy parsed them (the first one is used)."""
        proxy = None
        if upstreams:
            scheme, host, port = upstreams[0]
            if scheme not in ("http", "https"):
                raise OutboundError(f"mode upstream:{scheme}://...: coze-mitm can use an http:// or https:// "
                                    "upstream proxy only")
            proxy = f"{scheme}://{_bracketed(host)}:{port}"
        authorization = None
        if upstream_auth:
            if ":" not in upstream_auth[1:]:
                raise OutboundError("upstream_auth must be user:password (the password after the first colon)")
            authorization = "Basic " + base64.b64encode(upstream_auth.encode("utf-8")).decode("ascii")
        for name, path, is_dir in (("ssl_verify_upstream_trusted_ca", trusted_ca, False),
                                   ("ssl_verify_upstream_trusted_confdir", trusted_dir, True)):
            if path and not ssl_insecure and not (os.path.isdir(path) if is_dir else os.path.isfile(path)):
                raise OutboundError(f"{name}={path}: no such {'directory' if is_dir else 'file'}; give the path of "
                                    f"{'a c_rehash directory of CA certificates' if is_dir else 'a PEM CA certificate'}"
                                    " the Coze API's certificate chains to")
        return cls(proxy, authorization if proxy else None, not ssl_insecure,
                   trusted_ca or None, trusted_dir or None)

    def describe(self) -> str:
        """Where coze-mitm's own requests go and how they are verified, for a log line (no password)."""
        if self.refused:
            return "nowhere: " + self.refused
        via = f"through the upstream proxy {self.proxy}" if self.proxy else "directly"
        if self.proxy and self.proxy_authorization:
            via += " (with upstream_auth)"
        if not self.verify:
            check = "certificates not verified (ssl_insecure)"
        elif self.ca_file or self.ca_dir:
            check = "certificates verified against " + " and ".join(filter(None, (self.ca_file, self.ca_dir)))
        else:
            check = "certificates verified against the default CA bundle"
        return f"{via}, {check}"

    def session(self, *, pool_maxsize: int = 10, default_headers: bool = True) -> requests.Session:
        """A new `requests` session that sends as these options say. Never a proxy from the environment
        (`trust_env=False`): that proxy could be this one."""
        session = requests.Session()
        session.trust_env = False
        if not default_headers:
            session.headers.clear()  # send exactly the headers given (a page's own, in the retry)
        adapter = _Refusing(self.refused) if self.refused else _Adapter(self, pool_maxsize)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        if self.proxy:
            session.proxies = {"http": self.proxy, "https": self.proxy}
        session.verify = (self.ca_file or self.ca_dir or True) if self.verify else False
        return session


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class _Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter, plus: Proxy-Authorization from the options (not from a URL that could be logged),
    and both a CA file and a CA directory when both options are set (requests takes one `verify` path)."""

    def __init__(self, outbound: Outbound, pool_maxsize: int):
        self._outbound = outbound
        super().__init__(pool_connections=4, pool_maxsize=pool_maxsize)

    def proxy_headers(self, proxy):
        headers = super().proxy_headers(proxy)
        if self._outbound.proxy_authorization:
            # urllib3 sends these on CONNECT, and with every absolute-form request to an http:// destination
            headers["Proxy-Authorization"] = self._outbound.proxy_authorization
        return headers

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        outbound = self._outbound
        if outbound.verify and outbound.ca_file and outbound.ca_dir and verify == outbound.ca_file:
            pool_kwargs["ca_cert_dir"] = outbound.ca_dir
        return host_params, pool_kwargs


class _Refusing(requests.adapters.BaseAdapter):
    """Sends nothing: every request fails with OutboundRefused before any connection is opened."""

    def __init__(self, problem: str):
        super().__init__()
        self._problem = problem

    def send(self, request, **kwargs):
        raise OutboundRefused(self._problem, request=request)

    def close(self) -> None:
        pass


class SessionSource:
    """One client's session, following the current `Outbound`: asked for on each request (from any thread),
    it is rebuilt when the options changed. A replaced session is closed: that drops its idle connections
    only (urllib3 lets requests in flight finish)."""

    def __init__(self, outbound: Callable[[], Outbound], *, pool_maxsize: int = 10, default_headers: bool = True):
        self._outbound = outbound
        self._pool_maxsize = pool_maxsize
        self._default_headers = default_headers
        self._lock = threading.Lock()
        self._built_for: Outbound | None = None
        self._session: requests.Session | None = None

    def get(self) -> requests.Session:
        current = self._outbound()
        with self._lock:
            if self._session is None or self._built_for != current:
                old = self._session
                self._session = current.session(pool_maxsize=self._pool_maxsize,
                                                default_headers=self._default_headers)
                self._built_for = current
                if old is not None:
                    old.close()
            return self._session

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
            self._session, self._built_for = None, None


DIRECT = Outbound()  # mitmproxy's defaults: no upstream proxy, the default CA bundle
