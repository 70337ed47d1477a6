"""Chats: ``/v3/chat`` (JSON or streamed as SSE), ``/v1/workflows/chat`` (app mode, streamed), cancel,
retrieve, and a chat's messages. The reply is canned ("Sandbox reply to: ..."), sent word by word
``delta_gap`` seconds apart, and ``conversation.chat.completed`` carries the chat's usage
(common.usage_for: deterministic, so tests know what Coze would charge)."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any, Callable

from .common import CHAT_MODE_ERRORS, reply_for, usage_for, user_text
from .conversations import add_message, create_conversation, find_conversation

if TYPE_CHECKING:
    from .server import Handler
    from .state import State


# ------------------------------------------------------------------ the chat record (shared with ws_events.py)
def new_chat(st: "State", session: str, conv: dict, bot_id: str, user_id: str, messages: list) -> dict:
    """Record a chat, store its additional messages, and decide its reply and usage."""
    text = user_text(messages)
    reply = reply_for(text)
    chat = {
        "id": st.new_id(), "conversation_id": conv["id"], "bot_id": bot_id, "session": session,
        "user_id": user_id, "created_at": int(time.time()), "status": "created", "completed_at": None,
        "failed_at": None, "reply": reply, "usage": usage_for(text, reply),
    }
    with st.lock:
        st.chats[chat["id"]] = chat
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            role = m.get("role") if m.get("role") in ("user", "assistant") else "user"
            add_message(st, conv, role, m["content"], m.get("content_type") or "text", chat_id=chat["id"], bot_id=bot_id)
    return chat


def chat_obj(chat: dict) -> dict:
    obj = {k: chat[k] for k in ("id", "conversation_id", "bot_id", "created_at", "status")}
    obj["last_error"] = {"code": 0, "msg": ""}
    if chat.get("completed_at"):
        obj["completed_at"] = chat["completed_at"]
    if chat.get("failed_at"):
        obj["failed_at"] = chat["failed_at"]
    if chat["status"] == "completed":
        obj["usage"] = dict(chat["usage"])
    return obj


def run_stream(st: "State", conv: dict, chat: dict, emit: Callable[[str, Any], None],
               cut_after: int | None = None, on_cut: Callable[[], None] | None = None) -> str:
    """Play a chat's events through ``emit(event, data)``: created, in_progress, one delta per word,
    message completed, chat completed (with usage). Returns how it ended: "completed", "canceled" (the
    chat was canceled meanwhile), "cut" (chat_mode cut) or "stopped" (the sandbox is stopping).

    With ``on_cut`` (HTTP streams), chat_mode cut calls it once at the cut and the chat runs on to its end (as
    Coze's chats do when the connection breaks: completed and billed; ``emit`` is then expected to send
    nothing), and ``conversation.chat.completed`` comes ``delta_gap`` after ``conversation.message.completed``."""
    msg_id = st.new_id()
    base = {"id": msg_id, "conversation_id": conv["id"], "section_id": conv["section_id"],
            "bot_id": chat["bot_id"], "chat_id": chat["id"], "role": "assistant", "type": "answer",
            "content_type": "text"}
    reply = chat["reply"]
    emit("conversation.chat.created", chat_obj(chat))
    chat["status"] = "in_progress"
    emit("conversation.chat.in_progress", chat_obj(chat))
    for i, piece in enumerate(re.findall(r"\S+\s*", reply)):
        if i and st.delta_gap > 0 and st.stopping.wait(st.delta_gap):
            return "stopped"
        if chat["status"] == "canceled":
            return "canceled"
        if cut_after is not None and i >= cut_after:
            if on_cut is None:
                return "cut"
            on_cut()
            cut_after = None
        emit("conversation.message.delta", dict(base, content=piece))
    msg = add_message(st, conv, "assistant", reply, chat_id=chat["id"], bot_id=chat["bot_id"])
    with st.lock:  # the stored message keeps the id the deltas announced
        msg["id"] = msg_id
    now = int(time.time())
    emit("conversation.message.completed", dict(base, content=reply, created_at=now, updated_at=now, meta_data={}))
    # Coze finishes the chat a moment after its answer (follow-up suggestions, verbose events): a client that
    # stops reading at the answer's end leaves before conversation.chat.completed (HTTP streams; the WebSocket
    # chat keeps its old pace, which its tests time).
    if on_cut is not None and st.delta_gap > 0 and st.stopping.wait(st.delta_gap):
        return "stopped"
    chat["status"] = "completed"
    chat["completed_at"] = now
    emit("conversation.chat.completed", chat_obj(chat))
    return "completed"


def fail(chat: dict) -> None:
    chat["status"] = "failed"
    chat["failed_at"] = int(time.time())


# ------------------------------------------------------------------ endpoints
def _start(st: "State", req: "Handler", data: dict, bot_id: str, user_id: str, conv_id: Any, stream: bool) -> None:
    extra = data.get("additional_messages") or []
    if not isinstance(extra, list):
        return req.error(4000, "additional_messages must be a list")
    mode = st.chat_mode
    if mode in CHAT_MODE_ERRORS:
        return req.error(*CHAT_MODE_ERRORS[mode])
    if conv_id:
        conv, err = find_conversation(st, req.session, conv_id)
        if err:
            return req.error(*err)
    else:
        conv = create_conversation(st, req.session, bot_id)
    chat = new_chat(st, req.session, conv, bot_id, user_id, extra)
    if stream:
        return _stream(st, req, conv, chat, cut=(mode == "cut"))
    add_message(st, conv, "assistant", chat["reply"], chat_id=chat["id"], bot_id=bot_id)
    chat["status"] = "completed"
    chat["completed_at"] = int(time.time())
    req.ok(chat_obj(chat))


class RunsOn:
    """What Coze does when a stream's connection ends early (the client went away, or the network cut it):
    the chat does not stop. It runs on to its end, is billed, and its usage is then only in
    ``/v3/chat/retrieve`` (and the run history, for a workflow). ``emit`` sends while the connection
    lasts and nothing after; ``cut()`` closes it mid-answer (chat_mode cut: no done event, no last chunk)."""

    def __init__(self, req: "Handler", emit: Callable[[str, Any], None] | None = None):
        self.req = req
        self._emit = emit or req.emit
        self.gone = False

    def emit(self, event: str, data: Any) -> None:
        if self.gone:
            return
        try:
            self._emit(event, data)
        except (OSError, ValueError):  # the client went away (ValueError: the file is closed): the run goes on
            self.gone = True
            self.req.close_connection = True

    def cut(self) -> None:
        if not self.gone:
            self.gone = True
            self.req.cut()

    def end(self) -> None:
        if self.gone:
            return
        try:
            self.req.end_stream()
        except (OSError, ValueError):
            self.gone = True
            self.req.close_connection = True


def _stream(st: "State", req: "Handler", conv: dict, chat: dict, cut: bool) -> None:
    req.start_stream()
    cut_after = max(1, min(3, len(chat["reply"].split()) - 1)) if cut else None
    out = RunsOn(req)
    ended = run_stream(st, conv, chat, out.emit, cut_after, on_cut=out.cut)
    if ended == "stopped":  # the sandbox is stopping: close mid-stream, no done event, no terminating chunk
        fail(chat)
        return out.cut()
    out.emit("done", "[DONE]")
    out.end()


def chat(st: "State", req: "Handler") -> None:
    """POST /v3/chat?conversation_id {bot_id, user_id, stream, additional_messages, ...}"""
    data = req.json_body()
    if data is None:
        return req.error(4000, "request body must be a JSON object")
    bot_id = data.get("bot_id")
    if not isinstance(bot_id, str) or not bot_id:
        return req.error(4000, "bot_id is required")
    user_id = data.get("user_id")
    if not isinstance(user_id, str) or not user_id:
        return req.error(4000, "user_id is required")
    _start(st, req, data, bot_id, user_id, req.query.get("conversation_id"), stream=data.get("stream") is True)


def workflow_chat(st: "State", req: "Handler") -> None:
    """POST /v1/workflows/chat {workflow_id, additional_messages, app_id?|bot_id?, conversation_id?, ext?}:
    always streamed, with the same events as /v3/chat."""
    data = req.json_body()
    if data is None:
        return req.error(4000, "request body must be a JSON object")
    workflow_id = data.get("workflow_id")
    if not isinstance(workflow_id, str) or not workflow_id:
        return req.error(4000, "workflow_id is required")
    if not data.get("additional_messages"):
        return req.error(4000, "additional_messages is required")
    owner = next((v for v in (data.get("app_id"), data.get("bot_id")) if isinstance(v, str) and v), workflow_id)
    ext = data.get("ext") if isinstance(data.get("ext"), dict) else {}
    user_id = str(ext.get("user_id") or req.session or "sandbox_user")
    conv_id = data.get("conversation_id") or req.query.get("conversation_id")
    _start(st, req, data, owner, user_id, conv_id, stream=True)


def _find_chat(st: "State", req: "Handler", conv_id: Any, chat_id: Any) -> dict | None:
    """The caller's chat, having answered the error when it is not."""
    if not conv_id or not chat_id:
        req.error(4000, "conversation_id and chat_id are required")
        return None
    with st.lock:
        found = st.chats.get(chat_id)
    if found is None or found["conversation_id"] != conv_id:
        req.error(4000, f"chat {chat_id} does not exist in conversation {conv_id}")
        return None
    if found["session"] != req.session:
        req.error(4101, "no permission")
        return None
    return found


