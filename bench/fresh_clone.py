"""From a fresh clone to a streaming reply on a page of the developer's own (http://localhost:<port>), with no browser
setting at all: the steps a newcomer runs, each timed.

    python bench/fresh_clone.py [--repo PATH_OR_URL] [--python python3]

1. git clone the repository into a temporary folder;
2. `python3 -m venv .venv` and `.venv/bin/pip install -r requirements.txt` (whatever pip's index and cache give here);
3. `.venv/bin/python run_mitm.py --demo --port 0 --origins http://localhost:<page port>`: the proxy with the local
   SANDBOX (no Coze account), until it listens;
4. the developer's page (PAGE below: plain fetch, the proxy's address as the API base, `Bearer user:<id>`) served by
   `python3 -m http.server`, opened in headless Chromium with no proxy setting and no CA; until its first streamed
   delta is on the page, and until the whole reply is.
Typing and reading time are not counted. Prints one line per step and the total (for docs/clients.md).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.browser import find_chromium  # noqa: E402

# The page a developer writes (README's few lines, as plain fetch so it needs no bundler).
PAGE = """<!doctype html><meta charset="utf-8"><title>my page</title><pre id="out"></pre>
<script>
const API = new URLSearchParams(location.search).get('api');  // http://127.0.0.1:8080
(async () => {
  const r = await fetch(API + '/v3/chat', {method: 'POST',
    headers: {'Authorization': 'Bearer user:me-0001', 'Content-Type': 'application/json'},
    body: JSON.stringify({bot_id: '7000000000000000001', user_id: 'me-0001', stream: true,
      additional_messages: [{role: 'user', content: 'hello from my page', content_type: 'text'}]})});
  const reader = r.body.getReader(), dec = new TextDecoder();
  for (let buf = ''; ;) {
    const {done, value} = await reader.read(); if (done) break;
    buf += dec.decode(value, {stream: true});
    for (let i; (i = buf.indexOf('\\n\\n')) >= 0; buf = buf.slice(i + 2)) {
      const m = buf.slice(0, i).match(/^event:conversation\\.message\\.delta\\ndata:(.*)$/s);
      if (m) document.getElementById('out').textContent += JSON.parse(m[1]).content;
    }
  }
  document.title = 'done';
})();
</script>
"""


def run(cmd, cwd, what: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{what} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=str(REPO), help="what to clone (default: this repository)")
    p.add_argument("--python", default="python3", help="the Python a newcomer has (default: python3)")
    args = p.parse_args()
    chromium = find_chromium()
    if chromium is None:
        sys.exit("Chromium is not installed")
    from playwright.sync_api import sync_playwright

    steps = []
    with tempfile.TemporaryDirectory(prefix="coze-fresh-") as tmp:
        tmp = Path(tmp)
        home = tmp / "home"
        home.mkdir()
        clone = tmp / "coze-mitm"
        steps.append(("git clone", run(["git", "clone", "-q", args.repo, str(clone)], tmp, "git clone")))
        t = run([args.python, "-m", "venv", ".venv"], clone, "venv")
        t += run([str(clone / ".venv" / "bin" / "pip"), "install", "-q", "-r", "requirements.txt"], clone, "pip install")
        steps.append(("venv + pip install -r requirements.txt", t))

        site = tmp / "site"
        site.mkdir()
        (site / "index.html").write_text(PAGE)
        web = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"], cwd=site,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        page_port = int(re.search(r"port (\d+)", web.stdout.readline()).group(1))
        threading.Thread(target=lambda: [None for _ in web.stdout], daemon=True).start()
        t0 = time.perf_counter()
        proxy = subprocess.Popen([str(clone / ".venv" / "bin" / "python"), "run_mitm.py", "--demo", "--port", "0",
                                  "--origins", f"http://localhost:{page_port}"], cwd=clone, env={"HOME": str(home),
                                  "PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            port = None
            for line in proxy.stdout:
                m = re.search(r"proxy listening at \S*?:(\d+)", line)
                if m:
                    port = int(m.group(1))
                    break
            if port is None:
                sys.exit("run_mitm.py --demo did not start")
            threading.Thread(target=lambda: [None for _ in proxy.stdout], daemon=True).start()
            steps.append(("run_mitm.py --demo until it listens", time.perf_counter() - t0))
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                             args=["--no-sandbox", "--no-proxy-server", "--no-first-run",
                                                   "--disable-background-networking"])
                page = browser.new_page()
                t0 = time.perf_counter()
                page.goto(f"http://localhost:{page_port}/?api=http://127.0.0.1:{port}")
                page.wait_for_function("() => document.getElementById('out').textContent.length > 0", timeout=30_000)
                first = time.perf_counter() - t0
                page.wait_for_function("() => document.title === 'done'", timeout=30_000)
                whole = time.perf_counter() - t0
                text = page.inner_text("#out")
                browser.close()
            if not text.startswith("Sandbox reply to: hello from my page"):
                sys.exit(f"unexpected reply: {text!r}")
            steps.append(("page open -> first streamed piece on the page", first))
            steps.append(("page open -> whole reply", whole))
        finally:
            proxy.terminate()
            web.terminate()
            proxy.wait(10)
            web.wait(10)
    for name, seconds in steps:
        print(f"{name:50s} {seconds:7.2f} s")
    print(f"{'total (to the whole reply)':50s} {sum(s for _, s in steps if 'first' not in _):7.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
