"""`run_mitm.py --browser [NAME]`: the user's installed browser, started ready, as a user runs it.

The launcher runs as a subprocess (`run_mitm.py --demo --browser chromium|firefox`); the browser it starts is the
real one (Debian's chromium, firefox-esr), headless here through COZE_MITM_BROWSER_ARGS, and driven from outside:
Chromium over its DevTools port (Playwright's connect_over_cdp), Firefox over Marionette (tests/marionette.py).
Each test chats on the demo page and watches the reply stream in, checks that the profile trusts the proxy's CA
(https://coze.mitm) with nothing added to the user's own NSS db, and that the profile is gone once the browser
closes or coze-mitm stops.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import browser as launch_browser
from launcher.common import Fail
from tests.browser import RECORD_REPLY
from tests.conftest import TEST_HOME
from tests.harness import Launcher, clean_env, cmdline, one_error_line, run, wait_for

CHROMIUM = shutil.which("chromium")
FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")
CERTUTIL = shutil.which("certutil")
REPLY_RE = "Sandbox reply to: "
# Root (as in CI containers) needs --no-sandbox for Chromium; a desktop user does not.
ROOT_ARGS = "--no-sandbox " if hasattr(os, "geteuid") and os.geteuid() == 0 else ""


def profiles(confdir: Path) -> list[Path]:
    base = confdir / launch_browser.PROFILES_DIR
    return sorted(base.iterdir()) if base.exists() else []


def no_user_trust_store_touched():
    # The user's own NSS db (Chromium on Linux, certutil's default) and ~/.mozilla stay as they were: absent here.
    assert not (TEST_HOME / ".pki").exists()
    assert not (TEST_HOME / ".mozilla").exists()


# --------------------------------------------------------------------------- arguments and lookup

@pytest.mark.process  # runs run_mitm.py (and a browser)
def test_unknown_browser_name_is_one_line():
    result = run("--demo", "--browser", "netscape")
    assert result.returncode == 2
    line = one_error_line(result)
    assert "--browser netscape" in line and "chrome, chromium, edge, brave, firefox" in line


@pytest.mark.process  # runs run_mitm.py (and a browser)
def test_check_starts_no_browser():
    result = run("--check", "--browser")
    assert result.returncode == 2 and "drop --browser" in one_error_line(result)


def test_a_browser_that_is_not_installed_is_named_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(launch_browser, "candidates", lambda name: [str(tmp_path / f"no-{name}")])
    with pytest.raises(Fail) as e:
        launch_browser.find("brave")
    assert "brave was not found" in e.value.msg and str(tmp_path / "no-brave") in e.value.msg
    with pytest.raises(Fail) as e:
        launch_browser.find(None)
    assert e.value.msg.startswith("--browser: none of Chrome, Chromium, Edge, Brave and Firefox was found")
    assert e.value.code == 2


def test_lookup_places_per_platform(monkeypatch):
    assert "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome" in launch_browser.candidates("chrome", "darwin")
    assert "firefox-esr" in launch_browser.candidates("firefox", "linux")
    monkeypatch.setenv("ProgramFiles", "C:\\Program Files")
    assert any(p.endswith("Microsoft\\Edge\\Application\\msedge.exe") for p in launch_browser.candidates("edge", "win32"))
    assert launch_browser.nss_certutil("win32") is None  # Windows' certutil.exe is another tool: never used


# --------------------------------------------------------------------------- Chromium

def chromium_env(**extra) -> dict:
    return clean_env(COZE_MITM_BROWSER_ARGS=f"{ROOT_ARGS}--headless=new --disable-gpu --remote-debugging-port=0",
                     **extra)


def cdp_browser(playwright, profile: Path):
    port_file = profile / "data" / "DevToolsActivePort"

    def written_port():  # the file appears before its content does
        try:
            first = port_file.read_text().split()[:1]
        except OSError:
            return None
        return first[0] if first and first[0].isdigit() else None

    port = wait_for(written_port, what="DevTools port")
    return playwright.chromium.connect_over_cdp(f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def playwright():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as p:
        yield p


@pytest.mark.process  # runs run_mitm.py (and a browser)
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
@pytest.mark.skipif(CERTUTIL is None, reason="NSS certutil is not installed (apt-get install libnss3-tools)")
def test_demo_browser_chromium_chats_and_its_profile_goes_when_it_closes(tmp_path, playwright):
    began = time.monotonic()
    launcher = Launcher(tmp_path, "--demo", "--browser", "chromium", env=chromium_env()).start()
    try:
        assert launcher.wait_for_output(r"(?s)started chromium .* uses the PAC\s+http://127\.0\.0\.1:\d+/proxy\.pac", 20)
        [profile] = profiles(tmp_path)
        # Only this profile trusts the CA: a private HOME's NSS db, and the user's own HOME untouched.
        assert (profile / "home" / ".pki" / "nssdb" / "cert9.db").exists()
        no_user_trust_store_touched()
        assert "name constraints are NOT enforced" not in launcher.output  # Linux with certutil: they are

        browser = cdp_browser(playwright, profile)
        page = wait_for(lambda: next((p for p in browser.contexts[0].pages if p.url.startswith("http://coze.mitm/demo")),
                                       None), what="the demo page opened")
        page.wait_for_selector("#message")
        page.evaluate(RECORD_REPLY)
        page.fill("#message", "hello from a launched chromium")
        page.click("#send")
        page.wait_for_selector('.msg.bot[data-done="true"]', timeout=15_000)
        elapsed = time.monotonic() - began
        reply = page.inner_text(".msg.bot")
        assert reply == REPLY_RE + "hello from a launched chromium"
        snapshots = page.evaluate("window.__replies")
        assert len(snapshots) >= 4 and all(reply.startswith(s) for s in snapshots), snapshots  # streamed
        print(f"\nrun_mitm.py --demo --browser chromium: streamed reply complete {elapsed:.1f} s after the start")

        # The proxy's certificates are trusted in this profile (by the scoped CA in its NSS db).
        page.goto("https://coze.mitm/")
        assert "came over HTTPS" in page.inner_text("body")

        try:  # close the browser itself, as a user closing its last window would
            browser.new_browser_cdp_session().send("Browser.close")
        except Exception:  # the DevTools connection may end before the answer does
            pass
        assert launcher.wait_for_output(r"chromium closed; its profile is removed", 20), launcher.output
        assert not profile.exists() and profiles(tmp_path) == []
        assert launcher.proc.poll() is None  # the proxy keeps running
    finally:
        launcher.stop()
    no_user_trust_store_touched()


@pytest.mark.process  # runs run_mitm.py (and a browser)
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
@pytest.mark.skipif(CERTUTIL is None, reason="NSS certutil is not installed (apt-get install libnss3-tools)")
def test_launched_browser_chats_on_an_https_page_of_the_user_with_no_extension(tmp_path, playwright):
    """Beyond the demo page: https://page.test (served by tests/browser.py's PageServer, behind map_remote) is one of
    --origins; the launched Chromium trusts the scoped CA for it through its private NSS db, and coze_inject (on for
    --browser) brings the chat: no userscript manager, no init script, no certificate error ignored."""
    from tests.browser import PageServer

    # the stand-in SDK calls the demo's sandbox by its name, over https from an https page (no mixed content)
    pages = PageServer("https://sandbox.coze.mitm").start()
    launcher = Launcher(tmp_path, "--demo", "--origins", "https://page.test", "--browser", "chromium",
                        "--set", "coze_sdk_url=https://page.test/sdk/index.js", "--set", "connection_strategy=lazy",
                        *(a for spec in pages.map_remote("page.test") for a in ("--set", spec)),
                        env=chromium_env())
    try:
        launcher.start()
        assert launcher.wait_for_output(r"started chromium", 20)
        [profile] = profiles(tmp_path)
        browser = cdp_browser(playwright, profile)
        page = browser.contexts[0].new_page()
        main = page.goto("https://page.test/")
        assert main.status == 200 and main.url == "https://page.test/"  # the certificate was accepted
        page.wait_for_function("() => window.__fakeCozeClient || document.getElementById('coze-mitm-notice')")
        assert page.evaluate("() => document.getElementById('coze-mitm-notice')") is None
        page.evaluate("() => window.__fakeCozeClient.ready")
        assert page.evaluate("() => window.__cozeMitmInjected") == "running"
        reply = page.evaluate("(t) => window.__fakeCozeClient.send(t)", "on my own page")
        assert reply == REPLY_RE + "on my own page"
        user_id = page.evaluate("() => localStorage.getItem('coze-mitm:coze_user_id')")
        assert re.fullmatch(r"\d{13}-[A-Za-z0-9_-]{22}", user_id)
    finally:
        launcher.stop()
        pages.stop()
    assert profiles(tmp_path) == []


@pytest.mark.process  # runs run_mitm.py (and a browser)
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_stopping_coze_mitm_closes_the_browser_and_removes_its_profile(tmp_path, playwright):
    secrets = {"COZE_UPSTREAM_AUTH": "corp:Upstream-Pw-1", "COZE_REDIS_PASSWORD": "Redis-Pw-2"}
    launcher = Launcher(tmp_path, "--demo", "--browser", env=chromium_env(**secrets)).start()
    try:
        assert launcher.wait_for_output(r"started chromium", 20)  # --browser alone: the first installed one
        [profile] = profiles(tmp_path)
        browser = cdp_browser(playwright, profile)  # it really runs
        assert browser.contexts[0].pages
        [browser_pid] = [pid for pid in launcher.children() if "--user-data-dir=" in " ".join(cmdline(pid))]
        # coze-mitm's own variables (passwords among them) never reach the browser's environment
        environ = Path(f"/proc/{browser_pid}/environ").read_bytes()
        assert b"COZE_" not in environ and not any(v.encode() in environ for v in secrets.values())
    finally:
        assert launcher.stop() == 0
    assert not Path(f"/proc/{browser_pid}").exists()
    assert not profile.exists() and profiles(tmp_path) == []


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_where_no_nss_db_can_be_used_the_signers_key_is_accepted_and_that_is_said(mitmdump, config_file, playwright,
                                                                                  monkeypatch, capsys):
    """The macOS/Windows path (and Linux without certutil): --ignore-certificate-errors-spki-list, run here."""
    from argparse import Namespace

    from launcher.plan import Plan

    proxy = mitmdump(f"coze_config={config_file}", "coze_origins=http://coze.mitm", "coze_demo=true")
    pl = Plan(Namespace(demo=True, origins=None, intercept_all=False, sets=[("confdir", str(proxy.confdir))]))
    monkeypatch.setattr(launch_browser, "nss_certutil", lambda platform=None: None)
    monkeypatch.setenv(launch_browser.ARGS_ENV, f"{ROOT_ARGS}--headless=new --disable-gpu --remote-debugging-port=0")
    session = launch_browser.launch(pl, launch_browser.Browser("chromium", CHROMIUM), "127.0.0.1", proxy.port)
    try:
        said = capsys.readouterr().err.replace("\n  ", " ")
        assert "name constraints are NOT enforced" in said and "nothing is added to a trust store" in said
        spki = launch_browser.spki_hash((proxy.confdir / "mitmproxy-ca.pem").read_bytes())
        assert f"--ignore-certificate-errors-spki-list={spki}" in session.cmd
        assert not (session.profile / "home").exists() and session.env.get("HOME") == str(TEST_HOME)
        browser = cdp_browser(playwright, session.profile)
        page = browser.contexts[0].pages[0]
        page.goto("https://coze.mitm/")  # accepted by the signer's key
        assert "came over HTTPS" in page.inner_text("body")
    finally:
        session.stop()
    assert not session.profile.exists()
    no_user_trust_store_touched()


@pytest.mark.process  # runs run_mitm.py (and a browser)
def test_a_profile_left_by_a_killed_coze_mitm_is_removed_at_the_next_start(tmp_path):
    base = tmp_path / launch_browser.PROFILES_DIR
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = base / f"chromium-{dead.pid}-0badc0de"
    (stale / "data").mkdir(parents=True)
    alive = base / f"firefox-{os.getppid()}-00c0ffee"  # a running process's: kept
    alive.mkdir()
    launch_browser.remove_stale_profiles(base)
    assert not stale.exists() and alive.exists()


# --------------------------------------------------------------------------- Firefox

@pytest.mark.process  # runs run_mitm.py (and a browser)
@pytest.mark.skipif(FIREFOX is None, reason="Firefox is not installed (run_tests.py installs firefox-esr as root)")
@pytest.mark.skipif(CERTUTIL is None, reason="NSS certutil is not installed (apt-get install libnss3-tools)")
def test_demo_browser_firefox_chats_and_its_profile_goes_when_it_closes(tmp_path):
    from tests.marionette import Marionette

    from tests.browser import PageServer

    pages = PageServer("https://sandbox.coze.mitm").start()  # for the https page of --origins, as for Chromium
    began = time.monotonic()
    launcher = Launcher(tmp_path, "--demo", "--browser", "firefox", "--origins", "https://page.test",
                        "--set", "coze_sdk_url=https://page.test/sdk/index.js", "--set", "connection_strategy=lazy",
                        *(a for spec in pages.map_remote("page.test") for a in ("--set", spec)),
                        env=clean_env(COZE_MITM_BROWSER_ARGS="--headless --marionette",
                                      COZE_MITM_BROWSER_PREFS=json.dumps({"marionette.port": 0})))
    try:
        launcher.start()
        assert launcher.wait_for_output(r"(?s)started firefox .* uses the PAC\s+http://127\.0\.0\.1:\d+/proxy\.pac", 20)
        [profile] = profiles(tmp_path)
        assert (profile / "cert9.db").exists()
        prefs = (profile / "user.js").read_text()
        assert re.search(r'user_pref\("network\.proxy\.autoconfig_url", "http://127\.0\.0\.1:\d+/proxy\.pac"\);', prefs)
        assert 'user_pref("network.proxy.type", 2);' in prefs
        no_user_trust_store_touched()
        ff = Marionette.from_profile(profile)
        ff.wait_for("return location.href.startsWith('http://coze.mitm/demo') && document.getElementById('message')")
        ff.run("""
          window.__replies = [];
          new MutationObserver(() => {
            const bubbles = document.querySelectorAll('.msg.bot');
            const last = bubbles[bubbles.length - 1];
            if (last && last.textContent && window.__replies[window.__replies.length - 1] !== last.textContent)
              window.__replies.push(last.textContent);
          }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
          document.getElementById('message').value = 'hello from a launched firefox';
          document.getElementById('send').click();""")
        reply = ff.wait_for("const b = document.querySelector('.msg.bot[data-done=\"true\"]'); return b && b.textContent")
        elapsed = time.monotonic() - began
        assert reply == REPLY_RE + "hello from a launched firefox"
        snapshots = ff.run("return window.__replies")
        assert len(snapshots) >= 4 and all(reply.startswith(s) for s in snapshots), snapshots
        print(f"\nrun_mitm.py --demo --browser firefox: streamed reply complete {elapsed:.1f} s after the start")
        ff.navigate("https://coze.mitm/")  # the scoped CA, trusted in this profile's cert9.db
        assert "came over HTTPS" in ff.run("return document.body.innerText")
        # An https page of --origins: its certificate accepted, the chat brought by coze_inject (no extension).
        ff.navigate("https://page.test/")
        ff.wait_for("return window.__fakeCozeClient || document.getElementById('coze-mitm-notice')")
        assert ff.run("return document.getElementById('coze-mitm-notice')") is None
        assert ff.run("return window.__cozeMitmInjected") == "running"
        assert ff.run("return window.__fakeCozeClient.send('on my own page')") == REPLY_RE + "on my own page"
        assert re.fullmatch(r"\d{13}-[A-Za-z0-9_-]{22}", ff.run("return localStorage.getItem('coze-mitm:coze_user_id')"))
        ff.close()  # quits Firefox, as closing its window would
        assert launcher.wait_for_output(r"firefox closed; its profile is removed", 20), launcher.output
        assert not profile.exists() and profiles(tmp_path) == []
    finally:
        launcher.stop()
        pages.stop()
    no_user_trust_store_touched()
