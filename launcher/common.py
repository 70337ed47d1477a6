"""Names, exit codes and how the launcher talks: one message per error, wrapped to be read."""

from __future__ import annotations

import ipaddress
import os
import shutil
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ADDONS = REPO / "addons"
SCRIPT = ADDONS / "coze.py"
PROG = "run_mitm.py"
PYTHON = "py" if os.name == "nt" else "python3"  # how hints name Python: Debian has no `python`, Windows has `py`
DEFAULT_PORT = 8080
STATUS_URL = "http://coze.mitm/"
DEMO_URL = "http://coze.mitm/demo"
WRAP_WIDTH = 100  # at most; narrower terminals get narrower lines

EXIT_OK = 0
EXIT_FAILED = 1  # mitmproxy stopped with an error
EXIT_USAGE = 2  # bad or refused arguments
EXIT_CONFIG = 3  # the OAuth config (or another coze_* value) is invalid: found offline
EXIT_REFUSED = 4  # --check: Coze answered, and refused the token exchange
EXIT_UNREACHABLE = 5  # --check: Coze's token endpoint did not answer (network, DNS, timeout)
EXIT_PORT_IN_USE = 6

EXIT_CODES_HELP = """exit codes:
  0  stopped normally (Ctrl-C), or --check: Coze accepted the config
  1  mitmproxy stopped with an error (its output says why)
  2  bad or refused arguments (also: --web with a mitmweb whose API has no authentication)
  3  invalid config (found offline, before anything is started or sent)
  4  --check: Coze refused the token exchange (the message quotes Coze's error and logid)
  5  --check: Coze's token endpoint could not be reached or did not answer in time
  6  the port is already in use
"""


class Fail(Exception):
    """One message for the user, and the exit code that goes with it."""

    def __init__(self, msg: str, code: int = EXIT_FAILED):
        super().__init__(msg)
        self.msg = msg
        self.code = code


class Stop(Exception):
    """SIGTERM: stop like Ctrl-C does."""


def wrap(msg: str) -> str:
    """A long message as lines a terminal shows whole; the lines after the first are indented, and
    joining them with single spaces gives the message back (words and URLs are never broken)."""
    width = max(40, min(WRAP_WIDTH, shutil.get_terminal_size((WRAP_WIDTH, 24)).columns - 1))
    return textwrap.fill(msg, width=width, subsequent_indent="  ", break_long_words=False,
                         break_on_hyphens=False)


def say(msg: str = "", *, err: bool = False) -> None:
    print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def tell(kind: str, msg: str) -> None:
    """An error, warning or note of the launcher: on stderr, prefixed, wrapped."""
    say(wrap(f"{PROG}: {kind}: {msg}"), err=True)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def for_launcher(msg: str) -> str:
    """The addon's messages suggest mitmdump's --set coze_pat=...; the launcher has a safer way."""
    msg = msg.replace("--set coze_config=PATH", "--config PATH")
    return msg.replace("--set coze_pat=...", "COZE_PAT=pat_... in the environment")


def config_error(msg: str) -> str:
    """An OAuth config error as the launcher and --check both say it: with the launcher's spellings (the way to a
    first run without an account, --demo, is in the addon's own "not found" message, for plain mitmdump too)."""
    return for_launcher(msg)
