"""The benchmark's proxies, by path, made but not started: the latency passes (bench/run.py) start them as
they are; bench/instructions.py first puts valgrind in front of their command. One place says what each path
runs, so that a path means the same process in every table of docs/benchmarks.md."""

from __future__ import annotations

import os
from pathlib import Path

from tests.harness import Mitmdump

from . import REPO
from .common import PAGE, FileLoggedMitmdump

PATHS = {
    "bare": "bare mitmdump",
    "bare-O": "bare mitmdump under python -O",
    "noop": "one object, 4 flow hooks that do nothing (any -s script; bench/partial_bundle.py)",
    "least": "least credential swap (bench/least_swap.py)",
    "fused": "the bundle's work on this request fused into one object (bench/fused_floor.py; not coze-mitm)",
    "parts": "some of the bundle's parts (bench/partial_bundle.py)",
    "cycles-only": "bare mitmdump + cycles.py (bench/cycles_only.py)",
    "bundle": "plain mitmdump -s addons/coze.py",
    "run-mitm": "as run_mitm.py runs it (python -O, coze_quiet, coze_tune_process)",
}
QUIET = ["flow_detail=0"]  # every path prints nothing per flow, but run-mitm its coze_quiet line
# The paths that do not swap a tag: their client sends the token itself, beside the same other headers.
SENT_THE_TOKEN = frozenset({"bare", "bare-O", "noop", "cycles-only"})


def make(path: str, confdir: Path, coze_sets: list[str], token: str = "", *, api_base: str = "", parts: str = "",
         timing_file: Path | None = None, lines_to_file: bool = False) -> Mitmdump:
    """The path's mitmdump, not started. `coze_sets`: the bundle's options (config, origins); `token`: what the
    least swap and the fused floor put in the tag's place, `api_base` where the fused floor sends it (the
    stand-in); `parts`: bench/partial_bundle.py's COZE_BENCH_ADDONS (path "parts"),
    with `timing_file` its per-hook timer; `lines_to_file`: run-mitm's per-flow lines go to a file, as to a
    user's terminal, not through a pipe to a thread of the measuring process."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}: one of {', '.join(PATHS)}")
    confdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "COZE_PAT"}  # a developer's PAT must not switch modes
    if path in ("bare", "bare-O"):
        proxy = Mitmdump(confdir, QUIET, script=False, env=env)
    elif path in ("noop", "parts"):
        env["COZE_BENCH_ADDONS"] = "noop" if path == "noop" else parts
        if timing_file is not None:
            env["COZE_BENCH_TIMING"] = str(timing_file)
        proxy = Mitmdump(confdir, QUIET if path == "noop" else coze_sets, script=False, env=env,
                         extra_args=["-s", str(REPO / "bench" / "partial_bundle.py")])
        proxy.timing_file = timing_file
    elif path == "least":
        env["COZE_BENCH_TOKEN"] = token
        proxy = Mitmdump(confdir, QUIET, script=False, env=env, extra_args=["-s", str(REPO / "bench" / "least_swap.py")])
    elif path == "fused":
        env.update(COZE_BENCH_TOKEN=token, COZE_BENCH_API=api_base, COZE_BENCH_ORIGIN=PAGE)
        proxy = Mitmdump(confdir, QUIET, script=False, env=env, extra_args=["-s", str(REPO / "bench" / "fused_floor.py")])
    elif path == "cycles-only":
        proxy = Mitmdump(confdir, QUIET, script=False, env=env, extra_args=["-s", str(REPO / "bench" / "cycles_only.py")])
    elif path == "bundle":
        proxy = Mitmdump(confdir, coze_sets, env=env)
    else:  # run-mitm
        kind = FileLoggedMitmdump if lines_to_file else Mitmdump
        proxy = kind(confdir, [*coze_sets, "coze_quiet=true", "coze_tune_process=true"], env=env)
    if path in ("bare-O", "run-mitm"):
        as_run_mitm(proxy)
    proxy.sent_a_tag = path not in SENT_THE_TOKEN
    return proxy


def as_run_mitm(proxy: Mitmdump) -> Mitmdump:
    """The proxy's Python started with the flags run_mitm.py starts mitmproxy's with (launcher/plan.py)."""
    from launcher.plan import CHILD_PYTHON_FLAGS

    proxy.args[1:1] = CHILD_PYTHON_FLAGS  # after the interpreter, before its "-c"
    return proxy
