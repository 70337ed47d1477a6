"""usage.py: Coze's usage read from streams chunk by chunk, and from /v3/chat/retrieve."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib

import brotli
import zstandard

import pytest
from hypothesis import given, settings, strategies as st

from coze_mitm.core.usage import (
    COMPLETED, CREATED, MAX_FRAME, WORKFLOW_MESSAGE, SSEUsageReader, Usage, retrieve_body_ok, usage_from_retrieve,
)


def chat_obj(chat_id="7390000000000000001", status="completed", tokens=42, inp=40, out=2, **extra):
    return {"id": chat_id, "conversation_id": "7390000000000000009", "bot_id": "7380000000000000000",
            "status": status, "usage": {"token_count": tokens, "output_count": out, "input_count": inp}, **extra}


def frame(event: str, data, *, sep=":", nl="\n") -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event{sep}{event}{nl}data{sep}{payload}{nl}{nl}".encode()


def coze_stream(tokens=42, deltas=("Hel", "lo", ", wor", "ld! 你好"), **kw) -> bytes:
    """What Coze's /v3/chat sends with stream=true (the stand-in's format: no space after the colon)."""
    out = frame("conversation.chat.created", chat_obj(status="created", tokens=0, inp=0, out=0), **kw)
    out += frame("conversation.chat.in_progress", chat_obj(status="in_progress", tokens=0, inp=0, out=0), **kw)
    for d in deltas:
        out += frame("conversation.message.delta", {"id": "m1", "role": "assistant", "type": "answer", "content": d}, **kw)
    out += frame("conversation.message.completed", {"id": "m1", "content": "".join(deltas)}, **kw)
    out += frame(COMPLETED, chat_obj(tokens=tokens, inp=tokens - 2, out=2), **kw)
    out += frame("done", '"[DONE]"', **kw)
    return out


def read_all(stream: bytes, cuts=(), **kw) -> SSEUsageReader:
    seen = []
    reader = SSEUsageReader(seen.append, **kw)
    start = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        chunk = stream[start:cut]
        if chunk:
            assert reader(chunk) is chunk  # handed on unchanged: the very same object
        start = cut
    assert reader(b"") == b""
    assert seen == reader.usages
    return reader


def traced_peak(call) -> int:
    """The peak of Python allocations (tracemalloc) while `call()` runs."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class TestStream:
    def test_counts_the_completed_event(self):
        reader = read_all(coze_stream(tokens=123))
        assert reader.usages == [Usage(123, 121, 2, "7390000000000000001")]
        assert reader.token_count == 123 and reader.skipped_frames == 0 and not reader.unreadable

    def test_reports_the_moment_the_frame_is_complete(self):
        # a stream cut right after chat.completed (no `done`, no end of message) still counts
        seen = []
        reader = SSEUsageReader(seen.append)
        stream = coze_stream(tokens=7)
        cut = stream.index(b"event:done")
        reader(stream[:cut - 1])
        assert seen == []  # the blank line that ends the frame has not arrived yet
        reader(stream[cut - 1:cut])
        assert [u.token_count for u in seen] == [7]

    @pytest.mark.parametrize("sep", [":", ": "])
    @pytest.mark.parametrize("nl", ["\n", "\r\n", "\r"])
    def test_line_end_and_space_variants(self, sep, nl):
        assert read_all(coze_stream(tokens=9, sep=sep, nl=nl)).token_count == 9

    def test_crlf_split_between_chunks(self):
        stream = coze_stream(tokens=5, nl="\r\n")
        cuts = [i + 1 for i in range(len(stream)) if stream[i:i + 1] == b"\r"]  # every \r ends a chunk
        reader = read_all(stream, cuts)
        assert reader.token_count == 5 and reader.skipped_frames == 0

    def test_multi_line_data_comments_ids_and_bom(self):
        data = json.dumps(chat_obj(tokens=77), indent=1).splitlines()
        stream = (b"\xef\xbb\xbf: keep-alive comment\n\n"
                  + b"id: 1\nretry: 1000\nevent:" + COMPLETED.encode() + b"\n"
                  + b"".join(b"data:" + line.encode() + b"\n" for line in data) + b"\n")
        assert read_all(stream).token_count == 77

    def test_data_before_event_line(self):
        stream = b"data:" + json.dumps(chat_obj(tokens=3)).encode() + b"\nevent:" + COMPLETED.encode() + b"\n\n"
        assert read_all(stream).token_count == 3

    def test_last_frame_without_blank_line_counts_at_the_end(self):
        stream = coze_stream(tokens=11)
        stream = stream[: stream.index(b"event:done")] + frame(COMPLETED, chat_obj("c2", tokens=4)).rstrip(b"\n")
        reader = read_all(stream)
        assert [u.token_count for u in reader.usages] == [11, 4]

    def test_workflow_chat_stream_reports_the_same_event(self):
        # /v1/workflows/chat streams the same chat events (plus its own) and ends with chat.completed
        stream = (frame("conversation.chat.created", chat_obj(status="created", tokens=0))
                  + frame("conversation.message.delta", {"content": "x", "type": "answer"})
                  + frame("conversation.message.completed", {"type": "verbose", "content": "{\"msg_type\":\"generate_answer_finish\"}"})
                  + frame(COMPLETED, chat_obj(tokens=1500, inp=1400, out=100))
                  + frame("done", '"[DONE]"'))
        assert read_all(stream).token_count == 1500

    @pytest.mark.parametrize("usage", [
        {"token_count": "12"}, {"token_count": True}, {"token_count": -1}, {"token_count": 1.5},
        {"output_count": 3}, {"token_count": 10**13}, "12", None,
    ])
    def test_usage_that_is_not_a_count_is_not_counted(self, usage):
        stream = frame(COMPLETED, {"id": "c", "status": "completed", "usage": usage})
        reader = read_all(stream)
        assert reader.usages == [] and reader.skipped_frames == 1

    @pytest.mark.parametrize("data", ["{not json", "\"[DONE]\"", "[1,2]", "\xff"])
    def test_garbage_data_is_skipped(self, data):
        stream = frame(COMPLETED, data) + frame(COMPLETED, chat_obj(tokens=2))
        reader = read_all(stream)
        assert reader.token_count == 2 and reader.skipped_frames == 1

    def test_other_events_with_usage_are_not_counted(self):
        stream = frame("conversation.chat.in_progress", chat_obj(tokens=999)) + frame(COMPLETED, chat_obj(tokens=1))
        assert read_all(stream).token_count == 1

    def test_other_events_can_be_asked_for(self):
        stream = frame("conversation.chat.failed", chat_obj(status="failed", tokens=8)) + frame(COMPLETED, chat_obj(tokens=1))
        reader = read_all(stream, events=(COMPLETED, "conversation.chat.failed"))
        assert reader.token_count == 9

    def test_a_failing_callback_does_not_break_the_stream(self):
        def boom(usage):
            raise RuntimeError("store down")

        reader = SSEUsageReader(boom)
        stream = coze_stream() * 2
        assert reader(stream) is stream
        assert reader(b"more") == b"more"
        assert reader.unreadable == "usage reader failed: RuntimeError"

    def test_event_line_after_a_long_delta_line_is_still_read(self):
        # a frame we skip keeps only a short prefix of each line: enough to see a later `event:` field
        stream = (b"event:conversation.message.delta\ndata:" + b"x" * 5000 + b"\n"
                  + b"event:" + COMPLETED.encode() + b"\ndata:" + json.dumps(chat_obj(tokens=6)).encode() + b"\n\n")
        assert read_all(stream, cuts=range(0, len(stream), 100)).token_count == 6


