"""The settings part rebuilds on a runtime change of every coze_* option it builds from: options.py is the one list
(SETTINGS_OPTIONS is derived from its declarations), so an option added there cannot be silently ignored."""

import ast
from pathlib import Path

from mitmproxy.test import taddons

from coze_mitm import options
from coze_mitm.parts import settings as settings_part
from coze_mitm.parts.settings import CozeSettings

PAT = "pat_" + "Settings0ptions" * 3


def _read_by_settings() -> set[str]:
    """Every coze_* option parts/settings.py reads as an attribute (opts.coze_x, ctx.options.coze_x)."""
    tree = ast.parse(Path(settings_part.__file__).read_text(encoding="utf-8"))
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("coze_")}


def _other_value(name: str, current):
    if isinstance(current, bool):
        return not current
    if isinstance(current, int):
        return current + 1
    if name == "coze_pat":
        return PAT + "x"
    return "https://changed.example"


def test_every_option_the_settings_part_reads_rebuilds_it_when_changed_at_runtime():
    read = _read_by_settings()
    assert {"coze_pat", "coze_origins", "coze_token_ttl", "coze_allow_remote"} <= read  # the scan sees them
    assert read <= options.SETTINGS_OPTIONS
    settings = CozeSettings()
    with taddons.context(settings) as tctx:
        tctx.configure(settings, coze_pat=PAT, coze_origins="https://page.example")
        assert settings.broker is not None
        rebuilt = []
        real = settings._rebuild
        settings._rebuild = lambda: (rebuilt.append(1), real())
        for name in sorted(options.SETTINGS_OPTIONS):
            before = len(rebuilt)
            tctx.configure(settings, **{name: _other_value(name, getattr(tctx.options, name))})
            assert len(rebuilt) == before + 1, f"changing {name} at runtime did not rebuild the settings"
        tctx.configure(settings, coze_quiet=True)  # another part's option: no rebuild (tokens stay)
        assert len(rebuilt) == len(options.SETTINGS_OPTIONS)
