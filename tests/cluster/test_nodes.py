"""Join tickets and node bindings (`cluster.nodes`), against real SQL; where a node and a
replica are, from a real Ray cluster's own tables; the warden that drains intruders."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta

import pytest
import ray
import redis
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from billing import accounts
from billing.plans import Plans
from cluster import nodes, registry
from cluster.node_warden import NodeWarden
from cluster.nodes import ClusterNode, NodeBindingError, TicketError
from cluster.ray_internals import alive_actor_nodes
from core.schema import JoinTicket, ProviderReview, utcnow
from kernel.errors import Forbidden, InvalidRequest
from kernel.labels import LOCAL_PROVIDER_ID, PROVIDER_ID_LABEL, ROLE_LABEL, TrustTier
from kernel.tokens import hash_key

NODE_A = "a" * 56
NODE_B = "b" * 56
HEAD = "c" * 56


def provider(engine: Engine, r: redis.Redis, plans: Plans, email: str, approve: bool = True) -> str:
    account = accounts.create_account(engine, r, plans, email=email).id
    pid = registry.create_provider(engine, account_id=account, name="rig").provider.id
    if approve:
        registry.review(engine, pid, ProviderReview.approved)
    return pid


def labelled(node_id: str, provider_id: str | None, **more: str) -> ClusterNode:
    labels = {PROVIDER_ID_LABEL: provider_id} if provider_id else {}
    return ClusterNode(node_id, True, {**labels, **more})


@pytest.fixture
def two(engine: Engine, r: redis.Redis, plans: Plans) -> tuple[str, str]:
    return provider(engine, r, plans, "a@example.com"), provider(engine, r, plans, "b@example.com")


def test_a_ticket_binds_a_node_labelled_as_its_provider_once(
    engine: Engine, two: tuple[str, str]
) -> None:
    alice, _ = two
    new = nodes.issue_ticket(engine, alice)
    assert new.ticket.startswith(nodes.TICKET_PREFIX)
    with Session(engine) as session:  # stored hashed only
        row = session.scalars(select(JoinTicket)).one()
        assert row.ticket_hash == hash_key(new.ticket) and new.ticket not in str(row.__dict__)
    nodes.redeem(engine, alice, new.ticket, labelled(NODE_A, alice))
    assert nodes.bindings(engine) == {NODE_A: alice}
    with pytest.raises(TicketError):  # one time
        nodes.redeem(engine, alice, new.ticket, labelled(NODE_B, alice))
    assert nodes.bindings(engine) == {NODE_A: alice}


def test_what_a_hostile_provider_tries_with_tickets_and_labels(
    engine: Engine, r: redis.Redis, plans: Plans, two: tuple[str, str]
) -> None:
    alice, mallory = two
    alices = nodes.issue_ticket(engine, alice)
    nodes.redeem(engine, alice, alices.ticket, labelled(NODE_A, alice))
    own = nodes.issue_ticket(engine, mallory)
    # Alice's node, bound or not, labelled as Alice: not Mallory's to take
    with pytest.raises(NodeBindingError, match="not labelled as your provider"):
        nodes.redeem(engine, mallory, own.ticket, labelled(NODE_A, alice))
    # a node of Mallory's that labels itself Alice: Mallory's ticket cannot bind it to Alice
    with pytest.raises(TicketError):
        nodes.redeem(engine, alice, own.ticket, labelled(NODE_B, alice))
    # labelled as Mallory but claiming the control role too
    with pytest.raises(NodeBindingError, match="control role"):
        nodes.redeem(
            engine, mallory, own.ticket, labelled(NODE_B, mallory, **{ROLE_LABEL: "control"})
        )
    # relabel Alice's bound node as Mallory's (a restart with other labels, same id)
    with pytest.raises(NodeBindingError, match="another provider"):
        nodes.redeem(engine, mallory, own.ticket, labelled(NODE_A, mallory))
    # a node not in the cluster, or dead
    with pytest.raises(NodeBindingError, match="No alive node"):
        nodes.redeem(engine, mallory, own.ticket, None)
    with pytest.raises(NodeBindingError, match="No alive node"):
        nodes.redeem(
            engine, mallory, own.ticket, ClusterNode(NODE_B, False, {PROVIDER_ID_LABEL: mallory})
        )
    # every refusal above left the ticket unspent: it still binds Mallory's own node
    nodes.redeem(engine, mallory, own.ticket, labelled(NODE_B, mallory))
    assert nodes.bindings(engine) == {NODE_A: alice, NODE_B: mallory}
    # expired tickets, forged ones, and none for a provider that is not approved
    late = nodes.issue_ticket(
        engine, mallory, now=utcnow() - timedelta(seconds=nodes.TICKET_TTL_S + 1)
    )
    with pytest.raises(TicketError):
        nodes.redeem(engine, mallory, late.ticket, labelled("d" * 56, mallory))
    with pytest.raises(TicketError):
        nodes.redeem(engine, mallory, nodes.TICKET_PREFIX + "x" * 43, labelled("d" * 56, mallory))
    pending = provider(engine, r, plans, "p@example.com", approve=False)
    with pytest.raises(Forbidden):
        nodes.issue_ticket(engine, pending)
    registry.review(engine, mallory, ProviderReview.suspended)
    with pytest.raises(Forbidden):
        nodes.issue_ticket(engine, mallory)


@pytest.mark.parametrize("bad", ["", "xyz", "a" * 55, "g" * 56, "a" * 57, "../" * 20])
def test_node_ids_are_checked(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        nodes.check_node_id(bad)


def test_who_may_serve_where() -> None:
    bound = {NODE_A: "prv_a"}
    assert nodes.allowed("prv_a", NODE_A, bound, {HEAD})
    assert not nodes.allowed("prv_b", NODE_A, bound, {HEAD})  # a label of another provider
    assert not nodes.allowed("prv_a", NODE_B, bound, {HEAD})  # an unbound node
    assert not nodes.allowed("prv_a", None, bound, {HEAD})  # placement not known
    assert nodes.allowed(LOCAL_PROVIDER_ID, HEAD, bound, {HEAD})
    assert not nodes.allowed(LOCAL_PROVIDER_ID, NODE_B, bound, {HEAD})  # unlabelled elsewhere


def test_the_warden_drains_intruders_once_after_the_grace() -> None:
    bound = {NODE_A: "prv_a"}
    seen = {NODE_A: 0.0, NODE_B: 0.0, "d" * 56: 0.0, "e" * 56: 100.0}
    cluster = [
        labelled(HEAD, None, **{ROLE_LABEL: "control"}),
        labelled(NODE_A, "prv_a"),
        labelled(NODE_B, "prv_b"),  # never bound
        labelled("d" * 56, "prv_x", **{ROLE_LABEL: "control"}),
        labelled("e" * 56, "prv_c"),  # joined just now: still in its grace
        ClusterNode("f" * 56, False, {}),
    ]
    verdicts = nodes.nodes_to_remove(cluster, bound, {HEAD}, seen, 110.0, grace_s=60)
    assert set(verdicts) == {NODE_B, "d" * 56}
    suspended = nodes.nodes_to_remove(
        [labelled(NODE_A, "prv_a")], bound, {HEAD}, seen, 1.0, grace_s=60, approved={"prv_b"}
    )
    assert suspended == {NODE_A: "its provider prv_a is not approved"}
    relabelled = [labelled(NODE_A, "prv_b")]
    assert nodes.nodes_to_remove(relabelled, bound, {HEAD}, seen, 1.0, grace_s=60) == {
        NODE_A: "it is bound to prv_a but labelled prv_b"
    }


def test_the_warden_drains_a_node_whose_provider_is_of_another_tier_than_its_pool() -> None:
    """A provider whose tier changed since it joined (its attestation lapsed, or it became
    verified) leaves the pool it joined: a basic provider's node among verified ones could
    run code on them; its agent joins its tier's pool again."""
    bound, seen = {NODE_A: "prv_a"}, {NODE_A: 0.0}
    tiers = {"prv_a": TrustTier.basic}
    node = [labelled(NODE_A, "prv_a")]
    assert nodes.nodes_to_remove(node, bound, {HEAD}, seen, 1.0, 60, {"prv_a"}, tiers,
                                 TrustTier.verified) == {
        NODE_A: "its provider prv_a is not of the verified tier"
    }  # fmt: skip
    assert nodes.nodes_to_remove(node, bound, {HEAD}, seen, 1.0, 60, {"prv_a"}, tiers,
                                 TrustTier.basic) == {}  # fmt: skip


