"""The ingress↔pool contract: what the ingress takes from a pool is parsed as untrusted."""

from __future__ import annotations

import pytest

from serve_app.pool_protocol import (
    ServedBy,
    credential_digest,
    credential_matches,
    split_events,
)


def test_who_served_crosses_the_hop_whole() -> None:
    served = ServedBy("p1", "verified", "abc123", 20)
    assert ServedBy.from_header(served.header()) == served


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "not json",
        "[]",
        '{"provider_id": 1, "trust_tier": "basic", "replica": "r"}',
        '{"provider_id": "p", "trust_tier": "basic"}',
        '{"provider_id": "p", "trust_tier": "basic", "replica": "r", "price_floor_pct": "9"}',
        '{"provider_id": "p", "trust_tier": "basic", "replica": "r", "price_floor_pct": true}',
    ],
)
def test_a_malformed_served_by_is_refused(header: str | None) -> None:
    with pytest.raises(ValueError):
        ServedBy.from_header(header)


def test_only_the_pools_own_credential_passes() -> None:
    digest = credential_digest("s3cret")
    assert credential_matches("Bearer s3cret", digest)
    assert credential_matches("bearer s3cret", digest)
    for wrong in (None, "", "Bearer", "Bearer ", "Bearer s3cre", "Basic s3cret", "s3cret",
                  "Bearer dgpu-" + "0" * 40):  # fmt: skip
        assert not credential_matches(wrong, digest), wrong
    assert not credential_matches("Bearer ", credential_digest(""))
    assert not credential_matches("Bearer s3cret", "")  # no digest configured: nobody


def test_events_are_split_only_where_one_ends() -> None:
    assert split_events("") == ("", "")
    assert split_events('data: {"a"') == ("", 'data: {"a"')
    assert split_events("data: 1\n\ndata: 2\n\nda") == ("data: 1\n\ndata: 2\n\n", "da")
    assert split_events("data: 1\n\n") == ("data: 1\n\n", "")
