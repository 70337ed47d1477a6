"""--check: the OAuth config validated offline, then one real token minted for a throwaway session.

The verdict is the last line: "OK: ..." on stdout, or "FAILED: ..." on stderr with the same hints the
launcher gives; the exit code says which kind of failure it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import time

from launcher.common import (EXIT_CONFIG, EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE, config_error, say,
                             tell, wrap)
from launcher.args import UPSTREAM_AUTH_ENV
from launcher.plan import Plan, config_path


def failed(msg: str) -> None:
    say(wrap(f"FAILED: {msg}"), err=True)


def check_outbound(pl):
    """How the proxy's own requests would leave (core/outbound.py), from this command line's --set values and
    COZE_UPSTREAM_AUTH: --check mints its token the way the running proxy would."""
    from mitmproxy.proxy import mode_specs

    from coze_mitm.core.outbound import Outbound

    upstreams = []
    for name, value in pl.args.sets:
        if name == "mode":
            try:
                mode = mode_specs.ProxyMode.parse(value)
            except ValueError as e:
                raise ValueError(f"--set mode={value}: {e}; use mode=upstream:http://host:port") from None
            if isinstance(mode, mode_specs.UpstreamMode):
                upstreams.append((mode.scheme, mode.address[0], mode.address[1]))
    insecure = (pl.option("ssl_insecure", "false") or "").lower() in ("true", "1", "yes", "on")
    return Outbound.from_options(upstreams, os.environ.get(UPSTREAM_AUTH_ENV, "").strip() or None, insecure,
                                 pl.option("ssl_verify_upstream_trusted_ca"),
                                 pl.option("ssl_verify_upstream_trusted_confdir"))


def run_check(args: argparse.Namespace) -> int:
    from coze_mitm.core import config
    from coze_mitm.core.exchange import CozeTokenExchange, ExchangeError

    pat = bool(args.pat or os.environ.get("COZE_PAT", "").strip())
    path = config_path(args)
    pl = Plan(args)
    try:
        app = config.load_oauth_config(path)
        override = pl.option("coze_api_base")
        if override:
            config.parse_api_origin(override)
            problem = config.region_problem(app.www_base, override)
            if problem:
                raise config.ConfigError(f"{path} with --set coze_api_base: {problem}")
            app = dataclasses.replace(app, api_base=override.rstrip("/"))
        ttl = int(pl.option("coze_token_ttl", "900"))
        timeout = float(pl.option("coze_exchange_timeout", "10"))
        if args.origins:
            config.parse_page_origins(",".join(args.origins))
    except config.ConfigError as e:
        failed(config_error(str(e)))
        return EXIT_CONFIG
    except ValueError:
        failed("coze_token_ttl and coze_exchange_timeout must be numbers")
        return EXIT_USAGE
    if not 60 <= ttl <= 86399:
        failed(f"coze_token_ttl={ttl} is out of range: Coze accepts 60 to 86399 seconds")
        return EXIT_CONFIG
    key_bits = app.private_key.key_size
    kid = app.public_key_id if len(app.public_key_id) <= 8 else app.public_key_id[:6] + "…"
    say(f"config {path}: OK offline (client_id {app.client_id}, public_key_id {kid}, RSA-{key_bits} key, "
        f"API {app.api_base})")
    warning = config.permissions_warning(path)
    if warning:
        tell("warning", warning)
    if pat:
        tell("note", "a PAT is set (COZE_PAT or --pat): the proxy would run in PAT mode and not use this config; "
                     "--check does not verify PATs")

    session = f"coze-mitm-check-{secrets.token_hex(4)}"
    try:
        outbound = check_outbound(pl)
    except ValueError as e:
        failed(str(e))
        return EXIT_USAGE
    if outbound.proxy:
        say(f"the token request goes {outbound.describe()}")
    exchange = CozeTokenExchange(app, duration_seconds=ttl, timeout=timeout, outbound=lambda: outbound)
    started = time.monotonic()
    try:
        issued = exchange(session)
    except ExchangeError as e:
        if e.reason in ("exchange-timeout", "exchange-unreachable"):
            proxy_env = [k for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy") if os.environ.get(k)]
            if proxy_env:
                tell("note", f"{proxy_env[0]} is set, but coze-mitm ignores proxy variables: name the proxy with "
                             f"--set mode=upstream:http://host:port (its login: {UPSTREAM_AUTH_ENV}=user:password)")
            failed(e.msg)
            return EXIT_UNREACHABLE
        failed(e.msg)
        return EXIT_REFUSED
    expires = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(issued.expires_at))
    logid = issued.logid or "none sent"
    say(f"OK: Coze accepted the config: a token for the throwaway session {session} expires {expires} "
        f"(in {int(issued.expires_at - time.time())} s); exchange took {time.monotonic() - started:.2f} s; "
        f"logid {logid}")
    del issued  # never printed, never kept
    return EXIT_OK
