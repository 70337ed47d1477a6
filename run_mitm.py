#!/usr/bin/env python3
"""Start coze-mitm: mitmdump (or mitmweb) with addons/coze.py, set up so that it just works.

    python run_mitm.py --demo                                  # no account: local sandbox + http://coze.mitm/demo
    python run_mitm.py --check                                 # does Coze accept config/coze_oauth_config.json?
    python run_mitm.py --origins https://example.org --bot-id 7xxxxxxxxxxxx
    COZE_PAT=pat_... python run_mitm.py --origins https://example.org          # PAT mode
    python run_mitm.py --web ...                               # mitmweb instead of mitmdump

mitmproxy runs as a child process of this interpreter; its console output is passed through.
TLS is intercepted only for the hosts coze-mitm must see (mitmproxy's allow_hosts); all other
traffic is tunnelled untouched. Errors are one line; the exit code says what went wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import getpass
import importlib.metadata
import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent
ADDONS = REPO / "addons"
SCRIPT = ADDONS / "coze.py"
for _path in (str(REPO), str(ADDONS)):  # addons/ first: its modules import each other as siblings
    if _path not in sys.path:
        sys.path.insert(0, _path)

PROG = "run_mitm.py"
DEFAULT_PORT = 8080
STATUS_URL = "http://coze.mitm/"
DEMO_URL = "http://coze.mitm/demo"
LISTENING_RE = re.compile(r"HTTP\(S\) proxy listening at (\[[^\]]+\]|[^\s:]+):(\d+)")
WEB_LISTENING_RE = re.compile(r"Web server listening at (\S+)")
PORT_IN_USE_RE = re.compile(r"failed to listen on \S+? with .*(address already in use|Errno 98|Errno 48|WinError 10048)", re.I)
MITMWEB_FIXED = (11, 1, 2)  # CVE-2025-23217: mitmweb's API is unauthenticated before this version
# Always intercepted, whatever the config: the status/userscript pages and mitmproxy's CA page.
ALWAYS_INTERCEPT = ("coze.mitm", "mitm.it")
# Options this launcher owns: setting them with --set would bypass its checks.
OWNED_OPTIONS = {"listen_host": "--host", "listen_port": "--port", "mode": "--host/--port", "coze_demo": "--demo"}
# --set spellings of the launcher's own flags, accepted because the addon's messages suggest them.
FLAG_ALIASES = {"coze_config": "config", "coze_origins": "origins", "coze_bot_id": "bot_id", "coze_title": "title"}

EXIT_OK = 0
EXIT_FAILED = 1  # mitmproxy stopped with an error
EXIT_USAGE = 2  # bad or refused arguments
EXIT_CONFIG = 3  # the OAuth config (or another coze_* value) is invalid: found offline
EXIT_REFUSED = 4  # --check: Coze answered, and refused the token exchange
EXIT_UNREACHABLE = 5  # --check: Coze's token endpoint did not answer (network, DNS, timeout)
EXIT_PORT_IN_USE = 6

EXIT_CODES_HELP = """exit codes:
  0  stopped normally (Ctrl-C), or --check: Coze accepted the config
  1  mitmproxy stopped with an error (its output says why)
  2  bad or refused arguments
  3  invalid config (found offline, before anything is started or sent)
  4  --check: Coze refused the token exchange (the message quotes Coze's error and logid)
  5  --check: Coze's token endpoint could not be reached or did not answer in time
  6  the port is already in use
"""


class Fail(Exception):
    """One line for the user, and the exit code that goes with it."""

    def __init__(self, msg: str, code: int = EXIT_FAILED):
        super().__init__(msg)
        self.msg = msg
        self.code = code


class Stop(Exception):
    """SIGTERM: stop like Ctrl-C does."""


def say(msg: str = "", *, err: bool = False) -> None:
    print(msg, file=sys.stderr if err else sys.stdout, flush=True)


# --------------------------------------------------------------------------- arguments

class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise Fail(f"{message} (see python {PROG} --help)", EXIT_USAGE)


def port_number(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}: use 1-65535, or 0 for any free port")
    return port


def set_item(value: str) -> tuple[str, str]:
    name, sep, val = value.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise argparse.ArgumentTypeError(f"--set wants NAME=VALUE (a mitmproxy option), got {value!r}")
    return name, val


def make_parser() -> Parser:
    p = Parser(
        prog=PROG,
        description="coze-mitm: the Coze Web Chat SDK on any page, with no credential in the page.\n"
                    "Starts mitmdump (or mitmweb) with the coze-mitm addons on 127.0.0.1:8080.",
        epilog=EXIT_CODES_HELP + "\nThe PAT is best given as COZE_PAT=pat_... in the environment, "
               "or typed at the prompt of --pat without a value: a value on the command line stays in "
               "your shell history and is visible to other users in ps.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--check", action="store_true",
                      help="validate the OAuth config offline, then mint one real token for a throwaway session "
                           "and print its expiry and logid (or Coze's exact error); starts no proxy")
    what.add_argument("--demo", action="store_true",
                      help="no Coze account needed: start a local Coze SANDBOX (not Coze) with a throwaway key "
                           f"and serve a chat page at {DEMO_URL} that uses it through the proxy")

    net = p.add_argument_group("proxy")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: %(default)s); another than loopback needs --allow-remote")
    net.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                     help="port to listen on (default: %(default)s; 0: any free port)")
    net.add_argument("--allow-remote", action="store_true",
                     help="allow a --host that other machines can reach: everyone who can connect then chats "
                          "with YOUR Coze credentials")
    net.add_argument("--web", action="store_true",
                     help="start mitmweb (the flows in a browser UI) instead of mitmdump")
    net.add_argument("--intercept-all", action="store_true",
                     help="intercept TLS for every host (mitmproxy's default) instead of only the hosts "
                          "coze-mitm needs; every HTTPS site then needs mitmproxy's CA")

    coze = p.add_argument_group("coze")
    coze.add_argument("--config", metavar="PATH",
                      help="OAuth (JWT) app config JSON from the Coze console "
                           "(default: config/coze_oauth_config.json in the repository)")
    coze.add_argument("--pat", nargs="?", const="-", metavar="PAT",
                      help="use a personal access token (PAT mode: no per-user isolation); without a value it is "
                           "asked for (or read from stdin); the COZE_PAT environment variable works too")
    coze.add_argument("--origins", action="append", metavar="ORIGINS",
                      help="page origins allowed to use the credentials, comma-separated, "
                           "e.g. https://example.org,https://www.coze.cn (repeatable)")
    coze.add_argument("--bot-id", help="bot id written into the userscript served at http://coze.mitm/")
    coze.add_argument("--title", help="chat title written into the userscript")
    coze.add_argument("--set", dest="sets", action="append", type=set_item, default=[], metavar="NAME=VALUE",
                      help="any other mitmproxy or coze_* option, passed through (repeatable), "
                           "e.g. --set coze_token_ttl=3600 --set confdir=~/.mitmproxy")
    return p


@dataclass
class Plan:
    """What to start, worked out from the arguments before anything runs."""

    args: argparse.Namespace
    sets: list[tuple[str, str]] = field(default_factory=list)  # passed as --set, in this order
    env: dict[str, str] = field(default_factory=dict)
    pat: str = ""
    pat_source: str = ""
    config_path: str = ""
    api_bases: list[str] = field(default_factory=list)
    page_origins: frozenset[str] = frozenset()

    def option(self, name: str, default: str | None = None) -> str | None:
        return set_value(self.args, name, default)


def set_value(args: argparse.Namespace, name: str, default: str | None = None) -> str | None:
    """The last value given with --set for an option (mitmproxy's rule: the last --set wins)."""
    values = [v for n, v in args.sets if n == name]
    return values[-1] if values else default


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_args(args: argparse.Namespace) -> None:
    passed = []
    for name, value in args.sets:
        if name == "coze_pat":
            raise Fail("--set coze_pat=... would show the PAT to every user of this machine in ps: "
                       "pass it as COZE_PAT=pat_... in the environment (or --pat without a value to be asked)",
                       EXIT_USAGE)
        if name in OWNED_OPTIONS:
            raise Fail(f"use {OWNED_OPTIONS[name]} instead of --set {name}=...", EXIT_USAGE)
        attr = FLAG_ALIASES.get(name)
        if attr == "origins":
            args.origins = [*(args.origins or []), value]
        elif attr:
            if getattr(args, attr) is not None:
                raise Fail(f"--{attr.replace('_', '-')} is given twice (once as --set {name}=...): give it once",
                           EXIT_USAGE)
            setattr(args, attr, value)
        else:
            passed.append((name, value))
    args.sets = passed
    for name, _ in args.sets:
        if name == "web_host" and not is_loopback(set_value(args, name, "")) and not args.allow_remote:
            raise Fail("--set web_host=... to a non-loopback address would let other machines drive mitmweb; "
                       "add --allow-remote if you really mean it", EXIT_USAGE)
    if not is_loopback(args.host):
        if not args.allow_remote:
            raise Fail(f"--host {args.host} is not a loopback address: anyone who can reach it could chat with "
                       "your Coze credentials; use --host 127.0.0.1, or add --allow-remote if you really mean it",
                       EXIT_USAGE)
    if args.demo:
        for flag, given in (("--config", args.config), ("--pat", args.pat),
                            ("--set coze_api_base", set_value(args, "coze_api_base"))):
            if given:
                raise Fail(f"--demo brings its own sandbox config: drop {flag}", EXIT_USAGE)
    elif args.config and args.pat:
        raise Fail("--config (JWT mode) and --pat (PAT mode) exclude each other: choose one", EXIT_USAGE)


def read_pat(args: argparse.Namespace) -> tuple[str, str]:
    """(PAT, where it came from); never printed."""
    if args.pat == "-":
        if sys.stdin.isatty():
            value = getpass.getpass("Coze personal access token (input hidden): ")
        else:
            value = sys.stdin.readline()
        value = value.strip()
        if not value:
            raise Fail("no personal access token given", EXIT_USAGE)
        return value, "prompt"
    if args.pat:
        say(f"{PROG}: warning: a PAT given on the command line stays in your shell history and shows in ps; "
            "next time use COZE_PAT=pat_... or --pat without a value", err=True)
        return args.pat.strip(), "--pat"
    env = os.environ.get("COZE_PAT", "").strip()
    if env and args.config:
        say(f"{PROG}: note: COZE_PAT from the environment is ignored because --config was given (JWT mode)", err=True)
        return "", ""
    return (env, "COZE_PAT") if env else ("", "")


def plan(args: argparse.Namespace) -> Plan:
    """Validate everything that can be validated offline, and work out the mitmproxy options."""
    import config  # addons/config.py: the same checks the addon makes

    pl = Plan(args)
    pl.env = {k: v for k, v in os.environ.items() if k != "COZE_PAT"}
    pl.env["PYTHONUNBUFFERED"] = "1"
    if not args.demo:
        pl.pat, pl.pat_source = read_pat(args)

    origins = ",".join(o for o in (args.origins or []) if o.strip())
    try:
        pl.page_origins = config.parse_page_origins(origins)
    except config.ConfigError as e:
        raise Fail(f"--origins: {e}", EXIT_USAGE) from None
    extra_hosts = pl.option("coze_api_hosts", "") or ""
    try:
        api_override = pl.option("coze_api_base")
        if api_override:
            config.parse_api_origin(api_override)
        pl.api_bases = [u.strip() for u in extra_hosts.split(",") if u.strip()]
        for u in pl.api_bases:
            config.parse_api_origin(u, "coze_api_hosts")
        if pl.pat:
            pl.api_bases.insert(0, api_override or config.DEFAULT_API_BASE)
        elif not args.demo:
            pl.config_path = str(Path(args.config).expanduser().resolve()) if args.config else str(config.DEFAULT_CONFIG_PATH)
            app = config.load_oauth_config(pl.config_path)
            pl.api_bases.insert(0, api_override or app.api_base)
    except config.ConfigError as e:
        msg = for_launcher(str(e))
        if msg.startswith("OAuth config not found") and not args.config:
            msg += "; to see coze-mitm work without an account first: python run_mitm.py --demo"
        raise Fail(msg, EXIT_CONFIG) from None

    if pl.pat:
        pl.env["COZE_PAT"] = pl.pat  # the addon reads it from its environment: never on a command line
    if pl.config_path:
        pl.sets.append(("coze_config", pl.config_path))
    if origins:
        pl.sets.append(("coze_origins", origins))
    if args.bot_id:
        pl.sets.append(("coze_bot_id", args.bot_id))
    if args.title:
        pl.sets.append(("coze_title", args.title))
    return pl


def for_launcher(msg: str) -> str:
    """The addon's messages suggest mitmdump's --set coze_pat=...; the launcher has a safer way."""
    msg = msg.replace("--set coze_config=PATH", "--config PATH")
    return msg.replace("--set coze_pat=...", "COZE_PAT=pat_... in the environment")


def host_pattern(host: str, port: int | None = None) -> str:
    """An allow_hosts regex: mitmproxy matches them against "host:port" of the connection's destination."""
    return f"^{re.escape(host.lower())}:" + (str(port) if port else r"\d+") + "$"


def allow_hosts(pl: Plan) -> list[str]:
    import config

    patterns = [host_pattern(h) for h in ALWAYS_INTERCEPT]
    for base in pl.api_bases:
        origin = config.parse_api_origin(base)
        patterns.append(host_pattern(origin.host, origin.port))
    for page in sorted(pl.page_origins):
        origin = config.parse_api_origin(page, "coze_origins")
        patterns.append(host_pattern(origin.host, origin.port))
    return list(dict.fromkeys(patterns))


# --------------------------------------------------------------------------- ports

def listening_holder(port: int) -> str:
    """Who listens on TCP `port`, as "pid N (command)", or "" when that cannot be found out."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if inodes:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                for fd in (proc / "fd").iterdir():
                    if os.readlink(fd) in inodes:
                        return f"pid {proc.name} ({describe_process(proc)})"
            except OSError:
                continue
    if shutil.which("ss"):
        try:
            out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        m = re.search(r'users:\(\("([^"]+)",pid=(\d+)', out)
        if m:
            return f"pid {m.group(2)} ({m.group(1)})"
    return ""


def describe_process(proc: Path) -> str:
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        words = [a.decode(errors="replace") for a in argv if a][:4]
        text = " ".join(Path(words[0]).name if i == 0 else w for i, w in enumerate(words))
    except (OSError, IndexError):
        text = ""
    if not text:
        try:
            text = (proc / "comm").read_text().strip()
        except OSError:
            text = "?"
    return text if len(text) <= 60 else text[:59] + "…"


def port_in_use_message(host: str, port: int) -> str:
    holder = listening_holder(port)
    who = f"by {holder}" if holder else f"by another program (see: ss -ltnp 'sport = :{port}')"
    return (f"port {port} on {host} is already in use {who}; stop it, or choose another port with --port "
            f"(e.g. --port {port + 1 if port < 65535 else 8081}, or --port 0 for any free one)")


def check_port_free(host: str, port: int) -> None:
    """Bind like mitmproxy will (SO_REUSEADDR), to say clearly why it could not, before it tries."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise Fail(f"--host {host}: cannot resolve it ({e.strerror})", EXIT_USAGE) from None
    problems = []
    for family, type_, proto, _, addr in infos:
        try:
            with socket.socket(family, type_, proto) as s:
                if os.name != "nt":
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise Fail(port_in_use_message(host, port), EXIT_PORT_IN_USE) from None
            if e.errno == errno.EACCES:
                raise Fail(f"no permission to listen on port {port}: ports below 1024 need root; "
                           f"use e.g. --port {DEFAULT_PORT}", EXIT_USAGE) from None
            problems.append(e)  # e.g. "localhost" resolves to ::1 too, and IPv6 is off: one address is enough
    if problems and len(problems) == len(infos):
        e = problems[0]
        if e.errno == errno.EADDRNOTAVAIL:
            raise Fail(f"--host {host} is not an address of this machine", EXIT_USAGE)
        raise Fail(f"cannot listen on {host}:{port}: {e.strerror}", EXIT_FAILED)


# --------------------------------------------------------------------------- --check

def run_check(args: argparse.Namespace) -> int:
    import config
    from tokens import CozeTokenExchange, ExchangeError

    pat = bool(args.pat or os.environ.get("COZE_PAT", "").strip())
    path = str(Path(args.config).expanduser().resolve()) if args.config else str(config.DEFAULT_CONFIG_PATH)
    pl = Plan(args)
    try:
        app = config.load_oauth_config(path)
        override = pl.option("coze_api_base")
        if override:
            config.parse_api_origin(override)
            app = dataclasses.replace(app, api_base=override.rstrip("/"))
        ttl = int(pl.option("coze_token_ttl", "900"))
        timeout = float(pl.option("coze_exchange_timeout", "10"))
        if args.origins:
            config.parse_page_origins(",".join(args.origins))
    except config.ConfigError as e:
        say(f"FAILED: {for_launcher(str(e))}")
        return EXIT_CONFIG
    except ValueError:
        say("FAILED: coze_token_ttl and coze_exchange_timeout must be numbers")
        return EXIT_USAGE
    if not 60 <= ttl <= 86399:
        say(f"FAILED: coze_token_ttl={ttl} is out of range: Coze accepts 60 to 86399 seconds")
        return EXIT_CONFIG
    key_bits = app.private_key.key_size
    kid = app.public_key_id if len(app.public_key_id) <= 8 else app.public_key_id[:6] + "…"
    say(f"config {path}: OK offline (client_id {app.client_id}, public_key_id {kid}, RSA-{key_bits} key, "
        f"API {app.api_base})")
    warning = config.permissions_warning(path)
    if warning:
        say(f"warning: {warning}")
    if pat:
        say("note: a PAT is set (COZE_PAT or --pat): the proxy would run in PAT mode and not use this config; "
            "--check does not verify PATs")

    session = f"coze-mitm-check-{secrets.token_hex(4)}"
    verify = (pl.option("ssl_insecure", "false") or "").lower() not in ("true", "1", "yes", "on")
    exchange = CozeTokenExchange(app, duration_seconds=ttl, timeout=timeout, verify=verify)
    started = time.monotonic()
    try:
        issued = exchange(session)
    except ExchangeError as e:
        say(f"FAILED: {e.msg}")
        if e.reason in ("exchange-timeout", "exchange-unreachable"):
            proxy_env = [k for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy") if os.environ.get(k)]
            if proxy_env:
                say(f"note: {proxy_env[0]} is set, but coze-mitm talks to Coze directly (it ignores proxy variables)")
            return EXIT_UNREACHABLE
        return EXIT_REFUSED
    expires = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(issued.expires_at))
    logid = issued.logid or "none sent"
    say(f"OK: Coze accepted the config: a token for the throwaway session {session} expires {expires} "
        f"(in {int(issued.expires_at - time.time())} s); exchange took {time.monotonic() - started:.2f} s; "
        f"logid {logid}")
    del issued  # never printed, never kept
    return EXIT_OK


# --------------------------------------------------------------------------- the proxy

def mitmproxy_version() -> tuple[int, ...]:
    try:
        text = importlib.metadata.version("mitmproxy")
    except importlib.metadata.PackageNotFoundError:
        raise Fail("mitmproxy is not installed for this Python: pip install -r requirements.txt") from None
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def mitm_command(pl: Plan) -> list[str]:
    args = pl.args
    tool = "mitmweb" if args.web else "mitmdump"
    cmd = [sys.executable, "-c", f"from mitmproxy.tools.main import {tool}; {tool}()",
           "--listen-host", args.host, "--listen-port", str(args.port), "-s", str(SCRIPT)]
    sets = list(pl.sets)
    if not args.intercept_all:
        sets += [("allow_hosts", pattern) for pattern in allow_hosts(pl)]
    sets += args.sets
    for name, value in sets:
        cmd += ["--set", f"{name}={value}"]
    return cmd


def next_steps(pl: Plan, host: str, port: int, sandbox=None, web_url: str = "") -> str:
    shown = f"[{host}]" if ":" in host else host
    proxy = f"{shown}:{port}"
    lines = ["", "=" * 78]
    if sandbox is not None:
        lines += [
            f"coze-mitm DEMO is running: proxy {proxy}, talking to a local SANDBOX (not Coze).",
            f"  Open {DEMO_URL} in a browser that uses this proxy, e.g. a fresh Chromium:",
            f"    chromium --user-data-dir=\"$(mktemp -d)\" --proxy-server=http://{proxy} {DEMO_URL}",
            f"  or set the HTTP proxy {proxy} in your browser (Firefox: Settings > Network Settings > Manual).",
            "  No CA certificate is needed: the demo is plain HTTP.",
            f"  Check from a shell: curl -x http://{proxy} {STATUS_URL}status.json",
        ]
    else:
        mode = f"PAT mode (from {pl.pat_source})" if pl.pat else f"JWT mode ({pl.config_path})"
        lines += [
            f"coze-mitm is running: proxy {proxy}, {mode}.",
            f"  1. Point your browser's proxy at {proxy} (HTTP and HTTPS), e.g. with a proxy-switcher extension.",
            "  2. Install and trust mitmproxy's CA certificate: open http://mitm.it through the proxy.",
            f"  3. Install the userscript (Tampermonkey/Violentmonkey): open {STATUS_URL} through the proxy.",
        ]
        if not pl.page_origins:
            lines.append("  Note: no page origins yet: add --origins https://your.page to use the chat on a page.")
    if pl.args.web:
        lines.append(f"  The flows, in mitmweb: {web_url or 'the URL mitmweb printed above'}")
    if pl.args.intercept_all:
        lines.append("  --intercept-all: every HTTPS site goes through mitmproxy's CA.")
    lines += ["  Ctrl-C stops it.", "=" * 78, ""]
    return "\n".join(lines)


def run_proxy(pl: Plan, sandbox=None) -> int:
    args = pl.args
    version = mitmproxy_version()
    if args.web and version < MITMWEB_FIXED:
        say(f"{PROG}: WARNING: mitmweb {'.'.join(map(str, version))} serves its web API without authentication "
            "(CVE-2025-23217, fixed in mitmproxy 11.1.2): any program or web page that can reach its port can read "
            "the flows and change options. Python 3.12+ with mitmproxy 12 fixes it "
            "(pip install 'mitmproxy>=12'); plain mitmdump (without --web) is not affected.", err=True)
    if not is_loopback(args.host):
        say(f"{PROG}: WARNING: listening on {args.host}: anyone who can connect to it chats with YOUR Coze "
            "credentials and can use coze-mitm as an open proxy; firewall the port.", err=True)
    check_port_free(args.host, args.port)

    cmd = mitm_command(pl)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=pl.env, text=True, encoding="utf-8", errors="replace", bufsize=1)
    port_in_use = False
    listening: tuple[str, int] | None = None
    web_url = ""
    told = False
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if PORT_IN_USE_RE.search(line):
                port_in_use = True
            if m := LISTENING_RE.search(line):
                listening = (m.group(1).strip("[]"), int(m.group(2)))
            if m := WEB_LISTENING_RE.search(line):
                web_url = m.group(1)
            if listening and (web_url or not args.web) and not told:
                told = True
                say(next_steps(pl, *listening, sandbox=sandbox, web_url=web_url))
        rc = proc.wait()
    except KeyboardInterrupt:
        stop_child(proc, signalled=True)
        return EXIT_OK
    except Stop:
        stop_child(proc, signalled=False)
        return EXIT_OK
    if port_in_use:
        raise Fail(port_in_use_message(args.host, args.port), EXIT_PORT_IN_USE)
    if rc != 0:
        raise Fail(f"{'mitmweb' if args.web else 'mitmdump'} stopped with exit code {rc} (see its output above)",
                   EXIT_FAILED)
    return EXIT_OK


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
    from sandbox.coze_standin import make_sandbox_app, write_config

    import demo

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
        pl.page_origins = pl.page_origins | {demo.DEMO_ORIGIN}
        origins = ",".join(sorted(pl.page_origins))
        pl.sets = [(n, v) for n, v in pl.sets if n != "coze_origins"]
        pl.sets += [("coze_config", config_path), ("coze_origins", origins), ("coze_demo", "true")]
        if not pl.args.title:
            pl.sets.append(("coze_title", "Sandbox bot"))
        return run_proxy(pl, sandbox=standin)
    finally:
        standin.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
        check_args(args)
        if args.check:
            return run_check(args)
        pl = plan(args)
        return run_demo(pl) if args.demo else run_proxy(pl)
    except Fail as e:
        say(f"{PROG}: error: {e.msg}", err=True)
        return e.code
    except (KeyboardInterrupt, Stop):
        return EXIT_OK
    except ImportError as e:
        say(f"{PROG}: error: {e} (install the dependencies: pip install -r requirements.txt)", err=True)
        return EXIT_FAILED


def _terminate(signum, frame):
    raise Stop()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())
