"""Work the answer does not wait for: done once the `response` hook that asked for it has returned and the answer
has been handed to the client's socket.

mitmproxy runs each hook of a flow in a task of its own and, when every addon has returned, hands the answer to
the client's socket from that same task before it ends (proxy/server.py: `hook_task` awaits the hooks, then
`server_event` writes; mitmproxy 11 and 12). So a callback added to that task's done-callbacks runs after the
write. (Queuing it with the loop's `call_soon` is not enough: with mitmproxy 12's eager task factory the hook's
task can wait for the connection's event lock after the hooks return, and the queued callback would run first.)
Work queued here (the per-flow log line) costs the waiting client nothing.

Only what neither the client nor a later hook depends on may be queued here: the answer has left by then, and
mitmproxy may already have run later hooks of the same connection (mitmproxy 12: a pipelined request's, or those of a
WebSocket whose first message came with its upgrade request). So accounting's release of a chat's place is not.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("coze.after_answer")


def after_answer(callback, *args) -> None:
    """callback(*args) when the task running this hook ends; at once outside a task (a hook a test calls)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop running
        task = None
    if task is None or task.done():
        callback(*args)
        return
    task.add_done_callback(lambda _: _guarded(callback, args))


def _guarded(callback, args) -> None:
    # As an exception in a hook is reported ("Addon error") and the proxy goes on: never the loop's default
    # handler, which would print a bare traceback under a line that names no part.
    try:
        callback(*args)
    except Exception as e:
        owner = getattr(callback, "__self__", None)
        name = getattr(callback, "__qualname__", repr(callback))
        if owner is not None:
            name = f"{type(owner).__name__}.{getattr(callback, '__name__', name)}"
        log.error(f"Addon error: {name} (after the answer left): {e}", exc_info=True)
