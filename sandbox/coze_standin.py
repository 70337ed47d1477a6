"""coze-mitm SANDBOX: a strict local stand-in for the Coze API. THIS IS NOT COZE.

Nothing here talks to Coze. It is a small HTTP + WebSocket server (stdlib ``http.server``, pyjwt,
cryptography and wsproto; no mitmproxy) that behaves like the parts of the Coze API that coze-mitm
and the clients it serves (the Web Chat SDK, @coze/api, cozepy) use, and is as strict as Coze where
that matters:

* ``POST /api/permission/oauth2/token`` checks the RS256 JWT like Coze does (alg, typ, kid,
  signature, iss, aud, iat, exp, single-use jti, optional session_name) and answers
  ``{"access_token": "czs_...", "expires_in": <absolute unix time>, "token_type": "Bearer"}``;
* every other endpoint (the list is :mod:`sandbox.routes`) only accepts tokens it minted, and keeps
  every ``session_name`` in its own world (code 4101 for another session's conversation), which is
  how the tests prove per-user isolation;
* knobs (``token_mode``, ``chat_mode``, ``token_delay``, ``delta_gap``, :meth:`CozeStandIn.revoke`)
  reproduce Coze's failure modes, and observations (``exchanges``, ``requests_seen``,
  ``placeholder_seen``, ``ws_seen``, ``chats_of()``, ``usage_of()``) let tests see what reached "Coze".

Like a public API server it compresses answers (streams included, flushed per event) when the client offers
br, zstd or gzip (``CozeStandIn.compress = False`` turns that off).

It is labelled as a sandbox everywhere a person could see it: every answer carries
``Server: coze-sandbox``, the bot is called "Sandbox bot" and replies "Sandbox reply to: ...".

The package, by Coze API area: tokens.py (token exchange), bots.py (bots, apps, workflows),
conversations.py and messages.py, chat.py (chat and streaming; a chat whose stream ends early runs on and is billed),
workflows.py (workflow runs, async runs and their run history, stream_run/stream_resume), files.py, audio.py (speech and
transcription over HTTP), websocket.py (handshake, framing) and ws_events.py (the WebSocket endpoints). state.py holds the state every endpoint is
handed (a leaf: it imports none of them); routes.py lists every endpoint and dispatches to them;
server.py is the HTTP plumbing, which knows no endpoint; standin.py assembles the three. No module
imports one that imports it back (tests/test_sandbox_layout.py). This module is the public entry
point. Run the sandbox alone with::

    python -m sandbox.coze_standin --port 8790 --write-config /tmp/sandbox_oauth.json
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .common import BOT_NAME, JWT_GRANT_TYPE, SERVER_NAME, TOKEN_PATH, reply_for, usage_for
from .standin import CozeStandIn

__all__ = ["CozeStandIn", "make_sandbox_app", "generate_key_pair", "write_config", "TOKEN_PATH", "JWT_GRANT_TYPE",
           "SERVER_NAME", "BOT_NAME", "reply_for", "usage_for"]


def generate_key_pair() -> tuple[str, str]:
    """A throwaway RSA-2048 key pair as PEM strings: (PKCS8 private key, SubjectPublicKeyInfo public key)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return private_pem, public_pem


def make_sandbox_app(host: str = "127.0.0.1", port: int = 0, **kw: Any) -> tuple[CozeStandIn, dict]:
    """Generate a throwaway RSA-2048 key; return (stand-in, oauth config dict exactly like the Coze
    console's file: client_type "jwt", client_id, coze_www_base, coze_api_base = the stand-in's
    base_url, private_key (PKCS8 PEM, str), public_key_id). The stand-in is bound but not started:
    call ``.start()`` (or use it as a context manager)."""
    private_pem, public_pem = generate_key_pair()
    kid = "sandbox_" + secrets.token_urlsafe(24)
    client_id = "11" + "".join(secrets.choice("0123456789") for _ in range(11))
    standin = CozeStandIn(public_pem, kid, client_id, host=host, port=port, **kw)
    config = {
        "client_type": "jwt",
        "client_id": client_id,
        "coze_www_base": standin.base_url,
        "coze_api_base": standin.base_url,
        "private_key": private_pem,
        "public_key_id": kid,
    }
    return standin, config


def write_config(path: str, config: dict) -> None:
    """Write the config JSON with mode 0600 (it holds a private key, even if a throwaway one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (json.dumps(config, indent=2) + "\n").encode())
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sandbox.coze_standin",
        description="Run the coze-mitm SANDBOX (a local stand-in for the Coze API; it is NOT Coze) "
                    "with a throwaway key.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--write-config", metavar="PATH", help="write the OAuth app config JSON (mode 0600) here")
    p.add_argument("--delta-gap", type=float, default=0.05, help="seconds between SSE deltas")
    p.add_argument("--token-delay", type=float, default=0.0, help="seconds before answering a token request")
    args = p.parse_args(argv)
    standin, config = make_sandbox_app(args.host, args.port, delta_gap=args.delta_gap, token_delay=args.token_delay)
    if args.write_config:
        write_config(args.write_config, config)
    standin.start()
    print(standin.base_url, flush=True)
    print(f"coze-mitm SANDBOX (not Coze) serving at {standin.base_url} (WebSockets: {standin.ws_url})"
          + (f"; OAuth config written to {args.write_config}" if args.write_config else "")
          + "; Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
