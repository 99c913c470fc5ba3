from cluster.catalog import load_catalog
from cluster.placement import NodeCapacity, deployable_models, replica_bundles
from core.settings import CONFIGS_DIR
from kernel.labels import PRICE_FLOOR_LABEL, VRAM_RESOURCE, NodeIdentity, TrustTier, format_labels

CATALOG = load_catalog(CONFIGS_DIR / "models.toml")


def ids(models):
    return {m.id for m in models}


def test_without_a_gpu_only_the_local_model_is_deployed():
    assert ids(deployable_models(CATALOG, [NodeCapacity.from_resources({"CPU": 8})])) == {
        "darkgpu-tiny"
    }
    assert ids(deployable_models(CATALOG, [])) == {"darkgpu-tiny"}


def test_a_local_model_with_min_vram_goes_only_where_a_node_declares_it():
    tiny = CATALOG.get("darkgpu-tiny").model_copy(update={"min_vram_gb": 16})
    catalog = CATALOG.model_copy(update={"models": [tiny]})
    head = NodeCapacity.from_resources({"CPU": 8})
    provider = NodeCapacity.from_resources({"CPU": 4, VRAM_RESOURCE: 24})
    assert ids(deployable_models(catalog, [head])) == set()
    assert ids(deployable_models(catalog, [head, provider])) == {"darkgpu-tiny"}
    assert replica_bundles(tiny) == [{"CPU": 1, VRAM_RESOURCE: 16}]


def test_models_go_where_some_node_has_the_vram():
    node_24 = NodeCapacity.from_resources({"GPU": 1, VRAM_RESOURCE: 24})
    deployed = ids(deployable_models(CATALOG, [node_24]))
    assert {"qwen3.5-7b", "qwen3.5-14b", "qwen25-32b-awq"} <= deployed
    assert not deployed & {"qwen3.5-27b", "llama-3.3-70b", "deepseek-v3", "darkgpu-tiny"}


def test_tensor_parallel_models_need_enough_gpus_on_one_node():
    two_h100 = NodeCapacity.from_resources({"GPU": 2, VRAM_RESOURCE: 160})
    one_big = NodeCapacity.from_resources({"GPU": 1, VRAM_RESOURCE: 141})
    assert "deepseek-v3" in ids(deployable_models(CATALOG, [two_h100]))
    assert "deepseek-v3" not in ids(deployable_models(CATALOG, [one_big]))


def test_replica_bundles_ask_for_gpus_and_vram():
    assert replica_bundles(CATALOG.get("deepseek-v3")) == [{"GPU": 1, VRAM_RESOURCE: 80}] * 2
    assert replica_bundles(CATALOG.get("qwen3.5-7b")) == [{"GPU": 1, VRAM_RESOURCE: 8}]
    assert replica_bundles(CATALOG.get("darkgpu-tiny")) == [{"CPU": 1}]


def test_node_identity_round_trips_through_labels():
    node = NodeIdentity("p1", TrustTier.verified, "NVIDIA_H100")
    assert NodeIdentity.from_labels(node.labels()) == node
    priced = NodeIdentity("p2", TrustTier.basic, price_floor_pct=20)
    assert priced.labels()[PRICE_FLOOR_LABEL] == "20"
    assert NodeIdentity.from_labels(priced.labels()) == priced
    assert NodeIdentity.from_labels({PRICE_FLOOR_LABEL: "x"}).price_floor_pct == 0
    assert NodeIdentity.from_labels({}).provider_id == "local"
    assert format_labels(node.labels()).startswith("darkgpu.io/provider-id=p1,")
