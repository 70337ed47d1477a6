"""core/refusal.py: the one shape of a local answer and the one registry of the reasons the status page counts."""

from coze_mitm.core import refusal
from coze_mitm.core.exchange import EXCHANGE_HINTS, ExchangeError
from coze_mitm.core.tokens import LimitError
from coze_mitm.parts.login import LoginRefused
from coze_mitm.core.stats import Stats


def test_every_exchange_error_with_a_hint_has_its_own_counter():
    # A hint added to the exchange without its reason here would be counted as "other" on the status page.
    assert EXCHANGE_HINTS.keys() == refusal.EXCHANGE_ERRORS.keys()
    assert {f"exchange-refused:{e}" for e in EXCHANGE_HINTS} <= refusal.EXCHANGE_REASONS


def test_the_refusing_exceptions_carry_one_refusal_in_one_field_order():
    for error, reason in ((ExchangeError(502, 5000, "exchange-garbage", "m", "logid1"), "exchange-garbage"),
                          (LoginRefused(403, refusal.NO_CREDENTIALS, "login-unusable", "m"), "login-unusable")):
        assert error.refusal == (error.status, error.code, reason, "m", {})
        assert error.refusal.code == refusal.REASONS[reason]
    limit = LimitError("too many new users", 7)
    assert limit.refusal == (429, 4013, "new-user-limit", "too many new users", {"Retry-After": "7"})
    assert limit.refusal.code == refusal.REASONS["new-user-limit"]


def test_stats_count_registered_reasons_and_fold_the_rest_into_other():
    stats = Stats()
    for reason in refusal.REASONS:
        stats.refused(reason)
    stats.refused("Coze said: <script>")  # never a key of status.json
    assert set(stats.refusals) == set(refusal.REASONS) | {"other"}
    assert stats.refusals["other"] == 1
