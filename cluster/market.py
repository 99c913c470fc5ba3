"""Demand and reputation that everyone can see (the spec's "provider reputation and demand
visibility"), read from the ledger's usage rows, the registry and the strikes.

- `demand`: per catalog model, requests and tokens per hour over the last day and the last
  hour, and how many providers served it in the last hour.
- `gpu_earnings`: what a GPU of each size earned last week (the last whole UTC week, Monday
  to Monday): per provider that earned anything, its share divided by its GPUs, grouped by
  the VRAM of one GPU; the median and the most, and how many GPUs that is.
- `reputation`: per provider, the share of the last 7 days (or of its life, when shorter) in
  which its agent said it was online (`ProviderHour`, written by its heartbeats), the requests
  it served and the usage-report strikes recorded against it (billing.strikes) in that time.

Every figure is a count or a sum of rows: nothing a provider reports about itself is taken
as is (the requests it served are the ledger's, which the ingress metered).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.sql import ColumnElement

from core.schema import Provider, ProviderHour, UsageEvent, UsageStrike, utcnow

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
WEEK = timedelta(days=7)


@dataclass(frozen=True)
class ModelDemand:
    model: str
    requests_per_hour: float  # over the last 24 hours
    tokens_per_hour: float  # prompt + completion, over the last 24 hours
    requests_last_hour: int
    tokens_last_hour: int
    providers_last_hour: int  # providers that served it in the last hour

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GpuEarnings:
    vram_gb_per_gpu: int
    gpus: int  # GPUs of this size that earned anything last week
    median_usd_per_gpu: str
    most_usd_per_gpu: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Reputation:
    provider_id: str
    uptime_pct: float  # of the hours of the window, the ones it was online in
    window_hours: int  # the last 7 days, or the provider's life when shorter
    requests_served: int
    strikes: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def demand(engine: Engine, models: Iterable[str], now: datetime | None = None) -> list[ModelDemand]:
    """Every model named in `models` (the catalog's), in that order; one without traffic too."""
    end = _ms(now or utcnow())
    tokens = func.coalesce(func.sum(UsageEvent.prompt_tokens + UsageEvent.completion_tokens), 0)
    with Session(engine) as session:
        day = {
            model: (int(n), int(t))
            for model, n, t in session.execute(
                select(UsageEvent.model, func.count(), tokens)
                .where(UsageEvent.settled_at_ms > end - DAY_MS, UsageEvent.settled_at_ms <= end)
                .group_by(UsageEvent.model)
            )
        }
        hour = {
            model: (int(n), int(t), int(p))
            for model, n, t, p in session.execute(
                select(
                    UsageEvent.model,
                    func.count(),
                    tokens,
                    func.count(func.distinct(UsageEvent.provider_id)),
                )
                .where(UsageEvent.settled_at_ms > end - HOUR_MS, UsageEvent.settled_at_ms <= end)
                .group_by(UsageEvent.model)
            )
        }
    out = []
    for model in models:
        requests, used = day.get(model, (0, 0))
        last_requests, last_tokens, providers = hour.get(model, (0, 0, 0))
        out.append(
            ModelDemand(
                model,
                round(requests / 24, 2),
                round(used / 24, 1),
                last_requests,
                last_tokens,
                providers,
            )  # fmt: skip
        )
    return out


def last_week(now: datetime) -> tuple[datetime, datetime]:
    """The last whole UTC week: [Monday 00:00, the next Monday 00:00) before `now`."""
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    this_monday = today - timedelta(days=today.weekday())
    return this_monday - WEEK, this_monday


def gpu_earnings(engine: Engine, now: datetime | None = None) -> list[GpuEarnings]:
    """Last week's earnings per GPU, by the VRAM of one GPU, smallest first."""
    start, end = last_week(now or utcnow())
    with Session(engine) as session:
        rows = session.execute(
            select(Provider.vram_gb, Provider.gpu_count, func.sum(UsageEvent.provider_share_nusd))
            .join(Provider, Provider.id == UsageEvent.provider_id)
            .where(
                UsageEvent.settled_at_ms >= _ms(start),
                UsageEvent.settled_at_ms < _ms(end),
                Provider.gpu_count > 0,
                Provider.vram_gb.is_not(None),
            )
            .group_by(Provider.id, Provider.vram_gb, Provider.gpu_count)
        ).all()
    by_size: dict[int, list[float]] = {}
    for vram_gb, gpus, earned in rows:
        if not earned or vram_gb is None:  # (the query leaves both out)
            continue
        per_gpu = int(earned) / gpus  # nUSD
        by_size.setdefault(round(float(vram_gb) / gpus), []).extend([per_gpu] * gpus)
    return [
        GpuEarnings(size, len(values), _usd(statistics.median(values)), _usd(max(values)))
        for size, values in sorted(by_size.items())
    ]


def _usd(nusd: float) -> str:
    return f"{nusd / 1e9:.2f}"


def reputation(
    engine: Engine, provider_ids: Iterable[str], now: datetime | None = None
) -> dict[str, Reputation]:
    """provider id -> its record over the last 7 days (an unknown id is left out)."""
    now = now or utcnow()
    since = now - WEEK
    ids = list(provider_ids)
    with Session(engine) as session:
        created = dict(
            session.execute(select(Provider.id, Provider.created_at).where(Provider.id.in_(ids)))
            .tuples()
            .all()
        )
        hours = _count_by(
            session, ProviderHour.provider_id, ProviderHour.provider_id.in_(ids),
            ProviderHour.hour >= since,
        )  # fmt: skip
        served = _count_by(
            session, UsageEvent.provider_id, UsageEvent.provider_id.in_(ids),
            UsageEvent.settled_at_ms >= _ms(since),
        )  # fmt: skip
        strikes = _count_by(
            session, UsageStrike.provider_id, UsageStrike.provider_id.in_(ids),
            UsageStrike.created_at >= since,
        )  # fmt: skip
    out = {}
    for provider_id, born in created.items():
        window = max(1, min(168, int((now - max(born, since)).total_seconds() // 3600) + 1))
        online = min(int(hours.get(provider_id, 0)), window)
        out[provider_id] = Reputation(
            provider_id, round(100 * online / window, 1), window,
            int(served.get(provider_id, 0)), int(strikes.get(provider_id, 0)),
        )  # fmt: skip
    return out


def _count_by(
    session: Session, key: InstrumentedAttribute[str], *where: ColumnElement[bool]
) -> dict[str, int]:
    """key -> how many rows of its table match `where`."""
    rows = session.execute(select(key, func.count()).where(*where).group_by(key)).tuples()
    return {k: int(n) for k, n in rows}
