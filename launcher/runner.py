"""mitmdump (or mitmweb) as a child process of this interpreter: its output passed through, the next
steps printed once it listens, a clear message when it stops with an error, and a clean stop."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from coze_mitm import READY
from coze_mitm.core.identity import is_loopback
from coze_mitm.core.own_address import listen_api_base
from coze_mitm.core.versions import MITMWEB_FIXED, version_tuple

from launcher.args import is_anonymous
from launcher.browser import find as find_browser, launch as launch_browser
from launcher.ca import demo_confdir
from launcher.common import (DEMO_URL, EXIT_FAILED, EXIT_OK, EXIT_PORT_IN_USE, EXIT_USAGE, PROG, REPO, STATUS_URL,
                             Fail, Stop, say, tell, wrap)
from launcher.plan import Plan, mitm_command
from launcher.ports import PORT_IN_USE_RE, check_port_free, port_in_use_message

LISTENING_RE = re.compile(r"HTTP\(S\) proxy (?:\(upstream mode\) )?listening at (\[[^\]]+\]|[^\s:]+):(\d+)")
WEB_LISTENING_RE = re.compile(r"Web server listening at (\S+)")
# coze-mitm prints coze_mitm.READY once every part ran `running` (its lifecycle part), right after mitmproxy's
# listening line (same start-up step); generous for a loaded machine, and only ever waited out when the addon did
# not load.
READY_TIMEOUT = 15.0


def mitmproxy_version() -> tuple[int, ...]:
    try:
        text = importlib.metadata.version("mitmproxy")
    except importlib.metadata.PackageNotFoundError:
        raise Fail("mitmproxy is not installed for this Python: pip install -r requirements.txt") from None
    return version_tuple(text)


def require_safe_mitmweb() -> None:
    """mitmweb before 11.1.2 lets any program or page that reaches its port read every flow and change
    options (CVE-2025-23217); the flows hold what coze-mitm protects, so the launcher does not start it."""
    version = mitmproxy_version()
    if version >= MITMWEB_FIXED:
        return
    shown = ".".join(map(str, version))
    # mitmproxy >= 11.1.2 needs Python >= 3.12: no pip line can bring it to this Python (Debian 12 has 3.11 only)
    newer = newer_python()
    web = (f"{newer} {PROG} --web (found on this machine; {PROG} makes a venv with mitmproxy 12 for it)" if newer else
           f"{PROG} --web started by a Python 3.12 or newer, e.g. python3.12 {PROG} --web (none is on PATH here; "
           f"{PROG} makes a venv with mitmproxy 12 for it)")
    raise Fail(f"--web: mitmweb {shown} serves its web API without authentication (CVE-2025-23217, fixed in "
               "mitmproxy 11.1.2, which needs Python 3.12+): any program or web page that can reach its port could "
               f"read the flows and change options, so it is not started. What works: {web}; or mitmproxy's console "
               f"UI, fine on {shown}: {tool_path('mitmproxy')} -s addons/coze.py --set coze_origins=... (in {REPO}); "
               "or run without --web (mitmdump is not affected)", EXIT_USAGE)


def newer_python() -> str:
    """A Python >= 3.12 on PATH by its usual name, or "" (Windows: the py launcher's -3.12 form)."""
    if os.name == "nt":
        return "py -3.12" if shutil.which("py") and _runs(["py", "-3.12", "-c", ""]) else ""
    for minor in range(20, 11, -1):
        if shutil.which(f"python3.{minor}"):
            return f"python3.{minor}"
    return ""


def _runs(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def tool_path(name: str) -> str:
    """How to call one of mitmproxy's commands of this interpreter (its venv's bin/ or Scripts/), shown relative
    to the repository when it is in there (.venv-3.11/bin/mitmproxy): a bare name is often not on PATH."""
    path = Path(sys.executable).parent / name
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def check_directory(args) -> None:
    """An LDAP proxyauth spec: its bind checked before mitmdump starts. mitmproxy's proxyauth binds in its
    `configure` and, refused, stops with a traceback before coze-mitm is loaded; here it is one line naming the fix
    (a connect and a bind, a few seconds at most)."""
    spec = (args.proxyauth or "").strip()
    if not spec.lower().startswith("ldap"):
        return
    from coze_mitm import ldap_spec

    problem = ldap_spec.bind_problem(spec)
    if problem is not None:
        source = getattr(args, "proxyauth_source", "") or "--proxyauth"
        raise Fail(f"{source}: {problem.msg}", EXIT_USAGE if problem.misconfigured else EXIT_FAILED)


def warn_about_reach(pl: Plan) -> None:
    """Who can reach the proxy and use the credentials, said once before it starts."""
    args = pl.args
    if args.allow_remote and is_anonymous(args):
        tell("WARNING", "--allow-anonymous: anyone who can connect to this proxy can spend your Coze quota "
                        "as any user they claim, and use this proxy as an open proxy; firewall the "
                        "port, or use --proxyauth @/path/to/htpasswd")
    elif not is_loopback(args.host):
        tell("WARNING", f"listening on {args.host}: other machines can reach it; they must log in (--proxyauth) "
                        "to get credentials or any other service; firewall the port to those who should")


def next_steps(pl: Plan, host: str, port: int, sandbox=None, web_url: str = "") -> str:
    shown = f"[{host}]" if ":" in host else host
    proxy = f"{shown}:{port}"
    lines = ["", "=" * 78]
    api_base = listen_api_base(host, port)  # the proxy's own address as a Coze API base: loopback only
    if sandbox is not None:
        lines += [
            f"coze-mitm DEMO is running: proxy {proxy}, talking to a local SANDBOX (not Coze).",
            f"  Open {DEMO_URL} in a browser that uses this proxy, e.g. a fresh Chromium:",
            f"    chromium --user-data-dir=\"$(mktemp -d)\" --proxy-server=http://{proxy} {DEMO_URL}",
            f"  or set the PAC URL {pac_url(proxy)} in your browser (Firefox: Settings > Network Settings >",
            "  Automatic proxy configuration URL): only the demo's names then go through the proxy.",
            "  No CA certificate is needed: the demo is plain HTTP.",
            *([f"  API base for your own page or program, no proxy setting: {api_base} (the sandbox behind it)"]
              if api_base else []),
            f"  Check from a shell: curl -x http://{proxy} {STATUS_URL}status.json",
        ]
    else:
        mode = f"PAT mode (from {pl.pat_source})" if pl.pat else f"JWT mode ({pl.config_path})"
        lines += [
            f"coze-mitm is running: proxy {proxy}, {mode}.",
            f"  1. Set your browser's automatic proxy configuration (PAC) URL to {pac_url(proxy)}: only Coze",
            f"     goes through the proxy (Chrome/Edge: --proxy-pac-url=...). Or the whole browser: proxy {proxy}.",
            "  2. Trust the proxy's CA certificate: open http://mitm.it through the proxy (README step 5; "
            f"{STATUS_URL} shows the names it can vouch for).",
            f"  3. Install the userscript (Tampermonkey/Violentmonkey): open {STATUS_URL} through the proxy.",
            *([f"  Your own page or program, no proxy setting (steps 1-3 not needed): API base {api_base}"]
              if api_base else []),
        ]
        if not pl.page_origins:
            lines.append("  Note: no page origins yet: add --origins https://your.page to use the chat on a page.")
    if pl.args.web:
        lines.append(f"  The flows, in mitmweb: {web_url or 'the URL mitmweb printed above'}")
    if pl.args.intercept_all:
        lines.append("  --intercept-all: every HTTPS site goes through mitmproxy's CA.")
    if not pl.args.verbose:
        lines.append("  One line per request coze-mitm acts on; -v shows mitmproxy's own detail.")
    lines += ["  Ctrl-C stops it.", "=" * 78, ""]
    return "\n".join(lines)


def pac_url(proxy: str) -> str:
    return f"http://{proxy}/proxy.pac"


def stopped_line(listening: tuple[str, int] | None) -> str:
    """Said once when Ctrl-C (or SIGTERM) stopped a proxy that was listening: what browsers pointed at it do now."""
    if listening is None:
        return ""  # it never listened: no browser was using it
    host, port = listening
    if host in ("*", "", "0.0.0.0", "::"):
        host = "127.0.0.1"  # every interface: this machine's browsers name it so
    proxy = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return (f"coze-mitm: the proxy at {proxy} stopped. Browsers using its PAC file ({pac_url(proxy)}): only Coze pages "
            f"fail, other sites keep loading; browsers with {proxy} as their proxy for everything: every page fails "
            "until that proxy setting is removed.")


def run_proxy(pl: Plan, sandbox=None) -> int:
    args = pl.args
    mitmproxy_version()
    warn_about_reach(pl)
    check_port_free(args.host, args.port)
    check_directory(args)
    browser = find_browser(args.browser) if getattr(args, "browser", None) is not None else None  # before anything starts

    proc = subprocess.Popen(mitm_command(pl), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=pl.env, text=True, encoding="utf-8", errors="replace",
                            bufsize=1)
    port_in_use = False
    listening: tuple[str, int] | None = None
    web_url = ""
    told = False
    session = None  # the browser started by --browser
    loaded = threading.Event()  # coze-mitm's `running` said so (coze_mitm.READY)
    not_loaded = threading.Event()
    watch = threading.Timer(READY_TIMEOUT, _stop_unless_loaded, (proc, loaded, not_loaded))
    watch.daemon = True
    try:
        for line in proc.stdout:
            if READY in line:
                loaded.set()  # the launcher's own signal: not shown
            else:
                sys.stdout.write(line)
                sys.stdout.flush()
            if PORT_IN_USE_RE.search(line):
                port_in_use = True
            if m := LISTENING_RE.search(line):
                listening = (m.group(1).strip("[]"), int(m.group(2)))
                if not watch.is_alive() and not loaded.is_set():
                    watch.start()
            if m := WEB_LISTENING_RE.search(line):
                web_url = m.group(1)
            if listening and loaded.is_set() and (web_url or not args.web) and not told:
                told = True
                say(next_steps(pl, *listening, sandbox=sandbox, web_url=web_url))
                if browser is not None:
                    session = start_browser(pl, browser, *listening)
        rc = proc.wait()
        watch.cancel()
    except KeyboardInterrupt:
        watch.cancel()
        stop_child(proc, signalled=True)
        if gone := stopped_line(listening):
            say(wrap(gone))
        return EXIT_OK
    except Stop:
        watch.cancel()
        stop_child(proc, signalled=False)
        if gone := stopped_line(listening):
            say(wrap(gone))
        return EXIT_OK
    finally:
        if session is not None:
            session.stop()  # the browser closed and its profile removed, however the proxy stopped
    if not_loaded.is_set():
        raise Fail(f"coze-mitm did not load into {'mitmweb' if args.web else 'mitmdump'}: it was listening as a plain "
                   "proxy (no local gate, no credentials, no budgets), so it was stopped. mitmproxy's script loader can "
                   "stop without a word, e.g. on an option set twice or declared by two addons; its output above may "
                   "say more", EXIT_FAILED)
    if port_in_use:
        raise Fail(port_in_use_message(args.host, args.port), EXIT_PORT_IN_USE)
    if rc != 0:
        raise Fail(f"{'mitmweb' if args.web else 'mitmdump'} stopped with exit code {rc} (see its output above)",
                   EXIT_FAILED)
    return EXIT_OK


def start_browser(pl: Plan, browser, host: str, port: int):
    """--browser, once the proxy listens; a browser that cannot be started leaves the proxy running."""
    try:
        return launch_browser(pl, browser, host, port)
    except Fail as e:
        tell("error", f"{e.msg}; the proxy keeps running (Ctrl-C stops it)")
        return None


def _stop_unless_loaded(proc: subprocess.Popen, loaded: threading.Event, not_loaded: threading.Event) -> None:
    """READY_TIMEOUT after mitmproxy listened: no word from coze-mitm means a proxy running without it."""
    if not loaded.is_set() and proc.poll() is None:
        not_loaded.set()
        proc.terminate()


def stop_child(proc: subprocess.Popen, signalled: bool) -> None:
    """Ctrl-C in a terminal reached the child too (same process group): let it stop; else stop it."""
    if signalled:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:
        rest = proc.stdout.read()
    except (OSError, ValueError):
        rest = ""
    if rest:
        sys.stdout.write(rest)
        sys.stdout.flush()


def run_demo(pl: Plan) -> int:
    """The proxy in front of a local Coze stand-in with a throwaway key, and the demo page."""
    from sandbox.coze_standin import make_sandbox_app, write_config

    from coze_mitm.core.hosts import DEMO_ORIGIN

    standin, sandbox_config = make_sandbox_app("127.0.0.1", 0, delta_gap=0.12)
    workdir = tempfile.mkdtemp(prefix="coze-mitm-demo-")  # mode 0700
    config_path = os.path.join(workdir, "sandbox_oauth_config.json")
    try:
        write_config(config_path, sandbox_config)  # mode 0600; deleted below
        del sandbox_config
        standin.start()
        say(f"coze-mitm SANDBOX: a local stand-in for the Coze API at {standin.base_url} -- NOT Coze: no account, "
            "a throwaway key, canned replies. The demo page reaches it as http://sandbox.coze.mitm.")
        pl.config_path = config_path
        pl.api_bases.insert(0, standin.base_url)
        pl.page_origins = pl.page_origins | {DEMO_ORIGIN}
        origins = ",".join(sorted(pl.page_origins))
        pl.sets = [(n, v) for n, v in pl.sets if n != "coze_origins"]
        pl.sets += [("coze_config", config_path), ("coze_origins", origins), ("coze_demo", "true")]
        if pl.option("confdir") is None and not any(n == "confdir" for n, _ in pl.sets):
            pl.sets.append(("confdir", demo_confdir(pl, workdir)))  # throwaway, like the sandbox's key
        if not pl.args.title:
            pl.sets.append(("coze_title", "Sandbox bot"))
        return run_proxy(pl, sandbox=standin)
    finally:
        standin.stop()
        shutil.rmtree(workdir, ignore_errors=True)
