"""coze-mitm SANDBOX: a local stand-in for the Coze API. It is NOT Coze.

Used by the integration tests, the ``run_mitm.py --demo`` mode (no Coze account needed) and the
benchmarks. See :mod:`sandbox.coze_standin`; every endpoint it answers is listed in :mod:`sandbox.routes`.
"""

__all__ = ["CozeStandIn", "make_sandbox_app"]


def __getattr__(name: str):
    # imported on first use, so that `python -m sandbox.coze_standin` does not find it half-imported
    if name in __all__:
        from . import coze_standin
        return getattr(coze_standin, name)
    raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
