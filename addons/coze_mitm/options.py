"""Every coze_* option, declared in one place: name, type, default, and the help mitmweb and `--options` show.

The parts read them as ctx.options.coze_* in their own `configure` (each validates what it uses: a bad
value stops the start-up with one line; later, in mitmweb or with `set`, it raises OptionsError and
mitmproxy keeps the previous value). Declared by the settings part, the first part that has options.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

from mitmproxy import ctx, exceptions

from coze_mitm.core import config

LAUNCHER = "run_mitm.py"

log = logging.getLogger("coze.options")


def refuse(message: str, *, started: bool) -> None:
    """A coze_* value that cannot be used. At start-up: one ERROR line, and mitmdump/mitmweb exit 1 at once
    (an OptionsError there would print a traceback; the ERROR alone would stop it only after it printed
    "HTTP(S) proxy listening at ..." and "Error logged during startup, exiting..."). Once running (mitmweb's
    options, `set` in the console): OptionsError, so mitmproxy keeps the previous value and shows why; the
    part keeps its last good state. Elsewhere (a script reload, a test's context): the ERROR line only."""
    if started:
        raise exceptions.OptionsError(message)
    log.error(message)
    if starting_up():
        # SystemExit from a configure during mitmproxy's start-up ends it with this code and prints nothing
        # more (mitmproxy-notes.md); the line above is already written, flushed here for a piped stdout.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        raise SystemExit(1)


def starting_up() -> bool:
    """Is mitmdump/mitmweb starting, so that an ERROR logged now makes it exit anyway? True while its
    errorcheck addon still watches the log (it stops once the proxy runs); False in tests' contexts (no
    errorcheck) and on a script reload of a running proxy."""
    try:
        checker = ctx.master.addons.get("errorcheck")
    except AttributeError:
        return False
    handler = getattr(checker, "logger", None)
    return handler is not None and handler in logging.getLogger().handlers


def declare(loader) -> None:
    declare_settings(loader)
    declare_parts(loader)


def declare_settings(loader) -> None:
    """The options parts/settings.py builds from (the token broker, the origins), with the page options beside
    them: a runtime change of any of these rebuilds it (SETTINGS_OPTIONS)."""
    loader.add_option(
        "coze_config", str, str(config.DEFAULT_CONFIG_PATH),
        "Path of the OAuth (JWT) app config JSON downloaded from the Coze console.",
    )
    loader.add_option(
        "coze_pat", Optional[str], None,
        "A Coze personal access token. When set: PAT mode, no config file, no per-user isolation.",
    )
    loader.add_option(
        "coze_origins", str, "",
        "Comma-separated page origins allowed to use the injected credentials and loosened CORS, "
        "e.g. https://www.coze.cn,https://example.org (exact match).",
    )
    loader.add_option(
        "coze_api_base", Optional[str], None,
        "Coze API base URL; overrides the config's coze_api_base (default https://api.coze.cn).",
    )
    loader.add_option(
        "coze_api_hosts", str, "",
        "Comma-separated extra Coze API base URLs that get CORS and credentials too; ws:// and wss:// "
        "bases for the WebSocket APIs (the API base's own, e.g. wss://ws.coze.cn, is included).",
    )
    loader.add_option(
        "coze_allow_remote", bool, False,
        "Give Coze credentials to tagged requests from clients on other machines too. Off: they get a "
        "local 403, because anyone who reaches the proxy could spend your Coze quota as any user. On or off, "
        "they never reach this host's own services or link-local addresses through the proxy.",
    )
    loader.add_option("coze_token_ttl", int, 900, "Lifetime asked of Coze for each access token, in seconds (60-86399).")
    loader.add_option("coze_exchange_timeout", int, 10, "Seconds to wait for Coze's token endpoint (1-120).")
    loader.add_option("coze_max_users", int, 10_000, "Users whose tokens are kept in memory (least recently used dropped).")
    loader.add_option(
        "coze_new_users_per_minute", int, 300,
        "New users whose first token may be minted per minute; 0 means no limit.",
    )
    loader.add_option("coze_bot_id", str, "", "Bot id written into the served userscript.")
    loader.add_option("coze_title", str, "Coze", "Chat title written into the served userscript.")
    loader.add_option(
        "coze_sdk_url", str, "",
        "URL of the Coze Web Chat SDK for the served userscript and the pages' CSP; empty: the official "
        "CDN build for the API's site (coze.cn or coze.com).",
    )
    loader.add_option(
        "coze_csp", bool, True,
        "Add the Chat SDK's sources (its CDN, the Coze API) to the Content-Security-Policy of pages in "
        "coze_origins, so the SDK loads there; nothing else in the policy changes.",
    )
    loader.add_option(
        "coze_csp_extra", str, "",
        "More sources for those pages' CSP, in CSP syntax, e.g. \"img-src https://img.example; "
        "font-src https://fonts.example\" (fetch directives and plain sources only).",
    )



def declare_parts(loader) -> None:
    """The options the other parts read in their own `configure`."""
    # read by parts/inject.py
    loader.add_option(
        "coze_inject", bool, False,
        "Add the userscript's loader to the HTML pages of coze_origins (allowed by their Content-Security-Policy "
        "through its hash), so the chat appears in a browser without a userscript manager; the user id is kept in "
        "the page origin's localStorage. It stands down where the userscript runs. run_mitm.py --browser turns it on.",
    )

    # read by parts/login.py
    loader.add_option(
        "coze_ldap_identity", str, "dn",
        "With an LDAP proxyauth: what names a Coze user: dn (the directory entry's DN, the default) or one "
        "single-valued attribute of the entry, e.g. uid. The typed login name never does (the directory "
        "matches ' alice', 'ALICE' and a second cn as the same entry).",
    )

    # read by parts/demo.py
    loader.add_option(
        "coze_demo", bool, False,
        "Serve the demo chat page at http://coze.mitm/demo; its API http://sandbox.coze.mitm is mapped "
        "to the configured Coze API when that is a local sandbox (python3 run_mitm.py --demo sets this up).",
    )

    # read by parts/status.py
    loader.add_option(
        "coze_launcher", str, "",
        f"Set by {LAUNCHER} ({LAUNCHER} passes coze_launcher={LAUNCHER}) so the status page's hints name its "
        "flags (--bot-id, --origins) instead of --set options.",
    )

    # read by parts/accounting.py
    loader.add_option(
        "coze_user_daily_tokens", int, 0,
        "Coze tokens one user may use per UTC day; at the budget, every request that spends tokens (chats, "
        "workflow runs, WebSocket chat events) is answered locally with code 4013 until midnight UTC "
        "(HTTP 200 for pages, so Coze's chat component shows why; 429 with Retry-After for other clients). "
        "0 = no budget.",
    )
    loader.add_option(
        "coze_user_max_parallel_chats", int, 4,
        "With a daily budget: chats one user may have in progress at once; more are answered locally (code "
        "4013). A budget can be overshot by the chats already running when it is reached, so this bounds the "
        "overshoot. 0 = no cap.",
    )
    loader.add_option(
        "coze_usage_file", str, "",
        "SQLite file where usage per user and day is kept (default: coze-mitm-usage.sqlite in "
        "mitmproxy's confdir); 'memory' keeps it in memory only; a Redis URL (redis://host:6379/0, rediss:// "
        "for TLS; the password in the URL or in COZE_REDIS_PASSWORD) shares usage, budgets, the parallel cap "
        "and the new-users limit with every proxy pointed at the same Redis (docs/team.md).",
    )
    loader.add_option(
        "coze_usage_lease", int, 30,
        "With a Redis coze_usage_file: seconds a chat in flight holds its place in the shared parallel cap "
        "without its proxy renewing it (a proxy that dies frees its chats' places within this time).",
    )

    # read by parts/flowlog.py
    loader.add_option(
        "coze_quiet", bool, False,
        "Hide mitmproxy's per-connection log lines (client/server connect and disconnect, streaming "
        "notices); with flow_detail=0 the log then has one line per request coze-mitm acted on "
        "(without it, only refusals, token retries and errors get a line).",
    )

    # read by process/tuning.py
    loader.add_option(
        "coze_tune_process", bool, False,
        "Tune the whole mitmproxy process for a long-running proxy (run_mitm.py turns this on): mitmproxy's "
        "per-message type check without reference cycles, start-up objects frozen out of the garbage "
        "collector's way, and glibc's free heap pages handed back once a minute. Off by default: it changes "
        "the process for every addon in it. Everything it changes is put back at exit or when turned off.",
    )


class OptionsOnly:
    """The options without the settings part: for a part tested on its own (taddons.context(OptionsOnly(), part))."""

    def load(self, loader):
        declare(loader)


class _Names:
    """A loader that only notes the names declared to it."""

    def __init__(self):
        self.names: list[str] = []

    def add_option(self, name: str, *_args, **_kwargs) -> None:
        self.names.append(name)


def _declared(declare_some) -> frozenset[str]:
    names = _Names()
    declare_some(names)
    return frozenset(names.names)


# Derived, never repeated: an option added to declare_settings rebuilds the settings part when changed at runtime.
SETTINGS_OPTIONS = _declared(declare_settings)
