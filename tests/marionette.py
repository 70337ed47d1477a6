"""A minimal Marionette client: drives a stock Firefox (Debian's firefox-esr) the way geckodriver would.

Playwright drives only its own patched Firefox builds, which cannot be downloaded here; Marionette is Firefox's own
remote protocol (started with --marionette; pref marionette.port 0 makes it pick a free port and write it to
MarionetteActivePort in the profile). The protocol: "<length>:<json>" frames; commands [0, id, name, params],
answers [1, id, error, result].
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path


class MarionetteError(RuntimeError):
    pass


class Marionette:
    def __init__(self, port: int, timeout: float = 30):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        self.next_id = 0
        self._read_frame()  # the greeting: {"applicationType": "gecko", "marionetteProtocol": 3}
        self.call("WebDriver:NewSession", {"capabilities": {"alwaysMatch": {"acceptInsecureCerts": False}}})

    @classmethod
    def from_profile(cls, profile: Path, timeout: float = 30) -> "Marionette":
        """Connect once Firefox (started with --marionette and marionette.port 0) has written its port."""
        deadline = time.monotonic() + timeout
        port_file = profile / "MarionetteActivePort"
        while True:
            try:
                return cls(int(port_file.read_text().strip()), timeout)
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _read_frame(self):
        while b":" not in self.buffer:
            self._recv()
        length, _, rest = self.buffer.partition(b":")
        size = int(length)
        self.buffer = rest
        while len(self.buffer) < size:
            self._recv()
        frame, self.buffer = self.buffer[:size], self.buffer[size:]
        return json.loads(frame)

    def _recv(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise MarionetteError("Firefox closed the Marionette connection")
        self.buffer += chunk

    def call(self, name: str, params: dict | None = None):
        self.next_id += 1
        data = json.dumps([0, self.next_id, name, params or {}]).encode()
        self.sock.sendall(str(len(data)).encode() + b":" + data)
        while True:
            kind, msg_id, error, result = self._read_frame()
            if kind == 1 and msg_id == self.next_id:
                break
        if error:
            raise MarionetteError(f"{name}: {error.get('error')}: {error.get('message')}")
        return result

    def navigate(self, url: str) -> None:
        self.call("WebDriver:Navigate", {"url": url})

    def run(self, script: str, *args):
        """A function body run in the page (`return ...` gives the value)."""
        return self.call("WebDriver:ExecuteScript", {"script": script, "args": list(args)})["value"]

    def wait_for(self, script: str, *args, timeout: float = 20):
        """Run `script` until it returns something truthy; that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.run(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"not true within {timeout} s: {script}")
            time.sleep(0.05)

    def close(self) -> None:
        try:
            self.call("Marionette:Quit", {"flags": ["eForceQuit"]})
        except (OSError, MarionetteError):
            pass
        self.sock.close()