class TestBounds:
    def test_oversized_frame_is_skipped_and_the_next_one_counts(self):
        big = chat_obj(tokens=5, padding="p" * (MAX_FRAME + 10))
        stream = frame(COMPLETED, big) + frame(COMPLETED, chat_obj("c2", tokens=6))
        reader = read_all(stream, cuts=range(0, len(stream), 4096))
        assert reader.token_count == 6 and reader.skipped_frames == 1

    def test_frame_just_under_the_bound_counts(self):
        obj = chat_obj(tokens=5)
        body = frame(COMPLETED, obj)
        obj["padding"] = "p" * (MAX_FRAME - len(body) - 20)
        assert len(frame(COMPLETED, obj)) < MAX_FRAME
        assert read_all(frame(COMPLETED, obj), cuts=range(0, MAX_FRAME, 1000)).token_count == 5

    @pytest.mark.parametrize("event", [COMPLETED, "conversation.message.delta"])
    def test_hostile_endless_frame_keeps_memory_bounded(self, event):
        """An upstream sending one frame forever (no line end): what is kept never exceeds max_frame."""
        reader = SSEUsageReader(max_frame=MAX_FRAME)
        reader(b"event:" + event.encode() + b"\ndata:{\"usage\":")
        chunk = b"9" * 65536
        tracemalloc.start()
        try:
            for _ in range(1600):  # 100 MiB
                reader(chunk)
                assert len(reader._line) + reader._size <= MAX_FRAME
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * MAX_FRAME  # nothing grows with the stream (the chunk itself is not traced)
        # the stream goes on: the frame ends, and a proper one after it still counts
        reader(b"\n\n" + frame(COMPLETED, chat_obj(tokens=3)))
        reader(b"")
        assert reader.token_count == 3

    def test_endless_lines_without_blank_line_stay_bounded(self):
        reader = SSEUsageReader()
        reader(b"event:" + COMPLETED.encode() + b"\n")
        for _ in range(2000):
            reader(b"data:" + b"1" * 1000 + b"\n")
            assert len(reader._line) + sum(map(len, reader._data)) <= MAX_FRAME
        assert reader.skipped_frames == 1


