"""Proxy logins set up through run_mitm.py and mitmdump (issue 19 item 5):

* htpasswd files made by Apache's `htpasswd` (-B bcrypt, -m apr1, -s SHA): mitmproxy 12.3.1 refuses the whole
  file for one apr1 line ("Could not open htpasswd file", no line named); run_mitm.py (start-up and --check)
  names that line, its scheme and the fix (`htpasswd -B`) and does not start; on mitmproxy 11.0.2 (passlib)
  all three log in.
* the SPEC (an LDAP bind password, a user:pass) from --proxyauth-file or COZE_PROXYAUTH never reaches a
  command line: not the child mitmdump's /proc/PID/cmdline, not the launcher's.
* a proxy with logins listening beyond loopback says, in one line, that Basic logins cross the network in
  clear, and how to avoid it; on loopback it says nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from coze_mitm.htpasswd_check import htpasswd_problems, mitmproxy_version
from tests.harness import Mitmdump
from tests.harness import check, clean_env, cmdline, messages, run

pytestmark = pytest.mark.process  # every test here starts a process (run_tests.py --fast leaves them out)

MITMPROXY_12 = mitmproxy_version() >= (12,)
PASSWORDS = {"alice": "alice-Pw-bcrypt-1", "carol": "carol-Pw-apr1-2", "dave": "dave-Pw-sha-3"}
CLEAR_TEXT = "proxy logins are Basic authentication, sent in clear text"

needs_htpasswd = pytest.mark.skipif(shutil.which("htpasswd") is None,
                                    reason="Apache's htpasswd not installed (apt-get install apache2-utils)")


def make_htpasswd(path: Path, users=(("alice", "-B"), ("carol", "-m"), ("dave", "-s"))) -> Path:
    for i, (user, flag) in enumerate(users):
        create = ["-c"] if i == 0 else []
        subprocess.run(["htpasswd", "-b", *create, flag, str(path), user, PASSWORDS[user]], check=True,
                       capture_output=True)
    return path


def status_through(port: int, user: str, password: str) -> int:
    s = requests.Session()
    s.trust_env = False
    s.proxies = {"http": f"http://{user}:{password}@127.0.0.1:{port}"}
    return s.get("http://coze.mitm/status.json", timeout=10).status_code


# --------------------------------------------------------------------------- htpasswd schemes

@needs_htpasswd
def test_problem_lines_named_with_scheme_and_fix(tmp_path):
    path = make_htpasswd(tmp_path / "team.htpasswd")
    problems = htpasswd_problems(path)
    if MITMPROXY_12:
        assert len(problems) == 1, problems
        assert f"{path} line 2 (user 'carol')" in problems[0]
        assert "apr1 MD5 (htpasswd -m)" in problems[0] and f"htpasswd -B {path} carol" in problems[0]
        assert "refuses the WHOLE file" in problems[0]
    else:
        assert problems == []  # passlib verifies bcrypt, apr1 and SHA


@needs_htpasswd
def test_plain_mitmdump_with_an_apr1_line(tmp_path, config_file):
    """What mitmproxy itself does with the file (the reason the launcher checks it first)."""
    path = make_htpasswd(tmp_path / "team.htpasswd")
    sets = [f"proxyauth=@{path}", f"coze_config={config_file}", "coze_origins=https://chat.example.org"]
    if MITMPROXY_12:
        proxy = Mitmdump(tmp_path, sets)
        assert proxy.run_to_exit() != 0
        assert "Could not open htpasswd file" in proxy.output  # and no line named: hence coze-mitm's check
        return
    proxy = Mitmdump(tmp_path, sets).start()
    try:
        for user, password in PASSWORDS.items():
            assert status_through(proxy.port, user, password) == 200, user
        assert status_through(proxy.port, "carol", "wrong") == 407
        assert "cannot verify" not in proxy.output
    finally:
        proxy.stop()


@needs_htpasswd
def test_launcher_names_the_line_mitmproxy_12_cannot_read(launch, tmp_path):
    path = make_htpasswd(tmp_path / "team.htpasswd")
    if MITMPROXY_12:
        result = run("--demo", "--proxyauth", f"@{path}", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        (error,) = messages(result.stderr)
        assert f"line 2 (user 'carol')" in error and "apr1 MD5 (htpasswd -m)" in error
        assert f"htpasswd -B {path} carol" in error and "listening" not in result.stdout
        # after the fix the same file starts
        subprocess.run(["htpasswd", "-b", "-B", str(path), "carol", PASSWORDS["carol"]], check=True,
                       capture_output=True)
    launcher = launch("--demo", "--proxyauth", f"@{path}")
    for user, password in PASSWORDS.items():
        assert status_through(launcher.port, user, password) == 200, user
    assert status_through(launcher.port, "dave", "wrong") == 407


@needs_htpasswd
def test_check_names_the_line_too(tmp_path, config_file, standin):
    path = make_htpasswd(tmp_path / "team.htpasswd")
    result = check(config_file, "--proxyauth", f"@{path}")
    if MITMPROXY_12:
        assert result.returncode == 2
        assert "line 2 (user 'carol')" in result.stderr.replace("\n  ", " ") and "htpasswd -B" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert "cannot verify" not in result.stderr


# --------------------------------------------------------------------------- hashes mitmproxy takes for passwords

# Hashes of schemes neither mitmproxy reads (issue 25 item 3): mitmproxy 11.0.2's passlib takes them for plain-text
# passwords, so the hash string itself logged in (HTTP 200); mitmproxy 12 refuses the whole file, naming no line.
FOREIGN = {"bob": "{SSHA}x0rmB5ZhRPcKUR5vR+1HXsBmbY3bcnZz",
           "eve": "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$8tGGy1gp3jz8Ufp9z3Lx9Q"}


def foreign_htpasswd(path: Path) -> Path:
    make_htpasswd(path, users=(("alice", "-B"),))
    with path.open("a") as f:
        for user, pwhash in FOREIGN.items():
            f.write(f"{user}:{pwhash}\n")
    return path


def assert_names_the_foreign_lines(text: str, path: Path) -> None:
    text = text.replace("\n  ", " ")
    assert f"{path} line 2 (user 'bob')" in text and "salted SHA-1 {SSHA}" in text, text
    assert f"{path} line 3 (user 'eve')" in text and "argon2" in text, text
    assert f"htpasswd -B {path} bob" in text and f"htpasswd -B {path} eve" in text, text
    assert "line 1" not in text  # alice's bcrypt line is fine


@needs_htpasswd
def test_plain_mitmdump_refuses_a_hash_it_would_take_for_a_password(tmp_path, config_file):
    path = foreign_htpasswd(tmp_path / "team.htpasswd")
    sets = [f"proxyauth=@{path}", f"coze_config={config_file}", "coze_origins=https://chat.example.org"]
    proxy = Mitmdump(tmp_path, sets)
    assert proxy.run_to_exit() != 0, proxy.output
    assert "listening" not in proxy.output and "Traceback" not in proxy.output, proxy.output
    if MITMPROXY_12:
        # mitmproxy 12 reads the file before any script loads, and refuses it whole: no hash logs in
        assert "Could not open htpasswd file" in proxy.output, proxy.output
    else:
        assert_names_the_foreign_lines(proxy.output, path)
        assert TEXT_IS_PASSWORD_SAID in proxy.output


TEXT_IS_PASSWORD_SAID = "so that text itself logs in"


@needs_htpasswd
def test_launcher_refuses_a_hash_mitmproxy_would_take_for_a_password(tmp_path):
    path = foreign_htpasswd(tmp_path / "team.htpasswd")
    result = run("--demo", "--port", "0", "--proxyauth", f"@{path}", cwd=tmp_path)  # a free port if it did start
    assert result.returncode == 2, result.stdout + result.stderr
    (error,) = messages(result.stderr)
    assert_names_the_foreign_lines(error, path)
    assert "listening" not in result.stdout


# --------------------------------------------------------------------------- secrets off the command line

SECRET = "s3cret-Pw-7d1f"


def _no_secret_anywhere(launcher) -> None:
    for pid in [launcher.proc.pid, *launcher.children()]:
        assert not any(SECRET in a for a in cmdline(pid)), cmdline(pid)
    assert SECRET not in launcher.output


def test_proxyauth_file_never_on_a_command_line(launch, tmp_path):
    spec = tmp_path / "proxyauth"
    spec.write_text(f"alice:{SECRET}\n")
    spec.chmod(0o600)
    launcher = launch("--demo", "--proxyauth-file", str(spec))
    assert launcher.children()
    _no_secret_anywhere(launcher)
    assert status_through(launcher.port, "alice", SECRET) == 200
    assert status_through(launcher.port, "alice", "wrong") == 407
    assert "shell history" not in launcher.output  # no user:pass warning: it is not on the command line


def test_proxyauth_from_environment_never_on_a_command_line(launch, tmp_path):
    launcher = launch("--demo", env=clean_env(COZE_PROXYAUTH=f"alice:{SECRET}"))
    assert launcher.children()
    _no_secret_anywhere(launcher)
    assert status_through(launcher.port, "alice", SECRET) == 200
    assert status_through(launcher.port, "bob", SECRET) == 407


def test_proxyauth_file_readable_by_others_is_warned_about(tmp_path):
    spec = tmp_path / "proxyauth"
    spec.write_text(f"alice:{SECRET}\n")
    spec.chmod(0o644)
    result = run("--proxyauth-file", str(spec), "--config", str(tmp_path / "absent.json"), cwd=tmp_path)
    assert result.returncode == 3  # the missing config, after the warning
    assert any("can be read by other users" in m and f"chmod 600 {spec}" in m for m in messages(result.stderr))
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("content,expect", [("", "want exactly one line"), ("a:b\nc:d\n", "want exactly one line")])
def test_proxyauth_file_refusals(tmp_path, content, expect):
    spec = tmp_path / "proxyauth"
    spec.write_text(content)
    result = run("--proxyauth-file", str(spec), "--demo", cwd=tmp_path)
    assert result.returncode == 2 and expect in result.stderr
    both = run("--proxyauth-file", str(spec), "--proxyauth", "a:b", "--demo", cwd=tmp_path)
    assert both.returncode == 2 and "both given" in both.stderr


# --------------------------------------------------------------------------- clear-text warning

@needs_htpasswd
def test_shared_proxy_warns_that_logins_cross_in_clear(launch, tmp_path):
    path = make_htpasswd(tmp_path / "team.htpasswd", users=(("alice", "-B"),))
    shared = launch("--demo", "--host", "0.0.0.0", "--allow-remote", "--proxyauth", f"@{path}")
    assert shared.wait_for_output(CLEAR_TEXT, timeout=10), shared.output
    lines = [line for line in shared.output.splitlines() if CLEAR_TEXT in line]
    assert len(lines) == 1 and "ssh -L 8080:127.0.0.1:8080" in lines[0] and "stunnel" in lines[0]
    local = launch("--demo", "--proxyauth", f"@{path}")
    assert status_through(local.port, "alice", PASSWORDS["alice"]) == 200
    assert CLEAR_TEXT not in local.output
