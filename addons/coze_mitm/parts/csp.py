"""Pages in coze_origins: their Content-Security-Policy gets the Chat SDK's sources, nothing else.

The userscript loads the Coze Web Chat SDK from its CDN into the page, and the SDK calls the Coze API
from the page; a page whose CSP does not list those origins blocks both. The older two-server design
failed on exactly these pages, which is why the proxy intercepts the page hosts at all.

* Only documents (HTML responses) whose request went to an origin in coze_origins are touched, and
  only their enforced policies: every Content-Security-Policy header (each is enforced on its own, so
  each is patched on its own) and <meta http-equiv="Content-Security-Policy"> tags in the head.
  Content-Security-Policy-Report-Only blocks nothing and is left alone; so is a page without a CSP.
* What is added, and how fallbacks, 'none', nonces and 'strict-dynamic' are handled: csp_policy.py
  (pure logic, tested on its own).
* The proxy's own pages (http://coze.mitm/) keep their own strict policy.
* connect-src gets the API origins the pages really call: in the demo, http://sandbox.coze.mitm
  rather than the sandbox's loopback address (demo.page_api_origins).
* A page whose style directive allows inline styles only by nonce or hash blocks the SDK's <style>
  elements whatever is added: said once per origin in the log and on the status page.
"""

from __future__ import annotations

import logging
import re

from mitmproxy import ctx, http

from coze_mitm import options
from coze_mitm.parts import demo
from coze_mitm.core.bounded import decoded_prefix
from coze_mitm.core.csp_meta import meta_policies, patch_meta_tags
from coze_mitm.core.csp_policy import inline_styles_blocked, parse_extra, patch_header_value, resolve_sdk_url, sdk_needs
from coze_mitm.core.stats import Stats
from coze_mitm.parts.lifecycle import Lifecycle
from coze_mitm.parts.settings import CozeSettings
from coze_mitm.flowmeta import CSP_PAGE, CSP_DONE

log = logging.getLogger("coze.csp")

HTML_TYPES = ("text/html", "application/xhtml+xml")
DOCUMENT_DESTS = ("document", "iframe", "frame")
_META_HINT = re.compile(rb"content-security-policy", re.IGNORECASE)
# A page bigger than this (decoded) keeps its meta tags as they are: a small compressed body can decode to
# GiBs, and the rewrite needs the whole page in memory, on the event loop.
MAX_PAGE = 8 * 1024 * 1024


