"""Node for the tests that run the official JS SDK (@coze/api): tests/js/sdk/node_client.mjs, one JSON line out.
The npm packages come from tests/js/package-lock.json (`npm ci` in tests/js; run_tests.py does it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from tests.conftest import REPO

JS = REPO / "tests" / "js"
CLIENT = JS / "sdk" / "node_client.mjs"
NODE = shutil.which("node")


def node_env() -> dict:
    """Node without proxy settings from the environment: the client must reach the proxy by its own set-up."""
    drop = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "node_options", "node_extra_ca_certs"}
    return {k: v for k, v in os.environ.items() if k.lower() not in drop}


def run_sdk(scenario: str, timeout: float = 60, **params) -> dict:
    proc = subprocess.run([NODE, str(CLIENT), scenario, json.dumps(params)], capture_output=True, text=True,
                          timeout=timeout, env=node_env(), cwd=str(JS))
    lines = proc.stdout.strip().splitlines()
    assert lines, f"node printed nothing (exit {proc.returncode}):\n{proc.stderr}"
    out = json.loads(lines[-1])
    assert proc.returncode == 0 and "result" in out, f"{scenario} failed: {out}\n{proc.stderr}"
    return out["result"]
