"""coze-mitm SANDBOX: a local stand-in for the Coze API. It is NOT Coze.

Used by the integration tests, the ``run_mitm.py --demo`` mode (no Coze account needed) and the
benchmarks. See :mod:`sandbox.coze_standin`; every endpoint it answers is listed in :mod:`sandbox.routes`.
"""

from .coze_standin import CozeStandIn, make_sandbox_app

__all__ = ["CozeStandIn", "make_sandbox_app"]
