"""after_answer: bookkeeping queued by a `response` hook runs once the answer has left, in a real mitmdump; an
exception in it is reported like an addon's, and the proxy goes on."""

from __future__ import annotations

import asyncio
import logging

import pytest
import requests

from coze_mitm.after_answer import after_answer
from tests.harness import REPO, Mitmdump, wait_for
from tests.servers import Handler, Server


class Hello(Handler):
    def do_GET(self):
        self.send(200, b'{"code":0}')


# A script whose after_answer callback holds mitmproxy's event loop until the test has received the answer (the
# file `released` appears): if the callback ran before the answer was written, the answer would never come.
HOLDING_SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {addons!r})
from coze_mitm.after_answer import after_answer

here = Path(__file__).parent

def hold(flow):
    (here / "holding").write_text(flow.request.path)
    deadline = time.monotonic() + 30
    while not (here / "released").exists() and time.monotonic() < deadline:
        time.sleep(0.01)  # blocks the loop on purpose: nothing else may be sent meanwhile
    (here / "done").write_text("after the answer" if (here / "released").exists() else "timed out")

def fails(flow):
    raise ValueError("bookkeeping broke")

class Holder:
    def response(self, flow):
        after_answer(fails if flow.request.path == "/fails" else hold, flow)

addons = [Holder()]
"""


@pytest.mark.process
def test_the_callback_runs_once_the_answer_has_left(tmp_path):
    upstream = Server(Hello).start()
    script = tmp_path / "holder.py"
    script.write_text(HOLDING_SCRIPT.format(addons=str(REPO / "addons")))
    proxy = Mitmdump(tmp_path, ["flow_detail=0"], script=False, extra_args=["-s", str(script)]).start()
    try:
        s = requests.Session()
        s.trust_env = False
        r = s.get(upstream.base_url + "/hold", proxies=proxy.proxies, timeout=20)
        assert r.status_code == 200 and r.json() == {"code": 0}
        # the answer is here; the callback starts (now or a moment later) and holds the proxy's loop until released:
        # it was queued behind the write
        assert wait_for(lambda: (tmp_path / "holding").exists() and (tmp_path / "holding").read_text(),
                        what="the callback's start") == "/hold"
        assert not (tmp_path / "done").exists()
        (tmp_path / "released").write_text("")
        assert wait_for(lambda: (tmp_path / "done").exists() and (tmp_path / "done").read_text(),
                        what="the callback's end") == "after the answer"

        # a callback that raises: one "Addon error" line naming it, and the proxy answers the next request
        assert s.get(upstream.base_url + "/fails", proxies=proxy.proxies, timeout=20).status_code == 200
        assert proxy.wait_for_output(r"Addon error: fails \(after the answer left\): bookkeeping broke", timeout=20)
        assert s.get(upstream.base_url + "/again", proxies=proxy.proxies, timeout=20).status_code == 200
    finally:
        proxy.stop()
        upstream.stop()


def broken_bookkeeping():
    return 1 / 0


def test_without_an_event_loop_the_callback_runs_at_once():
    done = []
    after_answer(done.append, "now")
    assert done == ["now"]


def test_in_a_task_the_callback_waits_for_the_task_to_end(caplog):
    """As mitmproxy runs a hook: in a task of its own, which writes the answer before it ends."""
    done = []

    async def hook_task():
        after_answer(done.append, "later")
        after_answer(broken_bookkeeping)
        await asyncio.sleep(0)  # the task goes on (mitmproxy: the other hooks, then the write)
        assert done == []
        done.append("answer written")

    async def proxy():
        await asyncio.create_task(hook_task())
        await asyncio.sleep(0)
        return done

    with caplog.at_level(logging.ERROR, logger="coze.after_answer"):
        assert asyncio.run(proxy()) == ["answer written", "later"]
    assert [r.getMessage() for r in caplog.records] == [
        "Addon error: broken_bookkeeping (after the answer left): division by zero"]
