"""Page origins outside coze_origins that asked for Coze: noted by the parts that refuse them (cors: a preflight,
auth: a tagged request, direct_api: the proxy's own address as an API), shown by the status page, said in the
log now and then (the bounds: core/refused_origins.py). The list says what the coze_origins in force refuse:
it starts again when coze_origins changes.
"""

from __future__ import annotations

import logging

from coze_mitm.core.refused_origins import RefusedOrigins

log = logging.getLogger("coze.origins")


class RefusedOriginsLog:
    name = "refused_origins"

    def __init__(self):
        self._origins = RefusedOrigins()

    def configure(self, updated):
        if "coze_origins" in updated:
            self._origins.clear()

    def note(self, origin: str, what: str, *, logged_already: bool = False) -> None:
        """A page outside coze_origins asked for Coze: remembered for the status page, and said in the log now
        and then unless the caller's own line said it (a refusal's flow line)."""
        line = self._origins.note(origin, what)
        if line and not logged_already:
            log.warning(line)

    def recent(self) -> list[dict]:
        """Newest first: origin, how often, when last, what it asked."""
        return self._origins.recent()
