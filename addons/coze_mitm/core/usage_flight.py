"""Chats in flight per user: what bounds how far a daily budget can be overshot.

Pure logic, no mitmproxy import, no I/O.

A budget is checked before a chat starts, but a chat's usage is known only when it ends, so every chat
already running when the budget is crossed still finishes. `InFlight` counts those chats per user; the
accounting part refuses a new chat while the user has `coze_user_max_parallel_chats` of them, so the
overshoot is at most that many chats.

A chat is held under a key (an HTTP flow's id; a WebSocket flow's id, which may hold several chats; a
poll of a non-streamed chat's usage) and released when its answer ends. A key whose release never came
(a hook that did not run) is forgotten after `max_age` seconds, so a lost release never locks a user out
for good.
"""

from __future__ import annotations

import time
from typing import Callable

MAX_AGE = 30 * 60.0  # seconds: longer than any Coze chat or usage poll (10 min) runs


class InFlight:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_age: float = MAX_AGE):
        self.clock = clock
        self.max_age = max_age
        self._keys: dict[str, tuple[str, list[float]]] = {}  # key -> (user, start times of its chats)
        self._users: dict[str, dict[str, list[float]]] = {}  # user -> {key: start times}
        self.expired = 0  # chats forgotten after max_age (a release that never came)

    def count(self, user: str) -> int:
        keys = self._users.get(user)
        if not keys:
            return 0
        self._expire(user, keys)
        return sum(len(starts) for starts in keys.values())

    def add(self, key: str, user: str) -> None:
        """One more chat of `user`, held under `key` (a key belongs to one user)."""
        entry = self._keys.get(key)
        if entry is None:
            starts: list[float] = []
            self._keys[key] = (user, starts)
            self._users.setdefault(user, {})[key] = starts
        else:
            starts = entry[1]
        starts.append(self.clock())

    def release(self, key: str, n: int = 1) -> int:
        """The oldest `n` chats held under `key` ended; returns how many were held."""
        entry = self._keys.get(key)
        if entry is None:
            return 0
        user, starts = entry
        done = min(n, len(starts))
        del starts[:done]
        if not starts:
            self._drop(key, user)
        return done

    def release_all(self, key: str) -> int:
        entry = self._keys.get(key)
        return self.release(key, len(entry[1])) if entry is not None else 0

    def rekey(self, old: str, new: str) -> bool:
        """Hand the chats held under `old` to `new` (a non-streamed chat answered `in_progress`: its usage
        poll holds it now)."""
        entry = self._keys.pop(old, None)
        if entry is None:
            return False
        user, starts = entry
        keys = self._users[user]
        del keys[old]
        if new in self._keys:
            self._keys[new][1].extend(starts)
        else:
            self._keys[new] = (user, starts)
            keys[new] = starts
        return True

    def holds(self, key: str) -> bool:
        return key in self._keys

    def total(self) -> int:
        return sum(len(starts) for _, starts in self._keys.values())

    def _drop(self, key: str, user: str) -> None:
        del self._keys[key]
        keys = self._users.get(user)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._users[user]

    def _expire(self, user: str, keys: dict[str, list[float]]) -> None:
        oldest_allowed = self.clock() - self.max_age
        for key, starts in list(keys.items()):
            if starts and starts[0] < oldest_allowed:
                stale = sum(1 for t in starts if t < oldest_allowed)
                self.expired += stale
                self.release(key, stale)


class SharedInFlight(InFlight):
    """InFlight whose chats are also entries in a store several proxies share (usage_redis.py), so every
    proxy's parallel cap counts them. The entry is made by the store's atomic budget decision
    (`reserve`); this keeps which entries each key holds, and gives them back when its chats end (or, as
    for InFlight, after max_age)."""

    def __init__(self, store, **kw):
        super().__init__(**kw)
        self.store = store
        self._members: dict[str, list[str]] = {}  # key -> the store's entries, oldest first

    def add(self, key: str, user: str, member: str = "") -> None:
        super().add(key, user)
        if member:
            self._members.setdefault(key, []).append(member)

    def release(self, key: str, n: int = 1) -> int:
        done = super().release(key, n)
        members = self._members.get(key)
        if members:
            for member in members[:done]:
                self.store.release(member)
            del members[:done]
            if not members or not self.holds(key):
                for member in self._members.pop(key):
                    self.store.release(member)
        return done

    def rekey(self, old: str, new: str) -> bool:
        moved = super().rekey(old, new)
        members = self._members.pop(old, None)
        if moved and members:
            self._members.setdefault(new, []).extend(members)
        elif members:
            for member in members:
                self.store.release(member)
        return moved
