"""LDAP logins as directory entries: which entry a login that mitmproxy's proxyauth accepted belongs to.

mitmproxy's LDAP check (addons/proxyauth.py, 11.0.2 and 12.x) searches `(<search_filter_key>=<name>)` under
the spec's subtree, bound as the spec's DN, and binds as the FIRST entry found with the typed password. The
directory compares names its own way (OpenLDAP's `cn`: case, leading/trailing/repeated spaces, Unicode
width, and any one of several values), so ` alice`, `ａｌｉｃｅ` and `Alice Liddell` are all alice. This
module makes the same search, with the same connection settings, and returns the entry's identity: its DN
(`dn`), or one attribute of it as the directory stores it (e.g. `uid`).

Blocking (ldap3, synchronous): parts/login.py calls `lookup` in worker threads, never on the event loop,
and caches its answers (`Cache`). No mitmproxy import.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import ldap3
import ldap3.utils.conv

CACHE_ENTRIES = 10_000  # typed names remembered
CACHE_SECONDS = 300.0  # how long a typed name -> identity answer is trusted (a renamed entry shows after this)
TIMEOUT = 5  # seconds, for connecting to and answering from the directory
BIND_REFUSED_FOR = 30.0  # seconds a refused bind as the spec's DN is answered from memory, without binding again


class DirectoryError(Exception):
    """The login cannot be mapped to one directory entry; `msg` says why (never the bind password)."""

    misconfigured = False  # the proxy's own settings are wrong (BindRefused), not the login nor the directory

    def __init__(self, msg: str, unreachable: bool = False):
        super().__init__(msg)
        self.msg = msg
        self.unreachable = unreachable  # the directory did not answer (vs. answered: no usable entry)


class BindRefused(DirectoryError):
    """The directory answered, and refused the bind as the spec's DN: the bind DN or password in the proxyauth
    spec is wrong (or the account locked). Not "did not answer": trying again changes nothing until the spec
    or the directory's account is fixed. `msg` names the directory and the DN, for the operator's log."""

    misconfigured = True
    # What a client is told: not the DN, nor the directory's address.
    PUBLIC = ("the login directory refused the proxy's own bind (the bind DN or password in its proxyauth ldap "
              "spec is wrong); tell the proxy's operator")

    def __init__(self, settings: LdapSettings, why: str):
        self.why = why
        super().__init__(f"the LDAP directory {settings.host} refused the bind as {settings.bind_dn} ({why}): check "
                         "the bind DN and password in the proxyauth ldap[s]:... spec")


@dataclass(frozen=True)
class LdapSettings:
    """mitmproxy's proxyauth LDAP spec, as its own `Ldap.parse_spec` reads it."""

    use_ssl: bool
    host: str
    port: int | None
    bind_dn: str
    bind_password: str = field(repr=False)
    subtree: str
    filter_key: str

    @classmethod
    def from_parsed(cls, parsed: tuple) -> "LdapSettings":
        use_ssl, host, port, bind_dn, bind_password, subtree, filter_key = parsed
        return cls(use_ssl, host, port, bind_dn, bind_password, subtree, filter_key)


