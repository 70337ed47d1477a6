"""Where the proxy is in its life, for the parts that must tell a start-up from a running proxy.

A bad coze_* value is said differently then (options.refuse): at start-up one line and mitmdump exits; once the
proxy runs (mitmweb's option editor, `set` in the console) an OptionsError, so mitmproxy keeps the value in force.
mitmproxy keeps no such flag itself (a reloaded script is configured before its `running`, while mitmproxy's
script loader already runs), so one object per loaded bundle holds it: made by coze.py, handed to the parts
that refuse values, last in the bundle so that `started` turns true once every part ran its `running`.
"""

from __future__ import annotations

from mitmproxy import ctx

import coze_mitm


class Lifecycle:
    def __init__(self):
        self.started = False  # every part ran `running` (a script reload makes a new one: False until then)

    def running(self):
        self.started = True
        if getattr(ctx.options, "coze_launcher", ""):
            # run_mitm.py waits for this line (the proxy runs WITH coze-mitm, every part started): printed, not
            # logged, so that no termlog_verbosity hides it; plain mitmdump shows nothing
            print(coze_mitm.READY, flush=True)
