"""Usage and spend per API key: what each of an account's keys was billed, from the usage
ledger (`usage_events.key_id`, written by the meter for every settled request).

The console's keys page and `GET /v1/keys` show it, so a customer can tell which key (which
service, which leaked copy) spends its credits. Only the account's own keys and events are
read: the account id comes from the caller's session or key, never from the request.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from billing import accounts
from billing.reports import UsageFilter
from core.schema import UsageEvent
from kernel.money import nusd_to_usd


@dataclass(frozen=True)
class KeyUsage:
    """What one key was billed in a time range (zero for a key not used in it)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_nusd: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cost_nusd": self.cost_nusd,
            "cost_usd": nusd_to_usd(self.cost_nusd),
        }


def usage_by_key(
    engine: Engine, *, account_id: int, start: datetime, end: datetime
) -> dict[int | None, KeyUsage]:
    """The account's usage reserved in [start, end), by key id (None: events billed before
    keys were recorded on them)."""
    query = select(
        UsageEvent.key_id,
        func.count(),
        func.sum(UsageEvent.prompt_tokens),
        func.sum(UsageEvent.completion_tokens),
        func.sum(UsageEvent.cost_nusd),
    )
    query = UsageFilter(start, end, account_id).where(query).group_by(UsageEvent.key_id)
    with Session(engine) as session:
        return {
            (None if key_id is None else int(key_id)): KeyUsage(
                int(n), int(p or 0), int(c or 0), int(cost or 0)
            )
            for key_id, n, p, c, cost in session.execute(query)
        }


@dataclass(frozen=True)
class KeyWithUsage:
    key: accounts.KeyInfo
    usage: KeyUsage

    def to_json(self) -> dict[str, Any]:
        return {"object": "api_key", **self.key.to_json(), "usage": self.usage.to_json()}


def keys_with_usage(
    engine: Engine, *, account_id: int, start: datetime, end: datetime
) -> list[KeyWithUsage]:
    """Every key of the account (newest first) with its usage in [start, end)."""
    used = usage_by_key(engine, account_id=account_id, start=start, end=end)
    keys = accounts.list_keys(engine, account_id)[::-1]
    return [KeyWithUsage(k, used.get(k.id, KeyUsage())) for k in keys]
