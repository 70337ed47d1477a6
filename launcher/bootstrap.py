"""Start-up, before anything else: a new enough Python, and the requirements, in a project venv if need be.

    check_python()              coze-mitm needs Python 3.11 or newer: one line and exit 1 on an older one
    ensure_runtime(script, argv)
        this interpreter imports everything in requirements.txt, or is an activated venv: used as is
        (an activated venv that lacks something gets requirements.txt installed into it);
        otherwise .venv-3.X/ in the repository (one per Python version) is created if missing, requirements.txt
        pip-installed into it when it changed (one line says so), and the script re-executed with the venv's python
        (os.execve on POSIX; on Windows a child process whose exit code is passed on)
    ensure_venv(files)          the project venv for this Python, created if missing; its python (run_tests.py)

Standard library only, no addon imported, and syntax that any Python 3 (and 2.7) can parse: the version check
has to be able to speak on the interpreter someone happened to type. Nothing else in the launcher runs before it.
Paths are os.path strings (no pathlib): the same on every Python, and os.name alone decides the venv's layout.
"""

import hashlib
import os
import shutil
import subprocess
import sys

MIN_PYTHON = (3, 11)
NAME = "coze-mitm"
# The import names of requirements.txt: all present means this interpreter can run coze-mitm as it is.
RUNTIME_MODULES = ("mitmproxy", "jwt", "cryptography", "requests", "jinja2", "zstandard")
# Set in the environment of the re-executed process: if the venv still lacks something, say so, never loop.
REEXEC_FLAG = "COZE_MITM_BOOTSTRAPPED"
STAMP = "coze-mitm-requirements.txt"  # in the venv: what was installed, as "<file> <sha256>" lines
NO_VENV_MSG = NAME + ": Python's venv module is missing: sudo apt install python3-venv (Debian/Ubuntu)"


def repo():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def say(msg):
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def fail(msg, code=1):
    sys.stdout.flush()
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()
    raise SystemExit(code)


def check_python(version=None, executable=None):
    version = tuple(sys.version_info) if version is None else tuple(version)
    if version[:2] < MIN_PYTHON:
        fail("%s needs Python %d.%d or newer; this is %s (%s)" % (
            NAME, MIN_PYTHON[0], MIN_PYTHON[1], ".".join(str(v) for v in version[:3]),
            executable or sys.executable or "unknown interpreter"))


def missing_modules(names=RUNTIME_MODULES):
    import importlib.util
    return [n for n in names if importlib.util.find_spec(n) is None]


def active_venv():
    """The venv the user activated, if this interpreter is its python."""
    env = os.environ.get("VIRTUAL_ENV")
    if not env or sys.prefix == getattr(sys, "base_prefix", sys.prefix):
        return None
    try:
        return sys.prefix if os.path.samefile(env, sys.prefix) else None
    except OSError:
        return None


def venv_dir():
    return os.path.join(repo(), ".venv-%d.%d" % tuple(sys.version_info[:2]))


def venv_python(venv):
    if os.name == "nt":
        return os.path.join(str(venv), "Scripts", "python.exe")
    return os.path.join(str(venv), "bin", "python")


def shown(path):
    path = str(path)
    return os.path.relpath(path, repo()) if path.startswith(repo() + os.sep) else path


def name(path):
    return os.path.basename(str(path))


def has_ensurepip():
    import importlib
    import importlib.util
    importlib.invalidate_caches()
    return importlib.util.find_spec("ensurepip") is not None


def apt_install_venv():
    """As root on Debian/Ubuntu: install the venv package for this Python. True if it worked."""
    if os.name == "nt" or os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    package = "python%d.%d-venv" % tuple(sys.version_info[:2])
    say("%s: installing %s with apt-get (Python's venv module is missing)" % (NAME, package))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", package]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    if subprocess.call(install, **quiet) != 0:  # a fresh container has no package lists yet
        if subprocess.call(["apt-get", "update", "-qq"], **quiet) != 0 or subprocess.call(install, **quiet) != 0:
            return False
    return has_ensurepip()


