"""run_mitm.py where users tripped (issue 25 items 4 and 5, issue 26 item 4), as a user runs it: a subprocess,
its output, its exit code, the files it leaves.

* the demo makes no CA in the user's confdir (nothing to trust now, nothing to remove later) and says nothing
  about one;
* a confdir coze-mitm owns that others can read (0755) is made 0700, in one line; the usage file is 0600;
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.test_run_mitm import Launcher, clean_env

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes (Windows: docs/portability.md)")


def without_confdir(launcher: Launcher) -> Launcher:
    """The Launcher helper names a confdir; a newcomer names none (the default under $HOME is then used)."""
    i = launcher.args.index("--set")
    assert launcher.args[i + 1].startswith("confdir=")
    del launcher.args[i:i + 2]
    return launcher


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
