"""The supply reconciler's decision (`cluster.supply.plan_supply`): which models are deployed,
within which replica bounds, from the nodes, the providers' allow-lists and the demand."""

import pytest

from cluster.catalog import load_catalog
from cluster.placement import NodeCapacity
from cluster.supply import HOLD, DemandRate, ModelSupply, SupplyNode, SupplyPolicy, plan_supply
from core.settings import CONFIGS_DIR
from kernel.labels import VRAM_RESOURCE

CATALOG = load_catalog(CONFIGS_DIR / "models.toml")
TINY_16 = CATALOG.get("darkgpu-tiny").model_copy(update={"min_vram_gb": 16})
POLICY = SupplyPolicy(min_replicas=1, max_replicas=4)
NOW = 1_000_000.0


def node(name: str, models: tuple[str, ...] = (), draining: bool = False, **resources: float):
    return SupplyNode(name, NodeCapacity.from_resources(resources), models, draining)


def gpu(name: str, gpus: int = 1, vram: int = 24, models: tuple[str, ...] = (), **kw):
    return node(name, models, **kw, GPU=gpus, **{VRAM_RESOURCE: vram})


def plan(nodes, catalog=CATALOG, asked=None, policy=POLICY, now=NOW, demand=None, held=None):
    return plan_supply(catalog, nodes, asked or {}, policy, now, demand, held)


def test_the_head_alone_deploys_nothing_but_where_it_has_no_gpu_the_local_model():
    assert plan([]) == {}
    # the local platform: the head (a control node, no GPU) serves the CPU engine's model
    assert plan([node("head", CPU=8)]) == {"darkgpu-tiny": ModelSupply(1, 1)}
    # a local model with min VRAM goes only where a node declares that much
    tiny_only = CATALOG.model_copy(update={"models": [TINY_16]})
    assert plan([node("head", CPU=8)], tiny_only) == {}
    provider = node("p1", CPU=4, **{VRAM_RESOURCE: 24})
    assert plan([node("head", CPU=8), provider], tiny_only) == {"darkgpu-tiny": ModelSupply(1, 1)}


def test_models_go_where_some_node_has_the_vram_and_no_local_model_beside_a_gpu():
    planned = plan([node("head", CPU=8), gpu("p1")])
    assert {"qwen3.5-7b", "qwen3.5-14b", "qwen25-32b-awq"} <= set(planned)
    assert not set(planned) & {"qwen3.5-27b", "llama-3.3-70b", "deepseek-v3", "darkgpu-tiny"}
    # one GPU: one replica in all, the others in the plan without a slot (503 model_warming)
    assert sum(s.max_replicas for s in planned.values()) == 1


def test_tensor_parallel_models_need_enough_gpus_on_one_node():
    assert "deepseek-v3" in plan([gpu("p1", gpus=2, vram=160)])
    assert "deepseek-v3" not in plan([gpu("p1", gpus=1, vram=141)])
    assert "deepseek-v3" not in plan([gpu("p1", gpus=1, vram=80), gpu("p2", gpus=1, vram=80)])


def test_a_provider_serves_only_the_models_it_allows_and_a_model_nobody_allows_is_not_deployed():
    nodes = [gpu("p1", models=("qwen3.5-7b",)), gpu("p2", models=("qwen3.5-7b", "qwen3.5-14b"))]
    # p2's GPU goes to the 14B (only p2 allows it), p1's to the 7B: never two on one GPU
    assert plan(nodes) == {"qwen3.5-7b": ModelSupply(1, 1), "qwen3.5-14b": ModelSupply(1, 1)}
    # an allow-list names only what also fits: a 70B model on a 24 GiB GPU is never deployed
    assert plan([gpu("p1", models=("llama-3.3-70b",))]) == {}


def test_replicas_are_bounded_by_the_slots_of_the_nodes_that_may_hold_them():
    seven_b = ("qwen3.5-7b",)
    assert plan([gpu("p1", gpus=4, vram=96, models=seven_b)])["qwen3.5-7b"] == ModelSupply(1, 4)
    many = [gpu(f"p{i}", models=seven_b) for i in range(6)]
    assert plan(many)["qwen3.5-7b"] == ModelSupply(1, 4)  # never above max_replicas
    assert plan([gpu("p1", gpus=4, models=("deepseek-v3",), vram=320)])["deepseek-v3"] == (
        ModelSupply(1, 2)  # two GPUs each
    )
    tiny_only = CATALOG.model_copy(update={"models": [TINY_16]})
    two_slots = node("p1", CPU=8, **{VRAM_RESOURCE: 32})
    assert plan([two_slots], tiny_only) == {"darkgpu-tiny": ModelSupply(1, 2)}


