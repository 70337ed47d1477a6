"""addons/cycles.py: mitmproxy's per-message type check without reference cycles, same verdicts; start-up
objects frozen out of the collector's way while the proxy runs.

The cycles are counted with the garbage collector itself (disabled while messages are built, then one
collection says how many objects only it could free); the verdicts are compared with mitmproxy's own
function on the same values and types; the real mitmdump with the bundle says what it runs with.
"""

from __future__ import annotations

import collections.abc
import gc
import io
import typing
import weakref

import pytest
from mitmproxy import http
from mitmproxy.utils import typecheck

from coze_mitm.process import cycles
from tests.harness import Mitmdump


def build_messages(n: int) -> None:
    for _ in range(n):
        body = bytearray(64 * 1024)  # what a frame that builds a message may hold (a buffer)
        http.Request("example.org", 80, b"GET", b"http", b"example.org", b"/", b"HTTP/1.1", http.Headers(),
                     None, None, 1.0, None)
        http.Response(b"HTTP/1.1", 200, b"OK", http.Headers(), None, None, 1.0, None)
        del body


def cyclic_garbage_after(n: int) -> int:
    gc.collect()
    gc.disable()
    try:
        build_messages(n)
        return gc.collect()
    finally:
        gc.enable()


@pytest.fixture
def restore():
    saved = typecheck.check_option_type
    yield
    typecheck.check_option_type = saved


def test_mitmproxys_check_leaves_cycles_and_installed_one_does_not(restore):
    if not __debug__:
        pytest.skip("under -O mitmproxy does not check messages at all")
    typecheck.check_option_type = cycles._original
    assert cyclic_garbage_after(20) >= 20 * 4  # exception, traceback, frames per optional None field
    cycles.install()
    assert typecheck.check_option_type is cycles.check_option_type
    assert cyclic_garbage_after(20) == 0


def test_a_wrong_field_is_still_refused_with_mitmproxys_message(restore):
    cycles.install()
    with pytest.raises(TypeError) as ours:
        http.Response(b"HTTP/1.1", 200, b"OK", http.Headers(), None, None, 1.0, "late")
    with pytest.raises(TypeError) as theirs:
        cycles._original("timestamp_end", "late", float | None)
    assert str(ours.value) == str(theirs.value) == "Expected float | None for timestamp_end, but got <class 'str'>."


class Readable:
    def read(self):
        return b""


class Reader(typing.Protocol):  # not runtime_checkable: isinstance refuses it (raises TypeError)
    def read(self) -> bytes: ...


TYPES = [typing.Optional[Reader], bytes | None, typing.Optional[bytes], str, int, float, float | None, bool, typing.Any, type(None),
         typing.Optional[str], typing.Sequence[str], collections.abc.Sequence[str], typing.Optional[typing.Sequence[str]],
         tuple[int, str], typing.Union[tuple[int, str], None], http.Headers | None, typing.TextIO, typing.BinaryIO,
         typing.IO[str], typing.Union[int, str, None], float | int | None, typing.Union[Reader, float],
         collections.abc.Sequence, object, http.Headers]
VALUES = [None, b"x", "x", 1, 1.5, True, ["a", "b"], ("a", "b"), (1, "a"), [1, "a"], http.Headers(), Readable(),
          io.BytesIO(), object(), [1, 2]]


@pytest.mark.parametrize("typeinfo", TYPES, ids=str)
def test_same_verdict_as_mitmproxy_for_every_value(typeinfo):
    for value in VALUES:
        def verdict(check):
            try:
                check("field", value, typeinfo)
            except TypeError as e:
                return f"refused: {e}"
            return "accepted"
        assert verdict(cycles.check_option_type) == verdict(cycles._original), (typeinfo, value)


def test_running_freezes_what_exists_and_done_unfreezes(monkeypatch):
    monkeypatch.setattr(cycles, "_froze_at_start", False)  # as in a fresh process
    part = cycles.Cycles()
    try:
        gc.disable()
        garbage = [[]]
        garbage[0].append(garbage)  # a cycle nobody holds: must be collected, not frozen
        del garbage
        part.running()
        frozen = gc.get_freeze_count()
        assert frozen > 1000
        assert gc.collect() == 0  # the cycle was collected before the freeze
        # the start-up objects left the oldest generation: what the collector still scans there is
        # only what was made since (a full collection is no longer held back by them)
        assert len(gc.get_objects(generation=2)) < frozen / 10
    finally:
        gc.enable()
        part.done()
    assert gc.get_freeze_count() == 0


