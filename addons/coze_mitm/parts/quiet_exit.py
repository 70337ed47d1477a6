"""Stopping the proxy while clients are still connected prints no traceback.

At exit, asyncio.run cancels the tasks still running, among them mitmproxy's handler of every client
connection that is still open (a browser's keep-alive, a chat stream in flight). asyncio's streams
(Python 3.11 and 3.12) then call `task.exception()` on the cancelled task in a done-callback, which
raises CancelledError there; with mitmproxy's own exception handler already removed, the loop's
default handler prints it as a 17-line traceback per open connection. Nothing failed: the
connections are closed either way. This addon makes the loop's default handler drop exactly that
report (a CancelledError in that callback) and pass every other one on unchanged.
"""

from __future__ import annotations

import asyncio

_MARK = "_coze_quiet_exit"


def _is_cancelled_connection(context: dict) -> bool:
    callback = getattr(context.get("handle"), "_callback", None)
    return (isinstance(context.get("exception"), asyncio.CancelledError)
            and getattr(callback, "__qualname__", "").startswith("StreamReaderProtocol.connection_made."))


class QuietExit:
    def load(self, loader):
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (a test context): nothing to quiet
        default = loop.default_exception_handler
        if getattr(default, _MARK, False):
            return  # already installed (the script was reloaded)

        # Not loop.set_exception_handler: mitmproxy sets its own while it runs and, on the way out, puts back
        # the one it found before (none), which is when these reports come. The default handler stays.
        def quiet_default(context: dict) -> None:
            if not _is_cancelled_connection(context):
                default(context)

        setattr(quiet_default, _MARK, True)
        loop.default_exception_handler = quiet_default
