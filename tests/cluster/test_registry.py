from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
import redis
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from agent_bootstrap.evidence import make_evidence
from agent_bootstrap.nvml import RecordedReader, detect
from billing import accounts
from billing.plans import Plans
from cluster import registry
from cluster.attestation import SignedReportVerifier, issue_challenge
from cluster.registry import ProviderAuthError, Registration, RegistryError
from core.schema import Provider, ProviderReview, ProviderStatus, ProviderToken
from kernel.errors import Conflict
from kernel.tokens import hash_key
from tests.cluster.cc_pki import DevicePki
from tests.cluster.nvml_readings import H100, H100_CC_ON, RTX_4090

SECRET = b"k" * 32


def _account(engine: Engine, r: redis.Redis, plans: Plans, email: str = "gpu@example.com") -> int:
    return accounts.create_account(engine, r, plans, email=email).id


def _public_key() -> str:
    raw = X25519PrivateKey.generate().public_key().public_bytes_raw()
    return base64.b64encode(raw).decode()


def _registration(reading=H100, **extra) -> Registration:
    return Registration.model_validate(
        {**detect(RecordedReader(reading)).facts(), "public_key": _public_key(), **extra}
    )


@pytest.fixture
def account_id(engine: Engine, r: redis.Redis, plans: Plans) -> int:
    return _account(engine, r, plans)


def test_a_provider_gets_a_token_shown_once_and_stored_hashed(
    engine: Engine, account_id: int
) -> None:
    new = registry.create_provider(engine, account_id=account_id, name="garage 4090")
    assert new.token.startswith("dgpp-") and len(new.token) >= 5 + 43
    assert new.provider.id.startswith("prv_") and new.provider.account_id == account_id
    assert new.provider.status == "offline" and new.provider.trust_tier == "basic"
    with Session(engine) as session:
        row = session.scalars(select(ProviderToken)).one()
        assert row.token_hash == hash_key(new.token)
        assert row.prefix == new.token[:12]
        dumped = [str(v) for v in session.execute(text("SELECT * FROM provider_tokens")).one()]
        assert new.token not in dumped
    assert registry.authenticate(engine, new.token).id == new.provider.id


def test_tokens_are_random(engine: Engine, account_id: int) -> None:
    first = registry.create_provider(engine, account_id=account_id, name="a")
    second = registry.create_provider(engine, account_id=account_id, name="b")
    assert first.token != second.token and first.provider.id != second.provider.id


@pytest.mark.parametrize("token", [None, "", "dgpu-" + "a" * 43, "dgpp-short", "dgpp-" + "A" * 43])
def test_bad_tokens_are_refused(engine: Engine, account_id: int, token: str | None) -> None:
    registry.create_provider(engine, account_id=account_id, name="x")
    with pytest.raises(ProviderAuthError):
        registry.authenticate(engine, token)


def test_revoked_tokens_and_disabled_accounts_are_refused(
    engine: Engine, r: redis.Redis, account_id: int
) -> None:
    new = registry.create_provider(engine, account_id=account_id, name="x")
    spare = registry.issue_token(engine, new.provider.id)
    assert registry.authenticate(engine, spare).id == new.provider.id
    assert registry.revoke_tokens(engine, new.provider.id) == 2
    for token in (new.token, spare):
        with pytest.raises(ProviderAuthError) as info:
            registry.authenticate(engine, token)
        assert info.value.code == "revoked_provider_token"
    fresh = registry.issue_token(engine, new.provider.id)
    accounts.set_status(engine, r, account_id=account_id, status="suspended")
    with pytest.raises(ProviderAuthError) as info:
        registry.authenticate(engine, fresh)
    assert info.value.code == "account_disabled"


def test_unknown_account_is_refused(engine: Engine) -> None:
    with pytest.raises(RegistryError) as info:
        registry.create_provider(engine, account_id=999_999, name="x")
    assert info.value.code == "account_not_found"


def test_register_records_facts_and_an_h100_with_cc_off_stays_basic(
    engine: Engine, account_id: int
) -> None:
    new = registry.create_provider(engine, account_id=account_id, name="h100")
    schedule = [{"days": ["sat", "sun"], "start": "22:00", "end": "08:00"}]
    body = _registration(H100, price_floor_pct=20, schedule=schedule)
    done = registry.register(engine, new.provider.id, body, secret=SECRET)
    p = done.provider
    assert (p.gpu_name, p.vram_gb, p.gpu_count) == ("NVIDIA H100 80GB HBM3", 79.6, 1)
    assert (p.driver_version, p.cuda_version, p.cc_state) == ("580.159.04", "13.0", "off")
    assert p.trust_tier == "basic" and done.tier_reason == "confidential computing is off"
    assert p.public_key == body.public_key and p.price_floor_pct == 20
    assert p.schedule == schedule
    assert p.status == "paused"  # registered, not yet joined
    assert p.review == "pending"  # basic hardware waits for the operator
    assert registry.get_provider(engine, p.id) == p


