"""The least a credential-swapping mitmproxy script does, for the benchmark's attribution (python bench/run.py):
a request whose Authorization is a `Bearer user:` tag leaves with a real token instead (COZE_BENCH_TOKEN), and the
stored flow gets the tag back once the request has left. No origin check, no per-user token, no CORS, no budget,
no answer read: a floor under what any such proxy pays in mitmproxy's addon API, against which the bundle's own
work can be read. Not a part of coze-mitm.
"""

import os

TOKEN = os.environ.get("COZE_BENCH_TOKEN", "")


class LeastSwap:
    def request(self, flow):
        tag = flow.request.headers.get("authorization", "")
        if tag.startswith("Bearer user:"):
            flow.request.headers["authorization"] = f"Bearer {TOKEN}"
            flow.metadata["least_swap"] = tag

    def responseheaders(self, flow):
        tag = flow.metadata.pop("least_swap", None)
        if tag is not None:
            flow.request.headers["authorization"] = tag  # no view of the flow shows the token


addons = [LeastSwap()]
