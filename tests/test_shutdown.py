"""Stopping the proxy while clients are still connected prints no traceback (issue 9 §5): a real
mitmdump with an idle keep-alive connection, a CONNECT tunnel and a streamed chat in flight."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

from tests.clients import session, tagged

PAGE = "https://chat.example.org"
ALICE = "alice-0001"


def settle(proxy) -> None:
    """Wait until the harness has read everything the exited process wrote (no new line for 0.5 s)."""
    seen = -1
    while seen != len(proxy.lines):
        seen = len(proxy.lines)
        time.sleep(0.5)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_with_clients_connected_prints_no_traceback(mitmdump, config_file, standin, sig):
    standin.delta_gap = 0.5  # the chat streams slowly: it is still in flight when the proxy stops
    proxy = mitmdump(f"coze_config={config_file}", f"coze_origins={PAGE}")
    idle = session(proxy)
    assert idle.get(f"{standin.base_url}/v1/bots/7000", headers=tagged(ALICE)).status_code == 200  # kept alive

    tunnel = socket.create_connection(("127.0.0.1", proxy.port))
    tunnel.sendall(f"CONNECT {standin.audience} HTTP/1.1\r\nHost: {standin.audience}\r\n\r\n".encode())
    assert tunnel.recv(1024).startswith(b"HTTP/1.1 200")

    streaming = threading.Event()

    def chat():
        body = {"bot_id": "7000", "user_id": "u", "stream": True,
                "additional_messages": [{"role": "user", "content": "one two three four five six seven eight",
                                         "content_type": "text"}]}
        try:
            with session(proxy).post(f"{standin.base_url}/v3/chat", headers=tagged(ALICE), json=body,
                                     stream=True, timeout=60) as r:
                for _ in r.iter_content(None):
                    streaming.set()
        except Exception:
            pass  # the proxy went away mid-stream: expected
        streaming.set()

    client = threading.Thread(target=chat, daemon=True)
    client.start()
    assert streaming.wait(30)

    proxy.proc.send_signal(sig)
    assert proxy.proc.wait(30) == 0
    client.join(30)
    tunnel.close()
    settle(proxy)
    assert "Traceback" not in proxy.output, proxy.output
    assert "CancelledError" not in proxy.output, proxy.output
