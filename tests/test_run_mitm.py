"""run_mitm.py as a user runs it: a subprocess, its output and its exit code.

Argument handling and refusals, --check against the local Coze stand-in (success and every failure
kind), --demo driven through the proxy with requests, the port-in-use message, PAT via the
environment, and TLS interception limited to the hosts coze-mitm needs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import write_config
from tests.harness import (
    MITMPROXY_11, REPO, RUN_MITM, Launcher, check, clean_env, cmdline, free_port, messages, one_error_line, run,
)

pytestmark = pytest.mark.process  # every test here starts a process (run_tests.py --fast leaves them out)

PAGE = "https://chat.example.org"


# --------------------------------------------------------------------------- arguments and refusals

def test_help_explains_exit_codes():
    result = run("--help")
    assert result.returncode == 0
    for word in ("--check", "--demo", "--web", "--allow-remote", "COZE_PAT", "exit codes", "port is already in use"):
        assert word in result.stdout


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "example.org"])
def test_non_loopback_host_refused_without_allow_remote(host):
    result = run("--host", host, "--demo")
    assert result.returncode == 2
    line = one_error_line(result)
    assert "--allow-remote" in line and "credentials" in line


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_bad_port_refused(port):
    result = run("--port", port, "--demo")
    assert result.returncode == 2
    assert "invalid port" in one_error_line(result)


@pytest.mark.parametrize("args, expect", [
    (["--set", "listen_port=9999"], "use --port instead"),
    (["--set", "listen_host=0.0.0.0"], "use --host instead"),
    (["--set", "coze_demo=true"], "use --demo instead"),
    (["--config", "a.json", "--set", "coze_config=b.json"], "--config is given twice"),
    (["--set", "coze_origins=https://example.org/path"], "is not an origin"),
    (["--set", "nonsense"], "NAME=VALUE"),
    (["--set", "web_host=0.0.0.0"], "--allow-remote"),
    (["--demo", "--config", "x.json"], "drop --config"),
    (["--demo", "--check"], "not allowed with argument"),
    (["--config", "x.json", "--pat", "pat_abc"], "choose one"),
    (["--origins", "https://example.org/path"], "is not an origin"),
    (["--origins", "*"], "may not contain"),
])
def test_argument_refusals_are_one_line(args, expect):
    result = run(*args)
    assert result.returncode == 2
    assert expect in one_error_line(result)


def test_pat_in_set_refused_without_echoing_it():
    result = run("--set", "coze_pat=pat_SECRETSECRET")
    assert result.returncode == 2
    line = one_error_line(result)
    assert "COZE_PAT" in line and "ps" in line
    assert "SECRETSECRET" not in result.stdout + result.stderr


@pytest.mark.parametrize("url", ["redis://:rEdisSECRET@10.0.0.5:6379/0", "rediss://team:rEdisSECRET@redis.internal/1"])
def test_redis_password_in_set_refused_without_echoing_it(url):
    result = run("--set", f"coze_usage_file={url}")
    assert result.returncode == 2
    line = one_error_line(result)
    assert "COZE_REDIS_PASSWORD" in line and "ps" in line
    assert "rEdisSECRET" not in result.stdout + result.stderr


def test_missing_config_refused_before_starting(tmp_path):
    result = run("--config", str(tmp_path / "absent.json"), cwd=tmp_path)
    assert result.returncode == 3
    line = one_error_line(result)
    assert "OAuth config not found" in line and "absent.json" in line
    assert "listening" not in result.stdout


def test_set_spelling_of_config_works_like_the_flag(tmp_path):
    result = run("--set", f"coze_config={tmp_path / 'absent.json'}", cwd=tmp_path, env=clean_env(COZE_PAT="pat_x" * 8))
    assert result.returncode == 3  # an explicit config: COZE_PAT from the environment is not used
    note, error = messages(result.stderr)
    assert "COZE_PAT from the environment is ignored" in note
    assert error.startswith("run_mitm.py: error: OAuth config not found") and "absent.json" in error
    assert "COZE_PAT=pat_... in the environment" in error and "--set coze_pat" not in result.stderr
    assert "pat_x" not in result.stdout + result.stderr


def test_port_in_use_names_the_holder(tmp_path, rsa_key):
    config = write_config(tmp_path, rsa_key, "https://api.coze.cn")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run("--config", str(config), "--port", str(port), "--set", f"confdir={tmp_path}")
    assert result.returncode == 6
    line = one_error_line(result)
    assert f"port {port} on 127.0.0.1 is already in use" in line
    assert f"pid {os.getpid()}" in line  # this test process holds it
    assert "--port" in line


def test_port_in_use_seen_in_mitmproxy_output_is_recognised():
    from launcher.ports import PORT_IN_USE_RE

    # What mitmdump 11.0.2 and 12.3.1 print when the port is taken between our check and its bind.
    line = ("[21:59:58.832] [Errno 98] HTTP(S) proxy failed to listen on 127.0.0.1:18777 with [Errno 98] error "
            "while attempting to bind on address ('127.0.0.1', 18777): address already in use")
    assert PORT_IN_USE_RE.search(line)


@pytest.mark.parametrize("line, where", [
    ("[22:15:47.969] HTTP(S) proxy listening at 127.0.0.1:8080.", ("127.0.0.1", "8080")),
    ("[22:15:47.969] HTTP(S) proxy listening at [::1]:44469.", ("[::1]", "44469")),
    ("[22:15:47.969] HTTP(S) proxy (upstream mode) listening at 127.0.0.1:8080.", ("127.0.0.1", "8080")),
])
def test_listening_line_parsed(line, where):
    from launcher.runner import LISTENING_RE

    assert LISTENING_RE.search(line).groups() == where


def test_allow_hosts_patterns():
    import run_mitm
    from launcher.plan import Plan, allow_hosts

    args = run_mitm.make_parser().parse_args(["--origins", "https://chat.example.org,http://localhost:3000"])
    pl = Plan(args, api_bases=["https://api.coze.cn", "http://127.0.0.1:8790"])
    pl.page_origins = frozenset({"https://chat.example.org", "http://localhost:3000"})
    patterns = allow_hosts(pl)
    assert r"^api\.coze\.cn:443$" in patterns
    assert r"^127\.0\.0\.1:8790$" in patterns
    assert r"^chat\.example\.org:443$" in patterns
    assert r"^coze\.mitm:\d+$" in patterns and r"^mitm\.it:\d+$" in patterns

    def allowed(address):
        return any(re.search(p, address, re.IGNORECASE) for p in patterns)

    assert allowed("api.coze.cn:443") and allowed("API.COZE.CN:443") and allowed("coze.mitm:443")
    assert not allowed("api.coze.cn.evil.example:443") and not allowed("xapi.coze.cn:443")
    assert not allowed("www.google.com:443") and not allowed("api.coze.com:443")
    # Coze's WebSocket APIs: the API base's own ws host, and ws(s):// bases of coze_api_hosts.
    assert allowed("ws.coze.cn:443") and not allowed("ws.coze.com:443") and not allowed("sandbox.coze.mitm:443")
    pl = Plan(args, api_bases=["https://api.coze.com", "wss://ws.example.org:8443"])
    pl.page_origins = frozenset()
    patterns = allow_hosts(pl)
    assert allowed("ws.coze.com:443") and allowed("ws.example.org:8443") and not allowed("ws.example.org:443")

    demo = Plan(run_mitm.make_parser().parse_args(["--demo"]), api_bases=[])
    demo.page_origins = frozenset()
    patterns = allow_hosts(demo)
    assert allowed("sandbox.coze.mitm:443") and allowed("sandbox.coze.mitm:80")


@pytest.mark.parametrize("host, api_base", [
    ("127.0.0.1", "http://127.0.0.1:8123"), ("*", "http://127.0.0.1:8123"), ("0.0.0.0", "http://127.0.0.1:8123"),
    ("::1", "http://[::1]:8123"), ("192.168.1.20", None),  # --allow-remote on a LAN address: no API base to paste
])
def test_banner_names_the_api_base_in_one_line(host, api_base):
    import run_mitm  # noqa: F401  (puts addons/ on sys.path, as a start does)
    from launcher.plan import Plan
    from launcher.runner import next_steps

    args = run_mitm.make_parser().parse_args(["--origins", "http://localhost:3000"])
    pl = Plan(args, api_bases=["https://api.coze.cn"])
    pl.page_origins = frozenset({"http://localhost:3000"})
    for banner in (next_steps(pl, host, 8123), next_steps(pl, host, 8123, sandbox=object())):
        lines = [line for line in banner.splitlines() if "API base" in line]
        if api_base is None:
            assert lines == []
        else:
            assert len(lines) == 1 and api_base in lines[0].split(), lines
            assert "no proxy setting" in lines[0]


# --------------------------------------------------------------------------- --check

def assert_no_secret(text: str, standin, rsa_key) -> None:
    key_body = "".join(rsa_key["private_pem"].splitlines()[1:-1])
    for secret in [e["access_token"] for e in standin.exchanges] + [key_body[:64], key_body[-64:]]:
        assert secret not in text
    assert "PRIVATE KEY" not in text


def test_check_success_mints_one_throwaway_token(config_file, standin, rsa_key):
    result = check(config_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK offline" in result.stdout and "RSA-2048" in result.stdout
    verdict = result.stdout.strip().splitlines()[-1]
    assert verdict.startswith("OK: Coze accepted the config")
    assert len(standin.exchanges) == 1
    session = standin.exchanges[0]["session_name"]
    assert re.fullmatch(r"coze-mitm-check-[0-9a-f]{8}", session) and session in verdict
    logid = standin.requests_seen[-1]["logid"]
    assert f"logid {logid}" in verdict
    assert "expires 20" in verdict and "(in 89" in verdict  # 900 s asked, a moment ago
    assert_no_secret(result.stdout + result.stderr, standin, rsa_key)


def test_check_refused_by_coze_quotes_error_logid_and_hint(tmp_path, standin, rsa_key):
    wrong_kid = write_config(tmp_path, rsa_key, standin.base_url, public_key_id="not-the-kid")
    result = check(wrong_kid)
    assert result.returncode == 4
    verdict = messages(result.stderr)[-1]
    assert verdict.startswith("FAILED: Coze refused the token exchange: invalid_client: unknown kid 'not-the-kid'")
    assert "logid" in verdict and "SANDBOX" in verdict  # the stand-in's logid, quoted
    assert "api.coze.cn" in verdict and "api.coze.com" in verdict  # the hint
    assert standin.exchanges == []
    assert_no_secret(result.stdout + result.stderr, standin, rsa_key)


@pytest.mark.parametrize("content, expect", [
    (None, "OAuth config not found"),
    ("{not json", "not valid JSON (line 1"),
    (json.dumps({"client_type": "pkce", "client_id": "1"}), "JWT (service)"),
    ((REPO / "config" / "coze_oauth_config.example.json").read_text(), "this is the example"),
    ("\ufeff{not json", "not valid JSON (line 1, column 2"),  # the BOM is not what is wrong
])
def test_check_bad_config_offline(tmp_path, content, expect):
    path = tmp_path / "coze_oauth_config.json"
    if content is not None:
        path.write_text(content)
    result = check(path)
    assert result.returncode == 3
    assert messages(result.stderr)[-1].startswith("FAILED: ")
    assert expect in messages(result.stderr)[-1]
    assert "Traceback" not in result.stdout + result.stderr


def test_check_unreachable_host(tmp_path, rsa_key):
    config = write_config(tmp_path, rsa_key, f"http://127.0.0.1:{free_port()}")
    result = check(config)
    assert result.returncode == 5
    assert messages(result.stderr)[-1].startswith("FAILED: cannot reach Coze's token endpoint")


def test_check_timeout(config_file, standin):
    standin.token_delay = 10
    t0 = time.monotonic()
    result = check(config_file, "--set", "coze_exchange_timeout=1")
    assert result.returncode == 5
    assert "did not answer within 1 s" in messages(result.stderr)[-1]
    assert time.monotonic() - t0 < 8  # 1 s timeout + start-up, not the 10 s the endpoint would take


def test_check_warns_about_a_readable_key_file(config_file, standin):
    os.chmod(config_file, 0o644)
    result = check(config_file)
    assert result.returncode == 0
    assert any("chmod 600" in m for m in messages(result.stderr))


# --------------------------------------------------------------------------- running the proxy

def test_pat_from_environment_never_on_a_command_line(launch, standin):
    pat = "pat_" + "Z" * 40
    launcher = launch("--origins", PAGE, "--set", f"coze_api_base={standin.base_url}", env=clean_env(COZE_PAT=pat))
    assert "PAT mode (from COZE_PAT)" in launcher.output
    children = launcher.children()
    assert children, "mitmdump runs as a child process"
    for pid in [launcher.proc.pid, *children]:
        assert not any(pat in arg for arg in cmdline(pid))
    launcher.session().get(f"{standin.base_url}/v1/bots/7000", headers={
        "Authorization": "Bearer user:alice-0001", "Origin": PAGE})
    # The stand-in refuses tokens it did not mint (401); what matters is what reached it.
    assert standin.requests_seen[-1]["headers"]["authorization"] == f"Bearer {pat}"
    assert pat not in launcher.output


def test_pat_read_from_stdin_with_bare_flag(tmp_path, standin):
    pat = "pat_" + "Y" * 40
    proc = subprocess.Popen(
        [sys.executable, str(RUN_MITM), "--pat", "--port", "0", "--set", f"confdir={tmp_path}",
         "--set", f"coze_api_base={standin.base_url}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env(),
        cwd=tmp_path,
    )
    proc.stdin.write(pat + "\n")
    proc.stdin.close()
    out = []
    for line in proc.stdout:
        out.append(line)
        if "Ctrl-C stops it" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    proc.wait(15)
    text = "".join(out) + rest
    assert "PAT mode (from prompt)" in text
    assert pat not in text
    assert proc.returncode == 0


def test_tls_only_intercepted_for_coze_hosts(launch, config_file, standin):
    """A CONNECT to any other host is a raw tunnel: bytes pass untouched (mitmproxy's allow_hosts)."""
    launcher = launch("--config", str(config_file), "--origins", PAGE)
    mitm = launcher.children()[0]
    args = cmdline(mitm)
    allowed = [args[i + 1] for i, a in enumerate(args) if a == "--set" and args[i + 1].startswith("allow_hosts=")]
    origin_port = standin.base_url.rsplit(":", 1)[1]
    assert f"allow_hosts=^127\\.0\\.0\\.1:{origin_port}$" in allowed
    assert "allow_hosts=^chat\\.example\\.org:443$" in allowed

    with socket.socket() as echo:
        echo.bind(("127.0.0.1", 0))
        echo.listen()
        echo_port = echo.getsockname()[1]

        def serve():
            conn, _ = echo.accept()
            with conn:
                conn.sendall(conn.recv(100)[::-1])

        threading.Thread(target=serve, daemon=True).start()
        with socket.create_connection(("127.0.0.1", launcher.port), timeout=5) as c:
            c.sendall(f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\nHost: 127.0.0.1:{echo_port}\r\n\r\n".encode())
            assert c.recv(100).startswith(b"HTTP/1.1 200")
            c.sendall(b"\x00\xffraw bytes, not HTTP")
            assert c.recv(100) == b"PTTH ton ,setyb war\xff\x00"


def test_mitmproxy_runs_in_pythons_optimised_mode(launch, config_file, standin):
    """The child is `python -O`: mitmproxy skips its debug-only checks (docs/decisions.md), and still injects."""
    launcher = launch("--config", str(config_file), "--origins", PAGE)
    args = cmdline(launcher.children()[0])
    assert args[1] == "-O" and args[2] == "-c"
    r = launcher.session().get(f"{standin.base_url}/v1/bots/7000", headers={
        "Authorization": "Bearer user:optimised-0001", "Origin": PAGE}, timeout=10)
    assert r.status_code == 200 and r.json()["code"] == 0
    assert standin.requests_seen[-1]["headers"]["authorization"].startswith("Bearer ")
    assert "user:" not in standin.requests_seen[-1]["headers"]["authorization"]


def test_startup_error_from_mitmdump_is_passed_on(tmp_path, rsa_key):
    config = write_config(tmp_path, rsa_key, "https://api.coze.cn")
    result = run("--config", str(config), "--port", "0", "--set", f"confdir={tmp_path}",
                 "--set", "coze_token_ttl=5")
    assert result.returncode == 1
    assert "coze_token_ttl=5 is out of range" in result.stdout
    assert one_error_line(result).endswith("stopped with exit code 1 (see its output above)")


def test_web_only_with_an_authenticated_mitmweb(launch, config_file):
    """mitmweb < 11.1.2 serves its API to anyone who reaches it (CVE-2025-23217): not started at all."""
    args = ("--web", "--config", str(config_file), "--set", f"web_port={free_port()}", "--set", "web_open_browser=false")
    if MITMPROXY_11:
        result = run("--port", "0", *args, cwd=config_file.parent)
        assert result.returncode == 2
        line = one_error_line(result)
        assert "CVE-2025-23217" in line and "Python 3.12+" in line and "without --web" in line
        assert "listening" not in result.stdout
        return
    launcher = launch(*args)
    assert launcher.wait_for_output(r"Web server listening at", 10)
    assert "CVE-2025-23217" not in launcher.output
    web_url = re.search(r"Web server listening at (\S+)", launcher.output).group(1)
    assert f"The flows, in mitmweb: {web_url}" in launcher.output


def test_check_errors_go_to_stderr_with_the_launchers_hints(tmp_path):
    if (REPO / "config" / "coze_oauth_config.json").exists():
        pytest.skip("a real OAuth config is in place: the default config is not missing here")
    launcher = run(cwd=tmp_path)
    check = run("--check", cwd=tmp_path)
    assert launcher.returncode == check.returncode == 3
    error = one_error_line(launcher).removeprefix("run_mitm.py: error: ")
    assert error.startswith("OAuth config not found") and "python3 run_mitm.py --demo" in error
    assert messages(check.stderr) == [f"FAILED: {error}"]
    assert check.stdout == ""


# --------------------------------------------------------------------------- who may use the proxy

@pytest.mark.parametrize("args, expect", [
    (["--allow-remote"], ("no --proxyauth is given", "spend your Coze quota", "--allow-anonymous")),
    (["--allow-remote", "--proxyauth", "any"], ("--proxyauth any lets every login in", "--allow-anonymous")),
    (["--host", "0.0.0.0", "--allow-remote"], ("no --proxyauth is given",)),
    (["--allow-anonymous"], ("only means something with --allow-remote",)),
    (["--set", "coze_allow_remote=true"], ("use --allow-remote instead",)),
    (["--proxyauth", " "], ("--proxyauth wants a SPEC",)),
    (["--proxyauth", "@/nonexistent/htpasswd"], ("there is no htpasswd file at /nonexistent/htpasswd", "htpasswd -cB")),
    (["--proxyauth", "@a", "--set", "proxyauth=@b"], ("--proxyauth is given twice",)),
])
def test_remote_use_refused_without_a_login(args, expect):
    result = run(*args, "--demo")
    assert result.returncode == 2
    line = one_error_line(result)
    for words in expect:
        assert words in line
    assert "listening" not in result.stdout


def test_password_on_the_command_line_is_warned_about(tmp_path):
    result = run("--proxyauth", "alice:s3cret-word", "--config", str(tmp_path / "absent.json"), cwd=tmp_path)
    assert result.returncode == 3
    warning, error = messages(result.stderr)
    assert warning.startswith("run_mitm.py: warning: a --proxyauth with a password (user:pass, or an LDAP spec")
    assert "s3cret-word" not in result.stdout + result.stderr


def test_allow_anonymous_starts_with_a_warning(launch):
    launcher = launch("--demo", "--allow-remote", "--allow-anonymous")
    assert re.search(r"WARNING: --allow-anonymous: anyone who can connect to this proxy can spend your\s+Coze\s+"
                     r"quota", launcher.output)
    args = cmdline(launcher.children()[0])
    assert "coze_allow_remote=true" in args and not any(a.startswith("proxyauth=") for a in args)


def test_proxyauth_is_passed_to_mitmproxy(launch, tmp_path):
    htpasswd = tmp_path / "htpasswd"
    digest = base64.b64encode(hashlib.sha1(b"correct horse").digest()).decode()
    htpasswd.write_text(f"alice:{{SHA}}{digest}\n")
    launcher = launch("--demo", "--allow-remote", "--proxyauth", f"@{htpasswd}")
    args = cmdline(launcher.children()[0])
    # by environment, not on the child's command line (tests/test_proxyauth_files.py: secrets never in ps)
    after_code = args[args.index("-c") + 2:]  # the interpreter, its flags, -c and the child's program come first
    assert not any("proxyauth" in a for a in after_code) and "coze_allow_remote=true" in args
    assert "--allow-anonymous" not in launcher.output
    assert launcher.session().get("http://coze.mitm/status.json").status_code == 407
    s = launcher.session()
    s.proxies = {"http": f"http://alice:wrong@127.0.0.1:{launcher.port}"}
    assert s.get("http://coze.mitm/status.json").status_code == 407
    s.proxies = {"http": f"http://alice:correct%20horse@127.0.0.1:{launcher.port}"}
    assert s.get("http://coze.mitm/status.json").status_code == 200


# --------------------------------------------------------------------------- --demo

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    launcher = Launcher(tmp_path_factory.mktemp("demo"), "--demo").start()
    yield launcher
    launcher.stop()


def demo_headers(user_id: str) -> dict:
    return {"Authorization": f"Bearer user:{user_id}", "Origin": "http://coze.mitm", "Content-Type": "application/json",
            "Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "cross-site"}


def chat(launcher: Launcher, user_id: str, text: str, conversation_id: str = "") -> tuple[list[tuple[float, str]], str]:
    """POST /v3/chat streamed, as the demo page does; -> (arrival time and text of each delta, conversation id)."""
    url = "http://sandbox.coze.mitm/v3/chat" + (f"?conversation_id={conversation_id}" if conversation_id else "")
    body = {"bot_id": "7000", "user_id": user_id, "stream": True,
            "additional_messages": [{"role": "user", "content": text, "content_type": "text"}]}
    r = launcher.session().post(url, headers=demo_headers(user_id), json=body, stream=True)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["access-control-allow-origin"] == "http://coze.mitm"
    deltas, conv, event = [], "", ""
    for line in r.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            event = line[6:]
        elif line.startswith("data:"):
            data = json.loads(line[5:])
            if event == "conversation.chat.created":
                conv = data["conversation_id"]
            elif event == "conversation.message.delta":
                deltas.append((time.monotonic(), data["content"]))
    return deltas, conv


def test_demo_is_labelled_as_a_sandbox(demo):
    assert "SANDBOX" in demo.output and "NOT Coze" in demo.output
    assert "http://coze.mitm/demo" in demo.output
    assert "JWT mode for http://127.0.0.1:" in demo.output


def test_demo_banner_names_the_api_base_and_it_answers(demo):
    lines = [line for line in demo.output.splitlines() if "API base" in line]
    api_base = f"http://127.0.0.1:{demo.port}"
    assert len(lines) == 1 and f"{api_base} " in lines[0], lines
    s = requests.Session()
    s.trust_env = False  # no proxy: what a page or program pasting the API base does
    page = s.get(api_base + "/", timeout=10)
    assert page.status_code == 200 and api_base in page.text
    assert s.get("http://coze.mitm/status.json", proxies=demo.proxies, timeout=10).json()["api_base"] == api_base


def test_demo_config_is_private_and_temporary(tmp_path):
    launcher = Launcher(tmp_path, "--demo").start()
    try:
        args = cmdline(launcher.children()[0])
        path = Path(next(a for a in args if a.startswith("coze_config=")).split("=", 1)[1])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert not any("PRIVATE" in a for a in args)
    finally:
        assert launcher.stop() == 0
    assert not path.exists() and not path.parent.exists()
    assert "Traceback" not in launcher.output


def test_demo_page_served(demo):
    r = demo.session().get("http://coze.mitm/demo")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "connect-src http://sandbox.coze.mitm" in csp and "script-src 'nonce-" in csp
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    assert f'<script nonce="{nonce}">' in r.text
    assert "SANDBOX" in r.text and "not Coze" in r.text
    config = json.loads(re.search(r'id="coze-demo-config">(.*?)</script>', r.text).group(1))
    assert config["apiBase"] == "http://sandbox.coze.mitm" and config["ready"] is True
    status = demo.session().get("http://coze.mitm/status.json").json()
    assert status["origins"] == ["http://coze.mitm"]


def test_demo_preflight_answered_by_the_proxy(demo):
    r = demo.session().options("http://sandbox.coze.mitm/v3/chat", headers={
        "Origin": "http://coze.mitm", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-coze-client-user-agent"})
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "http://coze.mitm"
    assert "x-coze-client-user-agent" in r.headers["access-control-allow-headers"]
    other = demo.session().options("http://sandbox.coze.mitm/v3/chat", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers


def test_demo_chat_streams_and_two_users_get_separate_sessions(demo):
    alice, bob = "1732000000000-AAAAAAAAAAAAAAAAAAAAAA", "1732000000001-BBBBBBBBBBBBBBBBBBBBBB"
    deltas, alice_conv = chat(demo, alice, "one two three four")
    assert "".join(t for _, t in deltas) == "Sandbox reply to: one two three four"
    # Streamed, not buffered: the sandbox waits 0.12 s between deltas.
    assert deltas[-1][0] - deltas[0][0] > 0.5 * 0.12 * (len(deltas) - 1)
    again, same_conv = chat(demo, alice, "five", alice_conv)
    assert same_conv == alice_conv
    _, bob_conv = chat(demo, bob, "hello")
    assert bob_conv != alice_conv

    s = demo.session()
    listed = s.post(f"http://sandbox.coze.mitm/v1/conversation/message/list?conversation_id={alice_conv}",
                    headers=demo_headers(alice), json={"order": "asc"}).json()
    assert listed["code"] == 0
    assert [m["content"] for m in listed["data"] if m["type"] == "question"] == ["one two three four", "five"]
    # Bob's token belongs to another session: the sandbox refuses him Alice's conversation.
    refused = s.post(f"http://sandbox.coze.mitm/v1/conversation/message/list?conversation_id={alice_conv}",
                     headers=demo_headers(bob), json={}).json()
    assert refused["code"] == 4101

    # One exchange per user, each logged in one line.
    assert demo.wait_for_output(r"token for user 1732…BBBB minted")
    assert len(re.findall(r"token for user 1732…AAAA minted", demo.output)) == 1
    assert len(re.findall(r"token for user 1732…BBBB minted", demo.output)) == 1


def test_demo_refusals_are_one_line_each(demo):
    s = demo.session()
    r = s.post("http://sandbox.coze.mitm/v3/chat", headers={**demo_headers("1732000000002-CCCCCCCCCC"),
                                                             "Origin": "https://evil.example"}, json={})
    assert r.status_code == 403 and r.json()["code"] == 4101
    r = s.post("http://sandbox.coze.mitm/v3/chat", headers=demo_headers("bad id"), json={})
    assert r.status_code == 400 and r.json()["code"] == 4000
    assert demo.wait_for_output(r"refused POST 127\.0\.0\.1/v3/chat \(origin-not-allowed\)")
    assert demo.wait_for_output(r"refused POST 127\.0\.0\.1/v3/chat \(malformed-tag\)")


# --------------------------------------------------------------------------- what the run prints

FLOW_LINES = {
    "preflight": r"coze-mitm: preflight OPTIONS 127\.0\.0\.1/v3/chat from http://coze\.mitm -> 204$",
    # Today the auth addon's own line, once it hands refusals to flowlog the same words with the status.
    "refused": r"coze-mitm: refused POST 127\.0\.0\.1/v3/chat \(origin-not-allowed\)( -> 403)?: page origin "
               r"'https://evil\.example' may not use",
    "minted": r"coze-mitm: token for user 1732…DDDD minted, ",  # once per user, not per flow
    "injected": r"coze-mitm: injected POST 127\.0\.0\.1/v3/chat for user 1732…DDDD -> 200$",
}
CHATTER = ("client connect", "client disconnect", "server connect", "server disconnect", "(content missing)",
           "Streaming response", "<<")


def act(launcher: Launcher, done: str = r"coze-mitm: injected POST") -> None:
    """One preflight, one refused request, one injected (streamed) chat, and a status page nobody acts on."""
    user = "1732000000003-DDDDDDDDDD"
    s = launcher.session()
    r = s.options("http://sandbox.coze.mitm/v3/chat", headers={
        "Origin": "http://coze.mitm", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 204
    r = s.post("http://sandbox.coze.mitm/v3/chat", headers={**demo_headers(user), "Origin": "https://evil.example"},
               json={})
    assert r.status_code == 403
    deltas, _ = chat(launcher, user, "quiet please")
    assert deltas
    assert s.get("http://coze.mitm/status.json").status_code == 200
    assert launcher.wait_for_output(done)


def test_one_line_per_flow_coze_mitm_acted_on(tmp_path):
    launcher = Launcher(tmp_path, "--demo").start()
    try:
        act(launcher)
        time.sleep(0.5)  # not a timing assertion: lets a line that should not be there show up before reading
        after_banner = launcher.lines[max(i for i, line in enumerate(launcher.lines) if line == "=" * 78) + 1:]
    finally:
        assert launcher.stop() == 0
    logged = [re.sub(r"^\[[\d:.]+\] ", "", line) for line in after_banner if line.strip()]
    for kind, pattern in FLOW_LINES.items():
        assert len([line for line in logged if re.match(pattern, line)]) == 1, (kind, logged)
    assert len(logged) == len(FLOW_LINES), logged
    for words in CHATTER:
        assert words not in launcher.output
    assert "Traceback" not in launcher.output


def test_verbose_restores_mitmproxys_detail(tmp_path):
    launcher = Launcher(tmp_path, "--demo", "-v").start()
    try:
        act(launcher, done=r"GET http://coze\.mitm/status\.json")
        assert launcher.wait_for_output(r"client disconnect")
    finally:
        assert launcher.stop() == 0
    assert "client connect" in launcher.output
    assert re.search(r"POST http://\S+/v3/chat", launcher.output)  # mitmproxy's own line per flow
    assert re.search(r"<< 200", launcher.output)
    # coze-mitm adds what mitmproxy's lines cannot say (the refusal's reason), not a second line per flow.
    assert re.search(FLOW_LINES["refused"], launcher.output, re.M)
    assert not re.search(FLOW_LINES["injected"][:-1], launcher.output)
    assert "One line per request" not in launcher.output


def test_ctrl_c_says_what_browsers_pointed_at_the_proxy_will_do(launch):
    """Ctrl-C in a terminal reaches the launcher and mitmdump alike: one line says the proxy stopped, and
    what a browser using the PAC file and one using the proxy for everything see from now on."""
    launcher = launch("--demo")
    pac = f"http://127.0.0.1:{launcher.port}/proxy.pac"
    assert pac in launcher.output  # the next steps name the PAC URL
    r = requests.get(pac, proxies={"http": "", "https": ""}, timeout=10)  # asked of the proxy itself
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/x-ns-proxy-autoconfig"
    assert f'"PROXY 127.0.0.1:{launcher.port}"' in r.text and '"sandbox.coze.mitm"' in r.text
    deltas, _ = chat(launcher, "1732000000000-DemoUserForTheUsageFile", "counted?")  # a chat with usage
    assert deltas
    assert launcher.session().get("http://coze.mitm/status.json").json()["usage_users"] == 1
    for pid in [launcher.proc.pid, *launcher.children()]:
        os.kill(pid, signal.SIGINT)
    assert launcher.proc.wait(20) == 0
    launcher._read_all.wait(5)  # all its output read
    start = [i for i, line in enumerate(launcher.lines) if line.startswith("coze-mitm: the proxy at")]
    assert len(start) == 1, launcher.output
    stopped = [m for m in messages("\n".join(launcher.lines[start[0]:])) if m.startswith("coze-mitm: the proxy at")]
    assert stopped == [
        f"coze-mitm: the proxy at 127.0.0.1:{launcher.port} stopped. Browsers using its PAC file ({pac}): only Coze "
        f"pages fail, other sites keep loading; browsers with 127.0.0.1:{launcher.port} as their proxy for everything: "
        "every page fails until that proxy setting is removed."]
    assert "Traceback" not in launcher.output
    assert list(launcher.confdir.glob("*.sqlite")) == []  # (confdir is its cwd) the demo's usage stays in memory: no later run sees it
