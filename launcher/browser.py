"""--browser [NAME]: the user's own Chrome, Chromium, Edge, Brave or Firefox, started ready for coze-mitm.

A throwaway profile under the confdir (browser-profiles/), removed when the browser closes and when coze-mitm stops:
* the PAC URL of this proxy (Chromium family: --proxy-pac-url; Firefox: user.js), so only what coze-mitm must see
  goes through it;
* the confdir's CA trusted in that profile only, never in a system or user trust store:
  - Firefox: `certutil -A` into the new profile's cert9.db before its first start (name constraints enforced);
  - Chromium family on Linux: a private HOME whose NSS db ($HOME/.pki/nssdb) trusts it (name constraints enforced);
  - Chromium family on macOS and Windows (they use the OS store), or on Linux without NSS's certutil:
    --ignore-certificate-errors-spki-list with the signer's key (mitmproxy signs every certificate with that key):
    the browser then accepts that key for any name, so the name constraints are not enforced there; said at start;
* no first-run screens; it opens the demo page, the first --origins page, or the status page.
The browser starts once the proxy listens (its PAC is fetched from the proxy at once).

For automation (the tests): COZE_MITM_BROWSER_ARGS adds arguments to the browser's command line (shlex syntax, e.g.
"--headless"), COZE_MITM_BROWSER_PREFS (a JSON object) adds Firefox prefs to user.js.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ntpath
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from launcher.common import DEMO_URL, EXIT_USAGE, PROG, STATUS_URL, Fail, say, tell, wrap

NAMES = ("chrome", "chromium", "edge", "brave", "firefox")  # the order --browser without NAME tries them
ARGS_ENV = "COZE_MITM_BROWSER_ARGS"
PREFS_ENV = "COZE_MITM_BROWSER_PREFS"
PROFILES_DIR = "browser-profiles"
CA_NICKNAME = "coze-mitm scoped CA"
STOP_WAIT = 10  # seconds a browser gets to close by itself when coze-mitm stops


@dataclass(frozen=True)
class Browser:
    name: str  # one of NAMES
    path: str

    @property
    def firefox(self) -> bool:
        return self.name == "firefox"


def _linux_commands(name: str) -> list[str]:
    return {
        "chrome": ["google-chrome", "google-chrome-stable", "google-chrome-beta"],
        "chromium": ["chromium", "chromium-browser", "/snap/bin/chromium"],
        "edge": ["microsoft-edge", "microsoft-edge-stable", "microsoft-edge-beta"],
        "brave": ["brave-browser", "brave", "brave-browser-stable"],
        "firefox": ["firefox", "firefox-esr", "/snap/bin/firefox"],
    }[name]


def _mac_paths(name: str) -> list[str]:
    app = {"chrome": "Google Chrome.app/Contents/MacOS/Google Chrome", "chromium": "Chromium.app/Contents/MacOS/Chromium",
           "edge": "Microsoft Edge.app/Contents/MacOS/Microsoft Edge",
           "brave": "Brave Browser.app/Contents/MacOS/Brave Browser", "firefox": "Firefox.app/Contents/MacOS/firefox"}[name]
    return [f"/Applications/{app}", str(Path.home() / "Applications" / app)]


def _windows_paths(name: str) -> list[str]:
    tail = {"chrome": r"Google\Chrome\Application\chrome.exe", "chromium": r"Chromium\Application\chrome.exe",
            "edge": r"Microsoft\Edge\Application\msedge.exe", "brave": r"BraveSoftware\Brave-Browser\Application\brave.exe",
            "firefox": r"Mozilla Firefox\firefox.exe"}[name]
    roots = [os.environ.get(v) for v in ("ProgramFiles", "ProgramFiles(x86)", "LOCALAPPDATA")]
    return [ntpath.join(root, tail) for root in roots if root]


def candidates(name: str, platform: str | None = None) -> list[str]:
    """Where NAME is looked for on this platform (sys.platform; no registry: the installers' default places, PATH)."""
    platform = platform or sys.platform
    if platform == "darwin":
        return _mac_paths(name)
    if platform == "win32":
        return _windows_paths(name)
    return _linux_commands(name)


def _resolve(candidate: str) -> str | None:
    if os.path.isabs(candidate):
        return candidate if os.path.isfile(candidate) and os.access(candidate, os.X_OK) else None
    return shutil.which(candidate)


def find(name: str | None) -> Browser:
    """The browser --browser [NAME] means, or a Fail naming where it was looked for."""
    names = [name] if name else list(NAMES)
    for n in names:
        for candidate in candidates(n):
            path = _resolve(candidate)
            if path:
                return Browser(n, path)
    looked = ", ".join(c for n in names for c in candidates(n))
    what = f"{name} was not found" if name else "none of Chrome, Chromium, Edge, Brave and Firefox was found"
    raise Fail(f"--browser: {what} (looked for {looked}); install one, or name another: "
               f"--browser {'|'.join(NAMES)}", EXIT_USAGE)


def start_url(pl) -> str:
    """What the browser opens: the demo page, else the first --origins page, else the status page."""
    if pl.args.demo:
        return DEMO_URL
    for entry in pl.args.origins or []:
        first = next((o.strip() for o in entry.split(",") if o.strip()), None)
        if first:
            return first + "/"
    return STATUS_URL


def confdir_of(pl) -> Path:
    """The confdir mitmproxy runs with (launcher/ca.py added it to the plan; mitmproxy's default otherwise)."""
    value = pl.option("confdir") or dict(pl.sets).get("confdir") or "~/.mitmproxy"
    return Path(value).expanduser()


def spki_hash(cert_pem: bytes) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of the first certificate in a PEM file: what
    --ignore-certificate-errors-spki-list takes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificates(cert_pem)[0]
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def nss_certutil(platform: str | None = None) -> str | None:
    """NSS's certutil (Debian: libnss3-tools; macOS: brew install nss). Never on Windows: certutil.exe there is
    Microsoft's tool of the same name, which writes to the Windows store."""
    if (platform or sys.platform) == "win32":
        return None
    return shutil.which("certutil")


def _certutil(certutil: str, db: Path, ca_file: Path) -> None:
    """A new, empty-password NSS db in `db` that trusts `ca_file` to identify web sites, and nothing else added."""
    db.mkdir(parents=True, exist_ok=True)
    for cmd in ([certutil, "-N", "-d", f"sql:{db}", "--empty-password"],
                [certutil, "-A", "-d", f"sql:{db}", "-n", CA_NICKNAME, "-t", "C,,", "-i", str(ca_file)]):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError) as e:
            raise Fail(f"--browser: {Path(certutil).name} failed ({e})") from None
        if done.returncode != 0:
            raise Fail(f"--browser: {' '.join(cmd[:2])} failed: {(done.stderr or done.stdout).strip()[:300]}")


