"""The provider registry (SQL): providers, their agent tokens, GPU facts, keys and status.

An account creates a provider and gets its token once (`dgpp-` + 43 base64url characters,
32 random bytes; only the SHA-256 is stored, as with consumer keys, in a table of its own:
a provider token is never a consumer key and the reverse). The agent authenticates with it
to exchange it for the cluster's address and Ray token (`darkgpu auth`), to register its
GPU facts and X25519 public key, and to send heartbeats carrying its status.

The trust tier is decided here, at registration, by `cluster.attestation.decide_tier`:
`verified` needs CC on and evidence binding the registered key, checked by the platform's
`CcVerifier`; a new key or new facts without fresh evidence fall back to `basic`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from billing.schema import (
    Account,
    LedgerAccount,
    Provider,
    ProviderStatus,
    ProviderToken,
    UsageEvent,
    utcnow,
)
from cluster.attestation import (
    AttestationError,
    CcEvidence,
    CcVerifier,
    NoVerifier,
    decide_tier,
    decode_public_key,
    issue_challenge,
)
from cluster.labels import TrustTier
from cluster.nvml import CcState
from cluster.settings import get_settings

TOKEN_PREFIX = "dgpp-"
TOKEN_BYTES = 32
DISPLAY_PREFIX_LEN = 12
PROVIDER_ID_PREFIX = "prv_"
_TOKEN_RE = re.compile(r"^dgpp-[A-Za-z0-9_-]{43,}$")


class RegistryError(ValueError):
    """A request the registry refuses; `code` names why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ProviderAuthError(RegistryError):
    pass


class ProviderNotFound(RegistryError):
    pass


# --- request bodies --------------------------------------------------------------------------


class GpuFacts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    vram_gb: float = Field(gt=0, le=100_000, description="all GPUs together, GiB")
    count: int = Field(default=1, ge=1, le=64)
    driver_version: str = Field(min_length=1, max_length=32)
    cuda_version: str = Field(min_length=1, max_length=16)


class ScheduleEntry(BaseModel):
    """A `[[schedule]]` window as stored (the agent enforces it; agent_bootstrap.schedule)."""

    model_config = ConfigDict(extra="forbid")

    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(max_length=7)
    start: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    end: str = Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")


class Registration(BaseModel):
    """`POST /v1/providers/register`: what the agent detected and chose."""

    model_config = ConfigDict(extra="forbid")

    gpu: GpuFacts
    cc_state: CcState = CcState.unknown
    public_key: str = Field(description="base64 of the 32-byte X25519 public key")
    price_floor_pct: int = Field(default=0, ge=0, le=1000)
    schedule: list[ScheduleEntry] | None = Field(default=None, max_length=64)
    schedule_timezone: str | None = Field(default=None, max_length=64)
    cc_evidence: CcEvidence | None = None


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderInfo:
    id: str
    account_id: int
    name: str
    public_key: str | None
    gpu_name: str | None
    vram_gb: float | None
    gpu_count: int
    driver_version: str | None
    cuda_version: str | None
    cc_state: str
    trust_tier: str
    cc_evidence: dict[str, Any] | None
    price_floor_pct: int
    schedule: list[dict[str, Any]] | None
    status: str
    last_heartbeat_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, row: Provider) -> ProviderInfo:
        return cls(
            id=row.id,
            account_id=row.account_id,
            name=row.name,
            public_key=row.x25519_public_key,
            gpu_name=row.gpu_name,
            vram_gb=row.vram_gb,
            gpu_count=row.gpu_count,
            driver_version=row.driver_version,
            cuda_version=row.cuda_version,
            cc_state=row.cc_state,
            trust_tier=row.trust_tier,
            cc_evidence=row.cc_evidence,
            price_floor_pct=row.price_floor_pct,
            schedule=row.schedule,
            status=row.status,
            last_heartbeat_at=_aware(row.last_heartbeat_at),
            created_at=_aware(row.created_at) or utcnow(),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "object": "provider",
            "id": self.id,
            "account_id": self.account_id,
            "name": self.name,
            "status": self.status,
            "trust_tier": self.trust_tier,
            "price_floor_pct": self.price_floor_pct,
            "public_key": self.public_key,
            "gpu": {
                "name": self.gpu_name,
                "vram_gb": self.vram_gb,
                "count": self.gpu_count,
                "driver_version": self.driver_version,
                "cuda_version": self.cuda_version,
            },
            "cc_state": self.cc_state,
            "schedule": self.schedule,
            "last_heartbeat_at": _iso(self.last_heartbeat_at),
            "created_at": _iso(self.created_at),
        }


