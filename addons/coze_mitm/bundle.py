"""The one addon mitmproxy sees: it hands each event to the parts that handle it, in the bundle's order.

mitmproxy calls every hook of every registered addon object for every flow (and an `update` event
after each), walking its whole addon tree each time. With the parts registered one by one that walk
was a measurable share of a proxied request; here mitmproxy sees one object (addons/coze.py's
`addons = [bundle]`), and each of its hooks calls only the parts that implement that hook, found once
at start-up. Only the hooks some part has become attributes: mitmproxy asks for the rest and finds
nothing (no `add_log`: mitmproxy warns about any addon that merely has that name).

What mitmproxy did per addon, done here per part:
* lifecycle hooks (load, configure, running, done) go to every part that has them, in order; an
  exception goes to mitmproxy as before (a bad option stops the start-up as it did).
* every other hook (requestheaders, request, ..., websocket_end, tls_clienthello, error) goes to the
  parts that implement it, in order, each part's own guards deciding whether the flow is its business.
  A later part runs even when an earlier one set flow.response, as in mitmproxy.
* a hook may return an awaitable (auth's `request` does when a token must be minted): it is awaited
  before the next part runs, and only then does the hook return one itself: the common path stays
  synchronous, with no coroutine per flow.
* an exception in one part is logged ("Addon error", with the traceback) and the next parts still run, as
  mitmproxy goes on with the next addon: a part whose job is to refuse answers before anything that can raise.

* Two things mitmproxy cannot know are asked once instead of by every part's own guard (`python
  bench/run.py --only latency`: every call is Python code on every request, in docs/benchmarks.md):
  - a part whose `in_use` is false (its option is off: the demo, the page injection, the CSP rewrite)
    gets no event at all; `in_use` is read again after every `configure`.
  - a request addressed to a Coze API origin and to nothing else coze-mitm serves (`coze_api_only`, given
    by the settings) skips the parts marked `acts_on_coze_api = False` (the PAC, the status and demo pages,
    the proxy's own address, the pages' CSP and injection): the Coze API is none of their business, and
    the question is asked again at each flow hook, so a part that re-addresses a flow (the demo, the
    proxy's own address, another addon) hands it on to the right parts.
* mitmproxy finds each part by name (`ctx.master.addons.get("coze-mitm.cors")`) and its @command methods: the
  bundle names its parts, under its own name, when it is loaded and takes the names back when it is done.

The parts keep their hook methods, so each is tested on its own with mitmproxy.test.taddons.
Why one object at all: `python bench/bundle_dispatch.py` (figures in docs/architecture.md).
Never give this object an `addons` attribute: mitmproxy would register every part a second time.
"""

from __future__ import annotations

import inspect
import logging
import types

from mitmproxy import exceptions, hooks
# The modules that define mitmproxy's hooks, so that hooks.all_hooks is complete outside mitmproxy too.
from mitmproxy import addonmanager, eventsequence  # noqa: F401
from mitmproxy.proxy import server_hooks  # noqa: F401

log = logging.getLogger("coze.bundle")

LIFECYCLE = ("load", "configure", "running", "done")
_PASS_THROUGH = (exceptions.AddonHalt, exceptions.OptionsError)  # what mitmproxy's own safecall lets through


def handler_of(part, name: str):
    """The part's handler for hook `name`, or None (a module imported under a hook's name is not one)."""
    func = getattr(part, name, None)
    if func is None or isinstance(func, types.ModuleType) or not callable(func):
        return None
    return func


# The hooks of an HTTP flow, whose request's destination says whether it is for the Coze API alone.
HTTP_FLOW_HOOKS = frozenset({"requestheaders", "request", "responseheaders", "response"})


