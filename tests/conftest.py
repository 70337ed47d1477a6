"""Shared fixtures: a throwaway RSA key, a Coze stand-in, OAuth config files, a real mitmdump."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

REPO = Path(__file__).resolve().parent.parent
# Every test gives mitmproxy its own confdir. HOME points at a throwaway directory as well, so that a
# test which forgets (or a child process: mitmdump, run_mitm.py, Chromium) never writes into the
# user's real ~/.mitmproxy (a rewritten coze-mitm-userscript.json there changes the installed
# userscript's @version). Set before anything expands "~".
TEST_HOME = Path(tempfile.mkdtemp(prefix="coze-mitm-test-home-"))
os.environ["HOME"] = str(TEST_HOME)
(TEST_HOME / ".mitmproxy").mkdir()  # as on a machine where mitmproxy ran before: a leak would land here
# The addon modules import each other as siblings, the way mitmproxy loads addons/coze.py.
sys.path.insert(0, str(REPO / "addons"))
sys.path.insert(0, str(REPO))

from sandbox.coze_standin import CozeStandIn, generate_key_pair  # noqa: E402
from tests.harness import Launcher, Mitmdump  # noqa: E402

CLIENT_ID = "1127900000001"
KID = "test-kid-0001"


@pytest.fixture(scope="session")
def rsa_key():
    private_pem, public_pem = generate_key_pair()
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    return {"key": key, "private_pem": private_pem, "public_pem": public_pem}


@pytest.fixture
def standin(rsa_key):
    server = CozeStandIn(rsa_key["public_pem"], kid=KID, client_id=CLIENT_ID, delta_gap=0.02).start()
    yield server
    server.stop()


def write_config(directory: Path, rsa_key, api_base: str, **overrides) -> Path:
    data = {
        "client_type": "jwt",
        "client_id": CLIENT_ID,
        "coze_www_base": "https://www.coze.cn",
        "coze_api_base": api_base,
        "private_key": rsa_key["private_pem"],
        "public_key_id": KID,
    }
    data.update(overrides)
    data = {k: v for k, v in data.items() if v is not None}
    path = directory / "coze_oauth_config.json"
    path.write_text(json.dumps(data))
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def config_file(tmp_path, rsa_key, standin):
    return write_config(tmp_path, rsa_key, standin.base_url)


@pytest.fixture
def mitmdump(tmp_path_factory):
    """Start real mitmdump processes with the bundle; all are stopped after the test."""
    started = []

    def start(*sets: str, **kw) -> Mitmdump:
        proc = Mitmdump(tmp_path_factory.mktemp("mitm"), sets, **kw)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def front(standin):
    """Coze's answer to a non-streamed chat (`in_progress`, then polled) in front of the stand-in
    (tests/fronts.py)."""
    from tests.fronts import InProgressFront

    f = InProgressFront(standin)
    yield f
    f.stop()


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    """A real OpenLDAP server on loopback with the test directory (tests/slapd.py), shared by a module's tests;
    they skip, saying why, where it cannot start."""
    from tests.slapd import Slapd, Unavailable

    server = Slapd(tmp_path_factory.mktemp("slapd"))
    try:
        server.start()
    except Unavailable as e:
        pytest.skip(f"no OpenLDAP server for the LDAP tests: {e}")
    yield server
    server.stop()


@pytest.fixture
def pat_mode():
    """pat_mode(*parts, pat=..., **options) -> mitmproxy's test context (taddons) holding coze-mitm's settings in PAT
    mode (coze_api_base https://api.coze.cn) and the parts: a class is made with the settings (Cors, Auth, ...),
    an instance is taken as it is. options go to configure with coze_pat; tctx.settings and tctx.parts hold what
    was made. The context is left after the test."""
    from mitmproxy.test import taddons

    from coze_mitm.parts.settings import CozeSettings

    with contextlib.ExitStack() as stack:
        def enter(*parts, pat: str = "pat_" + "x" * 30, **options):
            settings = CozeSettings()
            made = [part(settings) if isinstance(part, type) else part for part in parts]
            tctx = stack.enter_context(taddons.context(settings, *made))
            tctx.configure(settings, coze_pat=pat, **{"coze_api_base": "https://api.coze.cn", **options})
            tctx.settings, tctx.parts = settings, made
            return tctx
        yield enter


@pytest.fixture
def launch(tmp_path_factory):
    """Start `run_mitm.py ...` in the background (harness.Launcher); all are stopped after the test."""
    started = []

    def start(*args: str, env: dict | None = None) -> Launcher:
        launcher = Launcher(tmp_path_factory.mktemp("run"), *args, env=env)
        started.append(launcher)
        return launcher.start()

    yield start
    for launcher in started:
        launcher.stop()


@pytest.fixture(scope="session", autouse=True)
def no_test_uses_the_default_confdir():
    """After the suite: nothing wrote the status addon's state into the default confdir (~/.mitmproxy)."""
    yield
    leaked = (TEST_HOME / ".mitmproxy" / "coze-mitm-userscript.json").exists()
    shutil.rmtree(TEST_HOME, ignore_errors=True)
    assert not leaked, "a test used mitmproxy's default confdir: give it its own (confdir=tmp_path)"


@pytest.fixture(autouse=True)
def coze_mitm_modules_as_imported():
    """A test that loads addons/coze.py twice in this process (as mitmproxy's script loader does) gets fresh
    coze_mitm modules the second time (coze.py's reload rule); the tests after it keep the modules they
    imported, as one mitmdump process keeps its own."""
    before = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "coze_mitm"}
    yield
    for name in [n for n in sys.modules if n.split(".")[0] == "coze_mitm"]:
        del sys.modules[name]
    sys.modules.update(before)
    package = before.get("coze_mitm")
    if package is not None and hasattr(package, "loaded_by_script"):
        del package.loaded_by_script


# --------------------------------------------------------------------------- --fast: the in-process tests only
# `python3 run_tests.py --fast` (pytest --fast) leaves out every test that starts another process: a real mitmdump,
# a browser, node, slapd, redis-server, the launcher. Which tests those are is found, not kept in a list: a test
# that uses the `mitmdump`, `launch` or `slapd` fixture, or is marked `process` (a module's `pytestmark`, or one
# test's decorator).
# A test that starts a process without either fails under --fast, naming the mark to add, so the split stays true.

PROCESS_FIXTURES = {"mitmdump", "launch", "slapd"}


def pytest_addoption(parser):
    parser.addoption("--fast", action="store_true",
                     help="run only the in-process tests (no mitmdump, browser, node, slapd, redis subprocess)")


def pytest_configure(config):
    config.addinivalue_line("markers", "process: the test starts another process (left out by --fast)")


def starts_processes(item) -> bool:
    return item.get_closest_marker("process") is not None or bool(PROCESS_FIXTURES & set(item.fixturenames))


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--fast"):
        return
    dropped = [item for item in items if starts_processes(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not starts_processes(item)]


_running: list[str] = [""]  # the test being set up, run or torn down (for the --fast guard's message)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    _running[0] = item.nodeid


@pytest.fixture(scope="session", autouse=True)
def in_process_only(request):
    """Under --fast, starting a process is an error that names the fix (the test belongs to the full run).
    Session-wide, so a fixture of any scope that starts one (a shared browser) is caught too."""
    if not request.config.getoption("--fast"):
        yield
        return
    import subprocess

    def refused(*args, **kwargs):
        raise AssertionError(f"{_running[0]} starts a process: mark it @pytest.mark.process "
                             "(or the module with pytestmark) so that --fast leaves it out")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "Popen", refused)
        yield