def test_the_warden_asks_each_intruder_to_drain_once(engine: Engine, two: tuple[str, str]) -> None:
    alice, _ = two
    now = [0.0]
    drained: list[str] = []
    warden = NodeWarden(
        engine, frozenset({HEAD}),
        list_nodes=lambda: [labelled(HEAD, None), labelled(NODE_B, alice)],
        drain=lambda node, why: drained.append(node) or True,
        grace_s=60, clock=lambda: now[0],
    )  # fmt: skip
    warden.tick()
    assert drained == []  # within its grace
    now[0] = 61.0
    warden.tick()
    warden.tick()
    assert drained == [NODE_B]


@pytest.fixture(scope="module")
def ray_node() -> Iterator[str]:
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.ERROR,
             labels={PROVIDER_ID_LABEL: "prv_real"})  # fmt: skip
    try:
        yield ray.get_runtime_context().get_node_id()
    finally:
        ray.shutdown()


def test_the_cluster_tables_say_where_nodes_and_replicas_are(ray_node: str) -> None:
    found = {node.node_id: node for node in nodes.cluster_nodes(draining={ray_node})}
    assert found[ray_node].alive and found[ray_node].claimed_provider == "prv_real"
    assert found[ray_node].resources["CPU"] == 1.0 and found[ray_node].draining

    @ray.remote(num_cpus=0)
    class Replica:
        def ping(self) -> int:
            return 1

    actor = Replica.options(name="SERVE_REPLICA::model-x#llm-x#r1").remote()  # type: ignore[attr-defined]
    assert ray.get(actor.ping.remote()) == 1
    assert alive_actor_nodes("SERVE_REPLICA::model-") == {
        "SERVE_REPLICA::model-x#llm-x#r1": ray_node
    }
    ray.kill(actor)
