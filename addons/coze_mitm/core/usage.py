"""Coze's token usage, read from answers as they pass: never buffered, never unbounded.

Pure logic, no mitmproxy import. Two readers:

* `SSEUsageReader` is fed the chunks of a `text/event-stream` answer (`/v3/chat`, `/v1/workflows/chat`)
  one by one; it is meant to be mitmproxy's `flow.response.stream` callable, which must hand every chunk
  on unchanged and quickly. It parses the frames (`event:<name>\\ndata:<json>\\n\\n`; `event: x`, CRLF or
  CR line ends and multi-line data tolerated), and reports the `usage` in the data of
  `conversation.chat.completed` to a callback the moment that frame is complete (a stream cut later
  still counts). A frame split across chunks is carried over, up to `max_frame` bytes; a longer frame
  is skipped, not buffered. Frames of events nobody asked for (the text deltas) are not kept at all.
  With `ids_from="conversation.chat.created"` it also keeps the chat's ids (`chat_ref`: conversation id,
  chat id), so a stream that ends before `conversation.chat.completed` (client gone, connection cut: the
  chat runs on at Coze and is billed) can have its usage fetched from `/v3/chat/retrieve`. With
  `cumulative=True` (workflow streams: `events=("Message",)`) a `usage` is the call's usage so far, so only
  its growth over the largest one reported before is counted.
* `usage_from_retrieve(body)` reads `data.usage` from the JSON answer of `/v3/chat/retrieve`
  (a bounded body; the chat must be `completed`).

A `Usage` carries the chat id, so the book can count one chat once even when a client both streams it
and polls `/v3/chat/retrieve` for it.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from typing import Callable

import brotli  # the codecs mitmproxy itself decodes with (11.x and 12.x)
import zstandard

from coze_mitm.core.bounded import BROTLI_PIECE, ZSTD_MAX_WINDOW

COMPLETED = "conversation.chat.completed"
CREATED = "conversation.chat.created"
WORKFLOW_MESSAGE = "Message"  # /v1/workflow/stream_run and stream_resume: node output, may carry `usage`
MAX_FRAME = 64 * 1024  # a chat.completed frame is ~1 KB; the text deltas are never kept
MAX_RETRIEVE_BODY = 256 * 1024
MAX_COUNT = 10**12  # above any real chat; a bigger figure is garbage, not usage

_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class Usage:
    token_count: int
    input_count: int = 0
    output_count: int = 0
    chat_id: str = ""  # empty when the answer did not say (then it cannot be de-duplicated)


def parse_usage(obj) -> Usage | None:
    """The `usage` of a Coze chat object (`{"id", "status", "usage": {"token_count", ...}}`), or None."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    counts = {}
    for key in ("token_count", "input_count", "output_count"):
        value = usage.get(key, 0)
        # bool is an int in Python; "12" or 1.5 are not what Coze sends: refuse rather than guess.
        if type(value) is not int or not 0 <= value <= MAX_COUNT:
            return None
        counts[key] = value
    if "token_count" not in usage:
        return None
    chat_id = obj.get("id")
    chat_id = chat_id if isinstance(chat_id, str) and len(chat_id) <= 128 else ""
    return Usage(counts["token_count"], counts["input_count"], counts["output_count"], chat_id)


def usage_from_retrieve(body: bytes | str, max_bytes: int = MAX_RETRIEVE_BODY) -> Usage | None:
    """`data.usage` of a `/v3/chat/retrieve` answer, once the chat is `completed`; None otherwise.

    The body must already be decoded (mitmproxy's `response.get_content()`); the caller should not
    decode one whose raw size is over the bound either (see `retrieve_body_ok`)."""
    if len(body) > max_bytes:
        return None
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(answer, dict) or answer.get("code", 0) != 0:
        return None
    data = answer.get("data")
    if not isinstance(data, dict) or data.get("status") != "completed":
        return None
    return parse_usage(data)


def retrieve_body_ok(raw_size: int, content_encoding: str, max_bytes: int = MAX_RETRIEVE_BODY) -> bool:
    """Whether a retrieve answer is small enough to decode whole (a compressed one may grow: allow 1/16)."""
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw_size <= max_bytes
    return raw_size <= max_bytes // 16


