"""Decode at most a small prefix of a content-encoded body.

What upstream sends is not trusted: a 32 KB zstd answer can decode to 1 GiB, a 64 KB brotli one to
tens of GiB. `decoded_prefix` never produces (nor holds) much more than `limit` bytes of output,
with each codec's incremental decoder, so a hostile body costs bounded memory and time. Only
coze-mitm's own decisions read bodies this way; what reaches the client is the body as it came.
No mitmproxy import (tokens.py uses it too).
"""

from __future__ import annotations

import io
import zlib

import brotli  # the codecs mitmproxy itself decodes with (11.x and 12.x)
import zstandard

ZSTD_MAX_WINDOW = 1 << 24  # a frame asking for a bigger window is not decoded (legit small answers need far less)
# Brotli 1.1 (mitmproxy 11's) has no output limit: it is fed 4 bytes per call, which complete at most about
# one 16 MiB command, so one call's output stays far below the growth a whole bomb would cause.
BROTLI_PIECE = 4


def decoded_prefix(raw: bytes, encoding: str, limit: int) -> bytes | None:
    """The first `limit` bytes (or fewer, if the body is shorter) of `raw` decoded per its
    Content-Encoding; None for an encoding we do not read or a body that does not decode."""
    encoding = encoding.strip().lower()
    try:
        if encoding in ("", "identity", "none"):
            return raw[:limit]
        if encoding in ("gzip", "x-gzip"):
            return _zlib(raw, 16 + zlib.MAX_WBITS, limit)
        if encoding == "deflate":
            try:
                return _zlib(raw, zlib.MAX_WBITS, limit)
            except zlib.error:
                return _zlib(raw, -zlib.MAX_WBITS, limit)  # raw deflate, as some servers send it
        if encoding == "br":
            return _brotli(raw, limit)
        if encoding == "zstd":
            return _zstd(raw, limit)
    except (zlib.error, brotli.error, zstandard.ZstdError, ValueError, MemoryError):
        return None
    return None


def _zlib(raw: bytes, wbits: int, limit: int) -> bytes:
    return zlib.decompressobj(wbits).decompress(raw, limit)


def _brotli_has_output_limit() -> bool:
    try:
        brotli.Decompressor().process(b"", output_buffer_limit=1)
    except TypeError:
        return False
    return True


_BROTLI_OUTPUT_LIMIT = _brotli_has_output_limit()  # Brotli >= 1.2 (what newer mitmproxy releases use)


def _brotli(raw: bytes, limit: int) -> bytes:
    decoder = brotli.Decompressor()
    if _BROTLI_OUTPUT_LIMIT:
        return decoder.process(raw, output_buffer_limit=limit)[:limit]
    out = bytearray()
    view = memoryview(raw)
    for i in range(0, len(view), BROTLI_PIECE):
        out += decoder.process(bytes(view[i:i + BROTLI_PIECE]))[: limit - len(out)]  # no copy of a big piece
        if len(out) >= limit or decoder.is_finished():
            break
    return bytes(out)


def _zstd(raw: bytes, limit: int) -> bytes:
    reader = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_reader(io.BytesIO(raw))
    out = bytearray()
    while len(out) < limit:
        piece = reader.read(limit - len(out))
        if not piece:
            break
        out += piece
    return bytes(out)
