"""Load and validate the OAuth (JWT) app config exactly as the Coze console hands it out.

Every problem becomes one ConfigError whose message names the cause and the fix, because the
message ends up as the single line mitmdump prints before it refuses to start.
No mitmproxy import here: this is plain logic, tested on its own.
"""

from __future__ import annotations

import json
import os
import stat
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

REPO_ROOT = Path(__file__).resolve().parents[3]  # addons/coze_mitm/core/config.py
DEFAULT_CONFIG_PATH = REPO_ROOT / "config" / "coze_oauth_config.json"
DEFAULT_API_BASE = "https://api.coze.cn"

# How a hint names Python: Debian and macOS have no `python` command, Windows has the `py` launcher.
PYTHON = "py" if os.name == "nt" else "python3"
DEMO_HINT = f"no Coze account yet? {PYTHON} run_mitm.py --demo shows coze-mitm working with a local sandbox"

# "server" is what older console downloads call the same JWT app.
JWT_CLIENT_TYPES = ("jwt", "server")
WHERE_TO_GET_IT = (
    "create an OAuth app of type 'JWT (service)' in the Coze console "
    "(coze.cn: https://www.coze.cn/open/oauth/apps, coze.com: https://www.coze.com/open/oauth/apps), "
    "download its config JSON"
)


class ConfigError(ValueError):
    """A config problem, phrased for the person who has to fix it."""


DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# A WebSocket handshake is an HTTP request: mitmproxy sees ws://host as http, wss://host as https.
WS_SCHEME_OF_HTTP = {"http": "ws", "https": "wss"}


@dataclass(frozen=True)
class Origin:
    """scheme://host[:port], serialised like a browser's Origin header; another port is another origin."""

    scheme: str
    host: str
    port: int

    @property
    def default_port(self) -> bool:
        return self.port == DEFAULT_PORTS[self.scheme]

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal, as browsers write it
        return host if self.default_port else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}"


def parse_api_origin(url: str, what: str = "coze_api_base", websocket: bool = False) -> Origin:
    """Parse an http(s) base URL (and, with `websocket`, a ws(s) one) into its origin; a path is ignored."""
    schemes = ("http", "https", "ws", "wss") if websocket else ("http", "https")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"{what} {url!r} is not a valid URL ({e}); use e.g. https://api.coze.cn") from None
    if parts.scheme not in schemes or not parts.hostname:
        kinds = "an http(s) or ws(s)" if websocket else "an http(s)"
        raise ConfigError(
            f"{what} {url!r} is not {kinds} URL; use https://api.coze.cn (China) "
            "or https://api.coze.com (international)" + (", or wss://ws.coze.cn for the WebSocket APIs" if websocket else "")
        )
    if port is None:
        port = DEFAULT_PORTS[parts.scheme]
    return Origin(parts.scheme, parts.hostname.lower(), port)


def default_ws_origin(api: Origin) -> Origin | None:
    """The WebSocket host that belongs to an API base: api.coze.cn -> wss://ws.coze.cn (coze.com alike).
    Other bases (a self-hosted Coze Studio, a local stand-in) name theirs in coze_api_hosts."""
    if not api.host.startswith("api.") or api.scheme not in WS_SCHEME_OF_HTTP:
        return None
    scheme = WS_SCHEME_OF_HTTP[api.scheme]
    return Origin(scheme, "ws." + api.host[len("api."):], DEFAULT_PORTS[scheme] if api.default_port else api.port)


@dataclass(frozen=True)
class OAuthApp:
    """A JWT OAuth app: who we are to Coze and the key we sign with (parsed once)."""

    client_id: str
    public_key_id: str
    api_base: str
    private_key: rsa.RSAPrivateKey = field(repr=False)
    www_base: str = ""
    path: str = ""

    @property
    def api_origin(self) -> Origin:
        return parse_api_origin(self.api_base)


