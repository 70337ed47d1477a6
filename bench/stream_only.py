"""The smallest useful mitmproxy script for this benchmark's reference path: stream text/event-stream
responses (what any SSE-friendly mitmproxy set-up needs), nothing else."""


class StreamEvents:
    def responseheaders(self, flow):
        if flow.response.headers.get("content-type", "").startswith("text/event-stream"):
            flow.response.stream = True


addons = [StreamEvents()]
