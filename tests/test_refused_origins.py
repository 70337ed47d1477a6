"""core/refused_origins.py: pages outside coze_origins, remembered and logged within bounds."""

from coze_mitm.core.refused_origins import MAX_KEPT, MAX_LENGTH, MAX_LINES_PER_MINUTE, QUIET_SECONDS, RefusedOrigins


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_one_line_per_origin_per_quiet_period():
    clock = Clock()
    book = RefusedOrigins(clock)
    line = book.note("https://a.example", "a CORS preflight")
    assert "https://a.example" in line and "coze_origins" in line
    assert book.note("https://a.example", "a CORS preflight") is None
    clock.now += QUIET_SECONDS + 1
    assert book.note("https://a.example", "a tagged request") is not None
    assert book.recent()[0]["count"] == 3 and book.recent()[0]["what"] == "a tagged request"


def test_bounded_whatever_pages_send():
    clock = Clock()
    book = RefusedOrigins(clock)
    lines = [book.note(f"https://{i}.example" + "x" * 500 + "\n\x00", "a CORS preflight") for i in range(100)]
    assert sum(1 for line in lines if line) == MAX_LINES_PER_MINUTE  # a flood logs at most this many per minute
    recent = book.recent()
    assert len(recent) == MAX_KEPT and recent[0]["origin"].startswith("https://99.")
    assert all(len(r["origin"]) <= MAX_LENGTH and r["origin"].isprintable() for r in recent)
    clock.now += 61
    assert book.note("https://new.example", "a CORS preflight") is not None
