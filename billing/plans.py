"""Plans and prepaid bundles (`configs/plans.toml`), validated, money in integer nUSD."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kernel.errors import InternalError
from kernel.money import NUSD_PER_CENT, usd_to_nusd


class PlansError(InternalError):
    """The plans file is missing or invalid; the message names the file and the field."""


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: int = Field(ge=1)
    tokens_per_day: int | None = Field(default=None, ge=0, description="None: no daily cap")
    signup_grant_usd: str = "0"
    custom: bool = False

    @field_validator("signup_grant_usd")
    @classmethod
    def _dollars(cls, value: str) -> str:
        usd_to_nusd(value)
        return value

    @property
    def signup_grant_nusd(self) -> int:
        return usd_to_nusd(self.signup_grant_usd)


class Bundle(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    price_usd: str
    default_tokens_per_day: int = Field(ge=0)
    tokens_included_approx: int | None = Field(default=None, ge=0)

    @field_validator("price_usd")
    @classmethod
    def _dollars(cls, value: str) -> str:
        if usd_to_nusd(value) % NUSD_PER_CENT:
            raise ValueError("a bundle price is a whole number of cents")
        return value

    @property
    def price_nusd(self) -> int:
        return usd_to_nusd(self.price_usd)

    @property
    def price_cents(self) -> int:
        return self.price_nusd // NUSD_PER_CENT


class Plans(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default_plan: str = "free"
    plans: dict[str, Plan] = Field(min_length=1)
    bundles: dict[str, Bundle] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _default_exists(self) -> Plans:
        if self.default_plan not in self.plans:
            raise ValueError(f"default_plan {self.default_plan!r} is not a plan")
        return self

    def get(self, name: str) -> Plan:
        try:
            return self.plans[name]
        except KeyError:
            raise KeyError(f"unknown plan {name!r} (plans: {', '.join(self.plans)})") from None


def load_plans(path: str | Path) -> Plans:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise PlansError(f"{path}: cannot read the plans file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PlansError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return Plans.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise PlansError(f"{path}: invalid plans file: " + "; ".join(problems)) from None


def daily_cap(plan_cap: int | None, operator_cap: int | None, own_cap: int | None) -> int | None:
    """The daily token cap that applies (None: none): the operator's override (or a capped
    budget's) else the plan's, lowered by the customer's own. The admission script applies the
    same rule to the account's Redis record (`billing.lua_scripts.ADMIT`: tpd, own)."""
    cap = operator_cap if operator_cap is not None else plan_cap
    if own_cap is not None and (cap is None or own_cap < cap):
        return own_cap
    return cap
