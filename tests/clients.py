"""HTTP clients for tests that go through a real proxy: a session and a tagged request's headers."""

from __future__ import annotations

import requests

PAGE = "https://chat.example.org"


def session(proxy) -> requests.Session:
    """A keep-alive session through `proxy` that ignores proxy settings from the environment."""
    s = requests.Session()
    s.trust_env = False
    s.proxies = proxy.proxies
    return s


def tagged(user_id: str, origin: str | None = PAGE, **extra) -> dict:
    """What the Chat SDK sends from page `origin` (None: a non-browser client like cozepy)."""
    headers = {"Authorization": f"Bearer user:{user_id}", "Content-Type": "application/json"}
    if origin:
        headers.update({"Origin": origin, "Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "cross-site"})
    headers.update(extra)
    return headers
