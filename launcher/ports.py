"""Is the port free, and if not, who holds it: said before mitmproxy tries, in one message."""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

from launcher.common import DEFAULT_PORT, EXIT_FAILED, EXIT_PORT_IN_USE, EXIT_USAGE, PROG, Fail

# What mitmdump 11.0.2 and 12.x print when the port is taken between our check and its bind.
PORT_IN_USE_RE = re.compile(r"failed to listen on \S+? with .*(address already in use|Errno 98|Errno 48|WinError 10048)", re.I)


def listening_holder(port: int) -> str:
    """Who listens on TCP `port`, as "pid N (command)", or "" when that cannot be found out."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if inodes:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                for fd in (proc / "fd").iterdir():
                    if os.readlink(fd) in inodes:
                        return f"pid {proc.name} ({describe_process(proc)})"
            except OSError:
                continue
    if shutil.which("ss"):
        try:
            out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        m = re.search(r'users:\(\("([^"]+)",pid=(\d+)', out)
        if m:
            return f"pid {m.group(2)} ({m.group(1)})"
    return ""


def describe_process(proc: Path) -> str:
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        every = [a.decode(errors="replace") for a in argv if a]
        if any(Path(a).parts[-2:] == ("addons", "coze.py") for a in every):
            # run_mitm.py's child is `python -c "...mitmproxy.tools.main..."`: say what it is, not its code
            tool = "mitmweb" if any("import mitmweb" in a or Path(a).name.startswith("mitmweb") for a in every) \
                else "mitmdump"
            return f"coze-mitm's {tool}, from a {PROG} or {tool} -s addons/coze.py started earlier"
        words = every[:4]
        text = " ".join(Path(words[0]).name if i == 0 else w for i, w in enumerate(words))
    except (OSError, IndexError):
        text = ""
    if not text:
        try:
            text = (proc / "comm").read_text().strip()
        except OSError:
            text = "?"
    return text if len(text) <= 60 else text[:59] + "…"


def port_in_use_message(host: str, port: int) -> str:
    holder = listening_holder(port)
    who = f"by {holder}" if holder else f"by another program (see: ss -ltnp 'sport = :{port}')"
    return (f"port {port} on {host} is already in use {who}; stop it, or choose another port with --port "
            f"(e.g. --port {port + 1 if port < 65535 else 8081}, or --port 0 for any free one)")


def check_port_free(host: str, port: int) -> None:
    """Bind like mitmproxy will (SO_REUSEADDR), to say clearly why it could not, before it tries."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise Fail(f"--host {host}: cannot resolve it ({e.strerror})", EXIT_USAGE) from None
    problems = []
    for family, type_, proto, _, addr in infos:
        try:
            with socket.socket(family, type_, proto) as s:
                if os.name != "nt":
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise Fail(port_in_use_message(host, port), EXIT_PORT_IN_USE) from None
            if e.errno == errno.EACCES:
                raise Fail(f"no permission to listen on port {port}: ports below 1024 need root; "
                           f"use e.g. --port {DEFAULT_PORT}", EXIT_USAGE) from None
            problems.append(e)  # e.g. "localhost" resolves to ::1 too, and IPv6 is off: one address is enough
    if problems and len(problems) == len(infos):
        e = problems[0]
        if e.errno == errno.EADDRNOTAVAIL:
            raise Fail(f"--host {host} is not an address of this machine", EXIT_USAGE)
        raise Fail(f"cannot listen on {host}:{port}: {e.strerror}", EXIT_FAILED)
