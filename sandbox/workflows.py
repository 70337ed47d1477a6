"""Workflows: ``/v1/workflow/run`` (synchronous, or ``is_async`` answered at once with an ``execute_id``),
``/v1/workflow/stream_run`` and ``/v1/workflow/stream_resume`` (SSE: ``Message``, ``Interrupt``, ``Done``
events with ids), and ``/v1/workflows/{workflow_id}/run_histories/{execute_id}`` (an async run's outcome).

What the stand-in bills for a run (``usage_of`` counts it): ``workflow_usage(text)``, deterministic; the
text is ``parameters.input`` (or the parameters as JSON). A run has an LLM node and an End node; a
``Message`` event's ``usage`` is this API call's usage so far (Coze's docs: "the tokens this API call
consumed"; whether Coze repeats it or sends it once is not checkable here, so the stand-in sends it on the
LLM node's last message and again, complete, on the End node's last). ``parameters.interrupt`` makes a
stream_run stop at a question (``Interrupt``, billed the LLM node's half); ``stream_resume`` with that
``event_id`` runs the rest (billed the other half). A run whose client went away runs on and is billed,
like a chat (chat.RunsOn). Checked only against Coze's published docs, not against Coze."""

from __future__ import annotations

import re
import threading
import time
from typing import TYPE_CHECKING, Any

from .chat import RunsOn
from .common import compact_json

if TYPE_CHECKING:
    from .server import Handler
    from .state import State

REPLY_PREFIX = "Sandbox workflow reply to: "


def workflow_usage(text: str) -> dict:
    """One token per word: the input, and the reply (4 words of prefix + the input)."""
    input_count = len(text.split())
    output_count = len((REPLY_PREFIX + text).split())
    return {"token_count": input_count + output_count, "output_count": output_count, "input_count": input_count}


