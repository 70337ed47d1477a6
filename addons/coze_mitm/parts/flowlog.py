"""One log line per flow coze-mitm acted on, written when the flow ends; optionally nothing else per flow.

    coze-mitm: injected POST api.coze.cn/v3/chat for user 1732…AAAA -> 200
    coze-mitm: refused POST api.coze.cn/v3/chat (origin-not-allowed) -> 403: <what to do>
    coze-mitm: preflight OPTIONS api.coze.cn/v3/chat from https://example.org -> 204

The line is made from what the other addons left on the flow (flow.metadata), so it says what happened,
not what was intended: a retried request shows the retry's outcome, a stream that broke shows the error.
No query string (a WebSocket tag may ride there), no header, never a token: users by identity.short_id.

`coze_quiet` (run_mitm.py sets it, with flow_detail=0, unless it is given -v) makes this line the log:
mitmproxy's own per-connection lines ("client connect", "server disconnect ...", "Streaming response from ...")
are hidden and every flow coze-mitm acted on gets its line; in mitmdump it is then printed straight to the terminal
in mitmproxy's own format (see `TerminalLine`). Otherwise (plain `mitmdump -s`, whatever its
flow_detail; plain `mitmweb -s`, whose flow list is the log) only refusals, retries and errors get one: a log record is
an event to every addon of mitmproxy (~300 us of CPU a line on a 2-core Xeon), which the fast path of a
cached-token request does not pay unless the per-flow log was asked for.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import weakref

from mitmproxy import ctx, http
from mitmproxy import log as mitmproxy_log
from mitmproxy.utils import vt_codes

from coze_mitm.after_answer import after_answer
from coze_mitm.flowmeta import CORS_ORIGIN, COZE_USER, LOCAL_ANSWER, REFUSED, TOKEN_RETRY
from coze_mitm.core.identity import short_id

log = logging.getLogger("coze.flowlog")

MAX_PATH = 120
MAX_MSG = 300
# Where mitmproxy 11.0.2 and 12.x log connections (ConnectionHandler.log, INFO), and what it says there
# per connection or per stream; its warnings (TLS handshake failed, ...) and other lines stay.
CONNECTION_LOGGER = "mitmproxy.proxy.server"
CHATTER_RE = re.compile(
    r"client (connect|disconnect|kill connection)$|server (connect|disconnect) |Streaming (request to|response from) "
)


# The status page's CA probe (https://coze.mitm/ca-probe.png) fails by design in a browser that does not
# trust the mitmproxy CA yet, and the page itself says so: mitmproxy's warning for that one name is lowered
# to DEBUG (shown with termlog_verbosity=debug), whatever coze_quiet says. Any other host's stays a warning.
PROBE_TLS_RE = re.compile(r"Client TLS handshake failed\. .*\bfor coze\.mitm(:\d+)?(?=[\s,(]|$)")


class ProbeHandshake(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and PROBE_TLS_RE.match(str(record.msg)):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


class TerminalLine:
    """mitmdump's terminal gets the per-flow line the way its own log handler would print it ("[12:00:00.123]
    coze-mitm: ..."), without the trip through the logging module. A log record there is also an event to every
    addon (mitmproxy's legacy `add_log` event: a wake-up of the event loop and a walk of the addon tree), which cost
    ~300 us of CPU per line, more than the process tuning saves. Here a line costs a clock read, a join and one
    write: mitmproxy's formatter is asked once for the shape of an INFO line (its colours, where the time goes),
    and the time of day is formatted once a second, as mitmproxy's `formatTime` would. Only where mitmdump prints
    the log (its Dumper is loaded) and its verbosity shows INFO."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.formatter = mitmproxy_log.MitmFormatter(vt_codes.ensure_supported(self.out))
        self._shape = self._shape_of_a_line()
        self._second, self._clock = -1, ""

    def _shape_of_a_line(self) -> tuple[str, str, str] | None:
        """(before the time, between the time and the message, after the message) of mitmproxy's INFO line;
        None if the formatter's line is not one of that shape (then every line is formatted by it)."""
        record = logging.LogRecord(log.name, logging.INFO, __file__, 0, "\0", None, None)
        line, clock = self.formatter.format(record), self.formatter.formatTime(record)
        before, found, rest = line.partition(clock)
        between, marker, after = rest.partition("\0")
        if not found or not marker or "\0" in after:
            return None
        record.created, record.msecs = 1700000000.25, 250.0  # formatTime's default: "%H:%M:%S", then ".%03d"
        if self.formatter.formatTime(record) != time.strftime(self.formatter.default_time_format,
                                                              time.localtime(1700000000)) + ".250":
            return None
        return before, between, after

    def line(self, message: str, now: float) -> str:
        """The line mitmproxy's formatter makes of an INFO record of `message` created at `now` (time.time())."""
        if self._shape is None:
            record = logging.LogRecord(log.name, logging.INFO, __file__, 0, message, None, None)
            record.created, record.msecs = now, int((now - int(now)) * 1000)
            return self.formatter.format(record)
        second = int(now)
        if second != self._second:
            # formatTime's default: the local time, "%H:%M:%S", then ".%03d" of the milliseconds (truncated)
            self._second, self._clock = second, time.strftime(self.formatter.default_time_format, time.localtime(second))
        before, between, after = self._shape
        return f"{before}{self._clock}.{int((now - second) * 1000):03d}{between}{message}{after}"

    def write(self, message: str) -> None:
        try:
            self.out.write(self.line(message, time.time()) + "\n")  # one write: print() makes two unbuffered
        except (OSError, ValueError):
            pass  # a closed terminal: mitmproxy's own handler decides what that means


def prints_info(options) -> bool:
    """Does mitmdump print INFO lines (termlog_verbosity info/alert/debug; -q makes it error)?"""
    return getattr(options, "termlog_verbosity", "info") in ("info", "alert", "debug")


class ConnectionChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not CHATTER_RE.match(str(record.msg))


def _clean(text: str, limit: int) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _refusal_msg(flow: http.HTTPFlow) -> str:
    """The "msg" of the local answer in Coze's envelope: what the page was told to do."""
    response = flow.response
    if response is None or not flow.metadata.get(LOCAL_ANSWER) or len(response.raw_content or b"") > 8192:
        return ""
    try:
        msg = json.loads(response.raw_content).get("msg", "")
    except (ValueError, AttributeError):
        return ""
    return _clean(msg, MAX_MSG) if isinstance(msg, str) else ""


class FlowLog:
    def __init__(self):
        self._filter = ConnectionChatter()
        self._probe_filter = ProbeHandshake()
        self._logged: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        # Every flow's line only where it is the log (coze_quiet with mitmproxy's own flow lines off, as
        # run_mitm.py runs it); otherwise only what mitmproxy's flow lines or flow list cannot say.
        self._every_flow = False
        self._terminal: TerminalLine | None = None  # mitmdump with the per-flow log: printed straight there


    def configure(self, updated):
        logging.getLogger(CONNECTION_LOGGER).addFilter(self._probe_filter)  # once (logging keeps one); removed at done
        if "flow_detail" in updated or "coze_quiet" in updated:
            # flow_detail is the Dumper's option: absent in mitmweb and bare test contexts.
            self._every_flow = ctx.options.coze_quiet and not getattr(ctx.options, "flow_detail", 0)
        if updated & {"flow_detail", "coze_quiet", "termlog_verbosity"}:
            # mitmdump (its Dumper's flow_detail exists) prints its log on the terminal; mitmweb keeps the line in
            # its event log, so there it stays a log record.
            in_mitmdump = "flow_detail" in ctx.options and ctx.master.addons.get("termlog") is not None
            self._terminal = (TerminalLine() if self._every_flow and in_mitmdump and prints_info(ctx.options)
                              else None)
        if "coze_quiet" not in updated:
            return
        logger = logging.getLogger(CONNECTION_LOGGER)
        if ctx.options.coze_quiet:
            logger.addFilter(self._filter)
        else:
            logger.removeFilter(self._filter)

    def done(self):
        logging.getLogger(CONNECTION_LOGGER).removeFilter(self._filter)
        logging.getLogger(CONNECTION_LOGGER).removeFilter(self._probe_filter)

    # ------------------------------------------------------------------ the end of a flow

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None and self._says_something(flow):  # a WebSocket ends later, in websocket_end
            after_answer(self._log, flow)  # the line waits for the answer, not the answer for the line

    def error(self, flow: http.HTTPFlow) -> None:
        self._log(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._log(flow)

    def _says_something(self, flow: http.HTTPFlow) -> bool:
        meta = flow.metadata
        return self._every_flow or REFUSED in meta or TOKEN_RETRY in meta or flow.error is not None

    def _log(self, flow: http.HTTPFlow) -> None:
        if not self._says_something(flow):
            return  # the fast path: nothing to say about this flow
        if flow in self._logged:
            return
        line = describe(flow)
        if line:
            self._logged.add(flow)
            if self._terminal is not None and REFUSED not in flow.metadata and flow.error is None:
                self._terminal.write(line)  # the everyday line; refusals and errors stay log records
            else:
                log.info(line)


def describe(flow: http.HTTPFlow) -> str:
    """The line for a flow coze-mitm acted on, or "" for any other flow."""
    meta, request = flow.metadata, flow.request
    if REFUSED not in meta and CORS_ORIGIN not in meta and COZE_USER not in meta:
        return ""  # most flows through the proxy: nothing to say, nothing to build
    what = f"{request.method} {request.host}{_clean(request.path.split('?')[0], MAX_PATH)}"
    outcome = "->"
    if flow.response is not None:
        outcome += f" {flow.response.status_code}" + (" WebSocket, closed" if flow.websocket is not None else "")
    if flow.error is not None:
        # Which server it was for: a connection error ("Connection refused", a DNS failure) names no host itself.
        where = _clean(f"{request.host}:{request.port}", MAX_PATH)
        outcome += ("," if flow.response is not None else "") + f" error ({where}): {_clean(flow.error.msg, MAX_MSG)}"
    if REFUSED in meta:
        msg = _refusal_msg(flow)
        return f"coze-mitm: refused {what} ({_clean(str(meta[REFUSED]), 40)}) {outcome}" + (f": {msg}" if msg else "")
    if _is_preflight(flow):
        return f"coze-mitm: preflight {what} from {_clean(meta[CORS_ORIGIN], MAX_PATH)} {outcome}"
    if COZE_USER in meta:
        line = f"coze-mitm: injected {what} for user {short_id(meta[COZE_USER])} {outcome}"
        retry = meta.get(TOKEN_RETRY)
        return line + (f"; token retry: {_clean(str(retry), MAX_MSG)}" if retry else "")
    return ""


def _is_preflight(flow: http.HTTPFlow) -> bool:
    """The Cors addon answers every preflight it marks with CORS_ORIGIN itself (never upstream)."""
    return (flow.request.method == "OPTIONS" and CORS_ORIGIN in flow.metadata
            and "access-control-request-method" in flow.request.headers)
