#!/usr/bin/env python3
"""Start coze-mitm: mitmdump (or mitmweb) with addons/coze.py, set up so that it just works.

    python3 run_mitm.py --demo                                 # no account: local sandbox + http://coze.mitm/demo
    python3 run_mitm.py --check                                # does Coze accept config/coze_oauth_config.json?
    python3 run_mitm.py --origins https://example.org --bot-id 7xxxxxxxxxxxx
    COZE_PAT=pat_... python3 run_mitm.py --origins https://example.org         # PAT mode
    python3 run_mitm.py --web ...                              # mitmweb instead of mitmdump (mitmproxy 12)
    python3 run_mitm.py --host 0.0.0.0 --allow-remote --proxyauth @/path/to/htpasswd  # a team's proxy
(Windows: `py run_mitm.py ...`.)

mitmproxy runs as a child process of this interpreter; its console output is passed through, one line
per request coze-mitm acted on (-v: mitmproxy's own detail). TLS is intercepted only for the hosts
coze-mitm must see (mitmproxy's allow_hosts); all other traffic is tunnelled untouched. An error is one
message; the exit code says what went wrong. The parts live in launcher/.

First of all launcher/bootstrap.py (standard library only, and parseable by any Python): an older Python than
3.11 gets one line saying so; an interpreter that lacks the requirements gets the project venv (.venv-3.X/,
created and filled with requirements.txt on the first run) and this script is run again with its python.
This file stays parseable by old Pythons up to that call (no annotations, no __future__ import).
"""

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launcher import bootstrap  # noqa: E402

if __name__ == "__main__":
    bootstrap.ensure_runtime(os.path.abspath(__file__), sys.argv[1:])
else:
    bootstrap.check_python()

import signal  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent
for _path in (str(REPO), str(REPO / "addons")):  # addons/ first: its modules import each other as siblings
    if _path not in sys.path:
        sys.path.insert(0, _path)

from launcher.args import check_args, make_parser  # noqa: E402
from launcher.ca import prepare as prepare_ca  # noqa: E402
from launcher.check import run_check  # noqa: E402
from launcher.common import EXIT_FAILED, EXIT_OK, Fail, Stop, tell  # noqa: E402
from launcher.plan import plan  # noqa: E402
from launcher.runner import require_safe_mitmweb, run_demo, run_proxy  # noqa: E402


def main(argv=None):  # argv: list[str] | None; -> the exit code
    try:
        args = make_parser().parse_args(argv)  # 1. the command line, and what it alone shows to be wrong
        check_args(args)
        if args.check:  # 2. --check: the config, and one real token exchange; no proxy
            return run_check(args)
        if args.web:  # 3. never a mitmweb whose API anyone can use
            require_safe_mitmweb()
        pl = plan(args)  # 4. everything that can be checked offline: PAT, config, origins, options
        prepare_ca(pl)  # 5. the CA scoped to what it intercepts (launcher/ca.py), in its own confdir
        return run_demo(pl) if args.demo else run_proxy(pl)  # 6. mitmproxy, until Ctrl-C
    except Fail as e:
        tell("error", e.msg)
        return e.code
    except (KeyboardInterrupt, Stop):
        return EXIT_OK
    except ImportError as e:
        tell("error", "%s (install the dependencies: pip install -r requirements.txt)" % e)
        return EXIT_FAILED


def _terminate(signum, frame):
    raise Stop()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(main())