def cancel(st: "State", req: "Handler") -> None:
    """POST /v3/chat/cancel {conversation_id, chat_id}: a streaming chat stops after the current delta."""
    data = req.json_body() or {}
    found = _find_chat(st, req, data.get("conversation_id"), data.get("chat_id"))
    if found is None:
        return
    if found["status"] not in ("created", "in_progress"):
        return req.error(4104, f"chat is {found['status']} and can no longer be canceled")
    found["status"] = "canceled"
    req.ok(chat_obj(found))


def retrieve(st: "State", req: "Handler") -> None:
    """GET|POST /v3/chat/retrieve?conversation_id&chat_id"""
    found = _find_chat(st, req, req.query.get("conversation_id"), req.query.get("chat_id"))
    if found is not None:
        req.ok(chat_obj(found))


def message_list(st: "State", req: "Handler") -> None:
    """GET|POST /v3/chat/message/list?conversation_id&chat_id: the chat's answers."""
    found = _find_chat(st, req, req.query.get("conversation_id"), req.query.get("chat_id"))
    if found is None:
        return
    with st.lock:
        conv = st.conversations.get(found["conversation_id"]) or {"messages": []}  # deleted meanwhile
        msgs = [dict(m) for m in conv["messages"] if m["chat_id"] == found["id"] and m["role"] == "assistant"]
    req.ok(msgs)
