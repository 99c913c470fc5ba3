"""The model catalog (`configs/models.toml`), validated and with exact integer prices.

Money is an integer count of nano-dollars (1e-9 USD). A price per 1M tokens is published in
dollars; per token that is `usd * 1e9 / 1e6 = usd * 1000` nano-dollars, which must come out
whole ($0.015 per 1M = 15 nUSD per token, $0.75 per 1k = 750,000 nUSD per token).
"""

from __future__ import annotations

import tomllib
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from kernel.errors import InternalError
from kernel.money import NUSD_PER_TOKEN_AT_1_USD_PER_1M

LOCAL_SOURCE_PREFIX = "local:"


class CatalogError(InternalError):
    """The catalog file is missing or invalid; the message names the file and the field."""


def _usd(value: object) -> Decimal:
    if isinstance(value, float):
        value = repr(value)
    try:
        amount = Decimal(str(value))
    except InvalidOperation as exc:
        raise ValueError(f"not a dollar amount: {value!r}") from exc
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"not a dollar amount: {value!r}")
    return amount


Usd = Annotated[Decimal, BeforeValidator(_usd)]


class ModelClass(StrEnum):
    standard = "standard"
    premium = "premium"
    local = "local"


class CatalogModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    source: str = Field(min_length=1, description="Hugging Face repo, or local:<name>")
    input_usd_per_1m: Usd
    output_usd_per_1m: Usd
    min_vram_gb: int = Field(ge=0, description="VRAM a replica needs, all its GPUs together")
    tensor_parallel_size: int = Field(default=1, ge=1)
    context_length: int = Field(ge=16)
    quantization: str
    model_class: ModelClass = Field(alias="class")
    min_replicas: int | None = Field(
        default=None, ge=1, le=64, description="replicas kept while warm; none: the operator's"
    )

    @model_validator(mode="after")
    def _prices_are_whole_nano_dollars(self) -> CatalogModel:
        for name in ("input_usd_per_1m", "output_usd_per_1m"):
            per_token = getattr(self, name) * NUSD_PER_TOKEN_AT_1_USD_PER_1M
            if per_token != per_token.to_integral_value():
                raise ValueError(f"{name}: not a whole number of nano-dollars per token")
        return self

    @property
    def input_nusd_per_token(self) -> int:
        return int(self.input_usd_per_1m * NUSD_PER_TOKEN_AT_1_USD_PER_1M)

    @property
    def output_nusd_per_token(self) -> int:
        return int(self.output_usd_per_1m * NUSD_PER_TOKEN_AT_1_USD_PER_1M)

    @property
    def is_local(self) -> bool:
        """Made on this machine (never downloaded) and served where no GPU is present."""
        return self.source.startswith(LOCAL_SOURCE_PREFIX)

    @property
    def vram_gb_per_gpu(self) -> int:
        return -(-self.min_vram_gb // self.tensor_parallel_size)


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[CatalogModel] = Field(min_length=1)

    @model_validator(mode="after")
    def _ids_are_unique(self) -> Catalog:
        seen: set[str] = set()
        for model in self.models:
            if model.id in seen:
                raise ValueError(f"duplicate model id {model.id!r}")
            seen.add(model.id)
        return self

    @cached_property
    def by_id(self) -> dict[str, CatalogModel]:
        return {m.id: m for m in self.models}

    def get(self, model_id: str) -> CatalogModel | None:
        return self.by_id.get(model_id)


def load_catalog(path: str | Path) -> Catalog:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read the model catalog: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = list(err["loc"])
            if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
                entry = data.get("models", [])[loc[1]]
                ident = entry.get("id", f"#{loc[1] + 1}") if isinstance(entry, dict) else loc[1]
                loc = [f"models[{ident}]", *loc[2:]]
            problems.append(f"{'.'.join(str(p) for p in loc)}: {err['msg']}")
        raise CatalogError(f"{path}: invalid model catalog: " + "; ".join(problems)) from None