def test_register_with_checked_cc_evidence_is_verified_and_a_new_key_resets_it(
    engine: Engine, account_id: int
) -> None:
    pki = DevicePki.make()
    new = registry.create_provider(engine, account_id=account_id, name="cc")
    key = X25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw()
    reader = RecordedReader(H100_CC_ON, report_signer=pki.sign_report)
    facts = detect(reader).facts()
    evidence = make_evidence(reader, public, issue_challenge(SECRET, new.provider.id, 0), 1)
    body = Registration.model_validate(
        {**facts, "public_key": base64.b64encode(public).decode(), "cc_evidence": evidence}
    )
    verifier = SignedReportVerifier([pki.root])
    done = registry.register(
        engine, new.provider.id, body, secret=SECRET, verifier=verifier, now=10
    )
    assert done.provider.trust_tier == "verified", done.tier_reason
    assert done.provider.cc_evidence and done.provider.cc_evidence["nonce"] == evidence.nonce
    assert done.provider.review == "approved"  # the rule: its attestation passed
    # The same evidence under another key no longer binds: back to basic, evidence dropped.
    again = body.model_copy(update={"public_key": _public_key()})
    redone = registry.register(
        engine, new.provider.id, again, secret=SECRET, verifier=verifier, now=10
    )
    assert redone.provider.trust_tier == "basic" and redone.provider.cc_evidence is None


def test_register_refuses_a_bad_public_key(engine: Engine, account_id: int) -> None:
    new = registry.create_provider(engine, account_id=account_id, name="x")
    body = _registration(RTX_4090).model_copy(update={"public_key": "bm90IDMyIGJ5dGVz"})
    with pytest.raises(RegistryError) as info:
        registry.register(engine, new.provider.id, body, secret=SECRET)
    assert info.value.code == "invalid_public_key"


def test_heartbeats_statuses_and_staleness(engine: Engine, account_id: int) -> None:
    new = registry.create_provider(engine, account_id=account_id, name="x")
    other = registry.create_provider(engine, account_id=account_id, name="y")
    t0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    beat = registry.heartbeat(engine, new.provider.id, ProviderStatus.online, now=t0)
    assert beat.status == "online" and beat.last_heartbeat_at == t0
    registry.heartbeat(engine, other.provider.id, ProviderStatus.online, now=t0)
    registry.heartbeat(
        engine, other.provider.id, ProviderStatus.draining, now=t0 + timedelta(seconds=80)
    )
    online = registry.list_providers(engine, status=ProviderStatus.online)
    assert [p.id for p in online] == [new.provider.id]
    changed = registry.mark_stale_offline(engine, older_than_s=60, now=t0 + timedelta(seconds=90))
    assert changed == 1
    assert registry.get_provider(engine, new.provider.id).status == "offline"
    assert registry.get_provider(engine, other.provider.id).status == "draining"
    assert registry.set_status(engine, other.provider.id, ProviderStatus.paused).status == "paused"
    with pytest.raises(registry.ProviderNotFound):
        registry.heartbeat(engine, "prv_nope", ProviderStatus.online)


def test_list_by_account(engine: Engine, r: redis.Redis, plans: Plans, account_id: int) -> None:
    mine = registry.create_provider(engine, account_id=account_id, name="mine")
    theirs_account = _account(engine, r, plans, "other@example.com")
    registry.create_provider(engine, account_id=theirs_account, name="theirs")
    assert [p.id for p in registry.list_providers(engine, account_id=account_id)] == [
        mine.provider.id
    ]
    assert len(registry.list_providers(engine)) == 2


def test_the_schema_refuses_unknown_statuses_and_tiers(engine: Engine, account_id: int) -> None:
    new = registry.create_provider(engine, account_id=account_id, name="x")
    for column, value in (("status", "gone"), ("trust_tier", "gold"), ("cc_state", "maybe")):
        with pytest.raises(IntegrityError):
            with Session(engine) as session, session.begin():
                row = session.get(Provider, new.provider.id)
                assert row is not None
                setattr(row, column, value)


def test_registration_validates_its_body() -> None:
    good = _registration(RTX_4090).model_dump()
    with pytest.raises(ValueError):
        Registration.model_validate({**good, "price_floor_pct": -1})
    with pytest.raises(ValueError):
        bad = [{"days": ["xyz"], "start": "1", "end": "2"}]
        Registration.model_validate({**good, "schedule": bad})
    with pytest.raises(ValueError):
        Registration.model_validate({**good, "surprise": 1})


def test_only_an_approved_provider_may_join_and_the_operator_decides(
    engine: Engine, account_id: int
) -> None:
    """A new provider is pending (the provider routes give its agent no cluster address or
    Ray token, and routing none of its requests) until the operator approves it.
    Suspending stops that again and approving lifts it; revoking is final and ends every
    token."""
    new = registry.create_provider(engine, account_id=account_id, name="rig")
    pid = new.provider.id

    def refusal() -> str | None:
        review = registry.authenticate(engine, new.token).review
        assert registry.provider_terms(engine)[pid].approved is (review == "approved")
        return None if review == "approved" else f"provider_{review}"

    assert refusal() == "provider_pending"
    approved = registry.review(engine, pid, ProviderReview.approved, note="checked by hand")
    assert (approved.review, refusal()) == ("approved", None)
    assert registry.provider_terms(engine)[pid].approved
    registry.review(engine, pid, ProviderReview.suspended, note="bad output")
    assert refusal() == "provider_suspended" and not registry.provider_terms(engine)[pid].approved
    registry.review(engine, pid, ProviderReview.approved)
    assert refusal() is None
    registry.review(engine, pid, ProviderReview.revoked, note="fraud")
    with pytest.raises(ProviderAuthError):  # its tokens went with it
        registry.authenticate(engine, new.token)
    with pytest.raises(Conflict):
        registry.review(engine, pid, ProviderReview.approved)
    with pytest.raises(RegistryError):
        registry.review(engine, pid, ProviderReview.pending)
    with Session(engine) as session:
        row = session.get(Provider, pid)
        assert row is not None and row.review == "revoked" and row.review_note == "fraud"
