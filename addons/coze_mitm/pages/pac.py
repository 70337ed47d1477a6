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

Names nothing private to whoever may not use the proxy (issue 25): browsers never answer a 407 for their PAC
file, so with proxyauth on it is served without a login, to anyone who reaches the proxy. That file (`salt`
given) lists the origins it routes (Coze API hosts, the team's page origins, possibly intranet names) only as
salted SHA-256 digests, which FindProxyForURL compares with the digest of the URL's "host port": the same
answers, and no name in the text. (Someone who guesses a name can still check the guess against the
digests, and count the entries; the names only this proxy answers, coze.mitm, mitm.it and the demo's,
are public and listed as they are.)

Pure: no mitmproxy import; the part (parts/pac.py) hands in what to list and the proxy's address.
"""

from __future__ import annotations

import hashlib
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


DIGEST_CHARS = 16  # hex characters of a digest kept (64 bits: no two origins of a PAC collide)


def digest(salt: str, key: str) -> str:
    """What the PAC's JavaScript computes for a "host port" key: SHA-256 of salt + key, hex, shortened."""
    return hashlib.sha256((salt + key).encode("utf-8")).hexdigest()[:DIGEST_CHARS]


# SHA-256 in ES5 (PAC files run in old, bare JavaScript engines: no crypto API there). Constants: the first
# 32 bits of the fractional parts of the cube roots of the first 64 primes (FIPS 180-4).
_SHA256_JS = """
var COZE_K = [
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2];

function cozeDigest(text) {
  var s = unescape(encodeURIComponent(text)), bytes = [], i, j;
  for (i = 0; i < s.length; i++) bytes.push(s.charCodeAt(i));
  var bits = bytes.length * 8;
  bytes.push(0x80);
  while (bytes.length % 64 !== 56) bytes.push(0);
  bytes.push(0, 0, 0, 0, (bits >>> 24) & 255, (bits >>> 16) & 255, (bits >>> 8) & 255, bits & 255);
  var H = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
  var w = [];
  for (j = 0; j < bytes.length; j += 64) {
    for (i = 0; i < 16; i++) {
      w[i] = (bytes[j + 4 * i] << 24) | (bytes[j + 4 * i + 1] << 16) | (bytes[j + 4 * i + 2] << 8) | bytes[j + 4 * i + 3];
    }
    for (i = 16; i < 64; i++) {
      var x = w[i - 15], y = w[i - 2];
      var s0 = ((x >>> 7) | (x << 25)) ^ ((x >>> 18) | (x << 14)) ^ (x >>> 3);
      var s1 = ((y >>> 17) | (y << 15)) ^ ((y >>> 19) | (y << 13)) ^ (y >>> 10);
      w[i] = (w[i - 16] + s0 + w[i - 7] + s1) | 0;
    }
    var a = H[0], b = H[1], c = H[2], d = H[3], e = H[4], f = H[5], g = H[6], h = H[7];
    for (i = 0; i < 64; i++) {
      var t1 = (h + (((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7)))
                + ((e & f) ^ (~e & g)) + COZE_K[i] + w[i]) | 0;
      var t2 = ((((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10)))
                + ((a & b) ^ (a & c) ^ (b & c))) | 0;
      h = g; g = f; f = e; e = (d + t1) | 0; d = c; c = b; b = a; a = (t1 + t2) | 0;
    }
    H[0] = (H[0] + a) | 0; H[1] = (H[1] + b) | 0; H[2] = (H[2] + c) | 0; H[3] = (H[3] + d) | 0;
    H[4] = (H[4] + e) | 0; H[5] = (H[5] + f) | 0; H[6] = (H[6] + g) | 0; H[7] = (H[7] + h) | 0;
  }
  var hex = "";
  for (i = 0; i < 8; i++) hex += ("00000000" + (H[i] >>> 0).toString(16)).slice(-8);
  return hex;
}
"""


def valid_proxy(proxy: str) -> bool:
    return bool(_PROXY_RE.fullmatch(proxy or ""))


def render(proxy: str, hosts, origins, salt: str | None = None) -> str:
    """The PAC text: `hosts` go through the proxy on any port (names only the proxy knows: coze.mitm, mitm.it,
    sandbox.coze.mitm), `origins` (Coze API, WebSocket hosts, page origins) on their own port only. With a
    `salt`, the origins are listed only as digests (the file for a reader who may not use the proxy)."""
    if not valid_proxy(proxy):
        raise ValueError(f"not a proxy address: {proxy!r}")
    any_port = sorted({host_key(h) for h in hosts})
    exact = origin_keys(origins)
    if salt is None:
        listed, key, helper, note = exact, "name + \" \" + port", "", ""
    else:
        listed = sorted(digest(salt, k) for k in exact)
        key = f"cozeDigest(COZE_SALT + name + \" \" + port).substring(0, {DIGEST_CHARS})"
        helper = f"var COZE_SALT = {json.dumps(salt)};\n" + _SHA256_JS
        note = "// The origins are listed as salted SHA-256 digests of \"host port\": this file names none of them.\n"
    # JSON is valid JavaScript for these values (ASCII only: no U+2028 can end a line inside a string).
    return f"""// coze-mitm proxy auto-config: only what coze-mitm must see goes through the proxy; the rest DIRECT.
// Generated from the proxy's running settings; reload it after changing them (coze_origins, coze_api_hosts, ...).
// No DIRECT fallback for these: while the proxy is stopped, Coze pages fail instead of talking to Coze untouched.
{note}var COZE_PROXY = {json.dumps("PROXY " + proxy)};
var COZE_ANY_PORT = {json.dumps(any_port)};
var COZE_ORIGINS = {json.dumps(listed)};
var COZE_DEFAULT_PORTS = {{"http": 80, "https": 443, "ws": 80, "wss": 443}};
{helper}
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
  var key = {key};
  for (i = 0; i < COZE_ORIGINS.length; i++) {{
    if (key === COZE_ORIGINS[i]) return COZE_PROXY;
  }}
  return "DIRECT";
}}
"""