class Bundle:
    def __init__(self, *parts, name: str = "coze-mitm", coze_api_only=None):
        # mitmproxy refuses a second addon of the same name: another script's bundle names itself
        self.name = name
        self.parts = parts
        # request -> is it addressed to a Coze API origin and to nothing else coze-mitm serves? (the settings')
        self._coze_api_only = coze_api_only
        self._tables: list[_Table] = []
        for hook in hooks.all_hooks:
            handlers = tuple(h for h in (handler_of(p, hook) for p in parts) if h is not None)
            if not handlers:
                continue  # no attribute at all: mitmproxy skips this object for that event
            if hook in LIFECYCLE:
                setattr(self, hook, _lifecycle(handlers))
            elif len(handlers) == 1:
                # One part: mitmproxy's own handling of its exception and awaitable is the same as ours.
                setattr(self, hook, handlers[0])
            else:
                table = _Table(hook, [p for p in parts if handler_of(p, hook) is not None])
                self._tables.append(table)
                narrow = coze_api_only if hook in HTTP_FLOW_HOOKS else None
                setattr(self, hook, table.dispatcher(narrow))
        parts_configure = getattr(self, "configure", None)
        if parts_configure is not None:
            def configure(updated):
                try:
                    return parts_configure(updated)
                finally:
                    self._refresh()  # a part's `in_use` follows its options
            self.configure = configure

        # mitmproxy finds an addon by name (`ctx.master.addons.get("coze-mitm.cors")`) and collects its @command
        # methods when it registers it; it registers only the bundle, so the bundle names its parts itself once
        # they are loaded, and takes the names back before they are done (a reload's new bundle names its own).
        # Under the bundle's name: a part's plain class name ("cors", "auth") would take a name another script's
        # addon may have, and mitmproxy refuses a second addon of one name.
        parts_load, parts_done = getattr(self, "load", None), getattr(self, "done", None)
        self._published: list[str] = []

        def load(loader):
            if parts_load is not None:
                parts_load(loader)
            self._publish(loader.master)

        def done():
            self._unpublish()
            return parts_done() if parts_done is not None else None

        self.load, self.done = load, done

    def _publish(self, master) -> None:
        lookup = master.addons.lookup
        for part in self.parts:
            name = self.part_name(part)
            if name in lookup:
                continue  # a name mitmproxy or another addon holds keeps its owner
            lookup[name] = part
            self._published.append(name)
            master.commands.collect_commands(part)

    def _unpublish(self) -> None:
        try:
            from mitmproxy import ctx

            lookup = ctx.master.addons.lookup
        except AttributeError:  # no master (a bare bundle in a test)
            return
        parts = {self.part_name(p): p for p in self.parts}
        for name in self._published:
            if lookup.get(name) is parts[name]:
                del lookup[name]
        self._published.clear()

    def _refresh(self) -> None:
        for table in self._tables:
            table.refresh()

    def part_name(self, part) -> str:
        """The name mitmproxy finds a part by: "coze-mitm." + its own name (its `name`, or its class in lower case)."""
        return f"{self.name}.{getattr(part, 'name', type(part).__name__.lower())}"

    def hooks(self) -> dict:
        """Every hook this bundle has, by name."""
        return {name: handler for name, handler in vars(self).items() if name in hooks.all_hooks}

    def __repr__(self) -> str:
        return f"Bundle({', '.join(type(p).__name__ for p in self.parts)})"


def _lifecycle(handlers):
    """Every part's handler, in order; exceptions go to mitmproxy (a bad option stops the start-up). An async
    `running` or `done` is awaited before the next part's: the returned coroutine is what mitmproxy awaits."""
    def call_all(*args):
        return _lifecycle_from(handlers, args)
    return call_all


def _lifecycle_from(handlers, args):
    for i, handler in enumerate(handlers):
        result = handler(*args)
        if result is not None and inspect.isawaitable(result):
            return _finish_lifecycle(result, handlers[i + 1:], args)
    return None


async def _finish_lifecycle(pending, rest, args) -> None:
    await pending
    more = _lifecycle_from(rest, args)
    if more is not None:
        await more


class _Table:
    """The handlers of one hook: of every part in use, and of those among them that act on Coze API flows."""

    __slots__ = ("hook", "parts", "every", "coze_api")

    def __init__(self, hook: str, parts: list):
        self.hook, self.parts = hook, parts
        self.every: tuple = ()
        self.coze_api: tuple = ()
        self.refresh()

    def refresh(self) -> None:
        in_use = [p for p in self.parts if getattr(p, "in_use", True)]
        self.every = tuple(getattr(p, self.hook) for p in in_use)
        self.coze_api = tuple(getattr(p, self.hook) for p in in_use if getattr(p, "acts_on_coze_api", True))

    def dispatcher(self, coze_api_only):
        hook = self.hook
        # Every hook but the lifecycle ones takes exactly one argument (a flow, or a connection's data).
        if coze_api_only is None:
            def dispatch(data):
                return _call_from(hook, self.every, data)
        else:
            def dispatch(flow):
                return _call_from(hook, self.coze_api if coze_api_only(flow.request) else self.every, flow)
        dispatch.__name__ = dispatch.__qualname__ = hook
        return dispatch


def _call_from(hook: str, handlers, data):
    """Call the handlers in order. When one returns an awaitable, stop and return a coroutine that awaits
    it and then goes on with the rest; None when every handler was synchronous (the common path)."""
    for i, handler in enumerate(handlers):
        try:
            result = handler(data)
        except _PASS_THROUGH:
            raise
        except Exception as e:
            _addon_error(hook, handler, e)
            continue
        if result is not None and inspect.isawaitable(result):
            return _finish(hook, handler, result, handlers[i + 1:], data)
    return None


async def _finish(hook: str, handler, pending, rest, data) -> None:
    try:
        await pending
    except _PASS_THROUGH:
        raise
    except Exception as e:
        _addon_error(hook, handler, e)
    more = _call_from(hook, rest, data)
    if more is not None:
        await more


def _addon_error(hook: str, handler, error: Exception) -> None:
    part = type(getattr(handler, "__self__", handler)).__name__
    log.error(f"Addon error: {part}.{hook}: {error}", exc_info=True)