class Directory:
    """Finds the entry of a login: the same search mitmproxy's proxyauth makes. One connection per worker
    thread (an ldap3 Connection is not shared between threads), bound as the spec's DN, re-made once when it
    has gone away."""

    def __init__(self, settings: LdapSettings, identity: str = "dn"):
        self.settings = settings
        self.identity = "dn" if identity.lower() == "dn" else identity
        self._connections = PerThread(self._connect)
        self._closed = False
        # (when, refusal) of the last bind the directory refused: any client could otherwise make the proxy bind
        # with the wrong password once per request, and lock the service account where the directory locks them
        self._refused: tuple[float, BindRefused] | None = None

    def _connect(self) -> ldap3.Connection:
        s = self.settings
        refused = self._refused
        if refused is not None and time.monotonic() - refused[0] < BIND_REFUSED_FOR:
            raise BindRefused(s, refused[1].why)
        server = ldap3.Server(s.host, port=s.port, use_ssl=s.use_ssl, connect_timeout=TIMEOUT)
        try:
            return ldap3.Connection(server, s.bind_dn, s.bind_password, auto_bind=True, receive_timeout=TIMEOUT,
                                    read_only=True)
        except ldap3.core.exceptions.LDAPBindError as e:
            # The directory answered the bind with a refusal (ldap3 raises others for a directory that does not
            # answer): not retried, not "could not be searched".
            refusal = BindRefused(s, str(e).rpartition(" - ")[2] or "refused")
            self._refused = (time.monotonic(), refusal)
            raise refusal from None

    def check(self) -> None:
        """Connect and bind as the spec's DN now (blocking: at start-up only); raises DirectoryError (BindRefused
        for a wrong bind DN or password) when lookups would fail."""
        try:
            self._connection()
        except ldap3.core.exceptions.LDAPException as e:
            raise DirectoryError(f"the LDAP directory {self.settings.host} did not answer ({type(e).__name__})",
                                 unreachable=True) from None
        finally:
            self._drop()  # the lookups have connections of their own, in their threads

    def _connection(self) -> ldap3.Connection:
        return self._connections.get()

    def _drop(self) -> None:
        self._connections.drop()

    def search_filter(self, name: str) -> str:
        return f"({self.settings.filter_key}={ldap3.utils.conv.escape_filter_chars(name)})"

    def search(self, name: str, attributes: list[str]) -> tuple[ldap3.Connection, list[dict]]:
        """The search mitmproxy's check makes for `name` (blocking): this thread's connection and its raw
        results (at most 2). Raises DirectoryError when the directory cannot be searched (BindRefused: it
        refused the bind as the spec's DN)."""
        if self._closed:
            raise DirectoryError("the directory lookup was shut down", unreachable=True)
        for _ in range(2):  # once more on a new connection: the old one may have gone away (restart, idle timeout)
            try:
                conn = self._connection()
                conn.search(self.settings.subtree, self.search_filter(name), attributes=attributes, size_limit=2)
                return conn, list(conn.response or [])
            except ldap3.core.exceptions.LDAPSizeLimitExceededResult:
                return conn, list(conn.response or [])
            except ldap3.core.exceptions.LDAPException as e:
                self._drop()
                error = type(e).__name__
        raise DirectoryError(f"the LDAP directory {self.settings.host} could not be searched ({error})",
                             unreachable=True)

    def first_dn(self, name: str) -> str | None:
        """The DN mitmproxy's check binds as for `name`: the first result of its search, when that is an entry
        (mitmproxy reads `response[0]["dn"]`: a referral there fails its check). Raises DirectoryError."""
        _, response = self.search(name, [])
        if not response or response[0].get("type") != "searchResEntry":
            return None
        return response[0]["dn"]

    def lookup(self, name: str) -> str:
        """The identity of the entry `name` logs in as (blocking; call it from a worker thread)."""
        conn, found = self.search(name, [] if self.identity == "dn" else [self.identity])
        response = [r for r in found if r.get("type") == "searchResEntry"]
        if not response:
            raise DirectoryError("the LDAP directory has no entry for this login")
        entry = response[0]  # the entry mitmproxy's proxyauth bound as: the first one found
        if self.identity == "dn":
            return entry["dn"]
        values = entry.get("attributes", {}).get(self.identity)
        if isinstance(values, (list, tuple)):
            values = [v for v in values if v not in (None, "")]
            if len(values) != 1:
                raise DirectoryError(
                    f"the directory entry of this login has {len(values) or 'no'} {self.identity} values; "
                    f"coze_ldap_identity wants an attribute with exactly one (or dn)")
            values = values[0]
        if isinstance(values, bytes):
            raise DirectoryError(f"the directory's {self.identity} of this login is binary; use dn or uid")
        if not values:
            raise DirectoryError(f"the directory entry of this login has no {self.identity}")
        self._require_unique(conn, str(values))
        return str(values)

    def _require_unique(self, conn: ldap3.Connection, value: str) -> None:
        """An attribute identity must name one entry: two entries sharing a uid (say in two OUs) would
        otherwise be one Coze user, each reading the other's conversations and spending one budget."""
        key = f"({self.identity}={ldap3.utils.conv.escape_filter_chars(value)})"
        try:
            conn.search(self.settings.subtree, key, attributes=[], size_limit=2)
            found = [r for r in (conn.response or []) if r.get("type") == "searchResEntry"]
        except ldap3.core.exceptions.LDAPSizeLimitExceededResult:
            found = [None, None]
        except ldap3.core.exceptions.LDAPException as e:
            self._drop()
            raise DirectoryError(f"the LDAP directory {self.settings.host} could not be searched "
                                 f"({type(e).__name__})", unreachable=True) from None
        if len(found) > 1:
            raise DirectoryError(
                f"more than one directory entry has the {self.identity} {value!r} of this login, so "
                f"coze_ldap_identity={self.identity} cannot tell them apart (they would share one Coze user); "
                "set coze_ldap_identity=dn (the default) or an attribute unique to each entry")

    def close(self) -> None:
        self._closed = True
        self._connections.close()


