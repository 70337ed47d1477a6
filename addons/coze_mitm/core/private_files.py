"""Files and folders coze-mitm writes are its user's alone: files 0600, folders 0700 (issue 25 item 5).

The usage file says who chatted how much; the confdir holds the CA's signing key. POSIX modes only: on Windows
`os.chmod` can only set read-only, and a user's profile folder (where confdirs live by default) is already
readable by that user, SYSTEM and Administrators alone (its inherited ACL); nothing is changed there.
No mitmproxy import.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700
POSIX = os.name == "posix"


def private_dir(path: Path) -> None:
    """Make the folder (and missing parents) owner-only; an existing folder is left as it is (tighten_dir)."""
    path = Path(path)
    missing = []
    while not path.exists() and path.parent != path:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):  # Path.mkdir(parents=True) would make the parents with the umask's mode
        folder.mkdir(mode=DIR_MODE, exist_ok=True)


def open_to_others(path: Path) -> int:
    """The group/other permission bits of `path` (0 when none, on Windows, or when it is not there)."""
    if not POSIX:
        return 0
    try:
        return stat.S_IMODE(os.stat(path).st_mode) & 0o077
    except OSError:
        return 0


def tighten(path: Path, mode: int) -> int | None:
    """chmod `path` to `mode` when others may read it; the old mode when it changed, else None."""
    if not open_to_others(path):
        return None
    old = stat.S_IMODE(os.stat(path).st_mode)
    os.chmod(path, mode)
    return old


def private_file(path: Path) -> None:
    """Create the file owner-only if it is missing (O_EXCL: never through another's file), or make an existing
    one owner-only; before anything is written to it."""
    path = Path(path)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    except FileExistsError:
        tighten(path, FILE_MODE)


def write_private(path: Path, data: bytes) -> None:
    """Write a whole file owner-only: a new temporary file beside it (0600), then renamed over it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