FIREFOX_PREFS = {
    "network.proxy.type": 2,  # automatic proxy configuration URL
    "browser.shell.checkDefaultBrowser": False,
    "browser.aboutwelcome.enabled": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "startup.homepage_welcome_url": "",
    "startup.homepage_welcome_url.additional": "",
    "browser.startup.firstrunSkipsHomepage": True,
    "trailhead.firstrun.didSeeAboutWelcome": True,
    "datareporting.policy.dataSubmissionPolicyBypassNotification": True,
    "datareporting.policy.firstRunURL": "",
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "browser.tabs.warnOnClose": False,
    "security.enterprise_roots.enabled": False,  # only this profile's roots (and Mozilla's), not the OS store's
}


def _prefs_js(prefs: dict) -> str:
    return "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in prefs.items())


def extra_args() -> list[str]:
    try:
        return shlex.split(os.environ.get(ARGS_ENV, ""), posix=os.name != "nt")
    except ValueError as e:
        raise Fail(f"{ARGS_ENV}: {e}", EXIT_USAGE) from None


def extra_prefs() -> dict:
    text = os.environ.get(PREFS_ENV, "").strip()
    if not text:
        return {}
    try:
        prefs = json.loads(text)
    except ValueError as e:
        raise Fail(f"{PREFS_ENV}: not JSON ({e})", EXIT_USAGE) from None
    if not isinstance(prefs, dict):
        raise Fail(f"{PREFS_ENV}: want a JSON object of Firefox prefs", EXIT_USAGE)
    return prefs


def remove_stale_profiles(base: Path) -> None:
    """Profiles left behind by a coze-mitm that was killed (their owner pid is gone): removed."""
    try:
        entries = list(base.iterdir())
    except OSError:
        return
    for entry in entries:
        pid = entry.name.rsplit("-", 2)[-2] if entry.name.count("-") >= 2 else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # no portable check without a dependency: a stale profile stays until removed by hand
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class Session:
    """One started browser and its profile. stop() is safe to call any time, more than once."""

    def __init__(self, browser: Browser, profile: Path, cmd: list[str], env: dict):
        self.browser = browser
        self.profile = profile
        self.cmd = cmd
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.tail: deque[str] = deque(maxlen=8)  # the browser's last output lines, shown if it fails
        self._stopping = False
        self._removed = threading.Event()

    def start(self) -> "Session":
        try:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, errors="replace")
        except OSError as e:
            self._remove()
            raise Fail(f"--browser: cannot start {self.browser.path} ({e.strerror or e})") from None
        threading.Thread(target=self._watch, name="coze-browser", daemon=True).start()
        return self

    def _watch(self) -> None:
        for line in self.proc.stdout:  # drained, so a chatty browser never blocks on a full pipe
            self.tail.append(line.rstrip())
        rc = self.proc.wait()
        self._remove()
        if self._stopping:
            return
        if rc != 0:
            detail = " | ".join(self.tail)
            say(wrap(f"{PROG}: warning: {self.browser.name} stopped with exit code {rc}"
                     + (f": {detail}" if detail else "") + "; the proxy keeps running (Ctrl-C stops it)"), err=True)
        else:
            say(wrap(f"{PROG}: {self.browser.name} closed; its profile is removed. The proxy keeps running "
                     "(Ctrl-C stops it)."))

    def _remove(self) -> None:
        for _ in range(20):  # Windows keeps files open a moment after the process ended
            shutil.rmtree(self.profile, ignore_errors=True)
            if not self.profile.exists():
                break
            time.sleep(0.25)
        self._removed.set()

    def stop(self) -> None:
        """Close the browser (if it still runs) and remove its profile."""
        self._stopping = True
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is None:
            self._remove()
        else:
            self._removed.wait(30)


