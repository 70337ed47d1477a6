"""The userscript as http://coze.mitm/coze-chat.user.js serves it: pure logic, no mitmproxy import.

* `fill_userscript`: one @match per allowed page origin, the config block's values filled in, and
  the proxy's address in @description (the script's own notices read it from the config block).
* `version_stamp`: a @version that stays the same while the served text does and rises whenever it
  changes, across restarts (Tampermonkey offers an update only for a higher version).
* `proxy_address`: the address a browser on this machine sets as its proxy.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import time
from pathlib import Path

from coze_mitm.core.hosts import STATUS_HOST
from coze_mitm.core.private_files import write_private

NO_ORIGIN_MATCH = "http://no-page-origin-configured.invalid/*"  # .invalid never resolves: matches no page
VERSION_STATE_FILE = "coze-mitm-userscript.json"  # in mitmproxy's confdir: keeps @version stable across restarts

_MATCH_LINE = re.compile(r"// @match\s+.*")
_VERSION_LINE = re.compile(r"^(// @version\s+)(\S+)\s*$", re.M)
# The one "(host:port)" in the @description line names the proxy.
_DESCRIPTION_PROXY = re.compile(r"^(// @description\s.*?\()[^()\s]+(\).*)$", re.M)


def own_origins() -> set[str]:
    return {f"http://{STATUS_HOST}", f"https://{STATUS_HOST}"}


def script_origins(origins) -> list[str]:
    """The page origins the served script runs on: the allowed ones but the proxy's own pages."""
    own = own_origins()
    return [o for o in sorted(origins) if o not in own]


def proxy_address(listen_host: str | None, port: int | None) -> str:
    """host:port as a browser's proxy setting names it.

    mitmproxy's default listen_host "" means every interface: a browser on this machine reaches it
    at 127.0.0.1 (so do the other "any" addresses, 0.0.0.0 and ::). A specific address is named as
    it is. Port None is mitmproxy's default for the regular mode, 8080.
    """
    host = (listen_host or "").strip()
    try:
        if not host or ipaddress.ip_address(host).is_unspecified:
            host = "127.0.0.1"
    except ValueError:
        pass  # a host name: named as it is
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{8080 if port is None else port}"


def fill_userscript(template: str, origins, values: dict[str, str], proxy: str | None = None) -> str:
    """The userscript with one @match per page origin and the config block's values replaced.

    Values go in as JSON string literals (ASCII only, so no U+2028 or quote can end the line or the
    string early); origins were validated by coze_origins' parser; `proxy` (host:port) also replaces
    the address in @description.
    """
    # The proxy's own pages (the demo puts http://coze.mitm in coze_origins) never get the SDK injected.
    matches = [f"// @match        {o}/*" for o in script_origins(origins)]
    if not matches:
        # No @match at all would mean "every page" to some script managers: match nothing useful instead.
        matches = [f"// @match        {NO_ORIGIN_MATCH}"]
    lines, placed = [], False
    for line in template.split("\n"):
        if _MATCH_LINE.fullmatch(line):
            if not placed:  # the template's placeholder @match line(s) become ours, in the same place
                lines.extend(matches)
                placed = True
            continue
        if line.startswith("// ==/UserScript==") and not placed:
            lines.extend(matches)
            placed = True
        lines.append(line)
    text = "\n".join(lines)
    if proxy:
        if any(c.isspace() or c in "()" for c in proxy):
            raise ValueError(f"not a proxy address: {proxy!r}")
        text = _DESCRIPTION_PROXY.sub(lambda m: m[1] + proxy + m[2], text, count=1)
        values = {**values, "proxy": proxy}
    for key, value in values.items():
        text = re.sub(
            rf"^(  {re.escape(key)}: ).*?(, // @coze-mitm {re.escape(key)}\b.*)$",
            lambda m: m[1] + json.dumps(value) + m[2], text, count=1, flags=re.M,
        )
    return text


def base_version(template: str) -> str:
    m = _VERSION_LINE.search(template)
    return m[2] if m else "0"


def set_version(text: str, version: str) -> str:
    return _VERSION_LINE.sub(lambda m: m[1] + version, text, count=1)


def version_stamp(digest: str, state_path: Path | None, now: float) -> tuple[int, bool]:
    """A number that stays the same while `digest` does and rises whenever it changes.

    It is the time of the last change, kept in a small file so a restart with the same settings
    gives the same number (Tampermonkey then sees no update). Returns (stamp, persisted).
    """
    old: dict = {}
    if state_path is not None:
        try:
            old = json.loads(state_path.read_text())
        except (OSError, ValueError):
            old = {}
    if not isinstance(old, dict):
        old = {}
    old_stamp = old.get("stamp") if isinstance(old.get("stamp"), int) else 0
    if old.get("digest") == digest and old_stamp > 0:
        return old_stamp, True
    stamp = max(int(now), old_stamp + 1)  # never backwards, even if the clock is
    if state_path is None:
        return stamp, False
    try:
        write_private(state_path, json.dumps({"digest": digest, "stamp": stamp}).encode())
    except OSError:
        return stamp, False
    return stamp, True


def build(template: str, origins, values: dict[str, str], proxy: str, confdir: str | None) -> tuple[bytes, str, bool]:
    """The served script, its @version, and whether that version could be kept in the confdir."""
    text = fill_userscript(template, origins, values, proxy=proxy)
    state_path = Path(os.path.expanduser(confdir)) / VERSION_STATE_FILE if confdir else None
    stamp, persisted = version_stamp(hashlib.sha256(text.encode()).hexdigest(), state_path, time.time())
    version = f"{base_version(template)}.{stamp}"
    return set_version(text, version).encode("utf-8"), version, persisted
