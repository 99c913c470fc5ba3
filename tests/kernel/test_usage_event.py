"""The usage event's one definition: its stream form and the money checks every reader
(the meter, reconciliation, the ledger verification) applies."""

import pytest

from kernel.money import split_cost
from kernel.usage_event import FIELDS, INT_FIELDS, UsageRecord, iso_day

STREAM = {
    "request_id": "req-1",
    "account_id": "7",
    "key_id": "",
    "customer_tag": "",
    "model": "m",
    "provider_id": "",
    "prompt_tokens": "3",
    "completion_tokens": "2",
    "input_nusd_per_token": "7",
    "output_nusd_per_token": "13",
    "cost_nusd": "47",
    "provider_share_nusd": "44",
    "platform_share_nusd": "3",
    "outcome": "reaped",
    "usage_day": "20261124",
    "created_at_ms": "1",
    "settled_at_ms": "2",
    "reported_completion_tokens": "",
}


def test_a_stream_entry_reads_as_the_record_and_back() -> None:
    record = UsageRecord.from_stream(STREAM)
    assert (record.key_id, record.customer_tag, record.provider_id) == (None, None, "")
    assert record.usage_day == "2026-11-24" and record.cost_nusd == 47
    assert record.to_stream() == STREAM
    assert list(record.row()) == list(FIELDS) == list(STREAM)
    assert "key_id" not in INT_FIELDS and "cost_nusd" in INT_FIELDS


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"cost_nusd": "48"}, "cost != tokens × prices"),
        ({"provider_share_nusd": "45", "platform_share_nusd": "2"}, "split is not 95/5"),
        ({"prompt_tokens": "-3", "cost_nusd": "5"}, "negative value"),
        ({"reported_completion_tokens": "-1"}, "negative value"),
        ({"reported_completion_tokens": "many"}, "malformed usage event"),
        ({"account_id": "seven"}, "malformed usage event"),
        ({"model": None}, "malformed usage event"),
    ],
)
def test_a_wrong_event_is_refused(change: dict[str, str | None], why: str) -> None:
    entry = {k: v for k, v in {**STREAM, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=why):
        UsageRecord.from_stream(entry)


def test_the_engines_own_count_rides_beside_the_billed_one() -> None:
    """`completion_tokens` is what the ingress counted and billed; the engine's report is
    kept beside it (None where unknown: events from before it, reaped ones without one)."""
    record = UsageRecord.from_stream({**STREAM, "reported_completion_tokens": "9"})
    assert (record.completion_tokens, record.reported_completion_tokens) == (2, 9)
    assert record.to_stream()["reported_completion_tokens"] == "9"
    assert UsageRecord.from_stream(STREAM).reported_completion_tokens is None
    # an entry written before the field existed reads as unknown, not as malformed
    old = {k: v for k, v in STREAM.items() if k != "reported_completion_tokens"}
    assert UsageRecord.from_stream(old).reported_completion_tokens is None


def test_days_and_the_split() -> None:
    assert iso_day("20261124") == "2026-11-24" and iso_day("2026-11-24") == "2026-11-24"
    assert split_cost(47) == (44, 3)  # 95% of 47 is 44.65: the provider gets 44
    assert split_cost(0) == (0, 0) and split_cost(100) == (95, 5)
