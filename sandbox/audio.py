"""Audio over plain HTTP: ``POST /v1/audio/speech`` (text in, audio out) and ``POST
/v1/audio/transcriptions`` (an audio file in, text out), as cozepy, @coze/api and the chat component
(``@coze/chat-sdk`` with audio on) call them. The same paths are WebSockets when the request is a GET
with ``Upgrade: websocket`` (ws_events.py).

The speech is silence, but valid audio of the requested format (mp3, wav, pcm, ogg_opus), about
50 ms per character of input; the transcript is canned."""

from __future__ import annotations

import io
import math
import struct
import wave
from typing import TYPE_CHECKING

from .common import is_number
from .files import parse_multipart

if TYPE_CHECKING:
    from .server import Handler
    from .state import State

MAX_INPUT = 1024  # characters (Coze's documented limit)
SAMPLE_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
# response_format -> Content-Type (cozepy takes an answer whose Content-Type has "audio" in it as the file)
FORMATS = {"mp3": "audio/mpeg", "wav": "audio/wav", "pcm": "audio/pcm", "ogg_opus": "audio/ogg",
           "ogg": "audio/ogg", "opus": "audio/ogg"}
MS_PER_CHAR = 50
MIN_MS, MAX_MS = 100, 5000


def duration_ms(text: str, speed: float) -> int:
    return int(min(MAX_MS, max(MIN_MS, len(text) * MS_PER_CHAR / speed)))


# ------------------------------------------------------------------ silent audio of each format
def pcm_silence(ms: int, sample_rate: int) -> bytes:
    """Raw PCM, 16-bit little-endian mono."""
    return bytes(2 * (sample_rate * ms // 1000))


def wav_silence(ms: int, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm_silence(ms, sample_rate))
    return buf.getvalue()


# MPEG audio layer III: sample rate -> (version bits, sample-rate index, samples per frame)
_MP3_RATES = {44100: (0b11, 0, 1152), 48000: (0b11, 1, 1152), 32000: (0b11, 2, 1152),
              22050: (0b10, 0, 576), 24000: (0b10, 1, 576), 16000: (0b10, 2, 576),
              11025: (0b00, 0, 576), 12000: (0b00, 1, 576), 8000: (0b00, 2, 576)}


def mp3_silence(ms: int, sample_rate: int) -> bytes:
    """Silent MPEG layer III frames, mono, 64 kbit/s: a frame header and an all-zero body (no
    bits for any granule: the decoder outputs silence)."""
    version, rate_index, samples = _MP3_RATES[sample_rate]
    mpeg1 = version == 0b11
    bitrate_index = 0b0101 if mpeg1 else 0b1000  # 64 kbit/s in either table
    frame_len = (144 if mpeg1 else 72) * 64000 // sample_rate
    header = struct.pack(">I", (0x7FF << 21) | (version << 19) | (0b01 << 17) | (1 << 16)  # layer III, no CRC
                         | (bitrate_index << 12) | (rate_index << 10) | (0b11 << 6))  # mono
    frames = max(1, math.ceil(ms * sample_rate / 1000 / samples))
    return (header + bytes(frame_len - 4)) * frames


def _ogg_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else (crc << 1)
            crc &= 0xFFFFFFFF
    return crc


def _ogg_page(packets: list[bytes], granule: int, seq: int, flags: int, serial: int = 0x5A4E4258) -> bytes:
    lacing = b""
    for p in packets:
        lacing += b"\xff" * (len(p) // 255) + bytes([len(p) % 255])
    header = struct.pack("<4sBBqIIIB", b"OggS", 0, flags, granule, serial, seq, 0, len(lacing)) + lacing
    page = header + b"".join(packets)
    return page[:22] + struct.pack("<I", _ogg_crc(page)) + page[26:]


def ogg_opus_silence(ms: int, sample_rate: int) -> bytes:
    """Ogg Opus (RFC 7845): OpusHead, OpusTags, then 20 ms packets whose one frame is empty (the
    decoder fills it with silence)."""
    pre_skip = 312
    head = struct.pack("<8sBBHIhB", b"OpusHead", 1, 1, pre_skip, sample_rate, 0, 0)
    vendor = b"coze-mitm sandbox"
    tags = b"OpusTags" + struct.pack("<I", len(vendor)) + vendor + struct.pack("<I", 0)
    n = min(250, max(1, math.ceil(ms / 20)))
    packets = [b"\xf8"] * n  # TOC: CELT fullband 20 ms, mono, one frame
    return (_ogg_page([head], 0, 0, 0x02) + _ogg_page([tags], 0, 1, 0)
            + _ogg_page(packets, pre_skip + 960 * n, 2, 0x04))


def silence(fmt: str, ms: int, sample_rate: int) -> bytes:
    if fmt == "mp3":
        return mp3_silence(ms, sample_rate)
    if fmt == "wav":
        return wav_silence(ms, sample_rate)
    if fmt == "pcm":
        return pcm_silence(ms, sample_rate)
    return ogg_opus_silence(ms, sample_rate)


# ------------------------------------------------------------------ endpoints
def speech(st: "State", req: "Handler") -> None:
    """POST /v1/audio/speech {input, voice_id, response_format?, speed?, sample_rate?}: the audio itself
    (Content-Type audio/...), or Coze's JSON error."""
    data = req.json_body()
    if data is None:
        return req.error(4000, "request body must be a JSON object")
    text = data.get("input")
    if not isinstance(text, str) or not text:
        return req.error(4000, "input is required: the text to speak")
    if len(text) > MAX_INPUT:
        return req.error(4000, f"input is longer than {MAX_INPUT} characters")
    voice_id = data.get("voice_id")
    if not isinstance(voice_id, str) or not voice_id:
        return req.error(4000, "voice_id is required")
    fmt = data.get("response_format", "mp3")
    if fmt not in FORMATS:
        return req.error(4000, f"response_format must be one of {sorted(FORMATS)}, got {fmt!r}")
    speed = data.get("speed", 1)
    if not is_number(speed) or not 0.2 <= speed <= 3:
        return req.error(4000, f"speed must be a number in 0.2..3, got {speed!r}")
    sample_rate = data.get("sample_rate", 24000)
    if sample_rate not in SAMPLE_RATES or isinstance(sample_rate, bool):
        return req.error(4000, f"sample_rate must be one of {SAMPLE_RATES}, got {sample_rate!r}")
    audio = silence(fmt, duration_ms(text, speed), sample_rate)
    req.send_bytes(200, audio, FORMATS[fmt])


def transcriptions(st: "State", req: "Handler") -> None:
    """POST /v1/audio/transcriptions (multipart/form-data, field ``file``): {"text": <a canned transcript>}."""
    fields = parse_multipart(req.headers.get("Content-Type"), req.body)
    if "file" not in fields:
        return req.error(4000, "a multipart/form-data body with a 'file' field (the audio) is required")
    name, ctype, content = fields["file"]
    if not content:
        return req.error(4000, "the audio file is empty")
    req.ok({"text": f"Sandbox transcript of {len(content)} bytes of audio"})
