"""Server-sent events go to the client chunk by chunk: a chat reply renders token by token.

mitmproxy buffers whole responses by default, which would deliver every delta at the end.
This runs for every host the proxy intercepts (page hosts too), since buffering breaks any SSE.
"""

from mitmproxy import http

from coze_mitm.core import fields


class Streaming:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if not flow.response:
            return
        if fields.get(flow.response.headers, b"content-type").lower().startswith("text/event-stream"):
            flow.response.stream = True
