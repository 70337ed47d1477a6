"""A second host for tests: a network namespace joined to this machine by a veth pair (`ip`, Linux, root or
CAP_NET_ADMIN). tests/test_remote.py talks to the proxy from it; tests/upstream_net.py builds a corporate network
on it."""

from __future__ import annotations

import shutil
import subprocess
from contextlib import contextmanager


class Unavailable(Exception):
    """This machine cannot make the namespace (the reason is the message)."""


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@contextmanager
def veth_pair(ns: str, link: str, near_addr: str, far_addr: str):
    """Namespace `ns` (its loopback up), joined by the veth pair `<link>a` (this host, `near_addr`/30) and
    `<link>b` (the namespace, `far_addr`/30); yields `ns`, removes both afterwards. Raises Unavailable with the
    reason where they cannot be made."""
    near, far = f"{link}a", f"{link}b"
    if shutil.which("ip") is None:  # not there, or not a program this user may run
        raise Unavailable("iproute2's `ip` is not installed: cannot make a network namespace")
    made = ip("netns", "add", ns)
    if made.returncode != 0:
        raise Unavailable(f"cannot create a network namespace here (needs root/CAP_NET_ADMIN): {made.stderr.strip()}")
    try:
        for cmd in (
            ("link", "add", near, "type", "veth", "peer", "name", far),
            ("link", "set", far, "netns", ns),
            ("addr", "add", f"{near_addr}/30", "dev", near),
            ("link", "set", near, "up"),
            ("-n", ns, "addr", "add", f"{far_addr}/30", "dev", far),
            ("-n", ns, "link", "set", far, "up"),
            ("-n", ns, "link", "set", "lo", "up"),
        ):
            run(*cmd)
        yield ns
    finally:
        ip("link", "del", near)
        ip("netns", "del", ns)


def run(*cmd: str) -> None:
    """`ip *cmd`, or Unavailable saying which command failed and why."""
    done = ip(*cmd)
    if done.returncode != 0:
        raise Unavailable(f"cannot build the test network (`ip {' '.join(cmd)}`): {done.stderr.strip()}")