@dataclass(frozen=True)
class NewProvider:
    provider: ProviderInfo
    token: str  # shown once, never stored


@dataclass(frozen=True)
class Registered:
    provider: ProviderInfo
    tier_reason: str  # why this tier (e.g. "confidential computing is off")


@dataclass(frozen=True)
class Earnings:
    requests: int
    earned_nusd: int  # the provider's 95% of everything it served
    payable_nusd: int  # not paid out yet (the ledger's `provider:<id>:payable`)

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "earned_nusd": self.earned_nusd,
            "payable_nusd": self.payable_nusd,
        }


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # SQLite drops the zone


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


# --- tokens ----------------------------------------------------------------------------------


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def looks_like_token(token: str) -> bool:
    return bool(_TOKEN_RE.match(token))


def _new_token(session: Session, provider_id: str) -> str:
    secret = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    session.add(
        ProviderToken(
            provider_id=provider_id,
            token_hash=hash_token(secret),
            prefix=secret[:DISPLAY_PREFIX_LEN],
        )
    )
    return secret


def _provider(session: Session, provider_id: str, *, lock: bool = False) -> Provider:
    query = select(Provider).where(Provider.id == provider_id)
    row = session.scalar(query.with_for_update() if lock else query)
    if row is None:
        raise ProviderNotFound("provider_not_found", f"No provider '{provider_id}'.")
    return row


# --- services --------------------------------------------------------------------------------


def create_provider(engine: Engine, *, account_id: int, name: str) -> NewProvider:
    """A provider owned by `account_id`, and its first token (returned once)."""
    with Session(engine) as session, session.begin():
        if session.get(Account, account_id) is None:
            raise RegistryError("account_not_found", f"No account {account_id}.")
        row = Provider(
            id=PROVIDER_ID_PREFIX + secrets.token_hex(8),
            account_id=account_id,
            name=name,
            gpu_count=0,
            cc_state=CcState.unknown.value,
            trust_tier=TrustTier.basic.value,
            price_floor_pct=0,
            status=ProviderStatus.offline.value,
        )
        session.add(row)
        session.flush()
        token = _new_token(session, row.id)
        session.flush()
        return NewProvider(ProviderInfo.of(row), token)


def issue_token(engine: Engine, provider_id: str) -> str:
    """Another token for the provider (shown once); earlier ones stay valid until revoked."""
    with Session(engine) as session, session.begin():
        _provider(session, provider_id)
        return _new_token(session, provider_id)


