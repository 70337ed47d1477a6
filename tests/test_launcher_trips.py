"""run_mitm.py where users tripped (issue 25 items 4 and 5, issue 26 item 4), as a user runs it: a subprocess,
its output, its exit code, the files it leaves.

* the demo makes no CA in the user's confdir (nothing to trust now, nothing to remove later) and says nothing
  about one;
* a confdir coze-mitm owns that others can read (0755) is made 0700, in one line; the usage file is 0600;
* an option the launcher sets too takes the user's value; a coze_* option given twice is refused in one line; and
  when coze-mitm did not load, whatever the reason, run_mitm.py says so and exits 1 (never a silent plain proxy);
* the newcomer's trips of issue 26 item 4, each with the text they saw.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.harness import MITMPROXY_11, REPO, Launcher, Mitmdump, clean_env, cmdline, messages, one_error_line, run

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes (Windows: docs/portability.md)")


def without_confdir(launcher: Launcher) -> Launcher:
    """The Launcher helper names a confdir; a newcomer names none (the default under $HOME is then used)."""
    i = launcher.args.index("--set")
    assert launcher.args[i + 1].startswith("confdir=")
    del launcher.args[i:i + 2]
    return launcher


@pytest.mark.process  # runs run_mitm.py or mitmdump
def test_demo_makes_no_ca_to_trust_or_remove(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    launcher = without_confdir(Launcher(tmp_path, "--demo", env=clean_env(HOME=str(home))))
    launcher.start()
    try:
        assert launcher.session().get("http://coze.mitm/status.json", timeout=10).status_code == 200
    finally:
        assert launcher.stop() == 0
    out = launcher.output
    assert "No CA certificate is needed" in out
    assert "made a CA" not in out and "trust" not in out.replace("No CA certificate is needed", ""), out
    assert not (home / ".mitmproxy-coze-mitm").exists() and not (home / ".mitmproxy").exists()
    # a confdir named for the demo, holding mitmproxy's own CA: used as it is, and no CA advice either
    named = tmp_path / "named"
    launcher = Launcher(named.parent, "--demo", env=clean_env(HOME=str(home)))
    launcher.args[launcher.args.index(f"confdir={named.parent}")] = f"confdir={named}"
    launcher.start()
    assert launcher.stop() == 0
    assert (named / "mitmproxy-ca.pem").exists()  # mitmproxy made its own there
    launcher = Launcher(named.parent, "--demo", env=clean_env(HOME=str(home)))
    launcher.args[launcher.args.index(f"confdir={named.parent}")] = f"confdir={named}"
    launcher.start()
    assert launcher.stop() == 0
    assert "vouch" not in launcher.output and "--new-ca" not in launcher.output, launcher.output


@pytest.mark.process  # runs run_mitm.py or mitmdump
@posix_only
def test_a_readable_confdir_of_coze_mitm_is_made_owner_only(tmp_path, config_file):
    home = tmp_path / "home"
    confdir = home / ".mitmproxy-coze-mitm"
    confdir.mkdir(parents=True)
    confdir.chmod(0o755)  # as an older version (or mkdir with the usual umask) left it
    launcher = without_confdir(Launcher(tmp_path, "--config", str(config_file), env=clean_env(HOME=str(home))))
    launcher.start()
    try:
        assert stat.S_IMODE(confdir.stat().st_mode) == 0o700
        usage = confdir / "coze-mitm-usage.sqlite"
        assert usage.exists() and stat.S_IMODE(usage.stat().st_mode) == 0o600
        for made in confdir.iterdir():
            assert stat.S_IMODE(made.stat().st_mode) & 0o077 == 0, made
    finally:
        assert launcher.stop() == 0
    notes = " ".join(launcher.output.split())
    assert f"{confdir} could be read by other users of this machine (mode 755)" in notes, launcher.output
    assert "made it 0700 (owner only)" in notes


# --------------------------------------------------------------------------- an option given twice (issue 25 item 4)

def test_an_option_the_launcher_sets_too_takes_the_users_value(launch):
    """run_mitm.py sets coze_tune_process itself; the user's --set used to make mitmproxy refuse the pair while
    coze-mitm registered its options: a plain proxy (no gate, no budgets, no credentials) announced as running."""
    launcher = launch("--demo", "--set", "coze_tune_process=false", "--set", "flow_detail=1")
    args = cmdline(launcher.children()[0])
    assert [a for a in args if a.startswith("coze_tune_process=")] == ["coze_tune_process=false"]
    assert [a for a in args if a.startswith("flow_detail=")] == ["flow_detail=1"]
    r = launcher.session().get("http://coze.mitm/status.json", timeout=10)
    assert r.status_code == 200 and "usage" in r.json()  # answered by coze-mitm: it is loaded


@pytest.mark.process  # runs run_mitm.py or mitmdump
def test_a_coze_option_given_twice_is_refused_in_one_line(tmp_path):
    result = run("--demo", "--port", "0", "--set", "coze_token_ttl=901", "--set", "coze_token_ttl=902", cwd=tmp_path, timeout=30)
    assert result.returncode == 2
    line = one_error_line(result)
    assert "--set coze_token_ttl is given more than once: give it once" in line.replace("\n  ", " "), line
    assert "901" not in line and "902" not in line  # values unsaid: one could be a redis:// password


def repo_copy(where: Path) -> Path:
    """The files of this checkout (not the tests), to change one thing in."""
    files = subprocess.run(["git", "ls-files", "run_mitm.py", "launcher", "addons", "sandbox", "config", "userscript",
                            "requirements.txt"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        target = where / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    return where


@pytest.mark.process  # runs run_mitm.py or mitmdump
def test_the_launcher_says_so_when_coze_mitm_did_not_load(tmp_path):
    """Whatever stops mitmproxy's script loader (here: the launcher of the old code passing an option twice, and
    mitmproxy's real loader dying of it), run_mitm.py says so and exits non-zero instead of announcing a proxy."""
    copy = repo_copy(tmp_path / "repo")
    plan = copy / "launcher" / "plan.py"
    plan.write_text(plan.read_text().replace('LIST_OPTIONS = ("allow_hosts",)',
                                             'LIST_OPTIONS = ("allow_hosts", "coze_tune_process")'))
    result = subprocess.run([sys.executable, str(copy / "run_mitm.py"), "--demo", "--port", "0",
                             "--set", f"confdir={tmp_path / 'conf'}", "--set", "coze_tune_process=false"],
                            capture_output=True, text=True, timeout=90, env=clean_env(), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "DEMO is running" not in result.stdout and "Ctrl-C stops it" not in result.stdout
    error = " ".join(messages(result.stderr)[-1].split())
    assert error.startswith("run_mitm.py: error: coze-mitm did not load into mitmdump"), result.stderr
    assert "plain proxy" in error and "was stopped" in error


# --------------------------------------------------------------------------- what a newcomer tripped over (issue 26)

@pytest.mark.process  # runs run_mitm.py or mitmdump
@pytest.mark.skipif(not MITMPROXY_11, reason="mitmweb >= 11.1.2 (Python 3.12+) starts: nothing to refuse")
def test_web_on_mitmproxy_11_says_what_works(tmp_path):
    """Seen on Debian 12: "Use Python 3.12+ with mitmproxy 12 (pip install 'mitmproxy>=12')" - a pip line that
    cannot work on Python 3.11."""
    result = run("--web", "--demo", "--port", "0", cwd=tmp_path)
    assert result.returncode == 2
    line = " ".join(one_error_line(result).split())
    assert "pip install" not in line
    assert re.search(r"What works: (python3\.1[2-9]|python3\.[2-9]\d)? ?run_mitm\.py --web", line) \
        or "python3.12 run_mitm.py --web" in line, line
    console = str(Path(sys.executable).parent / "mitmproxy")
    shown = os.path.relpath(console, REPO) if console.startswith(str(REPO) + os.sep) else console
    assert f"{shown} -s addons/coze.py" in line, line  # the console UI of the venv that runs here
    assert Path(console).exists()


@pytest.mark.process  # runs run_mitm.py or mitmdump
def test_plain_mitmdump_without_a_config_names_the_demo(tmp_path):
    """Seen with `.venv-3.11/bin/mitmdump -s addons/coze.py` in a fresh clone: "OAuth config not found..." and no
    word of the demo."""
    proxy = Mitmdump(tmp_path, [f"coze_config={tmp_path / 'absent.json'}"])
    assert proxy.run_to_exit() == 1
    assert "OAuth config not found" in proxy.output
    assert "no Coze account yet? python3 run_mitm.py --demo" in proxy.output, proxy.output
    assert "Traceback" not in proxy.output


def test_readme_card_names_the_venvs_mitmdump():
    """Seen: `mitmdump -s addons/coze.py` from the README -> "mitmdump: command not found" (it is in .venv-3.X)."""
    readme = (REPO / "README.md").read_text()
    direct = [line for line in readme.splitlines() if "Or directly" in line]
    assert direct and all("`.venv-3.11/bin/mitmdump --listen-host 127.0.0.1 -s addons/coze.py" in line
                          for line in direct), direct


@pytest.mark.process  # runs run_mitm.py or mitmdump
def test_hints_name_python3_never_bare_python(tmp_path):
    result = run("--no-such-flag", cwd=tmp_path)
    assert result.returncode == 2
    assert "(see python3 run_mitm.py --help)" in " ".join(one_error_line(result).split())
    for path in [*(REPO / "addons").rglob("*.py"), *(REPO / "addons").rglob("*.html"), *(REPO / "launcher").glob("*.py"),
                 REPO / "userscript" / "coze-chat.user.js", REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        assert not re.search(r"(?<![\w.-])python (run_mitm|run_tests|\{LAUNCHER\}|\{PROG\})", path.read_text()), path


@pytest.mark.process  # runs run_mitm.py or mitmdump
def test_check_refuses_a_coze_com_site_with_a_coze_cn_api_offline(tmp_path, rsa_key):
    """Seen: a coze.com app's config with coze_api_base https://api.coze.cn passed --check's offline part."""
    config = write_config(tmp_path, rsa_key, "https://api.coze.cn", coze_www_base="https://www.coze.com")
    result = run("--check", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr
    verdict = " ".join(messages(result.stderr)[-1].split())
    assert verdict.startswith("FAILED: ") and "OK offline" not in result.stdout
    assert "coze_www_base https://www.coze.com is coze.com (international)" in verdict, verdict
    assert "coze_api_base https://api.coze.cn is coze.cn (China)" in verdict
    assert "set coze_api_base to https://api.coze.com" in verdict
    # the same mix made with --set coze_api_base on a coze.cn config
    config = write_config(tmp_path, rsa_key, "https://api.coze.cn")
    result = run("--check", "--config", str(config), "--set", "coze_api_base=https://api.coze.com", cwd=tmp_path)
    assert result.returncode == 3 and "is coze.cn (China) but coze_api_base https://api.coze.com" in \
        " ".join(messages(result.stderr)[-1].split())


def test_a_second_start_on_a_busy_port_names_coze_mitm(launch, tmp_path):
    """Seen: "already in use by pid 24148 (python -c import os, sys; spec = ...": it is coze-mitm."""
    first = launch("--demo")
    result = run("--demo", "--port", str(first.port), "--set", f"confdir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 6
    line = " ".join(one_error_line(result).split())
    holder = first.children()[0]
    assert f"already in use by pid {holder} (coze-mitm's mitmdump, from a run_mitm.py or mitmdump -s " \
           "addons/coze.py started earlier)" in line, line
    assert "-c import" not in line

