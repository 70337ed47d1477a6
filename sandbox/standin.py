"""``CozeStandIn``: the assembly of the sandbox — its state (state.py), its one routing table
(routes.py) and one server on one port for HTTP and WebSocket (server.py) — and the API tests use."""

from __future__ import annotations

import functools
import threading

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from . import routes
from .server import Handler, Server
from .state import State


class _FromState:
    """A CozeStandIn attribute that is the state's attribute of the same name (read and write)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return getattr(obj.state, self.name)

    def __set__(self, obj, value) -> None:
        setattr(obj.state, self.name, value)


class CozeStandIn:
    """A local SANDBOX standing in for the Coze API (not Coze). See :mod:`sandbox.coze_standin`.

    The socket is bound in ``__init__`` so :attr:`base_url` (with the real port) is known before
    :meth:`start`. Knobs are plain attributes and may be changed at any time, also while serving.
    ``state`` is everything the endpoints know (:class:`sandbox.state.State`); ``server`` the bound
    HTTP server (its ``RequestHandlerClass`` may be swapped before :meth:`start`).
    """

    # knobs and observations live in the state; these names keep working on the stand-in
    kid = _FromState()
    client_id = _FromState()
    token_mode = _FromState()
    chat_mode = _FromState()
    token_delay = _FromState()
    delta_gap = _FromState()
    exchanges = _FromState()
    requests_seen = _FromState()
    placeholder_seen = _FromState()
    ws_seen = _FromState()

    def __init__(
        self,
        public_key_pem: str | bytes,
        kid: str,
        client_id: str,
        host: str = "127.0.0.1",
        port: int = 0,
        token_delay: float = 0.0,
        delta_gap: float = 0.05,
    ):
        if isinstance(public_key_pem, str):
            public_key_pem = public_key_pem.encode()
        key = serialization.load_pem_public_key(public_key_pem)
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("the sandbox verifies RS256 JWTs: public_key_pem must be an RSA public key")
        self.state = State(key, kid, client_id, token_delay=token_delay, delta_gap=delta_gap)
        self._thread: threading.Thread | None = None
        self._closed = False

        self.server = Server((host, port), Handler, functools.partial(routes.dispatch, self.state))
        self.port = int(self.server.server_address[1])
        # listening on all interfaces: clients (and the JWT aud) use the loopback address
        self.host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        self.audience = self.state.audience = f"{self.host}:{self.port}"
        self.base_url = f"http://{self.audience}"
        self.ws_url = f"ws://{self.audience}"  # the WebSocket APIs (/v1/chat, ...) on the same port

    @property
    def compress(self) -> bool:
        """Answers (streams included) compressed when the client offers br/zstd/gzip (default True)."""
        return self.server.compress

    @compress.setter
    def compress(self, value: bool) -> None:
        self.server.compress = bool(value)

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "CozeStandIn":
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                name=f"coze-sandbox:{self.port}", daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.state.stopping.set()
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(timeout=5)
        self.server.server_close()
        self.server.drop_connections()

    def __enter__(self) -> "CozeStandIn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<CozeStandIn SANDBOX (not Coze) at {self.base_url}>"

    # ----------------------------------------------------------------- observation (see State)
    def exchange_count(self, *args, **kw) -> int:
        return self.state.exchange_count(*args, **kw)

    def reset_observations(self) -> None:
        self.state.reset_observations()

    def revoke(self, session_name: str | None = None, token: str | None = None, style: str = "401") -> int:
        return self.state.revoke(session_name, token, style)

    def tokens_of(self, session_name: str) -> list[str]:
        return self.state.tokens_of(session_name)

    def chats_of(self, *args, **kw) -> list[dict]:
        return self.state.chats_of(*args, **kw)

    def usage_of(self, *args, **kw) -> dict:
        return self.state.usage_of(*args, **kw)

    def files_of(self, *args, **kw) -> list[dict]:
        return self.state.files_of(*args, **kw)

    def feedback_of(self, message_id: str) -> dict | None:
        return self.state.feedback_of(message_id)

    exchange_count.__doc__ = State.exchange_count.__doc__
    reset_observations.__doc__ = State.reset_observations.__doc__
    revoke.__doc__ = State.revoke.__doc__
    tokens_of.__doc__ = State.tokens_of.__doc__
    chats_of.__doc__ = State.chats_of.__doc__
    usage_of.__doc__ = State.usage_of.__doc__
    files_of.__doc__ = State.files_of.__doc__
    feedback_of.__doc__ = State.feedback_of.__doc__
