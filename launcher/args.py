"""The command line: flags, --set pass-through, and the refusals that follow from the arguments alone."""

from __future__ import annotations

import argparse
import os
import re
import stat
import urllib.parse
from pathlib import Path

from coze_mitm.core.identity import is_loopback
from coze_mitm.core.usage_redis import PASSWORD_ENV as REDIS_PASSWORD_ENV
from launcher.common import DEFAULT_PORT, DEMO_URL, EXIT_CODES_HELP, EXIT_USAGE, PROG, PYTHON, Fail, tell

# Options this launcher owns: setting them with --set would bypass its checks.
OWNED_OPTIONS = {"listen_host": "--host", "listen_port": "--port", "mode": "--host/--port", "coze_demo": "--demo",
                 "coze_allow_remote": "--allow-remote"}
# --set spellings of the launcher's own flags, accepted because the addon's messages suggest them.
FLAG_ALIASES = {"coze_config": "config", "coze_origins": "origins", "coze_bot_id": "bot_id", "coze_title": "title",
                "proxyauth": "proxyauth"}
# proxyauth values that let anyone in: mitmproxy's "any" accepts every user name and password.
ANONYMOUS_PROXYAUTH = ("any",)
# The proxyauth spec from the environment: keeps an LDAP bind password or a user:pass out of ps and shell history.
# The launcher hands it to mitmdump the same way (never on the child's command line).
PROXYAUTH_ENV = "COZE_PROXYAUTH"
# The upstream proxy's user:pass (mitmproxy's upstream_auth), the same way: never on a command line.
UPSTREAM_AUTH_ENV = "COZE_UPSTREAM_AUTH"


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one message, not argparse's usage block
        raise Fail(f"{message} (see {PYTHON} {PROG} --help)", EXIT_USAGE)


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

    p.add_argument("--browser", nargs="?", const="", metavar="NAME",
                   help="once the proxy listens, start your Chrome, Chromium, Edge, Brave or Firefox (NAME picks one: "
                        "chrome, chromium, edge, brave, firefox) with a throwaway profile that uses the proxy's PAC, "
                        "trusts its CA in that profile only, and opens the demo or the first --origins page; the "
                        "profile is removed when the browser closes. Turns coze_inject on: no userscript manager needed")

    net = p.add_argument_group("proxy")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: %(default)s); another than loopback needs --allow-remote")
    net.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                     help="port to listen on (default: %(default)s; 0: any free port)")
    net.add_argument("--allow-remote", action="store_true",
                     help="give Coze credentials to clients on other machines too (coze_allow_remote), and allow "
                          "a --host they can reach; needs --proxyauth (or --allow-anonymous)")
    net.add_argument("--proxyauth", metavar="SPEC",
                     help="clients log in to the proxy, and each login is one Coze user (mitmproxy's proxyauth: "
                          "@/path/to/htpasswd, ldap[s]:..., or user:pass; a password here stays in your shell "
                          f"history and shows in ps: use --proxyauth-file or {PROXYAUTH_ENV} for those)")
    net.add_argument("--proxyauth-file", metavar="PATH",
                     help="read the --proxyauth SPEC from this file's first line (e.g. an ldap:... spec with its "
                          f"bind password; keep the file mode 0600); the environment variable {PROXYAUTH_ENV} "
                          "works too. Either way it never appears on a command line")
    net.add_argument("--allow-anonymous", action="store_true",
                     help="with --allow-remote and no --proxyauth: start anyway; anyone who reaches the port "
                          "can then spend your Coze quota")
    net.add_argument("--web", action="store_true",
                     help="start mitmweb (the flows in a browser UI) instead of mitmdump; needs mitmproxy 12 "
                          "(Python 3.12+): older mitmweb serves its API without authentication")
    net.add_argument("--intercept-all", action="store_true",
                     help="intercept TLS for every host (mitmproxy's default) instead of only the hosts "
                          "coze-mitm needs; every HTTPS site then needs mitmproxy's CA")
    net.add_argument("--new-ca", action="store_true",
                     help="make a new CA (in ~/.mitmproxy-coze-mitm) that vouches only for the hosts coze-mitm "
                          "intercepts now, e.g. after --origins grew; then trust it and remove the old one (README)")
    net.add_argument("-v", "--verbose", action="store_true",
                     help="mitmproxy's own detail: every flow and connection (by default one line per request "
                          "coze-mitm acted on)")

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


def set_value(args: argparse.Namespace, name: str, default: str | None = None) -> str | None:
    """The last value given with --set for an option (mitmproxy's rule: the last --set wins)."""
    values = [v for n, v in args.sets if n == name]
    return values[-1] if values else default


