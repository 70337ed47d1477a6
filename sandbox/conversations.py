"""Conversations: the per-session store and ``/v1/conversation(s)`` endpoints, app-mode included.

Every conversation belongs to the session (session_name) of the token that created it; another
session gets code 4101 for it, as Coze answers.

``get_or_create: true`` with a ``conversation_name`` (how the chat component ``@coze/chat-sdk`` opens
an app's conversation on every load) answers the caller's newest conversation of that name with the
same app_id, bot_id and connector_id when there is one, and creates it otherwise; in app mode the
name defaults to "Default". Without get_or_create a new conversation is made each time (the
component's "new conversation" button), and the next get_or_create answers that one.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import Handler
    from .state import State

DEFAULT_CONNECTOR = "1024"  # Coze's "API" channel
DEFAULT_APP_CONVERSATION = "Default"  # an app's conversation when the request names none
MAX_NAME = 100


# ------------------------------------------------------------------ store (these take the lock)
def conversation_obj(conv: dict) -> dict:
    return {
        "id": conv["id"],
        "name": conv["name"],
        "created_at": conv["created_at"],
        "updated_at": conv["updated_at"],
        "meta_data": dict(conv["meta_data"]),
        "last_section_id": conv["section_id"],
        "connector_id": conv["connector_id"],
    }


def connector_of(connector_id: Any) -> str:
    """The channel a conversation is in: the given connector_id, else the API channel."""
    if isinstance(connector_id, (str, int)) and not isinstance(connector_id, bool) and connector_id:
        return str(connector_id)
    return DEFAULT_CONNECTOR


def create_conversation(st: "State", session: str, bot_id: str | None, meta_data: Any = None,
                        connector_id: Any = None, name: str = "", app_id: str | None = None,
                        conversation_name: str | None = None, workflow_id: str | None = None) -> dict:
    now = int(time.time())
    conv = {
        "id": st.new_id(),
        "session": session,
        "bot_id": bot_id,
        "app_id": app_id,
        "workflow_id": workflow_id,
        "name": name,
        "conversation_name": conversation_name,  # what get_or_create finds it by (a rename keeps it)
        "connector_id": connector_of(connector_id),
        "created_at": now,
        "updated_at": now,
        "meta_data": {str(k): str(v) for k, v in meta_data.items()} if isinstance(meta_data, dict) else {},
        "section_id": st.new_id(),
        "messages": [],
    }
    with st.lock:
        st.conversations[conv["id"]] = conv
    return conv


def find_conversation(st: "State", session: str, conv_id: Any) -> tuple[dict | None, tuple[int, str] | None]:
    """-> (conversation, None), or (None, (code, msg)): 4000 unknown, 4101 another session's."""
    if not isinstance(conv_id, str) or not conv_id:
        return None, (4000, "conversation_id is required")
    with st.lock:
        conv = st.conversations.get(conv_id)
    if conv is None:
        return None, (4000, f"conversation {conv_id} does not exist")
    if conv["session"] != session:
        return None, (4101, "no permission")
    return conv, None


def add_message(st: "State", conv: dict, role: str, content: str, content_type: str = "text",
                chat_id: str | None = None, bot_id: str | None = None, msg_type: str | None = None) -> dict:
    now = int(time.time())
    msg = {
        "id": st.new_id(),
        "conversation_id": conv["id"],
        "section_id": conv["section_id"],
        "bot_id": bot_id or conv.get("bot_id") or "",
        "chat_id": chat_id or "",
        "role": role,
        "type": msg_type or ("answer" if role == "assistant" else "question"),
        "content": content,
        "content_type": content_type,
        "meta_data": {},
        "created_at": now,
        "updated_at": now,
    }
    with st.lock:
        conv["messages"].append(msg)
        conv["updated_at"] = now
    return msg


def _add_initial_messages(st: "State", conv: dict, messages: Any) -> None:
    for m in messages if isinstance(messages, list) else []:
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            role = m.get("role") if m.get("role") in ("user", "assistant") else "user"
            add_message(st, conv, role, m["content"], m.get("content_type") or "text")


def get_or_create(st: "State", session: str, name: str, *, app_id: str | None, bot_id: str | None,
                  connector_id: Any, workflow_id: str | None = None, meta_data: Any = None) -> tuple[dict, bool]:
    """-> (the session's newest conversation called ``name`` with this app_id, bot_id and connector, False),
    or (a new one, True)."""
    connector = connector_of(connector_id)
    with st.lock:  # look and create at once: two loads at the same moment get one conversation
        for conv in reversed(st.conversations.values()):
            if (conv["session"] == session and conv["conversation_name"] == name and conv["app_id"] == app_id
                    and conv["bot_id"] == bot_id and conv["connector_id"] == connector):
                return conv, False
        return create_conversation(st, session, bot_id, meta_data, connector, name=name, app_id=app_id,
                                   conversation_name=name, workflow_id=workflow_id), True


