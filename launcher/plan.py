"""What to start, worked out before anything runs: the PAT, the OAuth config, the origins, and the
mitmproxy command line with its options."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launcher.args import PROXYAUTH_ENV, UPSTREAM_AUTH_ENV, set_value
from launcher.common import EXIT_CONFIG, EXIT_USAGE, SCRIPT, Fail, config_error, tell

# Without -v: no per-flow dump by mitmproxy (flowlog writes one line per flow coze-mitm acted on),
# and no per-connection lines (flowlog's coze_quiet).
QUIET_OPTIONS = (("flow_detail", "0"), ("coze_quiet", "true"))
# The options the launcher sets that take several values (mitmproxy's Sequence[str]).
LIST_OPTIONS = ("allow_hosts",)


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
        tell("warning", "a PAT given on the command line stays in your shell history and shows in ps; "
                        "next time use COZE_PAT=pat_... or --pat without a value")
        return args.pat.strip(), "--pat"
    env = os.environ.get("COZE_PAT", "").strip()
    if env and args.config:
        tell("note", "COZE_PAT from the environment is ignored because --config was given (JWT mode)")
        return "", ""
    return (env, "COZE_PAT") if env else ("", "")


def config_path(args: argparse.Namespace) -> str:
    from coze_mitm.core import config  # addons/config.py

    return str(Path(args.config).expanduser().resolve()) if args.config else str(config.DEFAULT_CONFIG_PATH)


def plan(args: argparse.Namespace) -> Plan:
    """Validate everything that can be validated offline, and work out the mitmproxy options."""
    from coze_mitm.core import config  # addons/config.py: the same checks the addon makes

    pl = Plan(args)
    pl.sets.append(("coze_launcher", "run_mitm.py"))  # the status page's hints then name this launcher's flags
    pl.sets.append(("coze_tune_process", "true"))  # the launcher owns its process: the soak-flat tuning (docs/benchmarks.md)
    pl.env = {k: v for k, v in os.environ.items() if k not in ("COZE_PAT", PROXYAUTH_ENV)}
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
            config.parse_api_origin(u, "coze_api_hosts", websocket=True)
        if pl.pat:
            pl.api_bases.insert(0, api_override or config.DEFAULT_API_BASE)
        elif not args.demo:
            pl.config_path = config_path(args)
            app = config.load_oauth_config(pl.config_path)
            pl.api_bases.insert(0, api_override or app.api_base)
    except config.ConfigError as e:
        raise Fail(config_error(str(e)), EXIT_CONFIG) from None

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
    if getattr(args, "browser", None) is not None:
        pl.sets.append(("coze_inject", "true"))  # the launched browser has no userscript manager (the user's --set wins)
    if args.allow_remote:
        pl.sets.append(("coze_allow_remote", "true"))
    if args.proxyauth:
        # by environment, never on the child's command line (ps, /proc/PID/cmdline): it may hold an LDAP bind
        # password or a user:pass; mitm_command's child code moves it into mitmproxy's own --set parsing
        pl.env[PROXYAUTH_ENV] = args.proxyauth.strip()
    return pl


def handled(pl: Plan):
    """The hosts the proxy will handle (core/hosts.py: the same lists its PAC and status page use)."""
    from coze_mitm.core.hosts import Handled

    api_base, *api_hosts = pl.api_bases or [None]
    return Handled.from_settings(api_base, ",".join(api_hosts), pl.page_origins, demo=bool(pl.args.demo),
                                 onboarding_host=pl.option("onboarding_host"))


def allow_hosts(pl: Plan) -> list[str]:
    return handled(pl).allow_hosts()


# -O: Python's optimised mode, in which mitmproxy skips its debug-only checks (the type check of every field of every
# message it builds, the event-type check of every state-machine step, its asserts): less work per request for the
# same behaviour (docs/decisions.md, "mitmproxy under `python -O`"). Nothing in addons/ is an assert
# (tests/test_package_layout.py). bench/ runs its "as run_mitm.py runs it" proxy with these flags too.
CHILD_PYTHON_FLAGS = ("-O",)


def child_code(tool: str) -> str:
    """The child's `python -c` program: mitmproxy's own main, with the proxyauth SPEC and the upstream proxy's
    user:pass (if any) taken from the environment into its argument list in memory only. /proc/PID/cmdline (what ps shows any user) keeps the
    command line the child started with; the variable leaves the child's environment before mitmproxy runs
    (the kernel's copy of the start-up environment, /proc/PID/environ, is readable by the same user only)."""
    return (f"import os, sys; spec = os.environ.pop({PROXYAUTH_ENV!r}, None); "
            "spec and sys.argv.extend(['--set', 'proxyauth=' + spec]); "
            f"up = os.environ.pop({UPSTREAM_AUTH_ENV!r}, None); "
            "up and sys.argv.extend(['--set', 'upstream_auth=' + up]); del spec, up; "
            f"from mitmproxy.tools.main import {tool}; {tool}()")


def mitm_command(pl: Plan) -> list[str]:
    args = pl.args
    tool = "mitmweb" if args.web else "mitmdump"
    cmd = [sys.executable, *CHILD_PYTHON_FLAGS, "-c", child_code(tool),
           "--listen-host", args.host, "--listen-port", str(args.port), "-s", str(SCRIPT)]
    sets = list(pl.sets)
    if not args.intercept_all:
        sets += [("allow_hosts", pattern) for pattern in allow_hosts(pl)]
    if not args.verbose:
        sets += [(n, v) for n, v in QUIET_OPTIONS if not (args.web and n == "flow_detail")]
    # The user's own --set wins: mitmproxy refuses a single-valued option given twice ("Received multiple values";
    # for a coze_* option its script loader then dies without a word), so the launcher's value is left out.
    # A list option (allow_hosts) takes every value: the user's are added to the launcher's.
    theirs = {name for name, _ in args.sets} - set(LIST_OPTIONS)
    sets = [(n, v) for n, v in sets if n not in theirs] + args.sets
    for name, value in sets:
        cmd += ["--set", f"{name}={value}"]
    return cmd

