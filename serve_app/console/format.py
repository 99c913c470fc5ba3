"""How the console writes numbers, money and times (Jinja filters)."""

from __future__ import annotations

from datetime import UTC, datetime

from kernel.money import NUSD_PER_CENT, nusd_to_usd


def usd(nusd: int) -> str:
    """10_500_000_000 → "$10.50"; sub-cent amounts keep their digits: "$0.000000315"."""
    text = nusd_to_usd(nusd)
    sign = "-" if text.startswith("-") else ""
    whole, _, frac = text.lstrip("-").partition(".")
    return f"{sign}${int(whole):,}.{frac.ljust(2, '0')}"


def cents(amount_cents: int) -> str:
    return usd(amount_cents * NUSD_PER_CENT)


def count(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


def when(moment: datetime | str | None) -> str:
    """A moment in UTC, to the minute: "2026-11-25 16:30 UTC"."""
    if moment is None or moment == "":
        return "never"
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def until(moment: str, now: datetime | None = None) -> str:
    """The time from now until an ISO moment: "5 h 3 min" (at least "1 min")."""
    target = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    seconds = (target - (now or datetime.now(UTC))).total_seconds()
    minutes = max(1, int(seconds // 60))
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


FILTERS = {"usd": usd, "cents": cents, "count": count, "when": when, "until": until}
