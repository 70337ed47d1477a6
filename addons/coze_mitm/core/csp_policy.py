"""Content-Security-Policy rewriting for the pages in coze_origins: pure logic, no mitmproxy import.

What the Coze Web Chat SDK needs from a page's CSP, and how a policy is widened by exactly that:

* The needs are a map "fetch directive -> sources": the SDK's CDN origin for script-src, style-src,
  img-src, font-src, media-src and frame-src, and the Coze API origin(s) for connect-src (see
  `sdk_needs`). Besides, what the SDK itself puts into the page: its CSS comes as <style> elements
  ('unsafe-inline' for style-src) and it shows data: and blob: images (inlined icons, upload
  previews); @coze/chat-sdk also brings its icon font as a data: URL (font-src data:). Nothing else: no 'unsafe-eval', no inline scripts, no wildcard. Users who find the SDK
  needs more on their pages (an avatar host, a font CDN) add it explicitly with coze_csp_extra.
* 'unsafe-inline' is never added to a source list that has a nonce or a hash: browsers ignore it
  there. Such a page keeps its policy, and the chat is unstyled on it (`inline_styles_blocked` tells
  the caller, which says so); only the page itself can allow inline styles.
* For each need, the directive that governs that kind of load is found the way a browser finds it
  (script-src-elem -> script-src -> default-src; frame-src -> child-src -> default-src; ...):
  - if it is the kind's own directive, the sources are appended to it ('none' is dropped, since
    'none' next to a source means nothing and alone it would keep blocking);
  - if it is a fallback (default-src, child-src), the kind's own directive is created as a copy of
    the fallback's sources plus ours, so every other kind of load still sees the fallback unchanged;
  - if nothing governs that kind, nothing restricts it and nothing is added.
* Sources already allowed (the exact source, `*`, or a scheme source such as `https:`) are not
  added again; a policy that needs nothing is returned byte for byte unchanged.
* Nonces, hashes and 'strict-dynamic' are kept as they are. Under 'strict-dynamic' browsers ignore
  host sources, but they allow any script element that is not parser-inserted; the userscript
  appends its <script src> with the DOM API, and the SDK loads its chunks the same way, so the page
  keeps working, and the added host source serves older browsers that ignore 'strict-dynamic'.
* A header value may hold several policies (comma-separated, like several headers); each is
  enforced on its own, so each is patched on its own. Report-only policies are left alone by the
  caller: they block nothing.
* <meta http-equiv="Content-Security-Policy"> tags in the document head are patched the same way
  (csp_meta.py).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping
from urllib.parse import urlsplit

# The official CDN builds of the Coze Web Chat SDK (not on npm). The cn build is what Coze's console
# hands out today; the oversea build is the one pages embed for api.coze.com (1.2.0-beta.6 is the
# newest seen in the wild there).
CN_SDK_URL = "https://lf-cdn.coze.cn/obj/unpkg/flow-platform/chat-app-sdk/1.2.0-beta.10/libs/cn/index.js"
OVERSEA_SDK_URL = "https://sf-cdn.coze.com/obj/unpkg-va/flow-platform/chat-app-sdk/1.2.0-beta.6/libs/oversea/index.js"

# What the SDK puts into the page itself: <style> elements, data: and blob: images.
# What the SDKs put into the page themselves: <style> elements, data:/blob: images (icons, upload previews), and
# @coze/chat-sdk's icon font as a data: URL (docs/chat-sdk-notes.md: the one violation on a strict page).
SDK_INLINE = {"style-src": ("'unsafe-inline'",), "img-src": ("data:", "blob:"), "font-src": ("data:",)}
UNSAFE_INLINE = "'unsafe-inline'"
_NONCE_OR_HASH = re.compile(r"'(?:nonce-|sha256-|sha384-|sha512-)", re.IGNORECASE)

# For each kind of load: the directives a browser consults, most specific first (CSP Level 3).
# The first one present in a policy governs that load.
CHAINS: dict[str, tuple[str, ...]] = {
    "script-src": ("script-src-elem", "script-src", "default-src"),
    "style-src": ("style-src-elem", "style-src", "default-src"),
    "img-src": ("img-src", "default-src"),
    "font-src": ("font-src", "default-src"),
    "media-src": ("media-src", "default-src"),
    "frame-src": ("frame-src", "child-src", "default-src"),
    "connect-src": ("connect-src", "default-src"),
    "worker-src": ("worker-src", "child-src", "script-src", "default-src"),
    "manifest-src": ("manifest-src", "default-src"),
}
# Directives that are the kind's own: sources go into them directly. A fallback is never widened.
OWN = {kind: {kind, f"{kind}-elem"} for kind in CHAINS}

_WS = re.compile(r"[\t\n\f\r ]+")
_DIRECTIVE_NAME = re.compile(r"[A-Za-z0-9-]+")
# A source expression we are willing to add: a keyword, a scheme source or a host source.
_SOURCE = re.compile(
    r"'(?:self|unsafe-inline|unsafe-eval|wasm-unsafe-eval|unsafe-hashes)'"
    r"|[a-z][a-z0-9+.-]*:"
    r"|(?:[a-z][a-z0-9+.-]*://)?(?:\*\.)?[a-z0-9.-]+(?::(?:\d{1,5}|\*))?(?:/[^\s;,']*)?",
    re.IGNORECASE,
)


def _origin(url: str, what: str) -> str:
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{what} {url!r} is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} {url!r} is not an http(s) URL")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + ("" if port in (None, default) else f":{port}")


def resolve_sdk_url(option: str, api_origins: Iterable[str]) -> str:
    """The SDK URL to use: the option when set, else the official build matching the API's site.

    Raises ValueError (naming the fix) for a value that is not an http(s) URL.
    """
    option = (option or "").strip()
    if option:
        _origin(option, "coze_sdk_url")
        if any(c.isspace() or c in "\"'<>`" for c in option):
            raise ValueError(f"coze_sdk_url {option!r} contains spaces or quotes; give a plain URL")
        return option
    hosts = {urlsplit(o).hostname or "" for o in api_origins}
    if hosts and all(h == "coze.com" or h.endswith(".coze.com") for h in hosts):
        return OVERSEA_SDK_URL
    return CN_SDK_URL


def sdk_origin(sdk_url: str) -> str:
    return _origin(sdk_url, "coze_sdk_url")


def parse_extra(spec: str) -> dict[str, tuple[str, ...]]:
    """coze_csp_extra: more sources in CSP syntax, e.g. "img-src https://img.example; font-src data:".

    Only fetch directives, only plain source expressions: no nonce, hash, 'strict-dynamic' or 'none'
    (they would change what the page's own policy means, not add a source).
    """
    needs: dict[str, list[str]] = {}
    for part in spec.split(";"):
        tokens = _WS.split(part.strip())
        if not tokens or not tokens[0]:
            continue
        name, sources = tokens[0].lower(), tokens[1:]
        if name not in CHAINS:
            raise ValueError(
                f"coze_csp_extra: {tokens[0]!r} is not a fetch directive coze-mitm extends; "
                f"use one of {', '.join(CHAINS)}"
            )
        if not sources:
            raise ValueError(f"coze_csp_extra: {name} lists no source; write e.g. \"{name} https://cdn.example\"")
        for source in sources:
            if not _SOURCE.fullmatch(source) or source == "*":
                raise ValueError(
                    f"coze_csp_extra: {source!r} in {name} is not a source coze-mitm adds; "
                    "give an origin (https://cdn.example), a scheme (data:) or a keyword such as 'unsafe-inline'"
                )
            needs.setdefault(name, []).append(source)
    return {k: tuple(v) for k, v in needs.items()}


def sdk_needs(sdk_url: str | None, api_origins: Iterable[str],
              extra: Mapping[str, Iterable[str]] | None = None) -> dict[str, tuple[str, ...]]:
    """Directive -> sources the Chat SDK needs on a page (see the module docstring)."""
    needs: dict[str, list[str]] = {}

    def add(directive: str, sources: Iterable[str]) -> None:
        bucket = needs.setdefault(directive, [])
        for s in sources:
            if s not in bucket:
                bucket.append(s)

    if sdk_url:
        cdn = sdk_origin(sdk_url)
        for directive in ("script-src", "style-src", "img-src", "font-src", "media-src", "frame-src"):
            add(directive, [cdn])
        add("style-src", SDK_INLINE["style-src"])
        add("img-src", SDK_INLINE["img-src"])
        add("font-src", SDK_INLINE["font-src"])
    add("connect-src", sorted(api_origins))
    for directive, sources in (extra or {}).items():
        add(directive, sources)
    return {k: tuple(v) for k, v in needs.items() if v}


# ------------------------------------------------------------------ one policy


def _allows(sources: list[str], wanted: str) -> bool:
    """Does this source list already allow `wanted`? Exact source, `*`, or a covering scheme source."""
    have = {s.lower().rstrip("/") for s in sources}
    w = wanted.lower().rstrip("/")
    if w in have:
        return True
    if w.startswith("'") or "://" not in w:
        return False  # keywords and scheme sources are only ever allowed by themselves
    scheme = w.split("://", 1)[0]
    if "*" in have and scheme in ("http", "https", "ws", "wss"):
        return True
    covering = {"https": ("https:", "http:"), "http": ("http:",), "wss": ("wss:", "ws:"), "ws": ("ws:",)}
    return any(c in have for c in covering.get(scheme, (f"{scheme}:",)))


def has_nonce_or_hash(sources: Iterable[str]) -> bool:
    return any(_NONCE_OR_HASH.match(s) for s in sources)


def _widen(sources: list[str], wanted: Iterable[str]) -> list[str] | None:
    """sources + the wanted ones not yet allowed; None when nothing needs adding."""
    if has_nonce_or_hash(sources):  # browsers ignore 'unsafe-inline' next to a nonce or hash
        wanted = [w for w in wanted if w.lower() != UNSAFE_INLINE]
    missing = [w for w in wanted if not _allows(sources, w)]
    if not missing:
        return None
    kept = [s for s in sources if s.lower() != "'none'"]
    return kept + [m for i, m in enumerate(missing) if m not in missing[:i]]


def patch_policy(policy: str, needs: Mapping[str, Iterable[str]]) -> tuple[str, list[str]]:
    """One serialized policy -> (patched policy, names of the directives changed or added).

    An unchanged policy comes back as the very same string.
    """
    directives: list[list] = []  # [name or None, original text, sources]
    first: dict[str, int] = {}  # a repeated directive is ignored by browsers: only the first counts
    for raw in policy.split(";"):
        text = raw.strip()
        tokens = [t for t in _WS.split(text) if t]
        name = tokens[0].lower() if tokens and _DIRECTIVE_NAME.fullmatch(tokens[0]) else None
        directives.append([name, text, tokens[1:]])
        if name and name not in first:
            first[name] = len(directives) - 1

    changed: list[str] = []
    replaced: dict[int, list[str]] = {}
    added: list[tuple[str, list[str]]] = []
    for kind, wanted in needs.items():
        wanted = list(wanted)
        governing = next((d for d in CHAINS[kind] if d in first), None)
        if governing is None:
            continue  # nothing restricts this kind of load
        index = first[governing]
        if governing in OWN[kind]:
            widened = _widen(replaced.get(index, directives[index][2]), wanted)
            if widened is not None:
                replaced[index] = widened
                changed.append(governing)
        else:
            # Copy the fallback as the page wrote it, so everything else it governs keeps exactly
            # its old sources and the new directive means what the fallback meant, plus ours.
            widened = _widen(directives[index][2], wanted)
            if widened is not None:
                added.append((kind, widened))
                changed.append(kind)
    if not changed:
        return policy, []

    out = []
    for i, (name, text, _) in enumerate(directives):
        if i in replaced:
            out.append(" ".join([name, *replaced[i]]))
        elif text:
            out.append(text)
    out.extend(" ".join([kind, *sources]) for kind, sources in added)
    return "; ".join(out), changed


def _governing(policy: str, kind: str) -> list[str] | None:
    """The sources of the directive that governs `kind` in one policy (None: nothing restricts it)."""
    found: dict[str, list[str]] = {}
    for raw in policy.split(";"):
        tokens = [t for t in _WS.split(raw.strip()) if t]
        if tokens and _DIRECTIVE_NAME.fullmatch(tokens[0]):
            found.setdefault(tokens[0].lower(), tokens[1:])
    return next((found[d] for d in CHAINS[kind] if d in found), None)


def inline_styles_blocked(value: str) -> bool:
    """Does this CSP header value (one or more policies) block <style> elements whatever is added?

    True when a policy's governing style directive allows inline styles only by nonce or hash: the
    SDK's <style> elements carry neither, and 'unsafe-inline' is ignored beside them.
    """
    for policy in value.split(","):
        sources = _governing(policy, "style-src")
        if sources is not None and has_nonce_or_hash(sources):
            return True
    return False


def patch_header_value(value: str, needs: Mapping[str, Iterable[str]]) -> tuple[str, list[str]]:
    """A Content-Security-Policy header value, which may hold several comma-separated policies."""
    policies = value.split(",")
    changed: list[str] = []
    patched = []
    for policy in policies:
        new, names = patch_policy(policy, needs)
        patched.append(new if not names else (" " if policy[:1].isspace() else "") + new)
        changed.extend(n for n in names if n not in changed)
    if not changed:
        return value, []
    return ",".join(patched), changed