def load_private_key(pem: str, path: str) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as e:
        # cryptography's message may be a tuple with OpenSSL's error objects: its first sentence only.
        first = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        reason = first.split("\n")[0].split(". ")[0].rstrip(".") or type(e).__name__
        if "-----BEGIN" not in pem:
            reason = "no PEM header line (BEGIN ... PRIVATE KEY between five dashes)"
        raise ConfigError(
            f"{path}: private_key does not parse as a PEM private key ({reason}); "
            "paste it exactly as downloaded, with its -----BEGIN/END----- lines and \\n line breaks"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(
            f"{path}: private_key is not an RSA key; Coze JWT apps sign with RS256, "
            "so use the RSA key the Coze console generated for this app"
        )
    return key


def _require_str(data: dict, name: str, path: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"{path}: field {name!r} is missing or empty; download the config again from the Coze console "
            "(OAuth app of type JWT) and keep every field"
        )
    return value.strip()


EXAMPLE_CONFIG = "config/coze_oauth_config.example.json"
# What the example file holds in place of an app's values.
_EXAMPLE_MARKS = ("PASTE_THE_PUBLIC_KEY_ID_HERE", "<paste ")


def is_example(data: dict) -> bool:
    return any(isinstance(data.get(k), str) and any(m in data[k] for m in _EXAMPLE_MARKS)
               for k in ("public_key_id", "private_key", "client_id"))


def parse_oauth_config(text: str, path: str = "<config>") -> OAuthApp:
    text = text.removeprefix("\ufeff")  # a UTF-8 BOM (Windows Notepad saves one)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            "use the file exactly as the Coze console downloads it"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object with client_id, private_key, ...; got {type(data).__name__}")

    if is_example(data):
        raise ConfigError(
            f"{path}: this is the example ({EXAMPLE_CONFIG}), placeholders and no key: download your app's config "
            f"from the Coze console instead: {WHERE_TO_GET_IT}"
        )
    client_type = data.get("client_type", "jwt")
    if client_type not in JWT_CLIENT_TYPES:
        raise ConfigError(
            f"{path}: client_type is {client_type!r}, but coze-mitm needs an OAuth app of type "
            "'JWT (service)' (client_type \"jwt\"); create one in the Coze console and download its config"
        )
    client_id = _require_str(data, "client_id", path)
    public_key_id = _require_str(data, "public_key_id", path)
    private_key_pem = _require_str(data, "private_key", path)
    api_base = data.get("coze_api_base") or DEFAULT_API_BASE
    if not isinstance(api_base, str):
        raise ConfigError(f"{path}: coze_api_base must be a string such as https://api.coze.cn")
    parse_api_origin(api_base, f"{path}: coze_api_base")
    # Older console files name the web base coze_domain; nothing here needs it beyond display, and the check below.
    www_base = data.get("coze_www_base") or data.get("coze_domain") or ""
    problem = region_problem(str(www_base), api_base)
    if problem:
        raise ConfigError(f"{path}: {problem}")
    return OAuthApp(
        client_id=client_id,
        public_key_id=public_key_id,
        api_base=api_base.rstrip("/"),
        private_key=load_private_key(private_key_pem, path),
        www_base=str(www_base),
        path=path,
    )


# Coze's two services: an OAuth app made on one is unknown to the other's API (its token exchange fails).
REGIONS = {"coze.cn": "coze.cn (China)", "coze.com": "coze.com (international)"}


def region_of(url: str) -> str | None:
    """"coze.cn" or "coze.com" for a URL on one of Coze's services, else None (a self-hosted or local base)."""
    host = (urllib.parse.urlsplit(url.strip()).hostname or "").lower().rstrip(".")
    return next((r for r in REGIONS if host == r or host.endswith("." + r)), None)


def region_problem(www_base: str, api_base: str) -> str | None:
    """Why a config's web base and API base cannot belong to one app: one is coze.cn, the other coze.com."""
    www, api = region_of(www_base), region_of(api_base)
    if www is None or api is None or www == api:
        return None
    return (f"coze_www_base {www_base} is {REGIONS[www]} but coze_api_base {api_base} is {REGIONS[api]}: an OAuth "
            f"app exists on one of them only, and Coze's other service refuses its tokens; set coze_api_base to "
            f"https://api.{www} (the app was made on {www}), or download the config of an app made on {api}")


def load_oauth_config(path: str | os.PathLike) -> OAuthApp:
    path = str(path)
    try:
        text = _read_small_file(path).decode("utf-8-sig")  # a UTF-8 BOM (Windows Notepad) is not part of the JSON
    except FileNotFoundError:
        raise ConfigError(
            f"OAuth config not found at {path}: {WHERE_TO_GET_IT}, and save it there "
            f"(or pass --set coze_config=PATH; for a personal access token use --set coze_pat=... instead); "
            f"{DEMO_HINT}"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read OAuth config {path}: {e}; check the path and its permissions") from None
    return parse_oauth_config(text, path)


MAX_CONFIG_BYTES = 1024 * 1024  # the console's file is ~2 KB


def _read_small_file(path: str) -> bytes:
    """A regular file's bytes, at most MAX_CONFIG_BYTES. Opened without blocking and checked first: a FIFO
    or a device given as the config would otherwise hang the start-up (or read forever)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file"
            raise ConfigError(f"OAuth config {path} is {kind}, not a regular file: pass the path of the JSON "
                              "file downloaded from the Coze console (--set coze_config=PATH)")
        data = b""
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"OAuth config {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB: it is not the "
                          "console's OAuth JSON (about 2 KB); check --set coze_config=PATH")
    return data


def permissions_warning(path: str | os.PathLike) -> str | None:
    """The private key file should be readable by its owner only.

    POSIX only: on Windows the mode bits are made up from the read-only flag (every file looks 0o666), and
    who may read a file is an ACL this check cannot see; a file in the user's own profile is readable by that
    user (and administrators) only, which is what the README asks there."""
    if os.name == "nt":
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (
            f"{path} is readable by other users of this machine (mode {stat.S_IMODE(mode):o}); "
            f"it holds your private key: chmod 600 {path}"
        )
    return None


def origin_key(origin: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an origin as parse_page_origins writes it: what a request's own
    scheme, host and port are compared with."""
    parts = urlsplit(origin)
    return parts.scheme, parts.hostname or "", parts.port or DEFAULT_PORTS[parts.scheme]


def parse_page_origins(spec: str) -> frozenset[str]:
    """`coze_origins`: comma-separated page origins, matched exactly against the browser's Origin header."""
    origins = set()
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if item in ("*", "null"):
            raise ConfigError(
                f"coze_origins may not contain {item!r}: list the exact origins of your pages, "
                "e.g. --set coze_origins=https://www.coze.cn,https://example.org"
            )
        try:
            parts = urlsplit(item)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if (
            parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or parts.path not in ("", "/") or parts.query or parts.fragment or parts.username
            or "*" in item
        ):
            raise ConfigError(
                f"coze_origins entry {item!r} is not an origin: write scheme://host[:port] with no path, "
                "e.g. https://example.org or http://localhost:3000"
            )
        origin = Origin(parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80))
        origins.add(str(origin))
    return frozenset(origins)
