"""decoded_prefix: a bounded prefix of a content-encoded body, for every encoding mitmproxy decodes."""

import gzip
import zlib

import brotli
import pytest
import zstandard

from coze_mitm.core.bounded import decoded_prefix

BODY = b'{"code":4100,"msg":"' + b"token invalid " * 2000 + b'"}'
ENCODERS = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": zstandard.ZstdCompressor().compress,
    "identity": lambda b: b,
    "": lambda b: b,
}


@pytest.mark.parametrize("encoding", ENCODERS)
def test_prefix_of_every_encoding(encoding):
    raw = ENCODERS[encoding](BODY)
    assert decoded_prefix(raw, encoding, 1 << 20) == BODY  # shorter than the limit: all of it
    assert decoded_prefix(raw, encoding.upper(), 100) == BODY[:100]


def test_raw_deflate_accepted():
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    assert decoded_prefix(c.compress(BODY) + c.flush(), "deflate", 50) == BODY[:50]


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd", "deflate"])
def test_garbage_and_unknown_encodings_give_none(encoding):
    assert decoded_prefix(b"\x00not compressed at all" * 10, encoding, 100) is None
    assert decoded_prefix(BODY, "compress", 100) is None
    assert decoded_prefix(gzip.compress(BODY), "gzip, br", 100) is None


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_a_bomb_yields_only_the_limit(encoding):
    big = b" " * (64 << 20)
    raw = {"gzip": gzip.compress, "br": lambda b: brotli.compress(b, quality=1),
           "zstd": zstandard.ZstdCompressor().compress}[encoding](big)
    assert decoded_prefix(raw, encoding, 65537) == big[:65537]