def test_a_draining_node_keeps_its_model_deployed_but_adds_no_slot():
    """Its replica is replaced elsewhere before it leaves: the model stays, at least one."""
    seven_b = ("qwen3.5-7b",)
    assert plan([gpu("p1", models=seven_b, draining=True)]) == {"qwen3.5-7b": ModelSupply(1, 1)}
    nodes = [gpu("p1", models=seven_b, draining=True), gpu("p2", models=seven_b),
             gpu("p3", models=seven_b)]  # fmt: skip
    assert plan(nodes)["qwen3.5-7b"] == ModelSupply(1, 2)


def test_the_floor_is_the_catalogs_else_the_operators_and_never_above_the_slots_online():
    """A floor of two replicas with one node: one, and two the moment a second node joins."""
    policy = SupplyPolicy(min_replicas=2, max_replicas=4)
    one = [gpu("p1", models=("qwen3.5-7b",))]
    assert plan(one, policy=policy) == {"qwen3.5-7b": ModelSupply(1, 1)}
    two = [*one, gpu("p2", models=("qwen3.5-7b",))]
    assert plan(two, policy=policy) == {"qwen3.5-7b": ModelSupply(2, 2)}
    seven_b = CATALOG.get("qwen3.5-7b").model_copy(update={"min_replicas": 1})
    catalog = CATALOG.model_copy(update={"models": [seven_b]})
    assert plan(two, catalog, policy=policy) == {"qwen3.5-7b": ModelSupply(1, 2)}


def test_a_cold_model_scales_to_zero_and_demand_warms_it_at_once():
    policy = SupplyPolicy(min_replicas=1, max_replicas=4, cool_after_s=600)
    nodes = [gpu("p1", models=("qwen3.5-7b",))]
    assert plan(nodes, policy=policy) == {"qwen3.5-7b": ModelSupply(0, 1)}  # never asked for
    asked = {"qwen3.5-7b": NOW - 1}
    assert plan(nodes, asked=asked, policy=policy) == {"qwen3.5-7b": ModelSupply(1, 1)}
    # warm for the whole window after the last request (hysteresis), cold after it
    assert plan(nodes, asked={"qwen3.5-7b": NOW - 599}, policy=policy)["qwen3.5-7b"].warm
    assert not plan(nodes, asked={"qwen3.5-7b": NOW - 601}, policy=policy)["qwen3.5-7b"].warm


SHARED = ("qwen3.5-7b", "qwen3.5-14b")  # both fit a 24 GiB GPU


def slots(planned: dict[str, ModelSupply]) -> dict[str, int]:
    return {model: supply.max_replicas for model, supply in planned.items()}


def test_a_shared_gpu_goes_to_the_model_asked_for_most_and_moves_only_on_a_clear_shift():
    nodes = [gpu("p1", models=SHARED)]
    first = plan(nodes, demand={"qwen3.5-7b": 1.0, "qwen3.5-14b": 3.0})
    assert first == {"qwen3.5-7b": ModelSupply(0, 0), "qwen3.5-14b": ModelSupply(1, 1)}
    # the 7B now asked a little more: the 14B keeps the GPU it holds (hysteresis)
    calmer = {"qwen3.5-7b": 3.5, "qwen3.5-14b": 3.0}
    assert slots(plan(nodes, demand=calmer, held=first)) == {"qwen3.5-7b": 0, "qwen3.5-14b": 1}
    # ...until it asks HOLD times as much: then the GPU moves
    shifted = {"qwen3.5-7b": 3.0 * HOLD + 0.1, "qwen3.5-14b": 3.0}
    assert slots(plan(nodes, demand=shifted, held=first)) == {"qwen3.5-7b": 1, "qwen3.5-14b": 0}
    # with nothing held, the same small lead wins it
    assert slots(plan(nodes, demand=calmer)) == {"qwen3.5-7b": 1, "qwen3.5-14b": 0}


