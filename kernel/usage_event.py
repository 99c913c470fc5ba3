"""The usage event: one settled request, as the settlement script appends it to the usage
stream (`dg:usage`), the meter records it in `usage_events` and the hash chain covers it.

`UsageRecord` is its one definition (names and types) and `FIELDS` its field names, in
order. Everything that reads or writes an event goes through them: the Lua that XADDs it is
formatted from `FIELDS` (billing.lua_scripts), the meter parses stream entries with
`UsageRecord.from_stream`, the chain hashes `FIELDS` (billing.chain), and reconciliation
reads waiting events with `from_stream` too. So a field added here reaches every side, and a
side that is not told about it fails at once instead of dropping it.

`completion_tokens` is what was billed: the ingress's own count of the completion it
delivered, never more than the engine reported (`reported_completion_tokens`, kept beside it
so the meter can tell when a provider's engine over-reports: billing.strikes).

In the stream every value is a string: integers in decimal, `''` for "none" (a key id or
customer tag) and the day as `YYYYMMDD` (a Redis key's form); in the record and in SQL, None
and `YYYY-MM-DD`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

from kernel.money import PROVIDER_SHARE_PCT, split_cost


def iso_day(yyyymmdd: str) -> str:
    """`20261124` (a Redis day key's form) → `2026-11-24` (SQL's `usage_day`)."""
    return f"{yyyymmdd[:4]}-{yyyymmdd[4:6]}-{yyyymmdd[6:8]}" if len(yyyymmdd) == 8 else yyyymmdd


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    account_id: int
    key_id: int | None
    customer_tag: str | None  # the request's X-Customer-Id
    model: str
    provider_id: str  # '' when no provider served it (a reaped reservation)
    prompt_tokens: int
    completion_tokens: int  # billed: the ingress's count of what it delivered, at most reported
    input_nusd_per_token: int  # the prices billed (the serving provider's, at most reserved)
    output_nusd_per_token: int
    cost_nusd: int
    provider_share_nusd: int
    platform_share_nusd: int
    outcome: str  # settled | reaped
    usage_day: str  # the reservation's UTC day, YYYY-MM-DD
    created_at_ms: int  # admission (the reservation)
    settled_at_ms: int
    # what the engine (on the provider's machine) reported; None: not known (events settled
    # before the ingress counted for itself, migration 0007, or reaped without a report)
    reported_completion_tokens: int | None = None

    @classmethod
    def from_stream(cls, entry: Mapping[str, str]) -> UsageRecord:
        """A stream entry's fields as a record; ValueError if one is missing or not of its
        type, or if the money does not add up (`money_problem`)."""
        values: dict[str, Any] = {}
        try:
            for name, decode, optional in _DECODERS:
                values[name] = decode(entry.get(name, "") if optional else entry[name])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"malformed usage event: {exc!r}") from None
        values["usage_day"] = iso_day(values["usage_day"])
        record = cls(**values)
        problem = record.money_problem()
        if problem is not None:
            raise ValueError(problem)
        return record

    @classmethod
    def of(cls, row: object) -> UsageRecord:
        """The record of anything with these attributes (a `usage_events` row)."""
        return cls(**{name: getattr(row, name) for name in FIELDS})

    def to_stream(self) -> dict[str, str]:
        """The stream entry's fields, as the settlement script writes them."""
        entry = {name: "" if value is None else str(value) for name, value in self.row().items()}
        entry["usage_day"] = self.usage_day.replace("-", "")
        return entry

    def row(self) -> dict[str, Any]:
        """Field name → value (the `usage_events` columns, and what the chain hashes). Every
        value is a str, an int or None: a shallow copy (`dataclasses.asdict` deep-copies
        each value, which cost the meter a third of its time per row)."""
        return {name: getattr(self, name) for name in FIELDS}

    def money_problem(self) -> str | None:
        """Why the money of this event is wrong, or None: negative counts, a cost other than
        tokens × prices, or a split other than the provider's `PROVIDER_SHARE_PCT`."""
        if min(getattr(self, name) for name in INT_FIELDS) < 0:
            return "negative value"
        if self.reported_completion_tokens is not None and self.reported_completion_tokens < 0:
            return "negative value"
        expected = (
            self.prompt_tokens * self.input_nusd_per_token
            + self.completion_tokens * self.output_nusd_per_token
        )
        if self.cost_nusd != expected:
            return f"cost != tokens × prices ({self.cost_nusd}, not {expected})"
        if (self.provider_share_nusd, self.platform_share_nusd) != split_cost(self.cost_nusd):
            return f"provider/platform split is not {PROVIDER_SHARE_PCT}/{100 - PROVIDER_SHARE_PCT}"
        return None


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(UsageRecord))
_TYPES: dict[str, Any] = {name: get_type_hints(UsageRecord)[name] for name in FIELDS}
_OPTIONAL = (int | None, str | None)
_DECODE: dict[Any, Any] = {
    int: int,
    str: str,
    int | None: lambda raw: int(raw) if raw else None,
    str | None: lambda raw: raw or None,
}
# (name, decoder, may be absent) per field, looked up once: a union type hashes its arguments
# each time it is a dict key, which cost the meter a fifth of its parsing
_DECODERS: tuple[tuple[str, Any, bool], ...] = tuple(
    (name, _DECODE[_TYPES[name]], _TYPES[name] in _OPTIONAL) for name in FIELDS
)
INT_FIELDS: tuple[str, ...] = tuple(name for name in FIELDS if _TYPES[name] is int)
