from cluster.catalog import load_catalog
from cluster.placement import replica_bundles
from core.settings import CONFIGS_DIR
from kernel.labels import PRICE_FLOOR_LABEL, VRAM_RESOURCE, NodeIdentity, TrustTier, format_labels

CATALOG = load_catalog(CONFIGS_DIR / "models.toml")


def test_replica_bundles_ask_for_gpus_vram_and_the_models_own_resource():
    """Only a node whose provider allows the model declares its resource
    (`kernel.labels.model_resources`), so Ray places the replica nowhere else."""
    gpu80 = {"GPU": 1, VRAM_RESOURCE: 80}
    assert replica_bundles(CATALOG.get("deepseek-v3")) == [
        {**gpu80, "darkgpu_model:deepseek-v3": 1.0},
        gpu80,
    ]
    assert replica_bundles(CATALOG.get("qwen3.5-7b")) == [
        {"GPU": 1, VRAM_RESOURCE: 8, "darkgpu_model:qwen3.5-7b": 1.0}
    ]
    assert replica_bundles(CATALOG.get("darkgpu-tiny")) == [
        {"CPU": 1, "darkgpu_model:darkgpu-tiny": 1.0}
    ]
    tiny_16 = CATALOG.get("darkgpu-tiny").model_copy(update={"min_vram_gb": 16})
    assert replica_bundles(tiny_16) == [
        {"CPU": 1, VRAM_RESOURCE: 16, "darkgpu_model:darkgpu-tiny": 1.0}
    ]


def test_node_identity_round_trips_through_labels():
    node = NodeIdentity("p1", TrustTier.verified, "NVIDIA_H100")
    assert NodeIdentity.from_labels(node.labels()) == node
    priced = NodeIdentity("p2", TrustTier.basic, price_floor_pct=20)
    assert priced.labels()[PRICE_FLOOR_LABEL] == "20"
    assert NodeIdentity.from_labels(priced.labels()) == priced
    assert NodeIdentity.from_labels({PRICE_FLOOR_LABEL: "x"}).price_floor_pct == 0
    assert NodeIdentity.from_labels({}).provider_id == "local"
    assert format_labels(node.labels()).startswith("darkgpu.io/provider-id=p1,")
