"""Messages of a conversation: list (paged), delete, and the thumbs up/down feedback."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .common import is_int
from .conversations import find_conversation

if TYPE_CHECKING:
    from .server import Handler
    from .state import State

FEEDBACK_TYPES = ("like", "unlike")


def list_(st: "State", req: "Handler") -> None:
    """POST /v1/conversation/message/list?conversation_id {order?, chat_id?, before_id?, after_id?, limit?}"""
    conv, err = find_conversation(st, req.session, req.query.get("conversation_id"))
    if err:
        return req.error(*err)
    data = req.json_body()
    if data is None:
        return req.error(4000, "request body must be a JSON object")
    limit = data.get("limit")
    limit = min(50, max(1, limit)) if is_int(limit) else 50
    with st.lock:
        msgs = list(conv["messages"])
    if data.get("chat_id"):
        msgs = [m for m in msgs if m["chat_id"] == data["chat_id"]]
    if data.get("order", "desc") != "asc":
        msgs.reverse()
    ids = [m["id"] for m in msgs]
    if data.get("after_id"):
        msgs = msgs[ids.index(data["after_id"]) + 1:] if data["after_id"] in ids else []
        page = msgs[:limit]
    elif data.get("before_id"):
        msgs = msgs[:ids.index(data["before_id"])] if data["before_id"] in ids else []
        page = msgs[-limit:]
    else:
        page = msgs[:limit]
    req.ok(
        [_public(m) for m in page],
        first_id=page[0]["id"] if page else "",
        last_id=page[-1]["id"] if page else "",
        has_more=len(msgs) > len(page),
    )


def _public(msg: dict) -> dict:
    return {k: v for k, v in msg.items() if k != "feedback"}


def _find_message(st: "State", req: "Handler", conv_id: str | None, msg_id: str | None) -> tuple[dict | None, dict | None]:
    """-> (conversation, message), having answered the error when either is not the caller's."""
    conv, err = find_conversation(st, req.session, conv_id)
    if err:
        req.error(*err)
        return None, None
    with st.lock:
        msg = next((m for m in conv["messages"] if m["id"] == msg_id), None)
    if msg is None:
        req.error(4000, f"message {msg_id} does not exist in conversation {conv_id}")
        return None, None
    return conv, msg


def delete(st: "State", req: "Handler") -> None:
    """POST /v1/conversation/message/delete?conversation_id&message_id: answers the deleted message."""
    conv, msg = _find_message(st, req, req.query.get("conversation_id"), req.query.get("message_id"))
    if msg is None:
        return
    with st.lock:
        conv["messages"] = [m for m in conv["messages"] if m["id"] != msg["id"]]
    req.ok(_public(msg))


def feedback(st: "State", req: "Handler", conv_id: str, msg_id: str) -> None:
    """POST /v1/conversations/{cid}/messages/{mid}/feedback {feedback_type: like|unlike, comment?, reason_types?}"""
    conv, msg = _find_message(st, req, conv_id, msg_id)
    if msg is None:
        return
    data = req.json_body()
    if data is None or data.get("feedback_type") not in FEEDBACK_TYPES:
        return req.error(4000, f"feedback_type must be one of {FEEDBACK_TYPES}")
    comment = data.get("comment") if isinstance(data.get("comment"), str) else ""
    reasons = [r for r in data.get("reason_types") or [] if isinstance(r, str)]
    with st.lock:
        msg["feedback"] = {"feedback_type": data["feedback_type"], "comment": comment[:1000], "reason_types": reasons}
    req.ok({})


def feedback_delete(st: "State", req: "Handler", conv_id: str, msg_id: str) -> None:
    """DELETE /v1/conversations/{cid}/messages/{mid}/feedback"""
    conv, msg = _find_message(st, req, conv_id, msg_id)
    if msg is None:
        return
    with st.lock:
        msg.pop("feedback", None)
    req.ok({})