def check_args(args: argparse.Namespace) -> None:
    """Refuse what the arguments alone show to be wrong or unsafe; fold --set aliases into the flags."""
    _fold_sets(args)
    _read_proxyauth(args)
    _check_reach(args)
    if args.browser is not None:
        from launcher.browser import NAMES

        if args.check:
            raise Fail("--check starts no proxy, so no browser either: drop --browser", EXIT_USAGE)
        if args.browser and args.browser.lower() not in NAMES:
            raise Fail(f"--browser {args.browser}: not a browser coze-mitm knows; use one of {', '.join(NAMES)} "
                       "(or --browser alone for the first one installed)", EXIT_USAGE)
        args.browser = args.browser.lower()
    if args.demo:
        for flag, given in (("--config", args.config), ("--pat", args.pat),
                            ("--set coze_api_base", set_value(args, "coze_api_base"))):
            if given:
                raise Fail(f"--demo brings its own sandbox config: drop {flag}", EXIT_USAGE)
    elif args.config and args.pat:
        raise Fail("--config (JWT mode) and --pat (PAT mode) exclude each other: choose one", EXIT_USAGE)


def _fold_sets(args: argparse.Namespace) -> None:
    passed = []
    for name, value in args.sets:
        if name == "coze_pat":
            raise Fail("--set coze_pat=... would show the PAT to every user of this machine in ps: "
                       "pass it as COZE_PAT=pat_... in the environment (or --pat without a value to be asked)",
                       EXIT_USAGE)
        if name == "upstream_auth":
            raise Fail("--set upstream_auth=... would show the proxy password to every user of this machine in ps: "
                       f"pass it as {UPSTREAM_AUTH_ENV}=user:password in the environment", EXIT_USAGE)
        if name == "coze_usage_file" and _redis_password_in(value):
            raise Fail("--set coze_usage_file=redis://:password@... would show the Redis password to every user of "
                       f"this machine in ps: drop it from the URL and pass it as {REDIS_PASSWORD_ENV} in the environment",
                       EXIT_USAGE)
        if name == "mode" and value.startswith("upstream:") and "@" not in value:
            passed.append((name, value))  # where the proxy sends requests, not where it listens (--host/--port)
            continue
        if name in OWNED_OPTIONS:
            raise Fail(f"use {OWNED_OPTIONS[name]} instead of --set {name}=..."
                       + (" (--set mode=upstream:http://host:port, without @, is passed on)" if name == "mode" else ""),
                       EXIT_USAGE)
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
    _refuse_repeated(passed)
    args.sets = passed


def _redis_password_in(value: str) -> bool:
    """Whether a coze_usage_file value is a Redis URL carrying a password (redis://[user]:password@host)."""
    value = value.strip()
    if not value.lower().startswith(("redis://", "rediss://")):
        return False
    try:
        return bool(urllib.parse.urlsplit(value).password)
    except ValueError:
        return "@" in value  # unparsable: the proxy refuses it anyway; a password may be in it all the same


def _refuse_repeated(sets: list[tuple[str, str]]) -> None:
    """A coze_* option given twice: mitmproxy would stop loading coze-mitm without a word (mitmproxy-notes.md).
    (mitmproxy's own single-valued options it refuses itself, naming them; list options take every value.)"""
    from coze_mitm import options

    kinds = _OptionKinds()
    options.declare(kinds)
    seen: set[str] = set()
    for name, _value in sets:  # values unsaid: one may hold a password (a redis:// URL)
        if name in seen and name in kinds.single:
            raise Fail(f"--set {name} is given more than once: give it once (mitmproxy would take neither value "
                       "and run without coze-mitm)", EXIT_USAGE)
        seen.add(name)


class _OptionKinds:
    """A loader for coze_mitm.options.declare that only notes which options take a single value."""

    def __init__(self):
        self.single: set[str] = set()

    def add_option(self, name, typespec, default, help, choices=None):  # noqa: A002 (mitmproxy's signature)
        if "Sequence" not in str(typespec):
            self.single.add(name)


