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

import hmac
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from agent_bootstrap.evidence import CcEvidence
from cluster.attestation import (
    AttestationError,
    CcVerifier,
    NoVerifier,
    decide_tier,
    decode_public_key,
    issue_challenge,
)
from cluster.pools import Pool, pools
from core.local_secrets import made_once
from core.schema import (
    Account,
    Provider,
    ProviderHour,
    ProviderReview,
    ProviderStatus,
    ProviderToken,
    utcnow,
)
from core.settings import Settings
from kernel.errors import AuthError, Conflict, InvalidRequest, NotFound, Unavailable
from kernel.gpu import CcState
from kernel.labels import TrustTier
from kernel.tokens import (
    generate_provider_token,
    hash_key,
    looks_like_provider_token,
    new_provider_id,
)


class RegistryError(InvalidRequest):
    """A request the registry refuses as given; `code` names why."""


class ProviderAuthError(AuthError):
    """A provider token that is missing, malformed, unknown or revoked, or whose account is
    disabled; `code` names which."""


class ProviderNotFound(NotFound):
    code = "provider_not_found"


class ClusterNotReady(Unavailable):
    """No Ray token yet: the cluster takes no providers until `darkgpu up` has made one."""

    code = "cluster_not_ready"


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
    review: str
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
            review=row.review,
            last_heartbeat_at=row.last_heartbeat_at,
            created_at=row.created_at,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "object": "provider",
            "id": self.id,
            "account_id": self.account_id,
            "name": self.name,
            "status": self.status,
            "review": self.review,
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


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


# --- tokens ----------------------------------------------------------------------------------


def _new_token(session: Session, provider_id: str) -> str:
    token = generate_provider_token()
    session.add(
        ProviderToken(provider_id=provider_id, token_hash=token.key_hash, prefix=token.prefix)
    )
    return token.secret


def _provider(session: Session, provider_id: str, *, lock: bool = False) -> Provider:
    query = select(Provider).where(Provider.id == provider_id)
    row = session.scalar(query.with_for_update() if lock else query)
    if row is None:
        raise ProviderNotFound(f"No provider '{provider_id}'.")
    return row


# --- services --------------------------------------------------------------------------------


