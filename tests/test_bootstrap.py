"""launcher/bootstrap.py: `python3 run_mitm.py` on a machine that has nothing but a Python.

(a) a real run from a copy of the repository with an interpreter that lacks the requirements: the project venv
    is created, requirements.txt pip-installed into it (from the real package index), the launcher re-executed;
(b) older Pythons get one line and exit 1, not a traceback (every old interpreter pyenv has here);
(c) Debian's python3 without python3-venv (simulated in-process): the one-line apt hint;
(d) Windows (simulated in-process): a child process with the venv's Scripts\\python.exe, its exit code passed on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import bootstrap

REPO = Path(__file__).resolve().parent.parent
VENV_NAME = ".venv-%d.%d" % sys.version_info[:2]
DEBIAN_NO_ENSUREPIP = (
    "The virtual environment was not created successfully because ensurepip is not\n"
    "available.  On Debian/Ubuntu systems, you need to install the python3-venv\n"
    "package using the following command.\n\n    apt install python3.11-venv\n\n"
    "You may need to use sudo with that command.  After installing the python3-venv\n"
    "package, recreate your virtual environment.\n\nFailing command: /tmp/x/bin/python3\n")


def child_env() -> dict:
    """The environment of a user's shell: no venv activated, no re-execution under way."""
    return {k: v for k, v in os.environ.items()
            if k not in ("VIRTUAL_ENV", bootstrap.REEXEC_FLAG, "PYTHONPATH", "PYTHONHOME", "PYTHON")}


def copy_repo(dst: Path) -> Path:
    """The repository's files (tracked, and new ones not ignored), without any venv or node_modules."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                             check=True).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()
                 and not {".git", "node_modules", "__pycache__"} & set(p.relative_to(REPO).parts)
                 and not p.relative_to(REPO).parts[0].startswith(".venv")]
    for f in files:
        src = REPO / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    return dst


@pytest.mark.process
def test_a_python_without_the_requirements_gets_the_project_venv(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    assert not (repo / VENV_NAME).exists()
    bare = tmp_path / "bare"  # a Python 3.11+ with nothing installed: not even pip
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    bare_python = bootstrap.venv_python(bare)
    lacks = subprocess.run([bare_python, "-c", "import mitmproxy"], capture_output=True, env=child_env())
    assert lacks.returncode != 0

    first = subprocess.run([bare_python, "run_mitm.py", "--help"], cwd=repo, capture_output=True, text=True,
                           env=child_env(), timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    install_line = f"coze-mitm: installing requirements.txt into {VENV_NAME} "
    assert first.stdout.count(install_line) == 1, first.stdout
    assert "usage: run_mitm.py" in first.stdout
    assert first.stdout.index(install_line) < first.stdout.index("usage: run_mitm.py")
    assert "Traceback" not in first.stderr
    venv_python = bootstrap.venv_python(repo / VENV_NAME)
    has = subprocess.run([venv_python, "-c", "import mitmproxy, jwt, cryptography, requests, jinja2, zstandard"],
                         capture_output=True, text=True, env=child_env())
    assert has.returncode == 0, has.stderr
    assert subprocess.run([bare_python, "-c", "import mitmproxy"], capture_output=True).returncode != 0  # untouched

    # Second run: no install, straight to the venv's python, which can import what --check needs: the
    # missing config is reported (exit 3), not an ImportError (exit 1, "install the dependencies").
    second = subprocess.run([bare_python, str(repo / "run_mitm.py"), "--check", "--config", str(tmp_path / "missing.json")],
                            cwd=tmp_path, capture_output=True, text=True, env=child_env(), timeout=120)
    assert "installing" not in second.stdout
    assert "install the dependencies" not in second.stderr
    assert second.returncode == 3, second.stdout + second.stderr
    assert "not found" in second.stderr


def pyenv_versions() -> Path:
    """pyenv's interpreters, from the real home (conftest points HOME at a throwaway directory)."""
    root = os.environ.get("PYENV_ROOT")
    if not root:
        try:
            import pwd
            root = os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".pyenv")
        except (ImportError, KeyError):
            root = os.path.join(os.path.expanduser("~"), ".pyenv")
    return Path(root) / "versions"


