"""Files: ``POST /v1/files/upload`` (multipart/form-data, field ``file``) and ``GET /v1/files/retrieve``.
An uploaded file belongs to the caller's session; another session gets 4101 for it."""

from __future__ import annotations

import hashlib
import re
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import Handler
    from .state import State

_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.I)
_DISPOSITION_PARAM = re.compile(r';\s*([A-Za-z*]+)="((?:[^"\\]|\\.)*)"')


def parse_multipart(content_type: str | None, body: bytes) -> dict[str, tuple[str | None, str, bytes]]:
    """{field name: (file name or None, part content type, content)}; {} when the body is not multipart."""
    if not (content_type or "").lower().startswith("multipart/form-data"):
        return {}
    m = _BOUNDARY.search(content_type or "")
    if not m:
        return {}
    delimiter = b"--" + m.group(1).encode("latin-1")
    fields: dict[str, tuple[str | None, str, bytes]] = {}
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):  # the closing delimiter
            break
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        headers: dict[str, str] = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        params = dict(_DISPOSITION_PARAM.findall(headers.get("content-disposition", "")))
        if "name" in params:
            content = content[:-2] if content.endswith(b"\r\n") else content
            fields[params["name"]] = (params.get("filename"), headers.get("content-type", "text/plain"), content)
    return fields


def _file_obj(f: dict) -> dict:
    return {"id": f["id"], "bytes": f["bytes"], "created_at": f["created_at"], "file_name": f["file_name"]}


def upload(st: "State", req: "Handler") -> None:
    """POST /v1/files/upload: answers {id, bytes, created_at, file_name} (the chat refers to data.id)."""
    fields = parse_multipart(req.headers.get("Content-Type"), req.body)
    if "file" not in fields:
        return req.error(4000, "a multipart/form-data body with a 'file' field is required")
    name, ctype, content = fields["file"]
    f = {"id": st.new_id(), "session": req.session, "file_name": name or "file", "content_type": ctype,
         "bytes": len(content), "sha256": hashlib.sha256(content).hexdigest(), "created_at": int(time.time())}
    with st.lock:
        st.files[f["id"]] = f
    req.ok(_file_obj(f))


def retrieve(st: "State", req: "Handler") -> None:
    """GET /v1/files/retrieve?file_id"""
    file_id = req.query.get("file_id")
    with st.lock:
        f = st.files.get(file_id or "")
    if f is None:
        return req.error(4000, f"file {file_id} does not exist")
    if f["session"] != req.session:
        return req.error(4101, "no permission")
    req.ok(_file_obj(f))
