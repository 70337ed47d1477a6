"""The sandbox's WebSocket endpoints (handshake and framing: websocket.py) and what they say: the events of @coze/api's websocket clients
(coze-js ``src/resources/websockets/types.ts``). Text chat is complete; speech and transcription are
minimal (silent audio, a canned transcript) but follow the same sequence of events.

/v1/chat — server: ``chat.created`` on connect; client ``chat.update`` -> ``chat.updated``;
client ``conversation.message.create`` {role, content_type, content} -> ``conversation.chat.created``,
``conversation.chat.in_progress``, ``conversation.message.delta`` (one per word),
``conversation.message.completed``, ``conversation.chat.completed`` (with usage); client
``conversation.chat.cancel`` -> ``conversation.chat.canceled``; ``conversation.clear`` ->
``conversation.cleared``; ``input_audio_buffer.clear`` -> ``input_audio_buffer.cleared``; anything
else (audio input, tool outputs, unknown events) -> ``error`` {code, msg}.
"""

from __future__ import annotations

import base64
import threading
import time
from typing import TYPE_CHECKING, Any

from .chat import chat_obj, fail, new_chat, run_stream
from .common import CHAT_MODE_ERRORS
from .conversations import create_conversation, find_conversation
from .websocket import WsSession, accept

if TYPE_CHECKING:
    from .server import Handler
    from .state import State

INPUT_AUDIO = {"format": "pcm", "codec": "pcm", "sample_rate": 24000, "channel": 1, "bit_depth": 16}
OUTPUT_AUDIO = {"codec": "pcm", "pcm_config": {"sample_rate": 24000}, "speech_rate": 0, "voice_id": ""}


def _merged(base: dict, update: object) -> dict:
    return {**base, **update} if isinstance(update, dict) else dict(base)


class ChatProtocol:
    def __init__(self, ws: WsSession):
        self.ws = ws
        self.st = ws.state
        query = ws.req.query
        self.bot_id = query.get("bot_id") or query.get("workflow_id") or ""
        self.chat_config = {"conversation_id": "", "user_id": ws.session, "auto_save_history": True,
                            "meta_data": {}, "custom_variables": {}, "extra_params": {}, "parameters": {}}
        self.input_audio = dict(INPUT_AUDIO)
        self.output_audio = dict(OUTPUT_AUDIO)
        self.conv: dict | None = None
        self.chat: dict | None = None
        self.worker: threading.Thread | None = None

    def run(self) -> None:
        if not self.bot_id:
            self.ws.error(4000, "bot_id is required in the query string")
            return self.ws.close(1008, "bot_id is required")
        self.ws.send("chat.created")
        for ev in self.ws.events():
            handler = getattr(self, "on_" + ev["event_type"].replace(".", "_"), None)
            data = ev.get("data") if isinstance(ev.get("data"), dict) else {}
            if handler is None:
                self.ws.error(4000, f"the sandbox does not handle {ev['event_type']!r} on /v1/chat")
            else:
                handler(data)
        if self.chat is not None and self.chat["status"] in ("created", "in_progress"):
            self.chat["status"] = "canceled"  # the client left: stop streaming to nobody

    # --- client events
    def on_chat_update(self, data: dict) -> None:
        config = data.get("chat_config")
        if isinstance(config, dict) and config.get("conversation_id"):
            conv, err = find_conversation(self.st, self.ws.session, config["conversation_id"])
            if err:
                return self.ws.error(*err)
            self.conv = conv
        self.chat_config = _merged(self.chat_config, config)
        self.input_audio = _merged(self.input_audio, data.get("input_audio"))
        self.output_audio = _merged(self.output_audio, data.get("output_audio"))
        self.ws.send("chat.updated", {"chat_config": self.chat_config, "input_audio": self.input_audio,
                                      "output_audio": self.output_audio})

    def on_conversation_message_create(self, data: dict) -> None:
        if not isinstance(data.get("content"), str):
            return self.ws.error(4000, "conversation.message.create needs data.content")
        mode = self.st.chat_mode
        if mode in CHAT_MODE_ERRORS:
            return self.ws.error(*CHAT_MODE_ERRORS[mode])
        if self.worker is not None:
            self.worker.join()  # one chat at a time, in order
        if self.conv is None or self.conv["id"] not in self.st.conversations:
            self.conv = create_conversation(self.st, self.ws.session, self.bot_id)
            self.chat_config["conversation_id"] = self.conv["id"]
        message = {"role": "user", "content": data["content"], "content_type": data.get("content_type") or "text"}
        self.chat = new_chat(self.st, self.ws.session, self.conv, self.bot_id,
                             str(self.chat_config.get("user_id") or ""), [message])
        self.worker = threading.Thread(target=self._stream, args=(self.chat, mode == "cut"),
                                       name="coze-sandbox-ws-chat", daemon=True)
        self.worker.start()

    def _stream(self, chat: dict, cut: bool) -> None:
        cut_after = max(1, min(3, len(chat["reply"].split()) - 1)) if cut else None
        try:
            ended = run_stream(self.st, self.conv, chat, self.ws.send, cut_after)
            if ended == "canceled":
                self.ws.send("conversation.chat.canceled", chat_obj(chat))
            elif ended in ("cut", "stopped"):
                fail(chat)
                self.ws.req.cut()
        except (OSError, ValueError):  # the client went away mid-stream (ValueError: the file is closed)
            # A chat that had already ended keeps its end: the client may close the moment its last event
            # arrives, before this thread is back from sending it.
            if chat["status"] in ("created", "in_progress"):
                fail(chat)

    def on_conversation_chat_cancel(self, data: dict) -> None:
        if self.chat is not None and self.chat["status"] in ("created", "in_progress"):
            self.chat["status"] = "canceled"  # the streaming thread answers conversation.chat.canceled
        else:
            self.ws.send("conversation.chat.canceled")

    def on_conversation_clear(self, data: dict) -> None:
        if self.worker is not None:
            self.worker.join()
        if self.conv is not None:
            with self.st.lock:
                self.conv["messages"] = []
                self.conv["section_id"] = self.st.new_id()
                self.conv["updated_at"] = int(time.time())
        self.ws.send("conversation.cleared")

    def on_input_audio_buffer_clear(self, data: dict) -> None:
        self.ws.send("input_audio_buffer.cleared")

    def on_input_audio_buffer_append(self, data: dict) -> None:
        pass  # accepted; nothing is recognised in the sandbox

    def on_input_audio_buffer_complete(self, data: dict) -> None:
        self.ws.send("input_audio_buffer.completed")
        self.ws.error(4000, "the sandbox has no speech recognition: send text with conversation.message.create")


