"""The console's money, number and time formats, and its SVG charts."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from serve_app.console import charts
from serve_app.console.format import count, until, usd, when


def test_money_keeps_every_nano_dollar() -> None:
    assert usd(10 * 10**9) == "$10.00"
    assert usd(10_500_000_000) == "$10.50"
    assert usd(1_234_567 * 10**9) == "$1,234,567.00"
    assert usd(315) == "$0.000000315"
    assert usd(0) == "$0.00"
    assert usd(-25 * 10**7) == "-$0.25"


def test_counts_and_times() -> None:
    assert count(200_000) == "200,000" and count(None) == "—"
    assert when("2026-11-25T16:30:59+00:00") == "2026-11-25 16:30 UTC"
    assert when(None) == "never"
    now = datetime(2026, 11, 25, 18, 57, tzinfo=UTC)
    assert until("2026-11-26T00:00:00Z", now) == "5 h 3 min"
    assert until("2026-11-25T18:57:10Z", now) == "1 min"


def test_charts_escape_labels_and_scale_to_the_largest_bar() -> None:
    bars = [charts.Bar("<script>alert(1)</script>", 50), charts.Bar("b", 100)]
    svg = charts.rows("Tokens by model", bars, str)
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    assert svg.startswith("<svg") and 'role="img"' in svg
    widths = [float(w) for w in re.findall(r'<rect [^>]*width="([\d.]+)"', svg)]
    assert widths[1] == 2 * widths[0]
    empty = charts.columns("Tokens by day", [], str)
    assert "No usage" in empty