class SSEUsageReader:
    """Watches a server-sent-event stream for Coze's usage; `reader(chunk)` returns `chunk` unchanged.

    on_usage(usage)   called once per `conversation.chat.completed` frame that carries a valid usage
    events            the event names whose data is read (the others are skipped without being kept)
    max_frame         the most bytes of one frame kept across chunks; a longer frame is skipped
    content_encoding  "", "identity", "gzip", "x-gzip", "deflate", "br" or "zstd"; any other makes the reader
                      inert (`unreadable` says why) rather than parse compressed bytes as text
    ids_from          an event whose data names the chat (`conversation.chat.created`): kept in `chat_ref`
    cumulative        each usage is the call's total so far: only the growth is reported
    """

    def __init__(self, on_usage: Callable[[Usage], None] | None = None, *, events=(COMPLETED,),
                 max_frame: int = MAX_FRAME, content_encoding: str = "", max_decoded: int = 64 * 1024 * 1024,
                 ids_from: str | None = None, cumulative: bool = False):
        self.on_usage = on_usage
        self.ids_from = ids_from
        self.cumulative = cumulative
        self.chat_ref: tuple[str, str] | None = None  # (conversation id, chat id) from the ids_from event
        self._reported = Usage(0)  # cumulative: the largest usage reported so far
        self.events = frozenset(events) | ({ids_from} if ids_from else frozenset())
        self._peek = 8 + max((len(e.encode()) for e in self.events), default=0)  # "event: " + a name of ours
        self.max_frame = max_frame
        self.usages: list[Usage] = []  # what was reported, in order (a chat stream has one)
        self.skipped_frames = 0  # frames of a read event over max_frame, or without valid usage JSON
        self.unreadable = ""  # why the stream cannot be read (unknown encoding, corrupt compression)
        self.ended = False
        self._line = bytearray()  # the current line, while its end has not arrived
        self._line_cut = False  # the current line was longer than we keep of it
        self._line_seen = False  # the current line has content, kept or not (a blank line ends a frame)
        self._event: str | None = None
        self._data: list[bytes] = []
        self._size = 0  # bytes of the current frame kept so far
        self._oversized = False  # the current frame went over max_frame: ignored up to its blank line
        self._after_cr = False  # the last piece ended in \r: a \n first in the next one ends no new line
        self._first = True  # a UTF-8 BOM may open the stream
        self._inflate = None
        self._steps: _Steps | None = None  # br, zstd: decoded a few bytes at a time (bounded output per call)
        self._inflated_any = False
        self._decoded_left = max_decoded
        self._encoding = content_encoding.strip().lower()
        if self._encoding in ("gzip", "x-gzip"):
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif self._encoding == "deflate":
            self._inflate = zlib.decompressobj(zlib.MAX_WBITS)
        elif self._encoding in ("br", "zstd"):
            self._steps = _Steps(self._encoding)
        elif self._encoding not in ("", "identity"):
            self.unreadable = f"content-encoding {self._encoding!r} is not read"

    @property
    def token_count(self) -> int:
        return sum(u.token_count for u in self.usages)

    def __call__(self, chunk: bytes) -> bytes:
        """mitmproxy's stream callable: called per chunk, then once with b"" at the end of the answer."""
        try:
            if chunk:
                self.feed(chunk)
            else:
                self.end()
        except Exception as e:  # accounting must never break the stream it watches
            self.unreadable = self.unreadable or f"usage reader failed: {type(e).__name__}"
        return chunk

    # -- bytes in --------------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        if self.unreadable or self.ended:
            return
        if self._steps is not None:
            for piece in self._steps.pieces(chunk):
                self._decoded_left -= len(piece)
                if self._decoded_left < 0:
                    self.unreadable = "decompressed stream too large"
                    return
                self._parse(piece)
            if self._steps.error:
                self.unreadable = "corrupt compressed stream"
            return
        if self._inflate is None:
            self._parse(chunk)
            return
        for piece in self._inflated(chunk):
            self._parse(piece)

    def end(self) -> None:
        """The stream ended: a last frame without its blank line still counts (tolerance, not the spec)."""
        if self.ended or self.unreadable:
            return
        self.ended = True
        if self._inflate is not None:
            try:
                tail = self._inflate.flush()
            except zlib.error:
                tail = b""
            if tail:
                self._parse(tail[: self.max_frame])
        if self._line_seen:
            self._line_done()
        if not self._oversized:
            self._dispatch()

    def _inflated(self, chunk: bytes):
        """Decompressed pieces of at most max_frame bytes each, so a bomb never sits in memory whole."""
        data = chunk
        while True:
            try:
                piece = self._inflate.decompress(data, self.max_frame)
            except zlib.error:
                if self._encoding == "deflate" and not self._inflated_any:
                    # "deflate" is sometimes sent raw, without the zlib header; browsers accept both
                    self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
                    self._inflated_any = True
                    continue
                self.unreadable = "corrupt compressed stream"
                return
            self._inflated_any = True
            self._decoded_left -= len(piece)
            if self._decoded_left < 0:
                self.unreadable = "decompressed stream too large"
                return
            if piece:
                yield piece
            data = self._inflate.unconsumed_tail
            if self._inflate.eof or (not data and len(piece) < self.max_frame):
                return  # a full piece may leave output inside zlib even with no input left: ask again

    def _parse(self, chunk: bytes) -> None:
        if self._first:
            self._first = False
            if chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]
        pos = 0
        if self._after_cr:
            self._after_cr = False
            if chunk.startswith(b"\n"):
                pos = 1
        for m in _LINE_END.finditer(chunk, pos):
            self._take(chunk, pos, m.start())
            self._line_done()
            pos = m.end()
        if pos == len(chunk) and chunk.endswith(b"\r"):
            self._after_cr = True
        elif pos < len(chunk):
            self._take(chunk, pos, len(chunk))

    # -- lines and frames ------------------------------------------------------------------------
    def _take(self, chunk: bytes, start: int, stop: int) -> None:
        """Part of the current line, kept only while it may matter and fits the bounds."""
        if stop <= start:
            return
        self._line_seen = True
        if self._oversized or self._line_cut:
            return
        if self._event is not None and self._event not in self.events:
            # a frame nobody reads (a text delta): a short prefix shows whether a line is a new `event`
            room = self._peek - len(self._line)
            if stop - start > room:
                self._line += chunk[start:start + max(room, 0)]
                self._line_cut = True
                return
        elif self._size + len(self._line) + (stop - start) > self.max_frame:
            self._oversized = True  # a frame we would read, too big to keep: skip it, do not buffer it
            self.skipped_frames += 1
            self._line.clear()
            self._data.clear()
            return
        self._line += chunk[start:stop]

    def _line_done(self) -> None:
        line = bytes(self._line)
        cut, self._line_cut = self._line_cut, False
        seen, self._line_seen = self._line_seen, False
        self._line.clear()
        if not seen:  # a blank line ends the frame
            if self._oversized:
                self._oversized = False
                self._reset_frame()
            else:
                self._dispatch()
            return
        if self._oversized or line.startswith(b":"):
            return  # inside a frame being skipped, or a comment
        name, colon, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"event":
            self._event = "" if cut else value.decode("utf-8", "replace")  # a cut name is none of ours
            if self._event not in self.events:
                self._data.clear()
            self._size += len(line)
        elif name == b"data" and not cut and (self._event is None or self._event in self.events):
            self._data.append(value)
            self._size += len(value) + 1
        # id, retry and unknown fields say nothing about usage

    def _reset_frame(self) -> None:
        self._event = None
        self._data.clear()
        self._size = 0

    def _dispatch(self) -> None:
        event, data = self._event, self._data
        try:
            if event is None or event not in self.events or not data:
                return
            if self.cumulative and not any(b'"usage"' in d for d in data):
                return  # a workflow's text piece: most Message events carry no usage
            try:
                obj = json.loads(b"\n".join(data))
            except (ValueError, UnicodeDecodeError, RecursionError):
                self.skipped_frames += 1
                return
            if event == self.ids_from:
                self._keep_ids(obj)
                return
            usage = parse_usage(obj)
            if usage is None:
                self.skipped_frames += 1
                return
            if self.cumulative:
                usage = self._growth(usage)
                if usage is None:
                    return
            self.usages.append(usage)
            if self.on_usage is not None:
                self.on_usage(usage)
        finally:
            self._reset_frame()

    def _keep_ids(self, obj) -> None:
        if not isinstance(obj, dict) or self.chat_ref is not None:
            return
        conversation_id, chat_id = obj.get("conversation_id"), obj.get("id")
        if (isinstance(conversation_id, str) and isinstance(chat_id, str) and 0 < len(conversation_id) <= 128
                and 0 < len(chat_id) <= 128):
            self.chat_ref = (conversation_id, chat_id)

    def _growth(self, usage: Usage) -> Usage | None:
        """What a running total adds to the largest one before it (None: nothing new)."""
        before = self._reported
        if usage.token_count <= before.token_count:
            return None
        self._reported = usage
        return Usage(usage.token_count - before.token_count, max(0, usage.input_count - before.input_count),
                     max(0, usage.output_count - before.output_count))


class _Steps:
    """An incremental br or zstd decoder fed a few bytes per call, so that one call's output stays bounded
    (brotli 1.1, mitmproxy 11's, has no output limit; zstd's decompressobj neither): a bomb is cut off by the
    reader's max_decoded after little more than that much output, never held whole (core/bounded.py does
    the same for whole bodies)."""

    ZSTD_PIECE = 64  # at most ~16 RLE blocks of 128 KiB each per call

    def __init__(self, encoding: str):
        self.error = False
        if encoding == "br":
            self._decoder = brotli.Decompressor()
            self._piece = BROTLI_PIECE
        else:
            self._decoder = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).decompressobj()
            self._piece = self.ZSTD_PIECE
        self._br = encoding == "br"

    def pieces(self, chunk: bytes):
        view = memoryview(chunk)
        step = self._piece
        try:
            for i in range(0, len(view), step):
                piece = bytes(view[i:i + step])
                out = self._decoder.process(piece) if self._br else self._decoder.decompress(piece)
                if out:
                    yield out
        except (brotli.error, zstandard.ZstdError):
            self.error = True