def prepare(pl, browser: Browser, proxy: str) -> Session:
    """The profile and command line for `browser`, for the proxy at host:port `proxy` (not started yet)."""
    confdir = confdir_of(pl)
    base = confdir / PROFILES_DIR
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    remove_stale_profiles(base)
    profile = base / f"{browser.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    profile.mkdir(mode=0o700)
    pac = f"http://{proxy}/proxy.pac"
    url = start_url(pl)
    root, signer = confdir / "mitmproxy-ca-cert.pem", confdir / "mitmproxy-ca.pem"
    # None of coze-mitm's own variables (the PAT, proxy logins, the upstream proxy's and Redis' passwords) reaches
    # the browser or anything it starts; the test hooks below are read here, not passed on either.
    env = {name: value for name, value in os.environ.items() if not name.upper().startswith("COZE_")}
    certutil = nss_certutil()
    if pl.args.intercept_all and pl.option("confdir") is None:
        tell("note", f"--browser with --intercept-all: the profile trusts mitmproxy's own CA ({root}), which can vouch "
                     "for every site; only this throwaway profile does")
    try:
        if browser.firefox:
            if certutil and root.is_file():
                _certutil(certutil, profile, root)
            else:
                tell("warning", "--browser firefox: no NSS certutil here (Debian: apt install libnss3-tools; macOS: "
                                "brew install nss), so the profile does not trust the proxy's CA: https pages of "
                                "coze_origins will show certificate errors there (the demo is plain http)")
            prefs = {**FIREFOX_PREFS, "network.proxy.autoconfig_url": pac, **extra_prefs()}
            (profile / "user.js").write_text(_prefs_js(prefs), encoding="utf-8")
            cmd = [browser.path, "-profile", str(profile), "-no-remote", "-new-instance", *extra_args(), url]
            return Session(browser, profile, cmd, env)
        if hasattr(os, "geteuid") and os.geteuid() == 0 and "--no-sandbox" not in extra_args():
            tell("note", f"--browser {browser.name}: running as root, which Chromium-family browsers refuse without "
                         f"--no-sandbox; start coze-mitm as your own user (or, knowing it turns off the browser's "
                         f"sandbox, {ARGS_ENV}=--no-sandbox)")
        data = profile / "data"
        args = [f"--user-data-dir={data}", f"--proxy-pac-url={pac}", "--no-first-run", "--no-default-browser-check",
                "--disable-search-engine-choice-screen", "--disable-sync"]
        if sys.platform.startswith("linux") and certutil and root.is_file():
            home = profile / "home"
            _certutil(certutil, home / ".pki" / "nssdb", root)  # Chromium on Linux reads $HOME/.pki/nssdb
            if "XAUTHORITY" not in env and (Path.home() / ".Xauthority").exists():
                env["XAUTHORITY"] = str(Path.home() / ".Xauthority")  # the X server's cookie, found via HOME
            env["HOME"] = str(home)
        elif signer.is_file():
            why = ("Chromium-family browsers on this system use the OS trust store" if not sys.platform.startswith("linux")
                   else "there is no NSS certutil here (Debian: apt install libnss3-tools)")
            tell("note", f"--browser {browser.name}: {why}, so this profile accepts the proxy's certificates by their "
                         "key (--ignore-certificate-errors-spki-list): the CA's name constraints are NOT enforced in "
                         "it (any site the proxy intercepted would be accepted); nothing is added to a trust store")
            args += [f"--ignore-certificate-errors-spki-list={spki_hash(signer.read_bytes())}", "--test-type"]
        cmd = [browser.path, *args, *extra_args(), url]
        return Session(browser, profile, cmd, env)
    except BaseException:
        shutil.rmtree(profile, ignore_errors=True)
        raise


def launch(pl, browser: Browser, host: str, port: int) -> Session:
    """Start `browser` for the proxy listening at host:port (called once it listens)."""
    if host.strip("[]") in ("*", "", "0.0.0.0", "::"):
        host = "127.0.0.1"  # every interface: this machine's browser reaches it on loopback
    proxy = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    session = prepare(pl, browser, proxy).start()
    say(wrap(f"{PROG}: started {browser.name} ({browser.path}) with a throwaway profile ({session.profile}) that "
             f"uses the PAC {f'http://{proxy}/proxy.pac'} and opens {start_url(pl)}; the profile is removed when "
             "the browser closes or coze-mitm stops."))
    return session