def _check_reach(args: argparse.Namespace) -> None:
    """Who may reach the proxy, and who may use the owner's credentials through it."""
    web_host = set_value(args, "web_host")
    if web_host is not None and not is_loopback(web_host) and not args.allow_remote:
        raise Fail("--set web_host=... to a non-loopback address would let other machines drive mitmweb; "
                   "add --allow-remote if you really mean it", EXIT_USAGE)
    if not is_loopback(args.host) and not args.allow_remote:
        raise Fail(f"--host {args.host} is not a loopback address: anyone who can reach it could chat with "
                   "your Coze credentials; use --host 127.0.0.1, or add --allow-remote (with --proxyauth) "
                   "if you really mean it", EXIT_USAGE)
    if args.proxyauth is not None and not args.proxyauth.strip():
        raise Fail("--proxyauth wants a SPEC: @/path/to/htpasswd, ldap[s]:..., or user:pass", EXIT_USAGE)
    if args.proxyauth and args.proxyauth.strip().startswith("@"):
        path = Path(args.proxyauth.strip()[1:]).expanduser().resolve()
        if not path.is_file():
            raise Fail(f"--proxyauth {args.proxyauth.strip()}: there is no htpasswd file at {path} (make one with: "
                       f"htpasswd -cB {path} USER)", EXIT_USAGE)
        args.proxyauth = f"@{path}"  # mitmproxy reads it as it is: no ~, and not relative to another directory
        _check_htpasswd(path)
    anonymous = is_anonymous(args)
    if args.allow_anonymous and not args.allow_remote:
        raise Fail("--allow-anonymous only means something with --allow-remote: drop it", EXIT_USAGE)
    if args.allow_remote and anonymous and not args.allow_anonymous:
        how = "--proxyauth any lets every login in" if args.proxyauth else "no --proxyauth is given"
        raise Fail(f"--allow-remote: {how}, so anyone who can connect to the proxy could spend your Coze quota; "
                   "add --proxyauth @/path/to/htpasswd (each login is then one Coze user), or --allow-anonymous "
                   "if you really mean it", EXIT_USAGE)
    if args.proxyauth and args.proxyauth_source == "--proxyauth" and _inline_password(args.proxyauth):
        tell("warning", "a --proxyauth with a password (user:pass, or an LDAP spec's bind password) stays in your "
                        "shell history and shows in ps; give it with --proxyauth-file PATH or COZE_PROXYAUTH instead")


def _read_proxyauth(args: argparse.Namespace) -> None:
    """The proxyauth SPEC from --proxyauth, --proxyauth-file or COZE_PROXYAUTH (args.proxyauth_source says which)."""
    args.proxyauth_source = "--proxyauth" if args.proxyauth is not None else ""
    path = getattr(args, "proxyauth_file", None)
    if path:
        if args.proxyauth is not None:
            raise Fail("--proxyauth and --proxyauth-file are both given: give one", EXIT_USAGE)
        path = Path(path).expanduser()
        try:
            lines = [line.strip() for line in path.read_text("utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise Fail(f"--proxyauth-file {path}: cannot read it ({type(e).__name__}: {e.strerror or e})"
                       if isinstance(e, OSError) else f"--proxyauth-file {path}: not UTF-8 text", EXIT_USAGE) from None
        if len(lines) != 1:
            raise Fail(f"--proxyauth-file {path}: want exactly one line, the SPEC (@/path/to/htpasswd, ldap[s]:..., "
                       f"or user:pass); it has {len(lines)}", EXIT_USAGE)
        args.proxyauth, args.proxyauth_source = lines[0], "--proxyauth-file"
        if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            tell("warning", f"--proxyauth-file {path} can be read by other users of this machine; "
                            f"chmod 600 {path}")
    elif args.proxyauth is None and os.environ.get(PROXYAUTH_ENV, "").strip():
        args.proxyauth, args.proxyauth_source = os.environ[PROXYAUTH_ENV].strip(), PROXYAUTH_ENV


def _check_htpasswd(path: Path) -> None:
    """Refuse, naming them, the lines the installed mitmproxy cannot verify as a hash: mitmproxy 12 refuses the
    whole file for one of them ("Could not open htpasswd file", no line named); mitmproxy 11 (passlib) takes a
    hash it does not know ({SSHA}, argon2) for a plain-text password, so the hash string itself logs in. The
    addon refuses the same lines when mitmdump starts without this launcher."""
    from coze_mitm.htpasswd_check import htpasswd_problems

    problems = htpasswd_problems(path)
    if problems:
        raise Fail("; ".join(problems), EXIT_USAGE)


def is_anonymous(args: argparse.Namespace) -> bool:
    """No proxy login, or one that lets everyone in."""
    return not args.proxyauth or args.proxyauth.strip().lower() in ANONYMOUS_PROXYAUTH


def _inline_password(spec: str) -> bool:
    """Does this spec carry a password (user:pass, or an LDAP spec's bind password)?"""
    spec = spec.strip()
    return ":" in spec and not spec.startswith("@")
