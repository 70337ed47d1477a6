"""coze-mitm: Coze Web Chat SDK on any page, no credential in the page.

    mitmdump -s addons/coze.py --set coze_origins=https://example.org
    mitmweb  -s addons/coze.py ...

One addon object is registered with mitmproxy: this module, whose hooks are the bundle's (bundle.py);
each hook calls the parts that implement it, in this order:
  cycles     mitmproxy's per-message type check without reference cycles; start-up objects out of the
             garbage collector's way, so that the cycles flows leave are freed within minutes
  heap_trim  memory the C allocator holds free given back to the system once a minute (its own thread)
  settings   the coze_* options, validated once; shared state (broker, origins, stats)
  demo       http://coze.mitm/demo and the sandbox.coze.mitm name, only with coze_demo (run_mitm.py --demo)
  status     http://coze.mitm/ pages, answered locally
  cors       preflights to the Coze API from allowed origins answered locally; CORS headers set (once)
  auth       the user tag swapped for that user's Coze token (or refused with a JSON answer)
  csp        pages in coze_origins: their Content-Security-Policy widened by the Chat SDK's sources only
  streaming  text/event-stream responses streamed chunk by chunk
  accounting usage per user (chats, Coze tokens) read from the answers as they pass; daily budgets
  flowlog    with coze_quiet (run_mitm.py): one log line per flow coze-mitm acted on, no connection chatter;
             otherwise a line for refusals, token retries and errors only
  quiet_exit no asyncio traceback when the proxy stops with clients still connected
"""

from accounting import Accounting
from auth import Auth
from bundle import Bundle
from cors import Cors
from cycles import Cycles
from csp import Csp
from demo import Demo
from flowlog import FlowLog
from heap_trim import HeapTrim
from quiet_exit import QuietExit
from settings import CozeSettings
from status import StatusPages
from streaming import Streaming

settings = CozeSettings()
settings.accounting = Accounting()  # auth asks it about budgets, status shows its usage

bundle = Bundle(
    Cycles(),
    HeapTrim(),
    settings,
    Demo(settings),
    StatusPages(settings),
    Cors(settings),
    Auth(settings),
    Csp(settings),
    Streaming(),
    settings.accounting,  # after streaming: it turns stream=True into a reader that passes chunks unchanged
    FlowLog(),
    QuietExit(),
)
# The module is the addon: mitmproxy walks a script's `addons` list on every event of every flow, and
# that level cost ~20-30 us per proxied request in the benchmark. So the hooks are the module's own
# (and its `addons` is empty).
globals().update(bundle.script_namespace())