class Node:
    me: "Node"


def test_a_script_reload_does_not_freeze_live_flows(monkeypatch):
    """mitmproxy reloads a changed script: done, then the new script's running. Frozen objects are never
    collected, and the flows alive at that moment (mitmweb's whole view) must not become so."""
    monkeypatch.setattr(cycles, "_froze_at_start", False)
    first, reloaded = cycles.Cycles(), cycles.Cycles()
    try:
        first.running()
        assert gc.get_freeze_count() > 1000
        first.done()
        live_flow = Node()
        live_flow.me = live_flow  # in a cycle, alive at the reload, garbage a moment later
        gone = weakref.ref(live_flow)
        reloaded.running()
        assert gc.get_freeze_count() == 0
        del live_flow
        gc.collect()
        assert gone() is None  # collected (a frozen object never is)
    finally:
        reloaded.done()
        first.done()


@pytest.mark.process
def test_the_bundle_installs_it_when_asked(tmp_path):
    """The real mitmdump with the bundle and coze_tune_process (as run_mitm.py runs it): messages checked by the
    cycle-free function, start-up frozen. Without the option nothing changes (tests/test_neighbours.py)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import gc, logging\nfrom mitmproxy.utils import typecheck\n"
        "class P:\n    def running(self):\n"
        "        logging.warning('typecheck is %s.%s, %d objects frozen', typecheck.check_option_type.__module__,"
        " typecheck.check_option_type.__name__, gc.get_freeze_count())\naddons = [P()]\n")
    proxy = Mitmdump(tmp_path, ["coze_pat=pat_test_only_0123456789abcdef", "coze_tune_process=true"],
                     extra_args=["-s", str(probe)]).start()
    try:
        assert proxy.wait_for_output(r"typecheck is coze_mitm\.process\.cycles\.check_option_type, \d{5,} objects frozen", timeout=15), \
            proxy.output
    finally:
        proxy.stop()


def test_the_types_remembered_stay_bounded():
    # Every new type object is remembered (by identity) until the bound; later ones are checked without.
    for i in range(cycles._MAX_PLANS + 50):
        kind = type(f"Kind{i}", (), {})
        cycles.check_option_type("field", kind(), kind | None)
        with pytest.raises(TypeError):
            cycles.check_option_type("field", "not a kind", kind | None)
    assert len(cycles._plans) <= cycles._MAX_PLANS


def test_tuning_puts_back_what_it_changed(monkeypatch):
    """ProcessTuning (coze_tune_process): applied at running, undone at done: mitmproxy's own check back, nothing
    frozen, no trim thread."""
    import threading

    from coze_mitm.process.tuning import ProcessTuning

    monkeypatch.setattr(cycles, "_froze_at_start", False)
    original = typecheck.check_option_type
    tuning = ProcessTuning()
    tuning.wanted = True
    tuning.running()
    try:
        assert typecheck.check_option_type is cycles.check_option_type
        assert gc.get_freeze_count() > 1000
    finally:
        tuning.done()
    assert typecheck.check_option_type is original
    assert gc.get_freeze_count() == 0
    assert "coze-heap-trim" not in {t.name for t in threading.enumerate()}


def test_someone_elses_freeze_and_check_are_left_alone(monkeypatch):
    monkeypatch.setattr(cycles, "_froze_at_start", False)
    gc.freeze()  # another addon's
    theirs = gc.get_freeze_count()
    part = cycles.Cycles()
    try:
        part.running()
        assert gc.get_freeze_count() == theirs  # not frozen again, and not thawed at done
        part.done()
        assert gc.get_freeze_count() == theirs
    finally:
        gc.unfreeze()

    def their_check(name, value, typeinfo):
        return None

    monkeypatch.setattr(typecheck, "check_option_type", their_check)
    cycles.uninstall()
    assert typecheck.check_option_type is their_check  # replaced after ours: theirs stays


def test_a_failing_tuning_step_never_stops_the_start(monkeypatch, caplog):
    from coze_mitm.process.tuning import ProcessTuning

    tuning = ProcessTuning()
    tuning.wanted = True
    monkeypatch.setattr(tuning.heap_trim, "running", lambda: (_ for _ in ()).throw(RuntimeError("no threads here")))
    monkeypatch.setattr(cycles, "_froze_at_start", True)
    original = typecheck.check_option_type
    tuning.running()
    assert "process tuning not applied (no threads here)" in caplog.text
    assert typecheck.check_option_type is original and not tuning.active
    tuning.done()
