"""The ingress↔pool contract: what the ingress takes from a pool is parsed as untrusted."""

from __future__ import annotations

import json

import pytest

from cluster.nodes import ClusterNode
from cluster.supply import ModelSupply
from kernel.errors import InvalidRequest
from serve_app.pool_protocol import (
    MAX_ANSWER_WITHIN_S,
    MAX_TAKE_WITHIN_S,
    TAKE_WITHIN_S,
    PoolListing,
    PoolReplica,
    ServedBy,
    credential_digest,
    credential_matches,
    drain_body,
    models_body,
    nodes_body,
    parse_answer_within,
    parse_drain,
    parse_models,
    parse_nodes,
    parse_replicas,
    parse_take_within,
    replicas_body,
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


NODE = "a" * 56


def test_the_pools_replicas_cross_the_hop_whole() -> None:
    listed = [PoolReplica("m", "r1", NODE, {"provider_id": "p1", "ongoing": 2})]
    assert parse_replicas(replicas_body(listed, {"m"})) == PoolListing(listed, frozenset({"m"}))
    assert parse_replicas(b'{"replicas": [], "online": []}') == PoolListing([], frozenset())


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xff", b"[]", b"{}", b'{"replicas": {}, "online": []}', b"null",
     b'{"replicas": []}', b'{"replicas": [], "online": "m"}', b'{"replicas": [], "online": [1]}',
     b'{"replicas": [], "online": ["%s"]}' % (b"m" * 129)],
)  # fmt: skip
def test_a_list_that_is_not_one_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_replicas(raw)


def test_a_malformed_entry_costs_only_its_replica() -> None:
    good = {"model": "m", "replica_id": "r1", "node_id": NODE, "stats": {"provider_id": "p"}}
    bad = [
        "r2",
        [],
        {**good, "replica_id": 7},
        {**good, "replica_id": ""},
        {**good, "node_id": "n" * 129},
        {**good, "model": None},
        {**good, "stats": "busy"},
        {k: v for k, v in good.items() if k != "node_id"},
    ]
    raw = json.dumps({"replicas": [*bad, good], "online": []}).encode()
    assert parse_replicas(raw).replicas == [PoolReplica("m", "r1", NODE, {"provider_id": "p"})]


def test_a_drain_request_names_a_node_and_a_short_reason() -> None:
    node = "ab" * 28
    assert parse_drain(json.dumps(drain_body(node, "why")).encode()) == (node, "why")
    for bad in (b"", b"[]", b'{"node_id": "ab", "reason": "x"}',
                json.dumps({"node_id": node, "reason": ""}).encode(),
                json.dumps({"node_id": node, "reason": "x" * 201}).encode(),
                json.dumps({"node_id": node.upper(), "reason": "x"}).encode()):  # fmt: skip
        with pytest.raises(InvalidRequest):
            parse_drain(bad)


def test_the_node_table_crosses_the_hop_whole() -> None:
    listed = [ClusterNode("ab" * 28, True, {"k": "v"}, {"CPU": 2.0, "GPU": 1.0}, True),
              ClusterNode("cd" * 28, False, {}, {}, False)]  # fmt: skip
    assert parse_nodes(nodes_body(listed)) == listed


def test_a_supply_plan_names_catalog_models_with_sane_bounds() -> None:
    wanted = {"m": ModelSupply(0, 2), "n": ModelSupply(1, 1)}
    raw = json.dumps(models_body(wanted)).encode()
    assert parse_models(raw, {"m", "n", "o"}) == wanted
    assert parse_models(b'{"models": {}}', {"m"}) == {}
    for bad in ({"x": {"min_replicas": 0, "max_replicas": 1}},  # not in the catalog
                {"m": {"min_replicas": 2, "max_replicas": 1}},
                {"m": {"min_replicas": -1, "max_replicas": 1}},
                {"m": {"min_replicas": 0, "max_replicas": 0}},
                {"m": {"min_replicas": 0, "max_replicas": 1025}},
                {"m": {"min_replicas": True, "max_replicas": 1}},
                {"m": {"min_replicas": 0.5, "max_replicas": 1}},
                {"m": {"max_replicas": 1}}, {"m": 1}, []):  # fmt: skip
        with pytest.raises(InvalidRequest):
            parse_models(json.dumps({"models": bad}).encode(), {"m", "n"})
    with pytest.raises(InvalidRequest):
        parse_models(b"not json", {"m"})


def test_the_times_a_replica_is_given_are_seconds_within_bounds() -> None:
    """What the ingress gives a replica to take a request, and to give its first item once
    it took it: a number of seconds above 0 and within the protocol's bound, else a 400."""
    assert parse_take_within(None) == TAKE_WITHIN_S
    assert parse_take_within("0.25") == 0.25
    assert parse_answer_within(None) is None  # no bound but the connection's
    assert parse_answer_within("12.5") == 12.5
    assert parse_answer_within(f"{MAX_ANSWER_WITHIN_S:g}") == MAX_ANSWER_WITHIN_S
    for bad in ("0", "-1", "nan", "inf", "-inf", "1e400", "soon", "", " ", "0x10"):
        for parse in (parse_take_within, parse_answer_within):
            with pytest.raises(InvalidRequest):
                parse(bad)
    with pytest.raises(InvalidRequest):
        parse_take_within(f"{MAX_TAKE_WITHIN_S + 1:g}")
    with pytest.raises(InvalidRequest):
        parse_answer_within(f"{MAX_ANSWER_WITHIN_S + 1:g}")
