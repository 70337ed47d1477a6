"""coze-mitm: Coze's chat SDKs on any page, no credential in the page.

    mitmdump -s addons/coze.py --set coze_origins=https://example.org
    mitmweb  -s addons/coze.py ...

The parts, in the order every request meets them (the code: addons/coze_mitm/parts/):
  web_guard   refuses to run inside mitmweb < 11.1.2 (CVE-2025-23217: its web API has no authentication)
  settings    the coze_* options (declared in coze_mitm/options.py), validated; the token broker, origins;
              how coze-mitm's own requests leave (mitmproxy's upstream mode and certificate options)
  refused_origins
              page origins outside coze_origins that asked for Coze (for the log and the status page)
  leaf_names  with a name-constrained CA (run_mitm.py's): leaves carry only names the CA may vouch for
  tuning      opt-in process tuning (coze_tune_process; run_mitm.py turns it on), off by default
  login       with mitmproxy's proxyauth: the login's password (and Proxy-Authorization) removed from the flow
  local_gate  clients on other machines never reach this host or its link (nor coze.mitm without
              coze_allow_remote); nobody makes the proxy connect to itself
  demo        http://coze.mitm/demo and the sandbox.coze.mitm name, only with coze_demo (run_mitm.py --demo)
  pac         the PAC file (http://127.0.0.1:8080/proxy.pac, http://coze.mitm/proxy.pac), answered locally
  status      http://coze.mitm/ pages, answered locally
  direct_api  requests sent straight to the proxy's own address (http://127.0.0.1:8080/v3/chat): re-addressed to
              the Coze API (WebSocket upgrades to its ws host), then on through every part below like any other
  cors        preflights to the Coze API from allowed origins answered locally; CORS headers set (once)
  auth        the user tag swapped for that user's Coze token (or refused with a JSON answer)
  csp         pages in coze_origins: their Content-Security-Policy widened by the Chat SDK's sources only
  inject      with coze_inject (run_mitm.py --browser): the userscript's loader added to those pages' HTML
  streaming   text/event-stream responses streamed chunk by chunk
  accounting  usage per user (chats, Coze tokens) read from the answers as they pass; daily budgets
  flowlog     with coze_quiet (run_mitm.py): one log line per flow coze-mitm acted on
  quiet_exit  no asyncio traceback when the proxy stops with clients still connected
  lifecycle   last: once every part ran `running`, the proxy is started (a bad value is then rolled back); with
              run_mitm.py, the line it waits for

mitmproxy sees one addon object, the Bundle (coze_mitm/bundle.py: each hook calls the parts that have it, and are
in use; a request to the Coze API skips demo, pac, status, direct_api, csp and inject, which never act on it).

A script reload (mitmproxy reloads this file when it changes) runs the package's current code: the
coze_mitm modules are imported afresh, except coze_mitm.process, which remembers what it did to the process.
"""

import sys

# Python keeps imported modules across a reload of this script: forget the package's (a first load finds
# none of them loaded by us), so that an edit to any module takes effect when this file is touched.
if getattr(sys.modules.get("coze_mitm"), "loaded_by_script", False):
    for _name in [n for n in sys.modules if n == "coze_mitm" or n.startswith("coze_mitm.")]:
        if not _name.startswith("coze_mitm.process"):
            del sys.modules[_name]

import coze_mitm  # noqa: E402
from coze_mitm.core.stats import Stats  # noqa: E402
from coze_mitm.bundle import Bundle  # noqa: E402
from coze_mitm.parts.accounting import Accounting  # noqa: E402
from coze_mitm.parts.auth import Auth  # noqa: E402
from coze_mitm.parts.cors import Cors  # noqa: E402
from coze_mitm.parts.csp import Csp  # noqa: E402
from coze_mitm.parts.demo import Demo  # noqa: E402
from coze_mitm.parts.direct_api import DirectApi  # noqa: E402
from coze_mitm.parts.flowlog import FlowLog  # noqa: E402
from coze_mitm.parts.inject import Inject  # noqa: E402
from coze_mitm.parts.leaf_names import LeafNames  # noqa: E402
from coze_mitm.parts.lifecycle import Lifecycle  # noqa: E402
from coze_mitm.parts.local_gate import LocalGate  # noqa: E402
from coze_mitm.parts.login import Login  # noqa: E402
from coze_mitm.parts.pac import Pac  # noqa: E402
from coze_mitm.parts.quiet_exit import QuietExit  # noqa: E402
from coze_mitm.parts.refused_origins import RefusedOriginsLog  # noqa: E402
from coze_mitm.parts.settings import CozeSettings  # noqa: E402
from coze_mitm.parts.status import StatusPages  # noqa: E402
from coze_mitm.parts.streaming import Streaming  # noqa: E402
from coze_mitm.parts.web_guard import MitmwebGuard  # noqa: E402
from coze_mitm.process.tuning import ProcessTuning  # noqa: E402

coze_mitm.loaded_by_script = True

# What several parts share, each made here and handed to the parts that use it (no part reaches into another):
lifecycle = Lifecycle()  # the parts that refuse a bad value ask it whether the proxy runs yet
stats = Stats()  # the counters the parts count into and the status page shows
refused = RefusedOriginsLog()  # cors, auth and direct_api note page origins they refuse; status shows them
settings = CozeSettings(lifecycle)
accounting = Accounting(settings, stats=stats)  # auth asks it about budgets
login = Login(lifecycle)  # auth asks it who a proxy login is (LDAP: the directory entry)
# inject adds the userscript it serves to pages; it shows the accounting part's usage (`shown`), not its book
status = StatusPages(settings, accounting.shown, refused, lifecycle, stats)

bundle = Bundle(
    MitmwebGuard(),
    settings,
    refused,
    LeafNames(),  # its only hook, tls_start_client, meets no flow
    ProcessTuning(),
    login,
    LocalGate(settings),  # before demo and status: their pages are this host too
    Demo(settings),
    Pac(settings),
    status,
    # after pac (its /proxy.pac on this address), before cors/auth (they read the new host)
    DirectApi(settings, refused, stats),
    Cors(settings, refused, stats),
    Auth(settings, accounting, login, refused, stats),
    Csp(settings, lifecycle, stats),
    Inject(settings, status),  # after csp: adds its hash to the policy csp widened
    Streaming(),
    accounting,  # after streaming: it turns stream=True into a reader that passes chunks unchanged
    FlowLog(),
    QuietExit(),
    lifecycle,  # last: `started` once every part before it ran `running`
    coze_api_only=settings.is_coze_api_only,  # Coze API requests skip the parts marked acts_on_coze_api = False
)

addons = [bundle]
