"""mitmweb before 11.1.2 serves its web API without authentication (CVE-2025-23217): any program or web page
that reaches its port reads every flow and changes options; the flows hold what coze-mitm protects.

Loaded into such a mitmweb (`mitmweb -s addons/coze.py`), coze-mitm says so in one line and ends the
process (exit 1) from its first `configure`, before any server listens, the web one included (an ERROR line
alone would stop the start-up only after the servers were up). mitmdump, mitmproxy's console and mitmweb >= 11.1.2 (a token is required) are not affected.
The wording is run_mitm.py --web's (launcher/runner.py), which refuses the same mitmweb before starting it.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx
from mitmproxy import version as mitmproxy_version

from coze_mitm.core.versions import MITMWEB_FIXED, version_tuple

log = logging.getLogger("coze.web_guard")



def is_mitmweb(master) -> bool:
    """mitmweb's master is a WebMaster (mitmproxy.tools.web.master), the only one with the web_* options."""
    return type(master).__name__ == "WebMaster" or "web_port" in getattr(master, "options", ())


def refusal(version: str) -> str:
    return (f"coze-mitm: mitmweb {version} serves its web API without authentication (CVE-2025-23217, fixed in "
            "mitmproxy 11.1.2): any program or web page that can reach its port could read the flows and change "
            "options, so coze-mitm does not run in it. Use Python 3.12+ with mitmproxy 12 "
            "(pip install 'mitmproxy>=12'), or mitmdump (not affected)")


class MitmwebGuard:
    def __init__(self):
        self.checked = False

    def configure(self, updated):
        if self.checked:
            return
        self.checked = True
        master = getattr(ctx, "master", None)
        if master is None or not is_mitmweb(master):
            return
        if version_tuple(mitmproxy_version.VERSION) < MITMWEB_FIXED:
            log.error(refusal(mitmproxy_version.VERSION))
            raise SystemExit(1)  # now, before any server (the web one included) listens; the line above is shown
