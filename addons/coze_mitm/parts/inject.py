"""coze_inject: the chat on allowed pages without a userscript manager (off by default; run_mitm.py --browser sets it).

The loader (core/inject.py: the served userscript in a wrapper standing in for the userscript manager) is added to
HTML documents of pages in coze_origins, with a hash source for it in their Content-Security-Policy where the page's
script policy would block it (headers and <meta> tags; a 304's headers too, since they replace the cached page's).

Bounded and narrow, like csp.py's meta rewrite:
* only GET navigations of top-level documents (Sec-Fetch-Dest document, or no such header) to an allowed origin,
  decided on the request as the browser sent it; never the proxy's own pages (coze.mitm, the demo's page);
* only a 200 text/html answer whose body is not streamed, decoded (any Content-Encoding core/bounded.py reads) to at
  most csp.MAX_PAGE bytes; anything else passes exactly as it came;
* nothing when the served userscript cannot be built (no template).
The flow's comment says what was added, so mitmweb shows it.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, http

from coze_mitm.core.bounded import decoded_prefix
from coze_mitm.core.inject import allow_loader, allow_loader_in_meta, insert_loader, loader_script, script_hash
from coze_mitm.flowmeta import INJECT_PAGE
from coze_mitm.parts.csp import MAX_PAGE
from coze_mitm.parts.settings import CozeSettings

log = logging.getLogger("coze.inject")


class Inject:
    acts_on_coze_api = False  # the user's pages (a page origin that is also an API origin is not skipped)

    def __init__(self, settings: CozeSettings, status):
        self.settings = settings
        self.status = status  # the StatusPages part: the userscript it serves (filled for this proxy) is the loader
        self.enabled = False
        self._built_from: bytes | None = None
        self._script = ""
        self._hash = ""
        self._announced: set[str] = set()

    @property
    def in_use(self) -> bool:
        """The bundle calls no hook of this part while it is off."""
        return self.enabled

    def configure(self, updated):
        if "coze_inject" in updated:
            self.enabled = bool(ctx.options.coze_inject)
            self._announced.clear()

    def _loader(self) -> tuple[str, str] | None:
        """(script text, its CSP hash source), rebuilt only when the served userscript changed."""
        served = self.status.userscript
        if not served:
            return None
        if served is not self._built_from:
            self._script = loader_script(served.decode("utf-8"))
            self._hash = script_hash(self._script)
            self._built_from = served
        return self._script, self._hash

    def request(self, flow: http.HTTPFlow) -> None:
        if not self.enabled or flow.response or not flow.live:
            return
        request = flow.request
        if request.method != "GET" or request.scheme not in ("http", "https") or self.settings.is_status_host(request):
            return
        if request.headers.get("sec-fetch-dest", "document").lower() != "document":
            return  # frames, fetches, scripts: the userscript runs in top-level pages only (@noframes)
        origin = self.settings.page_origin_of(request)
        if origin is not None:
            flow.metadata[INJECT_PAGE] = origin  # decided now: map_remote and others may rewrite the URL later

    def response(self, flow: http.HTTPFlow) -> None:
        origin = flow.metadata.get(INJECT_PAGE)
        response = flow.response
        if not origin or response is None or response.stream or not self.enabled:
            return
        loader = self._loader()
        if loader is None:
            return
        script, source = loader
        if response.status_code == 304:
            self._allow_in_headers(response, source)  # they replace the cached page's, which has the loader
            return
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if response.status_code != 200 or content_type != "text/html":
            return
        content = decoded_prefix(response.raw_content or b"", response.headers.get("content-encoding", ""), MAX_PAGE + 1)
        if content is None or len(content) > MAX_PAGE:
            log.debug(f"coze-mitm: {flow.request.pretty_url}: body not decoded or over {MAX_PAGE // 2**20} MiB, "
                      "no loader added")
            return
        text = response.get_text(strict=False)
        if text is None:
            return
        text, in_meta = allow_loader_in_meta(text, source)
        response.text = insert_loader(text, script)
        in_header = self._allow_in_headers(response, source)
        where = [w for w, changed in (("header", in_header), ("meta tag", in_meta)) if changed]
        what = "chat loader added" + (f" (its hash allowed by the CSP {' and '.join(where)})" if where else "")
        flow.comment = f"{flow.comment}; {what}" if flow.comment else f"coze-mitm: {what}"
        if origin not in self._announced:
            self._announced.add(origin)
            log.info(f"coze-mitm: {origin}: the chat loader is added to its pages (coze_inject)")

    @staticmethod
    def _allow_in_headers(response: http.Response, source: str) -> bool:
        values = response.headers.get_all("content-security-policy")
        if not values:
            return False
        patched = [allow_loader(v, source) for v in values]
        if not any(names for _, names in patched):
            return False
        response.headers.set_all("content-security-policy", [v for v, _ in patched])
        return True