def _halves(usage: dict) -> tuple[dict, dict]:
    first = {k: v // 2 for k, v in usage.items()}
    return first, {k: usage[k] - first[k] for k in usage}


def _text(parameters: Any) -> str:
    if isinstance(parameters, dict) and isinstance(parameters.get("input"), str):
        return parameters["input"]
    return compact_json(parameters) if parameters else ""


def _start_run(st: "State", req: "Handler", workflow_id: str, text: str, run_mode: int) -> dict:
    run = {"execute_id": st.new_id(), "workflow_id": workflow_id, "session": req.session, "run_mode": run_mode,
           "status": "Running", "text": text, "usage": workflow_usage(text), "billed": None,
           "created_at": int(time.time()), "updated_at": int(time.time()), "event_id": None}
    with st.lock:
        st.workflow_runs[run["execute_id"]] = run
    return run


def _bill(st: "State", run: dict, usage: dict) -> None:
    with st.lock:
        billed = run["billed"] or {k: 0 for k in usage}
        run["billed"] = {k: billed[k] + usage[k] for k in usage}
        run["updated_at"] = int(time.time())


def _body(req: "Handler") -> tuple[dict | None, str]:
    data = req.json_body()
    if data is None:
        req.error(4000, "request body must be a JSON object")
        return None, ""
    workflow_id = data.get("workflow_id")
    if not isinstance(workflow_id, str) or not workflow_id:
        req.error(4000, "workflow_id is required")
        return None, ""
    return data, workflow_id


def _debug_url(run: dict) -> str:
    return f"https://www.coze.cn/work_flow?execute_id={run['execute_id']}&workflow_id={run['workflow_id']}&sandbox=1"


def _wait(st: "State", words: int) -> bool:
    """The time a run takes (delta_gap per word of its reply); True when the sandbox is stopping."""
    return st.delta_gap > 0 and st.stopping.wait(st.delta_gap * words)


def run(st: "State", req: "Handler") -> None:
    """POST /v1/workflow/run {workflow_id, parameters, is_async?, bot_id?, app_id?, ext?}"""
    data, workflow_id = _body(req)
    if data is None:
        return
    text = _text(data.get("parameters"))
    reply = REPLY_PREFIX + text
    if data.get("is_async") is True:
        r = _start_run(st, req, workflow_id, text, 2)

        def finish():
            if _wait(st, len(reply.split())):
                r["status"] = "Fail"
                return
            _bill(st, r, r["usage"])
            r["output"] = compact_json({"Output": reply})
            r["status"] = "Success"

        threading.Thread(target=finish, name="coze-sandbox-workflow", daemon=True).start()
        return req.send_json(200, {"code": 0, "msg": "", "execute_id": r["execute_id"], "debug_url": _debug_url(r),
                                   "detail": {"logid": req.logid}})
    r = _start_run(st, req, workflow_id, text, 0)
    _wait(st, 1)
    _bill(st, r, r["usage"])
    r["output"] = compact_json({"Output": reply})
    r["status"] = "Success"
    req.send_json(200, {"code": 0, "msg": "", "data": r["output"], "execute_id": r["execute_id"],
                        "debug_url": _debug_url(r), "usage": dict(r["usage"]), "detail": {"logid": req.logid}})


def run_history(st: "State", req: "Handler", workflow_id: str, execute_id: str) -> None:
    """GET /v1/workflows/{workflow_id}/run_histories/{execute_id}: data is a list of one run."""
    with st.lock:
        r = st.workflow_runs.get(execute_id)
    if r is None or r["workflow_id"] != workflow_id:
        return req.error(4000, f"execute_id {execute_id} does not exist for workflow {workflow_id}")
    if r["session"] != req.session:
        return req.error(4101, "no permission")
    obj = {"execute_id": r["execute_id"], "execute_status": r["status"], "bot_id": "0", "connector_id": "1024",
           "connector_uid": req.session or "sandbox_user", "run_mode": r["run_mode"], "output": r.get("output", ""),
           "create_time": r["created_at"], "update_time": r["updated_at"], "error_code": "0", "error_message": "",
           "debug_url": _debug_url(r), "logid": req.logid, "is_output_trimmed": False}
    if r["status"] != "Running" and r["billed"] is not None:
        obj["usage"] = dict(r["billed"])
    req.ok([obj])


class _Events:
    """Coze's workflow frames: ``id: <n>``, ``event: <name>``, ``data: <json>``; ids count from 0."""

    def __init__(self, req: "Handler"):
        self.req = req
        self.n = 0

    def __call__(self, event: str, data: Any) -> None:
        frame = f"id: {self.n}\nevent: {event}\ndata: {compact_json(data)}\n\n"
        self.n += 1
        self.req.write_chunk(frame.encode("utf-8"))


def _play(st: "State", req: "Handler", r: dict, part: str) -> None:
    """Stream one call's events; the run goes on (and is billed) if the client goes away."""
    first, second = _halves(r["usage"])
    reply = REPLY_PREFIX + r["text"]
    req.start_stream()
    out = RunsOn(req, _Events(req))
    if part in ("all", "first"):
        out.emit("Message", {"content": "", "node_title": "LLM", "node_seq_id": "0", "node_is_finish": True,
                             "node_id": "100001", "usage": first})
        _bill(st, r, first)
        if part == "first":
            r["event_id"] = st.new_id()
            r["status"] = "Interrupted"
            out.emit("Interrupt", {"interrupt_data": {"event_id": r["event_id"], "type": 2}, "node_title": "Question"})
            return out.end()
    pieces = re.findall(r"\S+\s*", reply)
    for i, piece in enumerate(pieces):
        if i and st.delta_gap > 0 and st.stopping.wait(st.delta_gap):
            r["status"] = "Fail"
            return out.cut()
        last = i == len(pieces) - 1
        message = {"content": piece, "node_title": "End", "node_seq_id": str(i), "node_is_finish": last,
                   "node_id": "900001"}
        if last:  # this call's usage so far, complete
            message["usage"] = dict(r["usage"]) if part == "all" else second
        out.emit("Message", message)
    _bill(st, r, second)
    r["output"] = compact_json({"Output": reply})
    r["status"] = "Success"
    out.emit("Done", {"debug_url": _debug_url(r)})
    out.end()


def stream_run(st: "State", req: "Handler") -> None:
    """POST /v1/workflow/stream_run {workflow_id, parameters, ...}"""
    data, workflow_id = _body(req)
    if data is None:
        return
    parameters = data.get("parameters")
    r = _start_run(st, req, workflow_id, _text(parameters), 1)
    interrupt = isinstance(parameters, dict) and parameters.get("interrupt") is True
    _play(st, req, r, "first" if interrupt else "all")


def stream_resume(st: "State", req: "Handler") -> None:
    """POST /v1/workflow/stream_resume {workflow_id, event_id, resume_data, interrupt_type}"""
    data, workflow_id = _body(req)
    if data is None:
        return
    event_id = data.get("event_id")
    if not isinstance(event_id, str) or not event_id:
        return req.error(4000, "event_id is required")
    with st.lock:
        r = next((x for x in st.workflow_runs.values() if x["event_id"] == event_id), None)
    if r is None or r["workflow_id"] != workflow_id or r["status"] != "Interrupted":
        return req.error(4000, f"no interrupted run of workflow {workflow_id} waits for event {event_id}")
    if r["session"] != req.session:
        return req.error(4101, "no permission")
    r["status"] = "Running"
    r["event_id"] = None
    _play(st, req, r, "rest")