def test_slots_follow_demand_per_replica_across_nodes():
    nodes = [gpu(f"p{i}", models=SHARED) for i in range(4)]
    assert slots(plan(nodes, demand={"qwen3.5-7b": 9.0, "qwen3.5-14b": 3.0})) == {
        "qwen3.5-7b": 3,  # 9/3 per replica against 3/1
        "qwen3.5-14b": 1,
    }
    # a warm model keeps its floor whatever the other asks
    assert slots(plan(nodes, demand={"qwen3.5-7b": 100.0})) == {"qwen3.5-7b": 3, "qwen3.5-14b": 1}
    # a cold one gets none while another asks for them; asked for, it is warm again
    cold = SupplyPolicy(min_replicas=1, max_replicas=4, cool_after_s=600)
    hot = {"qwen3.5-7b": 100.0}
    assert plan(nodes, policy=cold, demand=hot, asked={"qwen3.5-7b": NOW})["qwen3.5-14b"] == (
        ModelSupply(0, 0)
    )
    asked = {"qwen3.5-7b": NOW, "qwen3.5-14b": NOW}
    assert plan(nodes, policy=cold, demand=hot, asked=asked)["qwen3.5-14b"] == ModelSupply(1, 1)


def test_idle_slots_go_to_the_model_the_provider_prefers_then_spread_evenly():
    prefers_14b = [gpu("p1", models=("qwen3.5-14b", "qwen3.5-7b"))]
    assert slots(plan(prefers_14b)) == {"qwen3.5-7b": 0, "qwen3.5-14b": 1}
    prefers_7b = [gpu("p1", models=SHARED)]
    assert slots(plan(prefers_7b)) == {"qwen3.5-7b": 1, "qwen3.5-14b": 0}
    # every provider prefers the 7B: it gets every GPU beyond the 14B's floor
    four = [gpu(f"p{i}", models=SHARED) for i in range(4)]
    assert slots(plan(four)) == {"qwen3.5-7b": 3, "qwen3.5-14b": 1}
    # no preference (no list: any model that fits): spread evenly
    catalog = CATALOG.model_copy(
        update={"models": [CATALOG.get("qwen3.5-7b"), CATALOG.get("qwen3.5-14b")]}
    )
    assert slots(plan([gpu(f"p{i}") for i in range(4)], catalog)) == {
        "qwen3.5-7b": 2,
        "qwen3.5-14b": 2,
    }


def test_a_model_only_some_nodes_allow_keeps_its_room_there():
    """The 7B fits both nodes, the 14B only p1 (p2 allows the 7B alone): the 7B, asked for
    most and served first, takes p2's GPU, never the only one the 14B may have."""
    nodes = [gpu("p1", models=SHARED), gpu("p2", models=("qwen3.5-7b",))]
    assert slots(plan(nodes, demand={"qwen3.5-7b": 10.0})) == {"qwen3.5-7b": 1, "qwen3.5-14b": 1}


def test_cpu_engine_models_share_a_nodes_vram_by_their_own_size():
    eight = TINY_16.model_copy(update={"id": "tiny-8", "min_vram_gb": 8})
    catalog = CATALOG.model_copy(update={"models": [TINY_16, eight]})
    nodes = [node("p1", CPU=8, **{VRAM_RESOURCE: 32})]
    # 16 + 8 + 8 GiB: each warm model one replica, the rest to the one asked for
    assert slots(plan(nodes, catalog, demand={"tiny-8": 5.0})) == {"darkgpu-tiny": 1, "tiny-8": 2}


def test_demand_is_a_rate_that_forgets_slowly():
    rate = DemandRate(half_life_s=60)
    assert rate.update({"m": 100}, now_s=0) == {}  # the first totals: nothing to compare
    assert rate.update({"m": 160}, now_s=60)["m"] == pytest.approx(0.5)  # 1/s, half weight
    assert rate.update({"m": 160}, now_s=120)["m"] == pytest.approx(0.25)  # silence: halves
    # a total that went back (its key expired and began again) counts nothing, not minus
    assert rate.update({"m": 3}, now_s=180)["m"] == pytest.approx(0.125)
