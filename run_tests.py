#!/usr/bin/env python3
"""The whole test suite on one Python: installs what it needs, then runs the Node tests and pytest.

    python3 run_tests.py                     # Linux/macOS (Windows: py run_tests.py)
    python3 run_tests.py --fast              # the in-process tests only (no mitmdump, browser, node): ~1 min
    python3 run_tests.py tests/test_pac.py::TestPart   # only the tests named (a failed id rerun alone)
    python3 run_tests.py -k cors -x          # extra arguments go to pytest
    python3 run_tests.py --python PATH       # build the venv from another interpreter (or PYTHON=PATH)

Steps: the Debian packages some tests drive (chromium, firefox-esr, certutil, htpasswd, slapd, redis-server; as
root, with apt-get, when missing; without them those tests are skipped with a reason); the project venv .venv-3.X/ for that Python (launcher/bootstrap.py, as
run_mitm.py uses it), refreshed with requirements-dev.txt; `npm ci` in tests/js; `node --test tests/js/`;
pytest (collecting no test counts as a failure). An activated venv whose python runs this is used as is.
The exit code is 0 only when every step passed. No shell: argument lists and pathlib, so it runs on Windows.
This file stays parseable by old Pythons up to the version check (no f-strings, no annotations).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launcher import bootstrap  # noqa: E402  (standard library only)


def split_args(argv):
    """(--python value or None, help wanted, the arguments for pytest)."""
    python, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--python" and i + 1 < len(argv):
            python, i = argv[i + 1], i + 2
            continue
        if a.startswith("--python="):
            python = a.split("=", 1)[1]
        elif a in ("-h", "--help"):
            return python, True, rest
        else:
            rest.append(a)
        i += 1
    return python, False, rest


def main(argv):
    python, want_help, pytest_args = split_args(argv)
    if want_help:
        sys.stdout.write(__doc__)
        return 0
    python = python or os.environ.get("PYTHON")
    if python:  # the chosen interpreter runs this file itself: its version is checked, its venv made
        import shutil
        found = shutil.which(python) or python
        if not os.path.exists(found):
            bootstrap.fail("run_tests.py: no Python at %s (--python / PYTHON)" % python)
        os.environ.pop("PYTHON", None)  # chosen now: not passed on
        if not same_interpreter(found):
            bootstrap.reexec(found, [os.path.abspath(__file__)] + pytest_args, flag=False)
    bootstrap.check_python()
    return run(pytest_args)


def same_interpreter(path):
    try:
        return os.path.samefile(path, sys.executable)
    except OSError:
        return False


# --- Python 3.11+ from here on -------------------------------------------------------------------------------

# (Debian package, the program it brings): the browser tests (chromium, firefox-esr: playwright drives them, no
# browser download), NSS trust stores (certutil), proxy logins (htpasswd, slapd), the shared usage store (redis).
DEBIAN_TOOLS = (
    ("chromium", "chromium"),
    ("firefox-esr", "firefox-esr"),
    ("libnss3-tools", "certutil"),
    ("apache2-utils", "htpasswd"),
    ("slapd", "/usr/sbin/slapd"),
    ("ldap-utils", "ldapsearch"),
    ("redis-server", "redis-server"),
)


def named_tests(pytest_args):
    """Test ids or paths given (a failed test's id, copied from the summary): only those run, not the tree."""
    return any(not a.startswith("-") and (a.startswith("tests") or "::" in a) for a in pytest_args)


def step(msg):
    bootstrap.say("== " + msg)


def warn(msg):
    bootstrap.say("!! " + msg)


def run(pytest_args):
    import shutil
    import subprocess
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parent
    started = time.monotonic()
    status = 0

    def call(cmd, **kw):
        return subprocess.call([str(c) for c in cmd], cwd=kw.pop("cwd", repo), **kw)

    # The tools some tests drive, from Debian's packages (as root, where apt-get exists); each test that needs
    # one skips with a reason where it is missing (other systems, no root). --fast runs none of those tests.
    missing = [package for package, tool in DEBIAN_TOOLS if not shutil.which(tool) and not os.path.exists(tool)]
    if missing and "--fast" not in pytest_args and os.name != "nt" and os.geteuid() == 0 and shutil.which("apt-get"):
        step("installing Debian's %s for the tests that drive them" % ", ".join(missing))
        quiet = {"stdout": subprocess.DEVNULL, "env": dict(os.environ, DEBIAN_FRONTEND="noninteractive")}
        if call(["apt-get", "update", "-qq"], **quiet) or call(["apt-get", "install", "-y", "-qq"] + missing, **quiet):
            warn("could not install %s: the tests that need them will be skipped" % ", ".join(missing))

    requirements = [repo / "requirements-dev.txt", repo / "requirements.txt"]
    venv = bootstrap.active_venv()
    if venv is not None:
        python = Path(sys.executable)
        bootstrap.pip_install(python, requirements[:1], str(venv))
    else:
        step("the project venv for %s (Python %s)" % (sys.executable, sys.version.split()[0]))
        python = bootstrap.ensure_venv(requirements, refresh=True)
    if call([python, "-c", "import mitmproxy.version, sys; "
             "print('== Python %s, mitmproxy %s in %s' % (sys.version.split()[0], mitmproxy.version.VERSION, "
             "sys.prefix))"]):
        warn("mitmproxy cannot be imported in %s" % python)
        return 1

    fast = "--fast" in pytest_args
    chosen = named_tests(pytest_args)
    npm = shutil.which("npm")  # npm.cmd on Windows: which() finds it through PATHEXT
    if fast or chosen:
        pass  # the in-process tests alone (--fast), or the tests named: no Node step
    elif npm:
        # The official Coze JS SDK (@coze/api) and what drives it: tests/test_node_sdk.py and the browser bundle.
        js = repo / "tests" / "js"
        npm_cmd = "ci" if (js / "package-lock.json").exists() else "install"
        step("npm packages for the JS SDK tests (tests/js)")
        if call([npm, npm_cmd, "--no-audit", "--no-fund", "--loglevel=error"], cwd=js):
            warn("npm %s failed in tests/js: the @coze/api tests cannot run" % npm_cmd)
            status = 1
    else:
        warn("npm not found: the @coze/api tests will be skipped")
        status = 1

    node = shutil.which("node")
    if fast or chosen:
        pass
    elif node:
        step("node --test tests/js/")
        if call([node, "--test", "tests/js/"]):
            status = 1
    else:
        warn("node not found: the userscript tests did not run")
        status = 1

    step("pytest")
    rc = call([python, "-m", "pytest"] + ([] if chosen else ["tests"]) + ["-q", "-p", "no:cacheprovider"]
              + list(pytest_args))
    if rc == 5:
        warn("pytest collected no tests: that is a failure here")
        rc = 1
    if rc:
        status = rc
    step("%s in %.0f s" % ("passed" if status == 0 else "FAILED (exit %d)" % status, time.monotonic() - started))
    return status


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