def create_venv(venv):
    if not has_ensurepip() and not apt_install_venv():
        fail(NO_VENV_MSG)
    cmd = [sys.executable, "-m", "venv", "--clear", str(venv)]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    if result.returncode != 0:
        shutil.rmtree(str(venv), ignore_errors=True)  # a venv without pip would only fail later, less clearly
        if "ensurepip" in (result.stdout or ""):  # Debian's python3 without python3-venv says so
            fail(NO_VENV_MSG)
        fail("%s\n%s: could not create the venv %s (%s -m venv): the output above says why"
             % ((result.stdout or "").rstrip(), NAME, venv, sys.executable))


def runs(python):
    """Is this venv's python there and able to start (its base interpreter may have been removed)?"""
    if not os.path.exists(str(python)):
        return False
    try:
        return subprocess.call([str(python), "-c", ""], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0
    except OSError:
        return False


def digest(files):
    lines = []
    for f in files:
        with open(str(f), "rb") as fh:
            lines.append("%s %s\n" % (name(f), hashlib.sha256(fh.read()).hexdigest()))
    return "".join(lines)


def pip_install(python, files, where):
    say("%s: installing %s into %s (pip; the first time takes a minute or two)"
        % (NAME, " and ".join(name(f) for f in files), where))
    cmd = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for f in files:
        cmd += ["-r", str(f)]
    if subprocess.call(cmd) != 0:
        fail("%s: pip could not install %s into %s: its output above says why"
             % (NAME, ", ".join(name(f) for f in files), where))


def ensure_venv(files, refresh=False):
    """The project venv for this Python (created if missing or broken), with `files` installed when they
    changed since the last install (always with refresh); its python."""
    venv = venv_dir()
    python = venv_python(venv)
    stamp = os.path.join(venv, STAMP)
    if not runs(python):
        create_venv(venv)
    want = digest(files)
    have = ""
    if os.path.exists(stamp):
        with open(stamp) as fh:
            have = fh.read()
    if refresh or not set(want.splitlines()) <= set(have.splitlines()):
        pip_install(python, files, shown(venv))
        kept = [line for line in have.splitlines() if line.split(" ")[0] not in [name(f) for f in files]]
        with open(stamp, "w") as fh:
            fh.write("".join(line + "\n" for line in kept) + want)
    return python


def reexec(python, argv, flag=True):
    """Run argv with `python` instead of this interpreter: in place on POSIX; on Windows (where os.exec*
    detaches the console) as a child whose exit code becomes ours. flag: mark the new process as re-executed."""
    cmd = [str(python)] + [str(a) for a in argv]
    env = dict(os.environ)
    if flag:
        env[REEXEC_FLAG] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name != "nt":
        os.execve(str(python), cmd, env)
    proc = subprocess.Popen(cmd, env=env)
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:  # Ctrl-C reached the child too: it decides how to stop, we wait for it
            continue
    raise SystemExit(code)


def ensure_runtime(script, argv):
    """Called first by run_mitm.py; returns only when this interpreter can run coze-mitm."""
    check_python()
    missing = missing_modules()
    if not missing:
        return
    requirements = os.path.join(repo(), "requirements.txt")
    if os.environ.get(REEXEC_FLAG):
        fail("%s: %s still lacks %s after installing requirements.txt: delete %s and run again"
             % (NAME, sys.prefix, ", ".join(missing), sys.prefix))
    venv = active_venv()
    if venv is not None:  # the user's own venv: theirs to use, so the requirements go there
        pip_install(sys.executable, [requirements], "the active venv %s" % venv)
        python = sys.executable
    else:
        python = ensure_venv([requirements])
    reexec(python, [script] + list(argv))


if __name__ == "__main__":  # python launcher/bootstrap.py: the version check and the venv, nothing started
    check_python()
    say(ensure_venv([os.path.join(repo(), "requirements.txt")]))