# ------------------------------------------------------------------ endpoints
def _create(st: "State", req: "Handler", app_required: bool) -> None:
    data = req.json_body()
    if data is None:
        return req.error(4000, "request body must be a JSON object")
    ids = {}
    for field in ("bot_id", "app_id", "workflow_id"):
        value = data.get(field)
        if value is not None and not isinstance(value, str):
            return req.error(4000, f"{field} must be a string")
        ids[field] = value or None
    if app_required and not ids["app_id"]:
        return req.error(4000, "app_id is required")
    get_or_create_ = data.get("get_or_create", False)
    if not isinstance(get_or_create_, bool):
        return req.error(4000, "get_or_create must be true or false")
    for field in ("conversation_name", "name"):
        value = data.get(field)
        if value is not None and not isinstance(value, str):
            return req.error(4000, f"{field} must be a string")
        if value and len(value) > MAX_NAME:
            return req.error(4000, f"{field} must be at most {MAX_NAME} characters")
    conversation_name = data.get("conversation_name") or (DEFAULT_APP_CONVERSATION if ids["app_id"] else None)
    if get_or_create_ and conversation_name:
        conv, created = get_or_create(st, req.session, conversation_name, app_id=ids["app_id"], bot_id=ids["bot_id"],
                                      connector_id=data.get("connector_id"), workflow_id=ids["workflow_id"],
                                      meta_data=data.get("meta_data"))
        if created:
            _add_initial_messages(st, conv, data.get("messages"))
        return req.ok(conversation_obj(conv))
    conv = create_conversation(st, req.session, ids["bot_id"], data.get("meta_data"), data.get("connector_id"),
                               name=data.get("name") or conversation_name or "", app_id=ids["app_id"],
                               conversation_name=conversation_name, workflow_id=ids["workflow_id"])
    _add_initial_messages(st, conv, data.get("messages"))
    req.ok(conversation_obj(conv))


def create(st: "State", req: "Handler") -> None:
    """POST /v1/conversation/create {bot_id?, name?, messages?, meta_data?, connector_id?} and, from the
    chat component in app mode, {app_id, conversation_name, get_or_create, workflow_id, draft_mode, connector_id}."""
    _create(st, req, app_required=False)


def workflow_create(st: "State", req: "Handler") -> None:
    """POST /v1/workflow/conversation/create {app_id, workflow_id, conversation_name, get_or_create, ...}
    (app mode, the Web Chat SDK): as /v1/conversation/create, app_id required."""
    _create(st, req, app_required=True)


def list_(st: "State", req: "Handler") -> None:
    """GET /v1/conversations?bot_id&page_num&page_size: the caller's conversations with that bot, newest first."""
    bot_id = req.query.get("bot_id")
    if not bot_id:
        return req.error(4000, "bot_id is required")
    try:
        page_num = max(1, int(req.query.get("page_num") or 1))
        page_size = min(50, max(1, int(req.query.get("page_size") or 50)))
    except ValueError:
        return req.error(4000, "page_num and page_size must be integers")
    with st.lock:
        convs = [c for c in st.conversations.values()
                 if c["session"] == req.session and c["app_id"] is None and c["bot_id"] in (None, bot_id)]
        convs.sort(key=lambda c: (c["created_at"], c["id"]), reverse=True)
        start = (page_num - 1) * page_size
        page = [conversation_obj(c) for c in convs[start:start + page_size]]
        has_more = len(convs) > start + page_size
    req.ok({"conversations": page, "has_more": has_more})


def retrieve(st: "State", req: "Handler") -> None:
    """GET|POST /v1/conversation/retrieve?conversation_id"""
    conv, err = find_conversation(st, req.session, req.query.get("conversation_id"))
    if err:
        return req.error(*err)
    req.ok(conversation_obj(conv))


def update(st: "State", req: "Handler", conv_id: str) -> None:
    """PUT /v1/conversations/{id} {name}: rename (the Web Chat SDK's conversation list)."""
    conv, err = find_conversation(st, req.session, conv_id)
    if err:
        return req.error(*err)
    data = req.json_body()
    if data is None or not isinstance(data.get("name"), str):
        return req.error(4000, "name is required")
    with st.lock:
        conv["name"] = data["name"][:100]
        conv["updated_at"] = int(time.time())
    req.ok(conversation_obj(conv))


def delete(st: "State", req: "Handler", conv_id: str) -> None:
    """DELETE /v1/conversations/{id}"""
    conv, err = find_conversation(st, req.session, conv_id)
    if err:
        return req.error(*err)
    with st.lock:
        st.conversations.pop(conv["id"], None)
    req.ok({})


def clear(st: "State", req: "Handler", conv_id: str) -> None:
    """POST /v1/conversations/{id}/clear: a new section, no messages; answers the section's id."""
    conv, err = find_conversation(st, req.session, conv_id)
    if err:
        return req.error(*err)
    with st.lock:
        conv["messages"] = []
        conv["section_id"] = st.new_id()
        conv["updated_at"] = int(time.time())
    req.ok({"id": conv["section_id"], "conversation_id": conv["id"]})
