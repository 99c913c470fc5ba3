"""The local models (`cluster/local_model.py`): the default keeps its 256 tokens of context;
the long variant is the same model with 16,384, and the catalog's `local:<name>` picks one."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cluster.catalog import CatalogModel
from cluster.local_model import ensure_local_model
from core.settings import Settings
from serve_app.models import model_source


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def contexts(folder: Path) -> tuple[int, int]:
    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    return config["max_position_embeddings"], tokenizer["model_max_length"]


def test_the_default_keeps_its_context_and_the_long_one_has_16k(root: Path) -> None:
    default = ensure_local_model(root)
    assert default == root / "tiny-llama"
    assert contexts(default) == (256, 256)
    long = ensure_local_model(root, "tiny-llama-16k")
    assert contexts(long) == (16384, 16384)
    # the same model otherwise: the same tokenizer, the same seeded weights
    assert (long / "tokenizer.json").read_bytes() == (default / "tokenizer.json").read_bytes()
    weights, long_weights = (load_file(f / "model.safetensors") for f in (default, long))
    assert weights.keys() == long_weights.keys()
    assert all(weights[k].equal(long_weights[k]) for k in weights)


def test_an_unknown_local_model_is_refused(root: Path) -> None:
    with pytest.raises(ValueError, match="tiny-llama-16k"):
        ensure_local_model(root, "tiny-llama-1m")


def test_the_catalog_source_names_the_local_model(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    model = CatalogModel.model_validate(
        {"id": "long", "source": "local:tiny-llama-16k", "input_usd_per_1m": "1",
         "output_usd_per_1m": "1", "min_vram_gb": 0, "context_length": 16384,
         "quantization": "bf16", "class": "local"}
    )  # fmt: skip
    source = Path(model_source(model, settings))
    assert source == Path(settings.resolved_data_dir) / "models" / "tiny-llama-16k"
    assert contexts(source) == (16384, 16384)


def test_the_tests_exact_word_tokenizes_back_one_token_each(root: Path) -> None:
    """`tests.exact_tokens`: the one token the tests let the engine pick is the built model's
    and n of them, as text, count n (the ingress's recount bills that count)."""
    from transformers import AutoTokenizer

    from tests.exact_tokens import WORD, WORD_ID

    tokenizer = AutoTokenizer.from_pretrained(ensure_local_model(root))
    assert tokenizer.decode([WORD_ID]) == WORD
    for n in (1, 7, 64):
        assert len(tokenizer(WORD * n, add_special_tokens=False)["input_ids"]) == n
