"""coze-mitm's package (addons/coze.py loads it). READY: the line the lifecycle part (parts/lifecycle.py) prints
from `running` (when started by run_mitm.py, coze_launcher set) once every part of coze-mitm started in a starting
mitmproxy; run_mitm.py waits for it before it says the proxy runs (a script that failed to load leaves a plain
proxy that says nothing, mitmproxy-notes.md)."""

READY = "coze-mitm: loaded, running"