class TestEncodings:
    def test_gzip_stream_in_small_chunks(self):
        raw = coze_stream(tokens=31) * 3
        body = gzip.compress(raw)
        reader = read_all(body, cuts=range(0, len(body), 7), content_encoding="gzip")
        assert reader.token_count == 93 and not reader.unreadable

    @pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS])
    def test_deflate_with_and_without_zlib_header(self, wbits):
        c = zlib.compressobj(wbits=wbits)
        body = c.compress(coze_stream(tokens=12)) + c.flush()
        assert read_all(body, cuts=range(0, len(body), 5), content_encoding="deflate").token_count == 12

    @pytest.mark.parametrize("step", [10**9, 3, 1000])
    def test_gzip_chunk_that_inflates_past_the_frame_bound(self, step):
        # one compressed chunk inflating to many max_frame pieces, the usage at the very end
        raw = frame("conversation.message.delta", {"content": "x" * (5 * MAX_FRAME)}) + frame(COMPLETED, chat_obj(tokens=8))
        body = gzip.compress(raw)
        assert read_all(body, cuts=range(0, len(body), step), content_encoding="gzip").token_count == 8

    def test_unknown_encoding_makes_the_reader_inert(self):
        reader = read_all(b"\x8b\x00garbage", content_encoding="compress")  # br is read since issue 24
        assert reader.usages == [] and reader.unreadable == "content-encoding 'compress' is not read"

    def test_corrupt_gzip_is_unreadable_not_an_error(self):
        reader = read_all(b"\x1f\x8b\x08\x00garbage-garbage", content_encoding="gzip")
        assert reader.usages == [] and reader.unreadable == "corrupt compressed stream"

    def test_gzip_bomb_is_read_in_bounded_pieces(self):
        bomb = gzip.compress(b"data:" + b"0" * (80 * 1024 * 1024))  # ~80 KiB that inflate to 80 MiB
        reader = SSEUsageReader(content_encoding="gzip")
        peak = traced_peak(lambda: reader(bomb))
        assert reader.unreadable == "decompressed stream too large"
        assert peak < 16 * MAX_FRAME


# Any cutting of a stream into chunks, with any line-end style, yields the same usages.
@settings(max_examples=300, deadline=None)
@given(
    tokens=st.integers(0, 10**9),
    nl=st.sampled_from(["\n", "\r\n", "\r"]),
    sep=st.sampled_from([":", ": "]),
    deltas=st.lists(st.text(max_size=30), max_size=6),
    cuts=st.lists(st.integers(0, 4000), max_size=40),
)
def test_any_chunking_gives_the_same_count(tokens, nl, sep, deltas, cuts):
    stream = coze_stream(tokens=max(tokens, 2), deltas=deltas, nl=nl, sep=sep)
    reader = read_all(stream, [c % (len(stream) + 1) for c in cuts])
    assert reader.usages == [Usage(max(tokens, 2), max(tokens, 2) - 2, 2, "7390000000000000001")]
    assert reader.skipped_frames == 0


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 10**6), max_size=30), level=st.integers(1, 9))
def test_any_chunking_of_a_gzip_stream_gives_the_same_count(cuts, level):
    body = gzip.compress(coze_stream(tokens=17) * 2, compresslevel=level)
    reader = read_all(body, [c % (len(body) + 1) for c in cuts], content_encoding="gzip")
    assert reader.token_count == 34


class TestRetrieve:
    def answer(self, **data):
        return json.dumps({"code": 0, "msg": "", "data": chat_obj(**data)}).encode()

    def test_completed_chat(self):
        assert usage_from_retrieve(self.answer(tokens=55, inp=53)) == Usage(55, 53, 2, "7390000000000000001")

    def test_str_body(self):
        assert usage_from_retrieve(self.answer(tokens=5).decode()).token_count == 5

    @pytest.mark.parametrize("status", ["created", "in_progress", "failed", "requires_action", None])
    def test_not_completed_is_not_counted(self, status):
        assert usage_from_retrieve(self.answer(status=status)) is None

    @pytest.mark.parametrize("body", [
        b"", b"{", b"[]", b'{"code": 4100, "msg": "bad token"}', b'{"code": 0, "data": null}',
        b'{"code": 0, "data": {"status": "completed"}}', b"[" * 100000,
    ])
    def test_garbage_is_none(self, body):
        assert usage_from_retrieve(body) is None

    def test_oversized_body_is_not_parsed(self):
        body = self.answer(tokens=5, padding="x" * 300_000)
        assert usage_from_retrieve(body) is None
        assert usage_from_retrieve(body, max_bytes=400_000).token_count == 5

    def test_body_size_gate(self):
        assert retrieve_body_ok(1000, "") and retrieve_body_ok(1000, "gzip")
        assert not retrieve_body_ok(300_000, "identity")
        assert not retrieve_body_ok(20_000, "br")  # may inflate past the bound


