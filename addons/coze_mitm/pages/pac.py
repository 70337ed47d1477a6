"""The PAC file (proxy auto-config) the proxy serves: only what coze-mitm must see goes through it.

    http://127.0.0.1:8080/proxy.pac   the URL a browser's "automatic proxy configuration" setting names
                                      (fetched directly from the proxy: an origin-form request to it)
    http://coze.mitm/proxy.pac        the same file, to look at (linked from the status page)

A browser that uses it sends the Coze API and WebSocket hosts, the allowed page origins, coze.mitm,
mitm.it (and in the demo sandbox.coze.mitm) to the proxy, and everything else DIRECT: when the proxy
stops, only those fail; every other site keeps loading. There is deliberately no "; DIRECT" fallback
after the proxy: a Coze request sent around a stopped proxy would carry the user tag to Coze instead of
a credential, and coze.mitm exists only in the proxy. (A browser that cannot fetch the PAC file at all,
e.g. Chromium re-reading it while the proxy is stopped, goes DIRECT for everything: the Coze pages then
fail too, coze.mitm does not resolve and Coze refuses the tag, which is no credential.)

Pure: no mitmproxy import; the part (parts/pac.py) hands in what to list and the proxy's address.
"""

from __future__ import annotations

import json
import re

PAC_PATH = "/proxy.pac"
CONTENT_TYPE = "application/x-ns-proxy-autoconfig"
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

# host:port as a Host header or proxy_address() writes it; nothing that could end the JS string.
_PROXY_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}")


def host_key(host: str) -> str:
    """A host as the PAC compares it: lower case, no trailing dot, IPv6 literals without brackets."""
    return host.strip().lower().rstrip(".").strip("[]")


def origin_keys(origins) -> list[str]:
    """"host port" keys for origins (objects with scheme, host, port, or "scheme://host[:port]" strings)."""
    keys = set()
    for origin in origins:
        if isinstance(origin, str):
            scheme, _, rest = origin.partition("://")
            rest = rest.split("/", 1)[0]
            m = re.fullmatch(r"(\[[^\]]+\]|[^:]+)(?::(\d+))?", rest)
            if not m or scheme not in DEFAULT_PORTS:
                continue
            host, port = m[1], int(m[2]) if m[2] else DEFAULT_PORTS[scheme]
        else:
            host, port = origin.host, origin.port
        keys.add(f"{host_key(host)} {port}")
    return sorted(keys)


def valid_proxy(proxy: str) -> bool:
    return bool(_PROXY_RE.fullmatch(proxy or ""))


def render(proxy: str, hosts, origins) -> str:
    """The PAC text: `hosts` go through the proxy on any port (names only the proxy knows: coze.mitm, mitm.it,
    sandbox.coze.mitm), `origins` (Coze API, WebSocket hosts, page origins) on their own port only."""
    if not valid_proxy(proxy):
        raise ValueError(f"not a proxy address: {proxy!r}")
    any_port = sorted({host_key(h) for h in hosts})
    exact = origin_keys(origins)
    # JSON is valid JavaScript for these values (ASCII only: no U+2028 can end a line inside a string).
    return f"""// coze-mitm proxy auto-config: only what coze-mitm must see goes through the proxy; the rest DIRECT.
// Generated from the proxy's running settings; reload it after changing them (coze_origins, coze_api_hosts, ...).
// No DIRECT fallback for these: while the proxy is stopped, Coze pages fail instead of talking to Coze untouched.
var COZE_PROXY = {json.dumps("PROXY " + proxy)};
var COZE_ANY_PORT = {json.dumps(any_port)};
var COZE_ORIGINS = {json.dumps(exact)};
var COZE_DEFAULT_PORTS = {{"http": 80, "https": 443, "ws": 80, "wss": 443}};

function FindProxyForURL(url, host) {{
  var m = /^([A-Za-z][A-Za-z0-9+.-]*):\\/\\/(?:[^\\/?#@]*@)?(\\[[^\\]]*\\]|[^\\/?#:]*)(?::(\\d+))?/.exec(url);
  var scheme = m ? m[1].toLowerCase() : "";
  var name = String(host || (m ? m[2] : "")).toLowerCase();
  if (name.charAt(0) === "[") name = name.substring(1, name.length - 1);
  while (name.charAt(name.length - 1) === ".") name = name.substring(0, name.length - 1);
  var i;
  for (i = 0; i < COZE_ANY_PORT.length; i++) {{
    if (name === COZE_ANY_PORT[i]) return COZE_PROXY;
  }}
  var port = m && m[3] ? parseInt(m[3], 10) : COZE_DEFAULT_PORTS[scheme];
  var key = name + " " + port;
  for (i = 0; i < COZE_ORIGINS.length; i++) {{
    if (key === COZE_ORIGINS[i]) return COZE_PROXY;
  }}
  return "DIRECT";
}}
"""