class PerThread:
    """One ldap3 Connection per worker thread (a Connection is not safe to share between threads), made by
    `connect` on first use, re-made after `drop`; `close` unbinds them all."""

    def __init__(self, connect):
        self.connect = connect
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[ldap3.Connection] = []

    def get(self) -> ldap3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._local.conn = self.connect()
            with self._lock:
                self._all.append(conn)
        return conn

    def drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)
            _unbind(conn)

    def close(self) -> None:
        with self._lock:
            connections, self._all = self._all, []
        for conn in connections:
            _unbind(conn)


def _unbind(conn: ldap3.Connection) -> None:
    try:
        conn.unbind()
    except Exception:
        pass


class Passwords:
    """(name, password) -> whether mitmproxy's LDAP proxyauth accepts them, decided as it decides (11.0.2 and
    12.x, addons/proxyauth.py `Ldap.__call__`): no name or no password fails; the spec's subtree is searched
    for `(<search_filter_key>=<name>)` bound as the spec's DN; the first result must be an entry; a simple bind
    as that entry's DN with the password decides. The name is escaped in the filter, as mitmproxy 12.2.2 does
    (11.0.2 does not: there a name with `( ) * \\` is searched as a pattern; docs/decisions.md).

    Blocking: core/password_checks.py calls it in its worker threads. Each thread has its own search connection
    (bound as the spec's DN) and its own bind connection, re-bound for every check (mitmproxy opens a new one,
    reading the server's schema each time: ~7 ms against a local slapd, vs. ~0.6 ms here). Raises
    DirectoryError when the directory cannot be asked (not a wrong password); BindRefused when it refuses the
    search connection's bind as the spec's DN."""

    def __init__(self, settings: LdapSettings):
        self.directory = Directory(settings)
        self._binds = PerThread(self._connect)

    def _connect(self) -> ldap3.Connection:
        s = self.directory.settings
        server = ldap3.Server(s.host, port=s.port, use_ssl=s.use_ssl, connect_timeout=TIMEOUT,
                              get_info=ldap3.NONE)
        conn = ldap3.Connection(server, receive_timeout=TIMEOUT, read_only=True)
        conn.open()
        return conn

    def __call__(self, name: str, password: str) -> bool:
        if not name or not password:
            return False  # mitmproxy's rule; and a bind with an empty password is an anonymous one: it succeeds
        dn = self.directory.first_dn(name)
        if dn is None:
            return False
        for _ in range(2):  # a wrong password is False, not an exception: this is a connection gone away
            try:
                return bool(self._binds.get().rebind(dn, password, read_server_info=False))
            except ldap3.core.exceptions.LDAPException as e:
                self._binds.drop()
                error = type(e).__name__
        raise DirectoryError(f"the LDAP directory {self.directory.settings.host} could not be asked ({error})",
                             unreachable=True)

    def close(self) -> None:
        self.directory.close()
        self._binds.close()


class Cache:
    """typed name -> identity, at most `entries` names (least recently used dropped), each for `seconds`.
    Only answers are cached; a failed lookup is asked again next time."""

    def __init__(self, entries: int = CACHE_ENTRIES, seconds: float = CACHE_SECONDS, clock=time.monotonic):
        self.entries, self.seconds, self.clock = entries, seconds, clock
        self._data: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()

    def get(self, name: str) -> str | None:
        hit = self._data.get(name)
        if hit is None:
            return None
        if hit[1] <= self.clock():
            del self._data[name]
            return None
        self._data.move_to_end(name)
        return hit[0]

    def put(self, name: str, identity: str) -> None:
        self._data[name] = (identity, self.clock() + self.seconds)
        self._data.move_to_end(name)
        while len(self._data) > self.entries:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)