# -- issue 24: br/zstd streams, the chat's ids for a stream cut short, workflow running totals ----------------
COMPRESS = {"br": brotli.compress, "zstd": lambda b: zstandard.ZstdCompressor().compress(b)}


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 3000), max_size=12), encoding=st.sampled_from(["br", "zstd"]))
def test_any_chunking_of_a_br_or_zstd_stream_gives_the_same_count(cuts, encoding):
    body = COMPRESS[encoding](coze_stream(tokens=77))
    assert read_all(body, cuts=cuts, content_encoding=encoding).token_count == 77


@pytest.mark.parametrize("encoding", ["br", "zstd"])
def test_corrupt_br_or_zstd_is_unreadable_not_an_error(encoding):
    reader = read_all(COMPRESS[encoding](coze_stream())[:5] + b"\xff" * 64, content_encoding=encoding)
    assert reader.usages == [] and reader.unreadable == "corrupt compressed stream"


@pytest.mark.parametrize("encoding, peak_bound", [("zstd", 8 * 1024 * 1024), ("br", 48 * 1024 * 1024)])
def test_br_and_zstd_bombs_are_cut_off_bounded(encoding, peak_bound):
    # 200 MiB of zeros in a few KiB; brotli 1.1 (mitmproxy 11's) completes up to ~16 MiB per 4-byte call
    bomb = COMPRESS[encoding](b"\0" * (200 * 1024 * 1024))
    reader = SSEUsageReader(content_encoding=encoding, max_decoded=8 * 1024 * 1024)
    peak = traced_peak(lambda: reader(bomb))
    assert reader.unreadable == "decompressed stream too large"
    assert peak < peak_bound


class TestCutShort:
    def test_the_chat_ids_of_a_stream_cut_after_chat_created(self):
        whole = coze_stream(tokens=9)
        cut = whole[: whole.index(b"event:conversation.message.delta")]
        reader = read_all(cut, events=(COMPLETED,), ids_from=CREATED)
        assert reader.usages == [] and reader.chat_ref == ("7390000000000000009", "7390000000000000001")

    def test_a_whole_stream_counts_and_names_its_chat(self):
        reader = read_all(coze_stream(tokens=9), events=(COMPLETED,), ids_from=CREATED)
        assert reader.token_count == 9 and reader.chat_ref is not None

    @pytest.mark.parametrize("ids", [{"conversation_id": 7, "id": "1"}, {"conversation_id": "c"}, {"conversation_id": "c" * 129, "id": "1"}])
    def test_ids_that_are_not_ids_are_not_kept(self, ids):
        reader = read_all(frame(CREATED, dict(ids, status="created")), events=(COMPLETED,), ids_from=CREATED)
        assert reader.chat_ref is None


def workflow_message(content: str, usage: dict | None = None, eid: int = 0) -> bytes:
    data = {"content": content, "node_title": "End", "node_seq_id": "0", "node_is_finish": usage is not None}
    if usage is not None:
        data["usage"] = usage
    return f"id: {eid}\nevent: Message\ndata: {json.dumps(data)}\n\n".encode()


class TestWorkflowMessages:
    def test_running_totals_count_their_growth_once(self):
        stream = (workflow_message("a") + workflow_message("", {"token_count": 10, "input_count": 4, "output_count": 6})
                  + workflow_message("b") + workflow_message("", {"token_count": 10, "input_count": 4, "output_count": 6})
                  + workflow_message("c", {"token_count": 25, "input_count": 9, "output_count": 16})
                  + b"id: 9\nevent: Done\ndata: {}\n\n")
        reader = read_all(stream, cuts=range(0, len(stream), 7), events=(WORKFLOW_MESSAGE,), cumulative=True)
        assert [u.token_count for u in reader.usages] == [10, 15] and reader.token_count == 25
        assert (sum(u.input_count for u in reader.usages), sum(u.output_count for u in reader.usages)) == (9, 16)

    def test_messages_without_usage_are_not_parsed(self):
        reader = read_all(b"".join(workflow_message(f"piece {i}") for i in range(50)), events=(WORKFLOW_MESSAGE,),
                          cumulative=True)
        assert reader.usages == [] and reader.skipped_frames == 0

    def test_a_cut_stream_keeps_what_it_saw(self):
        stream = workflow_message("", {"token_count": 10}) + workflow_message("x")[:20]
        assert read_all(stream, events=(WORKFLOW_MESSAGE,), cumulative=True).token_count == 10