class SpeechProtocol:
    """/v1/audio/speech: speech.created; speech.update -> speech.updated; input_text_buffer.append
    {delta}...; input_text_buffer.complete -> input_text_buffer.completed, speech.audio.update
    {delta: base64 PCM silence, 10 ms per character}, speech.audio.completed."""

    def __init__(self, ws: WsSession):
        self.ws = ws
        self.output_audio = dict(OUTPUT_AUDIO)
        self.text: list[str] = []

    def run(self) -> None:
        self.ws.send("speech.created")
        for ev in self.ws.events():
            kind, data = ev["event_type"], ev.get("data") if isinstance(ev.get("data"), dict) else {}
            if kind == "speech.update":
                self.output_audio = _merged(self.output_audio, data.get("output_audio"))
                self.ws.send("speech.updated", {"output_audio": self.output_audio})
            elif kind == "input_text_buffer.append":
                self.text.append(str(data.get("delta") or ""))
            elif kind == "input_text_buffer.complete":
                self.ws.send("input_text_buffer.completed")
                silence = bytes(min(480 * len("".join(self.text)), 480_000))  # 24 kHz 16-bit: 480 bytes = 10 ms
                self.ws.send("speech.audio.update", {"delta": base64.b64encode(silence).decode()})
                self.ws.send("speech.audio.completed")
                self.text = []
            else:
                self.ws.error(4000, f"the sandbox does not handle {kind!r} on /v1/audio/speech")


class TranscriptionsProtocol:
    """/v1/audio/transcriptions: transcriptions.created; transcriptions.update -> transcriptions.updated;
    input_audio_buffer.append {delta: base64}...; input_audio_buffer.complete -> input_audio_buffer.completed,
    transcriptions.message.update and .completed with a canned transcript; input_audio_buffer.clear -> .cleared."""

    def __init__(self, ws: WsSession):
        self.ws = ws
        self.input_audio = dict(INPUT_AUDIO)
        self.received = 0

    def run(self) -> None:
        self.ws.send("transcriptions.created")
        for ev in self.ws.events():
            kind, data = ev["event_type"], ev.get("data") if isinstance(ev.get("data"), dict) else {}
            if kind == "transcriptions.update":
                self.input_audio = _merged(self.input_audio, data.get("input_audio"))
                self.ws.send("transcriptions.updated", {"input_audio": self.input_audio})
            elif kind == "input_audio_buffer.append":
                self.received += len(str(data.get("delta") or "")) * 3 // 4
            elif kind == "input_audio_buffer.clear":
                self.received = 0
                self.ws.send("input_audio_buffer.cleared")
            elif kind == "input_audio_buffer.complete":
                self.ws.send("input_audio_buffer.completed")
                text = f"Sandbox transcript of {self.received} bytes of audio"
                self.ws.send("transcriptions.message.update", {"content": text})
                self.ws.send("transcriptions.message.completed", {"content": text})
                self.received = 0
            else:
                self.ws.error(4000, f"the sandbox does not handle {kind!r} on /v1/audio/transcriptions")


# ------------------------------------------------------------------ endpoints (routes.py)
def _serve(st: "State", req: "Handler", protocol: Any) -> None:
    ws = accept(st, req)
    if ws is None:
        return
    try:
        protocol(ws).run()
    except OSError:  # the client went away
        pass
    finally:
        ws.closed = True


def chat(st: "State", req: "Handler") -> None:
    """WS /v1/chat?bot_id=…[&workflow_id=…]: text chat (ChatProtocol)."""
    _serve(st, req, ChatProtocol)


def speech(st: "State", req: "Handler") -> None:
    """WS /v1/audio/speech: text in, (silent) audio out (SpeechProtocol)."""
    _serve(st, req, SpeechProtocol)


def transcriptions(st: "State", req: "Handler") -> None:
    """WS /v1/audio/transcriptions: audio in, a canned transcript out (TranscriptionsProtocol)."""
    _serve(st, req, TranscriptionsProtocol)