def create_provider(engine: Engine, *, account_id: int, name: str) -> NewProvider:
    """A provider owned by `account_id`, and its first token (returned once)."""
    with Session(engine) as session, session.begin():
        if session.get(Account, account_id) is None:
            raise RegistryError(f"No account {account_id}.", code="account_not_found")
        row = Provider(
            id=new_provider_id(),
            account_id=account_id,
            name=name,
            gpu_count=0,
            cc_state=CcState.unknown.value,
            trust_tier=TrustTier.basic.value,
            price_floor_pct=0,
            status=ProviderStatus.offline.value,
            review=ProviderReview.pending.value,
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
        return _revoke_tokens(session, provider_id)


def _revoke_tokens(session: Session, provider_id: str) -> int:
    result = session.execute(
        update(ProviderToken)
        .where(ProviderToken.provider_id == provider_id, ProviderToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def authenticate(engine: Engine, token: str | None) -> ProviderInfo:
    """The provider of a valid, unrevoked token, or `ProviderAuthError`."""
    if not token or not looks_like_provider_token(token):
        raise ProviderAuthError(
            "Missing or malformed provider token.", code="invalid_provider_token"
        )
    digest = hash_key(token)
    with Session(engine) as session, session.begin():
        found = session.execute(
            select(ProviderToken, Provider)
            .join(Provider, Provider.id == ProviderToken.provider_id)
            .where(ProviderToken.token_hash == digest)
        ).first()
        if found is None or not hmac.compare_digest(found[0].token_hash, digest):
            raise ProviderAuthError("Unknown provider token.", code="invalid_provider_token")
        token_row, provider = found
        if token_row.revoked_at is not None:
            raise ProviderAuthError(
                "This provider token was revoked.", code="revoked_provider_token"
            )
        account = session.get(Account, provider.account_id)
        if account is None or account.status != "active":
            raise ProviderAuthError("The provider's account is disabled.", code="account_disabled")
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
        raise RegistryError(str(exc), code="invalid_public_key") from None
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
        if decision.tier == TrustTier.verified and row.review == ProviderReview.pending.value:
            # the rule that approves without the operator: the platform checked its hardware
            row.review = ProviderReview.approved.value
            row.reviewed_at = utcnow()
            row.review_note = "approved: its confidential-computing attestation passed"
        session.flush()
        return Registered(ProviderInfo.of(row), decision.reason)


def heartbeat(
    engine: Engine, provider_id: str, status: ProviderStatus, now: datetime | None = None
) -> ProviderInfo:
    """The agent is alive and in `status`; an hour it says `online` in counts to its uptime
    (`cluster.market`)."""
    now = now or utcnow()
    with Session(engine) as session, session.begin():
        row = _provider(session, provider_id, lock=True)  # its heartbeats one at a time
        row.status = status.value
        row.last_heartbeat_at = now
        hour = now.replace(minute=0, second=0, microsecond=0)
        if (
            status == ProviderStatus.online
            and session.get(ProviderHour, (provider_id, hour)) is None
        ):
            session.add(ProviderHour(provider_id=provider_id, hour=hour))
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


# --- the operator's review ---------------------------------------------------------------------


def review(
    engine: Engine, provider_id: str, decision: ProviderReview, *, note: str | None = None
) -> ProviderInfo:
    """The operator approves, suspends or revokes a provider. Revoking also revokes every
    token and is final; approving lifts a suspension. Whoever decided writes `note` (why)."""
    if decision == ProviderReview.pending:
        raise RegistryError("A provider cannot be put back to pending.", code="invalid_review")
    with Session(engine) as session, session.begin():
        row = _provider(session, provider_id, lock=True)
        if row.review == ProviderReview.revoked.value:
            raise Conflict(f"Provider '{provider_id}' was revoked; it stays revoked.")
        row.review = decision.value
        row.reviewed_at = utcnow()
        row.review_note = note
        if decision == ProviderReview.revoked:
            _revoke_tokens(session, provider_id)
        session.flush()
        return ProviderInfo.of(row)


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
    review: ProviderReview = ProviderReview.approved
    # usage strikes within STRIKE_WINDOW (billing.strikes): its engine over-reported usage
    recent_strikes: int = 0

    @property
    def approved(self) -> bool:
        """Only an approved provider serves at all: pending, suspended and revoked ones get
        no request, not even as a last resort."""
        return self.review == ProviderReview.approved

    @property
    def takes_requests(self) -> bool:
        """False once the agent said the provider is leaving or paused (its node may still
        be in the cluster, finishing what it has), or when it is not approved."""
        return self.approved and self.status not in (ProviderStatus.draining, ProviderStatus.paused)


# Routing weighs a provider's usage strikes over this window.
STRIKE_WINDOW = timedelta(hours=24)
ATTESTATION_SECRET_FILE = "attestation_secret"


def provider_terms(engine: Engine, now: datetime | None = None) -> dict[str, ProviderTerms]:
    """Every registered provider's trust tier, price floor, status and usage strikes within
    `STRIKE_WINDOW` of `now`, by provider id."""
    from sqlalchemy import func

    from core.schema import UsageStrike

    query = select(
        Provider.id, Provider.trust_tier, Provider.price_floor_pct, Provider.status, Provider.review
    )
    since = (now or datetime.now(UTC)) - STRIKE_WINDOW
    struck = (
        select(UsageStrike.provider_id, func.count())
        .where(UsageStrike.created_at >= since)
        .group_by(UsageStrike.provider_id)
    )
    with Session(engine) as session:
        strikes = {pid: int(n) for pid, n in session.execute(struck)}
        return {
            pid: ProviderTerms(
                TrustTier(tier),
                int(floor),
                ProviderStatus(status),
                ProviderReview(review),
                strikes.get(pid, 0),
            )
            for pid, tier, floor, status, review in session.execute(query)
        }


# --- what the platform tells agents ----------------------------------------------------------


@dataclass
class ProviderPlatform:
    """What the provider routes need besides the database: the process's settings (passed
    in, never read again from the environment) and the CC verifier."""

    settings: Settings
    verifier: CcVerifier = field(default_factory=NoVerifier)

    def _pool(self, tier: TrustTier) -> Pool:
        found = pools(self.settings).get(tier)
        if found is None:
            raise ClusterNotReady(
                f"No supply pool takes providers of the {tier.value} tier on this platform.",
                headers={"Retry-After": "3600"},
            )
        return found

    def cluster_address(self, tier: TrustTier) -> str:
        """Where a provider of `tier` joins: its tier's pool (`cluster.pools`)."""
        return self._pool(tier).agent_address

    def ray_token(self, tier: TrustTier) -> str:
        """The Ray auth token of `tier`'s pool, or ClusterNotReady when it has none (yet)."""
        try:
            token = self._pool(tier).ray_token_path.read_text().strip()
        except OSError:
            token = ""
        if not token:
            raise ClusterNotReady(
                "The cluster is not accepting providers right now.", headers={"Retry-After": "30"}
            )
        return token

    def secret(self) -> bytes:
        """The key of attestation challenges: the setting, else one made once under the data
        directory. Never derived from the Ray token: every approved provider holds that."""
        return attestation_secret(self.settings).encode()

    def challenge(self, provider_id: str, now: float | None = None) -> str:
        return issue_challenge(self.secret(), provider_id, time.time() if now is None else now)


def attestation_secret(settings: Settings) -> str:
    return settings.attestation_secret or made_once(
        Path(settings.resolved_data_dir) / ATTESTATION_SECRET_FILE
    )


# --- the owner's own hand on its providers (the console) ------------------------------------

REMOVED_NOTE = "removed by its owner"


def _owned(session: Session, account_id: int, provider_id: str) -> Provider:
    """The account's provider, locked; another account's is "no such provider", as a
    missing one (nobody learns which ids exist)."""
    row = session.scalar(
        select(Provider)
        .where(Provider.id == provider_id, Provider.account_id == account_id)
        .with_for_update()
    )
    if row is None:
        raise ProviderNotFound(f"No provider '{provider_id}' in this account.")
    return row


def remove_provider(engine: Engine, *, account_id: int, provider_id: str) -> ProviderInfo:
    """The owner retires a GPU: its review becomes `revoked` (final: it never takes traffic
    or joins the cluster again), with the note that its owner removed it, and every token is
    revoked, so its agent's next heartbeat is refused. Removing it again changes nothing."""
    with Session(engine) as session, session.begin():
        row = _owned(session, account_id, provider_id)
        if row.review != ProviderReview.revoked.value:
            row.review = ProviderReview.revoked.value
            row.reviewed_at = utcnow()
            row.review_note = REMOVED_NOTE
            row.status = ProviderStatus.offline.value
        _revoke_tokens(session, provider_id)
        session.flush()
        return ProviderInfo.of(row)


def rotate_token(engine: Engine, *, account_id: int, provider_id: str) -> str:
    """The owner replaces its GPU's token: every earlier token is revoked and a new one made
    (shown once), in one transaction. A removed (revoked) provider gets none."""
    with Session(engine) as session, session.begin():
        row = _owned(session, account_id, provider_id)
        if row.review == ProviderReview.revoked.value:
            raise Conflict(f"Provider '{provider_id}' is removed; it gets no new token.")
        _revoke_tokens(session, provider_id)
        return _new_token(session, provider_id)
