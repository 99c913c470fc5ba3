"""The supply reconciler's decision (`cluster.supply.plan_supply`): which models are deployed,
within which replica bounds, from the nodes, the providers' allow-lists and the demand."""

from cluster.catalog import load_catalog
from cluster.placement import NodeCapacity
from cluster.supply import ModelSupply, SupplyNode, SupplyPolicy, plan_supply
from core.settings import CONFIGS_DIR
from kernel.labels import VRAM_RESOURCE

CATALOG = load_catalog(CONFIGS_DIR / "models.toml")
TINY_16 = CATALOG.get("darkgpu-tiny").model_copy(update={"min_vram_gb": 16})
POLICY = SupplyPolicy(min_replicas=1, max_replicas=4)
NOW = 1_000_000.0


def node(name: str, models: tuple[str, ...] = (), draining: bool = False, **resources: float):
    return SupplyNode(name, NodeCapacity.from_resources(resources), frozenset(models), draining)


def gpu(name: str, gpus: int = 1, vram: int = 24, models: tuple[str, ...] = (), **kw):
    return node(name, models, **kw, GPU=gpus, **{VRAM_RESOURCE: vram})


def plan(nodes, catalog=CATALOG, asked=None, policy=POLICY, now=NOW):
    return plan_supply(catalog, nodes, asked or {}, policy, now)


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
    deployed = set(plan([node("head", CPU=8), gpu("p1")]))
    assert {"qwen3.5-7b", "qwen3.5-14b", "qwen25-32b-awq"} <= deployed
    assert not deployed & {"qwen3.5-27b", "llama-3.3-70b", "deepseek-v3", "darkgpu-tiny"}


def test_tensor_parallel_models_need_enough_gpus_on_one_node():
    assert "deepseek-v3" in plan([gpu("p1", gpus=2, vram=160)])
    assert "deepseek-v3" not in plan([gpu("p1", gpus=1, vram=141)])
    assert "deepseek-v3" not in plan([gpu("p1", gpus=1, vram=80), gpu("p2", gpus=1, vram=80)])


def test_a_provider_serves_only_the_models_it_allows_and_a_model_nobody_allows_is_not_deployed():
    nodes = [gpu("p1", models=("qwen3.5-7b",)), gpu("p2", models=("qwen3.5-7b", "qwen3.5-14b"))]
    assert plan(nodes) == {"qwen3.5-7b": ModelSupply(1, 2), "qwen3.5-14b": ModelSupply(1, 1)}
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


def test_the_operators_floor_holds_even_above_the_slots_online():
    """A floor of two replicas with one node: the second waits for a node (Serve places it
    the moment one joins)."""
    policy = SupplyPolicy(min_replicas=2, max_replicas=4)
    assert plan([gpu("p1", models=("qwen3.5-7b",))], policy=policy) == {
        "qwen3.5-7b": ModelSupply(2, 2)
    }


def test_a_cold_model_scales_to_zero_and_demand_warms_it_at_once():
    policy = SupplyPolicy(min_replicas=1, max_replicas=4, cool_after_s=600)
    nodes = [gpu("p1", models=("qwen3.5-7b",))]
    assert plan(nodes, policy=policy) == {"qwen3.5-7b": ModelSupply(0, 1)}  # never asked for
    asked = {"qwen3.5-7b": NOW - 1}
    assert plan(nodes, asked=asked, policy=policy) == {"qwen3.5-7b": ModelSupply(1, 1)}
    # warm for the whole window after the last request (hysteresis), cold after it
    assert plan(nodes, asked={"qwen3.5-7b": NOW - 599}, policy=policy)["qwen3.5-7b"].warm
    assert not plan(nodes, asked={"qwen3.5-7b": NOW - 601}, policy=policy)["qwen3.5-7b"].warm