PYENV = pyenv_versions()


def old_pythons() -> list[Path]:
    found = []
    for pattern in ("2.7*/bin/python", "3.6*/bin/python3", "3.9*/bin/python3", "3.10*/bin/python3"):
        found += sorted(PYENV.glob(pattern))[:1]
    return found


@pytest.mark.process
@pytest.mark.parametrize("entry", [["run_mitm.py", "--demo"], ["run_tests.py"], ["-m", "launcher.bootstrap"]])
def test_b_too_old_python_gets_one_line_and_exit_1(entry):
    pythons = old_pythons()
    if not any("3.10" in str(p) for p in pythons):
        pytest.skip(f"no Python 3.10 under {PYENV}")
    for python in pythons:
        r = subprocess.run([str(python), *entry], cwd=REPO, capture_output=True, text=True, env=child_env(),
                           timeout=60)
        version = subprocess.run([str(python), "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                                 capture_output=True, text=True).stdout.strip()
        assert r.returncode == 1, (python, r.stdout, r.stderr)
        assert r.stdout == ""
        assert r.stderr == f"coze-mitm needs Python 3.11 or newer; this is {version} ({python})\n", python


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """bootstrap pointed at an empty directory as the repository, with this interpreter lacking mitmproxy."""
    (tmp_path / "requirements.txt").write_text("mitmproxy\n")
    monkeypatch.setattr(bootstrap, "repo", lambda: str(tmp_path))
    monkeypatch.setattr(bootstrap, "missing_modules", lambda names=(): ["mitmproxy"])
    monkeypatch.setattr(bootstrap, "active_venv", lambda: None)
    monkeypatch.delenv(bootstrap.REEXEC_FLAG, raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail(f"execve{a}"))
    return tmp_path


def test_c_no_ensurepip_says_install_python3_venv(fake_repo, monkeypatch, capsys):
    monkeypatch.setattr(bootstrap, "has_ensurepip", lambda: False)
    monkeypatch.setattr(bootstrap, "apt_install_venv", lambda: False)  # not root, or no apt-get
    with pytest.raises(SystemExit) as e:
        bootstrap.ensure_runtime("run_mitm.py", ["--demo"])
    assert e.value.code == 1
    out, err = capsys.readouterr()
    assert err == "coze-mitm: Python's venv module is missing: sudo apt install python3-venv (Debian/Ubuntu)\n"
    assert out == ""
    assert not (fake_repo / VENV_NAME).exists()


def test_c_venv_failing_as_debian_does_says_install_python3_venv(fake_repo, monkeypatch, capsys):
    """ensurepip importable but `python3 -m venv` failing with Debian's text: the same line, no half-made venv."""
    monkeypatch.setattr(bootstrap, "has_ensurepip", lambda: True)
    made = []

    def debian_venv(cmd, **kw):
        assert cmd[1:3] == ["-m", "venv"]
        Path(cmd[-1], "bin").mkdir(parents=True)  # Debian leaves a venv without pip behind
        made.append(cmd[-1])
        return subprocess.CompletedProcess(cmd, 1, stdout=DEBIAN_NO_ENSUREPIP)

    monkeypatch.setattr(bootstrap.subprocess, "run", debian_venv)
    with pytest.raises(SystemExit) as e:
        bootstrap.ensure_runtime("run_mitm.py", ["--demo"])
    assert e.value.code == 1
    assert capsys.readouterr().err == bootstrap.NO_VENV_MSG + "\n"
    assert made and not Path(made[0]).exists()


def test_d_windows_reexec_is_a_child_process_whose_exit_code_is_passed_on(fake_repo, monkeypatch, capsys):
    venv = fake_repo / VENV_NAME
    monkeypatch.setattr(bootstrap, "runs", lambda python: True)  # the venv is there, requirements installed:
    venv.mkdir()
    (venv / bootstrap.STAMP).write_text(bootstrap.digest([fake_repo / "requirements.txt"]))
    calls = []

    class FakePopen:
        def __init__(self, cmd, env=None):
            calls.append((cmd, env))
            self.waits = 0

        def wait(self):
            self.waits += 1
            if self.waits == 1:
                raise KeyboardInterrupt  # Ctrl-C reaches both processes: the parent keeps waiting
            return 7

    monkeypatch.setattr(bootstrap.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(bootstrap.subprocess, "call", lambda *a, **k: pytest.fail(f"pip ran: {a}"))
    monkeypatch.setattr(os, "name", "nt")  # last: pathlib must not see it
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(SystemExit) as e:
        bootstrap.ensure_runtime("C:\\coze-mitm\\run_mitm.py", ["--demo", "--port", "0"])
    assert e.value.code == 7
    [(cmd, env)] = calls
    assert cmd == [os.path.join(str(venv), "Scripts", "python.exe"), "C:\\coze-mitm\\run_mitm.py", "--demo", "--port",
                   "0"]
    assert env[bootstrap.REEXEC_FLAG] == "1"
    assert capsys.readouterr().out == ""  # nothing to install: no line


def test_posix_reexec_replaces_the_process_with_the_venv_python(fake_repo, monkeypatch):
    venv = fake_repo / VENV_NAME
    monkeypatch.setattr(os, "name", "posix")
    monkeypatch.setattr(bootstrap, "runs", lambda python: True)
    venv.mkdir()
    (venv / bootstrap.STAMP).write_text(bootstrap.digest([fake_repo / "requirements.txt"]))
    execs = []

    def execve(path, cmd, env):
        execs.append((path, cmd, env))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.setattr(bootstrap.subprocess, "Popen", lambda *a, **k: pytest.fail("Popen on POSIX"))
    with pytest.raises(SystemExit):
        bootstrap.ensure_runtime("/x/run_mitm.py", ["--help"])
    [(path, cmd, env)] = execs
    assert path == str(venv / "bin" / "python") and cmd == [path, "/x/run_mitm.py", "--help"]
    assert env[bootstrap.REEXEC_FLAG] == "1"


def test_changed_requirements_are_installed_again(fake_repo, monkeypatch, capsys):
    venv = fake_repo / VENV_NAME
    monkeypatch.setattr(bootstrap, "runs", lambda python: True)
    venv.mkdir()
    (venv / bootstrap.STAMP).write_text("requirements.txt 0000\n")
    pips = []
    monkeypatch.setattr(bootstrap.subprocess, "call", lambda cmd, **kw: pips.append(cmd) or 0)
    assert bootstrap.ensure_venv([fake_repo / "requirements.txt"]) == bootstrap.venv_python(venv)
    assert len(pips) == 1 and pips[0][1:4] == ["-m", "pip", "install"]
    assert "installing requirements.txt into " + VENV_NAME in capsys.readouterr().out
    assert bootstrap.ensure_venv([fake_repo / "requirements.txt"]) and len(pips) == 1  # now up to date


def test_reexecuted_process_that_still_lacks_a_module_says_so_instead_of_looping(fake_repo, monkeypatch, capsys):
    monkeypatch.setenv(bootstrap.REEXEC_FLAG, "1")
    with pytest.raises(SystemExit) as e:
        bootstrap.ensure_runtime("run_mitm.py", [])
    assert e.value.code == 1
    assert "still lacks mitmproxy" in capsys.readouterr().err


def test_an_interpreter_with_everything_is_used_as_is(monkeypatch):
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed"))
    monkeypatch.setattr(bootstrap, "ensure_venv", lambda *a, **k: pytest.fail("venv made"))
    assert bootstrap.missing_modules() == []  # the suite runs with the requirements installed
    bootstrap.ensure_runtime("run_mitm.py", [])