class Csp:
    acts_on_coze_api = False  # the user's pages (a page origin that is also an API origin is not skipped)

    def __init__(self, settings: CozeSettings, lifecycle: Lifecycle | None = None, stats: Stats | None = None):
        self.settings = settings
        self.lifecycle = lifecycle or Lifecycle()  # started: a bad value is rolled back
        self.stats = stats or Stats()  # its page_notes: why a page's chat is unstyled (the status page shows them)
        self.enabled = True
        self.needs: dict[str, tuple[str, ...]] = {}
        self._announced: set[str] = set()

    @property
    def in_use(self) -> bool:
        """The bundle calls no hook of this part while it is off."""
        return self.enabled

    def configure(self, updated):
        opts = ctx.options
        self.enabled = opts.coze_csp
        try:
            extra = parse_extra(opts.coze_csp_extra)
        except ValueError as e:
            if "coze_csp_extra" in updated:
                options.refuse(f"coze-mitm: {e}", started=self.lifecycle.started)
            extra = {}
        api_origins = sorted(str(o) for o in self.settings.api_origins)
        try:
            sdk_url = resolve_sdk_url(opts.coze_sdk_url, api_origins)
        except ValueError:
            sdk_url = None  # the status addon reports a bad coze_sdk_url; the API's origins still get in
        self.needs = sdk_needs(sdk_url, demo.page_api_origins(self.settings), extra)
        self._announced.clear()
        self.stats.page_notes.clear()

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live or not self.enabled:
            return
        request = flow.request
        if request.scheme not in ("http", "https") or self.settings.is_status_host(request):
            return
        origin = self.settings.page_origin_of(request)
        if origin is not None:
            # Decided now: map_remote and other addons may rewrite the destination later.
            flow.metadata[CSP_PAGE] = origin

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # The headers of a streamed response leave after this hook: patch them now.
        self._patch_headers(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        # Answers made locally in `request` (by a later addon) never pass responseheaders.
        self._patch_headers(flow)
        self._patch_meta(flow)

    def _is_document(self, flow: http.HTTPFlow) -> bool:
        response = flow.response
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type in HTML_TYPES:
            return True
        # A 304 carries no body type, but its headers update the cached page's: patch it the same way.
        dest = flow.request.headers.get("sec-fetch-dest", "").lower()
        return response.status_code == 304 and dest in DOCUMENT_DESTS

    def _patch_headers(self, flow: http.HTTPFlow) -> None:
        origin = flow.metadata.get(CSP_PAGE)
        if not origin or not flow.response or flow.metadata.get(CSP_DONE):
            return
        flow.metadata[CSP_DONE] = True
        if not self.needs or not self._is_document(flow):
            return
        headers = flow.response.headers
        values = headers.get_all("content-security-policy")
        if not values:
            return
        changed: list[str] = []
        patched = []
        for value in values:
            new, names = patch_header_value(value, self.needs)
            patched.append(new)
            changed.extend(n for n in names if n not in changed)
        if changed:
            headers.set_all("content-security-policy", patched)
            self._note(flow, origin, "header", changed)
        if any(inline_styles_blocked(v) for v in patched):
            self._unstyled(origin, "header")

    def _patch_meta(self, flow: http.HTTPFlow) -> None:
        origin = flow.metadata.get(CSP_PAGE)
        response = flow.response
        if not origin or not response or response.stream or not self.needs or not self._is_document(flow):
            return
        content = decoded_prefix(response.raw_content or b"", response.headers.get("content-encoding", ""), MAX_PAGE + 1)
        if not content or not _META_HINT.search(content):
            return  # no meta CSP (or a body we do not decode): leave it exactly as it came
        if len(content) > MAX_PAGE:
            log.debug(f"coze-mitm: {flow.request.pretty_url}: page over {MAX_PAGE // 2**20} MiB, meta CSP left as it is")
            return
        text = response.get_text(strict=False)
        if text is None:
            return
        new, changed = patch_meta_tags(text, self.needs)
        if changed:
            response.text = new
            self._note(flow, origin, "meta tag", changed)
        if any(inline_styles_blocked(v) for v in meta_policies(new)):
            self._unstyled(origin, "meta tag")

    def _unstyled(self, origin: str, where: str) -> None:
        notes = self.stats.page_notes
        if origin in notes:
            return
        notes[origin] = (
            f"The chat is unstyled here: this page's Content-Security-Policy {where} allows inline styles only by "
            "nonce or hash, so the Chat SDK's <style> elements are blocked (browsers ignore 'unsafe-inline' next to "
            "a nonce or hash, so coze_csp_extra cannot fix it). The page itself must allow inline styles: "
            "style-src 'unsafe-inline' without a nonce or hash."
        )
        log.warning(f"coze-mitm: {origin}: {notes[origin]}")

    def _note(self, flow: http.HTTPFlow, origin: str, where: str, changed: list[str]) -> None:
        what = f"CSP {where} extended for the Coze Chat SDK ({', '.join(changed)})"
        flow.comment = f"{flow.comment}; {what}" if flow.comment else f"coze-mitm: {what}"
        key = f"{origin} {where}"
        if key not in self._announced:
            self._announced.add(key)
            log.info(f"coze-mitm: {origin} sends a Content-Security-Policy {where}; added the Chat SDK's sources "
                     f"to {', '.join(changed)} (nothing else changed)")
        else:
            log.debug(f"coze-mitm: {flow.request.pretty_url}: {what}")
