from pathlib import Path

import pytest

from cluster.catalog import CatalogError, load_catalog
from core.settings import CONFIGS_DIR

SPEC_PRICES = {  # USD per 1M tokens (input, output) and min VRAM, from the consumer docs
    "qwen3.5-7b": ("0.015", "0.06", 8),
    "llama-3.3-8b": ("0.02", "0.08", 8),
    "mistral-nemo-12b": ("0.030", "0.12", 12),
    "gemma-4-12b": ("0.035", "0.14", 12),
    "qwen3.5-14b": ("0.030", "0.15", 16),
    "qwen3.5-27b": ("0.060", "0.30", 32),
    "llama-3.3-70b": ("0.100", "0.50", 48),
    "deepseek-v3": ("0.270", "1.10", 160),
}


@pytest.fixture(scope="module")
def catalog():
    return load_catalog(CONFIGS_DIR / "models.toml")


def test_catalog_has_every_spec_model_at_its_price(catalog):
    for model_id, (usd_in, usd_out, vram) in SPEC_PRICES.items():
        model = catalog.get(model_id)
        assert model is not None, model_id
        assert str(model.input_usd_per_1m) == usd_in
        assert str(model.output_usd_per_1m) == usd_out
        assert model.min_vram_gb == vram


def test_prices_are_exact_nano_dollars_per_token(catalog):
    assert catalog.get("qwen3.5-7b").input_nusd_per_token == 15
    assert catalog.get("qwen3.5-7b").output_nusd_per_token == 60
    assert catalog.get("deepseek-v3").output_nusd_per_token == 1100
    # the prepaid-credits site: $0.75 per 1,000 tokens
    for model_id, model_class in (("qwen25-14b-awq", "standard"), ("qwen25-32b-awq", "premium")):
        model = catalog.get(model_id)
        assert model.input_nusd_per_token == model.output_nusd_per_token == 750_000
        assert model.model_class == model_class
        assert model.quantization == "awq"


def test_local_model_is_priced_like_the_cheapest(catalog):
    local = [m for m in catalog.models if m.is_local]
    assert [m.id for m in local] == ["darkgpu-tiny"]
    cheapest = min(
        (m for m in catalog.models if not m.is_local),
        key=lambda m: (m.input_nusd_per_token, m.output_nusd_per_token),
    )
    assert local[0].input_nusd_per_token == cheapest.input_nusd_per_token
    assert local[0].output_nusd_per_token == cheapest.output_nusd_per_token


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


GOOD = """
[[models]]
id = "m1"
source = "org/m1"
input_usd_per_1m = "0.015"
output_usd_per_1m = "0.06"
min_vram_gb = 8
context_length = 4096
quantization = "fp16"
class = "standard"
"""


def test_a_bad_field_is_named(tmp_path):
    with pytest.raises(CatalogError, match=r"models\[m1\]\.min_vram_gb"):
        load_catalog(_write(tmp_path, GOOD.replace("min_vram_gb = 8", "min_vram_gb = -1")))
    with pytest.raises(CatalogError, match=r"models\[m1\]\.context_length"):
        load_catalog(_write(tmp_path, GOOD.replace("context_length = 4096\n", "")))
    with pytest.raises(CatalogError, match=r"models\[m1\]\.class"):
        load_catalog(_write(tmp_path, GOOD.replace('"standard"', '"gold"')))


def test_a_price_finer_than_a_nano_dollar_per_token_is_refused(tmp_path):
    with pytest.raises(CatalogError, match="input_usd_per_1m"):
        load_catalog(_write(tmp_path, GOOD.replace('"0.015"', '"0.0155"')))


def test_duplicate_ids_and_bad_toml_are_refused(tmp_path):
    with pytest.raises(CatalogError, match="duplicate model id 'm1'"):
        load_catalog(_write(tmp_path, GOOD + GOOD))
    with pytest.raises(CatalogError, match="not valid TOML"):
        load_catalog(_write(tmp_path, "[[models]\n"))
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path / "missing.toml")
