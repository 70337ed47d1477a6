"""What a chat talks to: bots (``/v1/bots/{id}``, ``/v1/bot/get_online_info``), and in app mode the
app (``/v1/apps/{id}``) and its chat workflow (``/v1/workflows/{id}``). Any id exists; all are
labelled as the sandbox's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .common import BOT_DESCRIPTION, BOT_NAME

if TYPE_CHECKING:
    from .server import Handler
    from .state import State

PROLOGUE = "This is the coze-mitm sandbox, not Coze: replies are canned."
CREATED = 1700000000


def bot_obj(bot_id: str) -> dict:
    return {
        "bot_id": bot_id,
        "name": BOT_NAME,
        "description": BOT_DESCRIPTION,
        "icon_url": "",
        "create_time": CREATED,
        "update_time": CREATED,
        "version": "sandbox",
        "bot_mode": 0,
        "onboarding_info": {"prologue": PROLOGUE, "suggested_questions": []},
        # read by the Web Chat SDK when the bubble opens
        "default_user_input_type": "text",
        "shortcut_commands": [],
        "background_image_info": {},
        "media_config": {"is_voice_call_closed": True},
    }


def bot(st: "State", req: "Handler", bot_id: str) -> None:
    """GET /v1/bots/{bot_id}"""
    req.ok(bot_obj(bot_id))


def bot_online_info(st: "State", req: "Handler") -> None:
    """GET /v1/bot/get_online_info?bot_id"""
    bot_id = req.query.get("bot_id")
    if not bot_id:
        return req.error(4000, "bot_id is required")
    req.ok(bot_obj(bot_id))


def app(st: "State", req: "Handler", app_id: str) -> None:
    """GET /v1/apps/{app_id}?version&connector_id (app mode)"""
    req.ok({"app_id": app_id, "name": "Sandbox app", "description": BOT_DESCRIPTION, "icon_url": "",
            "version": req.query.get("version") or "sandbox", "created_at": CREATED, "updated_at": CREATED})


def workflow(st: "State", req: "Handler", workflow_id: str) -> None:
    """GET /v1/workflows/{workflow_id}?connector_id&is_debug&caller (app mode). The Web Chat SDK reads
    ``data.role`` (the chat's persona); ``workflow_detail`` is what the API documents."""
    connector_id = req.query.get("connector_id") or "1024"
    req.ok({
        "workflow_detail": {"workflow_id": workflow_id, "workflow_name": "sandbox_chatflow",
                            "description": BOT_DESCRIPTION, "icon_url": "", "app_id": "",
                            "created_at": CREATED, "updated_at": CREATED},
        "role": {
            "id": workflow_id, "workflow_id": workflow_id, "connector_id": connector_id,
            "name": BOT_NAME, "description": BOT_DESCRIPTION, "avatar": {"image_uri": "", "image_url": ""},
            "onboarding_info": {"prologue": PROLOGUE, "display_all_suggestions": False, "suggested_questions": []},
            "user_input_config": {"default_input_mode": 1},
        },
    })