def revoke_tokens(engine: Engine, provider_id: str) -> int:
    """Revoke every token of the provider; the number revoked."""
    with Session(engine) as session, session.begin():
        result = session.execute(
            update(ProviderToken)
            .where(ProviderToken.provider_id == provider_id, ProviderToken.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


def authenticate(engine: Engine, token: str | None) -> ProviderInfo:
    """The provider of a valid, unrevoked token, or `ProviderAuthError`."""
    if not token or not looks_like_token(token):
        raise ProviderAuthError("invalid_provider_token", "Missing or malformed provider token.")
    digest = hash_token(token)
    with Session(engine) as session, session.begin():
        found = session.execute(
            select(ProviderToken, Provider)
            .join(Provider, Provider.id == ProviderToken.provider_id)
            .where(ProviderToken.token_hash == digest)
        ).first()
        if found is None or not hmac.compare_digest(found[0].token_hash, digest):
            raise ProviderAuthError("invalid_provider_token", "Unknown provider token.")
        token_row, provider = found
        if token_row.revoked_at is not None:
            raise ProviderAuthError("revoked_provider_token", "This provider token was revoked.")
        account = session.get(Account, provider.account_id)
        if account is None or account.status != "active":
            raise ProviderAuthError("account_disabled", "The provider's account is disabled.")
        token_row.last_used_at = utcnow()
        return ProviderInfo.of(provider)


def register(
    engine: Engine,
    provider_id: str,
    registration: Registration,
    *,
    secret: bytes,
    verifier: CcVerifier | None = None,
    now: float | None = None,
) -> Registered:
    """Record the agent's GPU facts, key, price floor and schedule; decide the trust tier."""
    try:
        decode_public_key(registration.public_key)
    except AttestationError as exc:
        raise RegistryError("invalid_public_key", str(exc)) from None
    decision = decide_tier(
        cc_state=registration.cc_state,
        public_key=registration.public_key,
        evidence=registration.cc_evidence,
        provider_id=provider_id,
        secret=secret,
        verifier=verifier or NoVerifier(),
        now=time.time() if now is None else now,
    )
    gpu = registration.gpu
    with Session(engine) as session, session.begin():
        row = _provider(session, provider_id, lock=True)
        row.x25519_public_key = registration.public_key
        row.gpu_name = gpu.name
        row.vram_gb = round(gpu.vram_gb, 1)
        row.gpu_count = gpu.count
        row.driver_version = gpu.driver_version
        row.cuda_version = gpu.cuda_version
        row.cc_state = registration.cc_state.value
        row.trust_tier = decision.tier.value
        row.cc_evidence = decision.record
        row.price_floor_pct = registration.price_floor_pct
        row.schedule = (
            None
            if registration.schedule is None
            else [w.model_dump() for w in registration.schedule]
        )
        if row.status == ProviderStatus.offline.value:
            row.status = ProviderStatus.paused.value  # registered, not yet in the cluster
        session.flush()
        return Registered(ProviderInfo.of(row), decision.reason)


def heartbeat(
    engine: Engine, provider_id: str, status: ProviderStatus, now: datetime | None = None
) -> ProviderInfo:
    """The agent is alive and in `status`."""
    with Session(engine) as session, session.begin():
        row = _provider(session, provider_id, lock=True)
        row.status = status.value
        row.last_heartbeat_at = now or utcnow()
        session.flush()
        return ProviderInfo.of(row)


def set_status(engine: Engine, provider_id: str, status: ProviderStatus) -> ProviderInfo:
    with Session(engine) as session, session.begin():
        row = _provider(session, provider_id, lock=True)
        row.status = status.value
        session.flush()
        return ProviderInfo.of(row)


def mark_stale_offline(engine: Engine, *, older_than_s: float, now: datetime | None = None) -> int:
    """Providers whose last heartbeat is older than `older_than_s` become `offline`."""
    cutoff = (now or utcnow()) - timedelta(seconds=older_than_s)
    with Session(engine) as session, session.begin():
        result = session.execute(
            update(Provider)
            .where(
                Provider.status != ProviderStatus.offline.value,
                (Provider.last_heartbeat_at.is_(None)) | (Provider.last_heartbeat_at < cutoff),
            )
            .values(status=ProviderStatus.offline.value)
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


def get_provider(engine: Engine, provider_id: str) -> ProviderInfo:
    with Session(engine) as session, session.begin():
        return ProviderInfo.of(_provider(session, provider_id))


def list_providers(
    engine: Engine, *, account_id: int | None = None, status: ProviderStatus | None = None
) -> list[ProviderInfo]:
    query = select(Provider).order_by(Provider.created_at, Provider.id)
    if account_id is not None:
        query = query.where(Provider.account_id == account_id)
    if status is not None:
        query = query.where(Provider.status == status.value)
    with Session(engine) as session, session.begin():
        return [ProviderInfo.of(row) for row in session.scalars(query)]


@dataclass(frozen=True)
class ProviderTerms:
    """What routing takes from the registry, not from a node's self-declared labels."""

    trust_tier: TrustTier
    price_floor_pct: int
    status: ProviderStatus

    @property
    def takes_requests(self) -> bool:
        """False once the agent said the provider is leaving or paused (its node may still
        be in the cluster, finishing what it has)."""
        return self.status not in (ProviderStatus.draining, ProviderStatus.paused)


def provider_terms(engine: Engine) -> dict[str, ProviderTerms]:
    """Every registered provider's trust tier, price floor and status, by provider id."""
    query = select(Provider.id, Provider.trust_tier, Provider.price_floor_pct, Provider.status)
    with Session(engine) as session:
        return {
            pid: ProviderTerms(TrustTier(tier), int(floor), ProviderStatus(status))
            for pid, tier, floor, status in session.execute(query)
        }


def earnings(engine: Engine, provider_id: str) -> Earnings:
    """What the provider's GPU has earned (usage ledger) and what is still to be paid."""
    with Session(engine) as session, session.begin():
        earned_sum = func.coalesce(func.sum(UsageEvent.provider_share_nusd), 0)
        requests, earned = session.execute(
            select(func.count(UsageEvent.id), earned_sum).where(
                UsageEvent.provider_id == provider_id
            )
        ).one()
        payable = session.scalar(
            select(LedgerAccount.balance).where(
                LedgerAccount.name == f"provider:{provider_id}:payable"
            )
        )
        return Earnings(int(requests), int(earned), int(payable or 0))


# --- what the platform tells agents ----------------------------------------------------------


class RegistrySettings(BaseSettings):
    """`DARKGPU_*` settings of the provider side of the platform."""

    model_config = SettingsConfigDict(env_prefix="DARKGPU_", extra="ignore")

    cluster_address: str = Field(
        default="",
        description="host:port of the Ray head that agents join, on the overlay network "
        "(e.g. 10.8.0.1:6380); empty: the local head, 127.0.0.1:<ray_port>.",
    )
    ray_auth_token_path: Path | None = Field(
        default=None,
        description="The cluster's Ray token; unset: <data_dir>/ray_auth_token (cluster.local).",
    )
    attestation_secret: str = Field(
        default="", description="HMAC key of attestation challenges; empty: derived from the "
        "Ray token, which every head-side process has."
    )  # fmt: skip
    heartbeat_interval_s: int = Field(default=15, ge=1)
    offline_after_s: int = Field(default=90, ge=1)


@dataclass
class ProviderPlatform:
    """What the provider routes need besides the database: settings and the CC verifier."""

    settings: RegistrySettings = field(default_factory=RegistrySettings)
    verifier: CcVerifier = field(default_factory=NoVerifier)

    def cluster_address(self) -> str:
        return self.settings.cluster_address or f"127.0.0.1:{get_settings().ray_port}"

    def ray_token_path(self) -> Path:
        path = self.settings.ray_auth_token_path
        return path.expanduser() if path else get_settings().resolved_data_dir / "ray_auth_token"

    def ray_token(self) -> str:
        """The cluster's Ray auth token, or RegistryError when the cluster has none yet."""
        try:
            token = self.ray_token_path().read_text().strip()
        except OSError:
            token = ""
        if not token:
            raise RegistryError(
                "cluster_not_ready", "The cluster is not accepting providers right now."
            )
        return token

    def secret(self) -> bytes:
        if self.settings.attestation_secret:
            return self.settings.attestation_secret.encode()
        return hmac.new(self.ray_token().encode(), b"darkgpu attestation", "sha256").digest()

    def challenge(self, provider_id: str, now: float | None = None) -> str:
        return issue_challenge(self.secret(), provider_id, time.time() if now is None else now)
