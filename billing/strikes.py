"""Strikes: requests whose engine reported more completion tokens than the ingress delivered.

The ingress bills its own count of the completion it delivered, never more than the engine
reported (serve_app.recount), and the usage event carries both. A provider's engine that
reports more than was delivered is not paid for it either way; a strike records that it
tried, so the operator can see it (`darkgpu admin provider strikes`), the metric
`ray_darkgpu_usage_strikes_total` counts it, and routing gives a provider with recent
strikes less traffic, none past a threshold (serve_app.provider_policy, through the
registry's `ProviderTerms.recent_strikes`).

The tolerance: recounting detokenized text is not exact. The ingress counts the EOS or stop
token and a matched stop string itself, so what is left is the round trip: an engine may
emit a split the tokenizer would merge, a token inside a UTF-8 character, a special token the
text skips, or the markup around a tool call. On the test model (a byte-level BPE with random
weights, the worst case for the round trip: see docs/security.md for the measurement) the
honest difference stays within a few tokens and a few per cent of the completion; a report
counts as a strike only past `SLACK_TOKENS + SLACK_PCT`% of the report. Below it nothing
is paid for the difference anyway: the tolerance decides only who is struck.

The meter (billing.meter) records strikes in the transaction that writes the usage rows, for
fresh rows only (a replayed event is skipped there), and `request_id` is unique in
`usage_strikes`: each request is struck at most once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from core.schema import UsageStrike
from kernel.labels import LOCAL_PROVIDER_ID
from kernel.usage_event import UsageRecord

log = logging.getLogger(__name__)

SLACK_TOKENS = 8
SLACK_PCT = 10
# No provider (a reaped request nobody served), and the platform's own head: the operator's
# machine, not a provider's (its usage is billed at the ingress's count all the same).
NEVER_STRUCK = frozenset({"", LOCAL_PROVIDER_ID})


def tolerance(reported: int) -> int:
    """How far an engine's report may exceed the ingress's count without a strike."""
    return SLACK_TOKENS + max(0, reported) * SLACK_PCT // 100


def is_strike(reported: int | None, counted: int) -> bool:
    """Whether a report of `reported` completion tokens against `counted` delivered is one."""
    return reported is not None and reported - counted > tolerance(reported)


@dataclass(frozen=True)
class Strike:
    provider_id: str
    request_id: str
    model: str
    reported_tokens: int
    counted_tokens: int
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "provider_id": self.provider_id,
            "request_id": self.request_id,
            "model": self.model,
            "reported_tokens": self.reported_tokens,
            "counted_tokens": self.counted_tokens,
            "created_at": self.created_at.isoformat(),
        }


def strikes_of(events: Sequence[UsageRecord]) -> list[Strike]:
    """The strikes among settled usage events (one served by a provider, with a report)."""
    out = []
    for event in events:
        reported = event.reported_completion_tokens
        if event.provider_id in NEVER_STRUCK or reported is None:
            continue
        if is_strike(reported, event.completion_tokens):
            out.append(
                Strike(
                    provider_id=event.provider_id,
                    request_id=event.request_id,
                    model=event.model,
                    reported_tokens=reported,
                    counted_tokens=event.completion_tokens,
                    created_at=datetime.fromtimestamp(event.settled_at_ms / 1000, UTC),
                )
            )
    return out


def record(session: Session, events: Sequence[UsageRecord]) -> list[Strike]:
    """Add the strikes among `events` in `session`'s transaction (those whose request is
    struck already are left out); returns the ones added."""
    found = strikes_of(events)
    if not found:
        return []
    ids = [s.request_id for s in found]
    known = set(
        session.scalars(select(UsageStrike.request_id).where(UsageStrike.request_id.in_(ids)))
    )
    fresh = [s for s in found if s.request_id not in known]
    if fresh:
        session.execute(
            insert(UsageStrike),
            [
                {
                    "provider_id": s.provider_id,
                    "request_id": s.request_id,
                    "model": s.model,
                    "reported_tokens": s.reported_tokens,
                    "counted_tokens": s.counted_tokens,
                    "created_at": s.created_at,
                }
                for s in fresh
            ],
        )
    return fresh


def count_metric(strikes: Sequence[Strike]) -> None:
    """Count committed strikes in `ray_darkgpu_usage_strikes_total{provider,model}` (in a
    Ray process: the billing actor; elsewhere, e.g. a test's meter, nothing)."""
    if not strikes:
        return
    counter = _counter()
    if counter is None:
        return
    for strike in strikes:
        counter.inc(1, tags={"provider": strike.provider_id, "model": strike.model})


_COUNTER: Any = None


def _counter() -> Any:
    global _COUNTER
    if _COUNTER is None:
        try:
            import ray
            from ray.util import metrics

            if not ray.is_initialized():
                return None
            _COUNTER = metrics.Counter(
                "darkgpu_usage_strikes_total",
                description="Requests whose engine reported more completion tokens than the "
                "ingress delivered, beyond the tolerance, by provider.",
                tag_keys=("provider", "model"),
            )
        except Exception as exc:  # noqa: BLE001 - a metric must never stop metering
            log.warning("no strike metric: %r", exc)
            return None
    return _COUNTER
