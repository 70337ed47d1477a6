"""coze-mitm beside other addons in one real mitmdump: its modules live in the coze_mitm package, so a
neighbour script with its own config.py, settings.py and tokens.py works whichever loads first; start-up
says nothing about deprecated events; plain `mitmdump -s addons/coze.py` changes nothing process-wide; and a
script reload runs the package's edited code."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import REPO
from tests.clients import session
from tests.harness import Mitmdump, copied_addons

pytestmark = pytest.mark.process  # every test here starts a process (run_tests.py --fast leaves them out)

PAGE = "https://chat.example.org"
COZE_PY = REPO / "addons" / "coze.py"


def neighbour(tmp_path):
    """A user's own addon whose folder has modules named like coze-mitm's old top-level ones."""
    d = tmp_path / "neighbour"
    d.mkdir()
    (d / "config.py").write_text("GREETING = 'neighbour config'\n")
    (d / "settings.py").write_text("HEADER = 'x-neighbour'\n")
    (d / "tokens.py").write_text("def token():\n    return 'neighbour-token'\n")
    (d / "neighbour.py").write_text(textwrap.dedent("""
        import logging
        import config, settings, tokens

        class Neighbour:
            def running(self):
                logging.warning("neighbour loaded: %s / %s / %s", config.GREETING, settings.HEADER, tokens.token())

            def response(self, flow):
                flow.response.headers[settings.HEADER] = config.GREETING

        addons = [Neighbour()]
    """))
    return d / "neighbour.py"


@pytest.mark.parametrize("order", ["neighbour first", "coze first"])
def test_a_neighbour_with_its_own_config_py_and_coze_mitm_both_work(tmp_path, standin, config_file, order):
    other = neighbour(tmp_path)
    scripts = [str(other), str(COZE_PY)] if order == "neighbour first" else [str(COZE_PY), str(other)]
    args = [a for s in scripts for a in ("-s", s)]
    proxy = Mitmdump(tmp_path, [f"coze_config={config_file}", f"coze_origins={PAGE}"], script=False,
                     extra_args=args).start()
    try:
        assert proxy.wait_for_output(r"neighbour loaded: neighbour config / x-neighbour / neighbour-token", 10), proxy.output
        s = session(proxy)
        # coze-mitm: a preflight answered locally and a tagged request given alice's real token
        pre = s.options(standin.base_url + "/v3/chat", headers={"Origin": PAGE, "Access-Control-Request-Method": "POST"},
                        timeout=10)
        assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == PAGE
        answer = s.get(standin.base_url + "/v1/bots/7000000000000000001",
                       headers={"Authorization": "Bearer user:neighbour-user-0001"}, timeout=10)
        assert answer.status_code == 200 and answer.json()["code"] == 0, answer.text
        # the neighbour: its own config module, not coze-mitm's
        assert answer.headers["x-neighbour"] == "neighbour config"
        assert "Error" not in proxy.output and "Traceback" not in proxy.output, proxy.output
    finally:
        proxy.stop()


def test_startup_prints_no_deprecation_line(tmp_path):
    proxy = Mitmdump(tmp_path, ["coze_pat=pat_test_only_0123456789abcdef"]).start()
    try:
        assert proxy.wait_for_output(r"HTTP\(S\) proxy listening", 5)
        time.sleep(0.3)
    finally:
        proxy.stop()
    assert "Loading script" in proxy.output
    assert "deprecated" not in proxy.output.lower(), proxy.output
    assert "never awaited" not in proxy.output, proxy.output


def test_plain_mitmdump_leaves_the_process_alone_and_the_option_tunes_it(tmp_path):
    """Without coze_tune_process: mitmproxy's type check is its own, nothing frozen, no trim thread. With it:
    all three, as run_mitm.py runs the proxy."""
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent("""
        import gc, logging, threading
        from mitmproxy.utils import typecheck

        class Probe:
            def running(self):
                threads = sorted(t.name for t in threading.enumerate() if t.name == "coze-heap-trim")
                logging.warning("probe: check=%s.%s frozen=%d threads=%s", typecheck.check_option_type.__module__,
                                typecheck.check_option_type.__name__, gc.get_freeze_count(), threads)

        addons = [Probe()]
    """))
    for tuned in (False, True):
        sets = ["coze_pat=pat_test_only_0123456789abcdef"] + (["coze_tune_process=true"] if tuned else [])
        proxy = Mitmdump(tmp_path, sets, extra_args=["-s", str(probe)]).start()
        try:
            assert proxy.wait_for_output(r"probe: check=", 10), proxy.output
        finally:
            proxy.stop()
        line = next(l for l in proxy.lines if "probe: check=" in l)
        if tuned:
            assert "check=coze_mitm.process.cycles.check_option_type" in line, line
            assert "threads=['coze-heap-trim']" in line, line
            assert int(line.split("frozen=")[1].split()[0]) > 10_000, line
        else:
            assert "check=mitmproxy.utils.typecheck.check_option_type" in line, line
            # nothing frozen beyond what a fresh interpreter holds (0 on 3.11, its own few hundred on 3.12)
            fresh = subprocess.run([sys.executable, "-c", "import gc; print(gc.get_freeze_count())"],
                                   capture_output=True, text=True, check=True).stdout.strip()
            assert f"frozen={fresh} threads=[]" in line, line


def test_a_reload_runs_the_packages_edited_code(tmp_path, standin, config_file):
    """Editing a module inside coze_mitm and touching coze.py: the new code answers (README: what a reload covers)."""
    copy = tmp_path / "repo"
    coze_py = copied_addons(copy)
    proxy = Mitmdump(tmp_path, [f"coze_config={config_file}", f"coze_origins={PAGE}"], script=False,
                     extra_args=["-s", str(coze_py)]).start()
    try:
        s = session(proxy)

        def preflight_max_age() -> str:
            return s.options(standin.base_url + "/v3/chat", headers={
                "Origin": PAGE, "Access-Control-Request-Method": "POST"}, timeout=10).headers["Access-Control-Max-Age"]

        assert preflight_max_age() == "600"
        cors = copy / "addons" / "coze_mitm" / "parts" / "cors.py"
        text = cors.read_text()
        assert 'MAX_AGE = "600"' in text
        cors.write_text(text.replace('MAX_AGE = "600"', 'MAX_AGE = "601"'))
        later = time.time() + 5
        os.utime(coze_py, (later, later))
        assert proxy.wait_for_output(r"Loading script[\s\S]*JWT mode[\s\S]*Loading script[\s\S]*JWT mode", 10), proxy.output
        assert preflight_max_age() == "601"
        assert "Addon error" not in proxy.output and "Traceback" not in proxy.output, proxy.output
    finally:
        proxy.stop()
