"""A provider's owner removes its GPU or rotates its token (`cluster.registry`, what the
console calls), on real SQLite and PostgreSQL: only within its own account (another's is
"no such provider"), every old token refused at once, a removed GPU final."""

from __future__ import annotations

import pytest
import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from billing import accounts
from billing.plans import Plans
from cluster import registry
from cluster.registry import ProviderAuthError, ProviderNotFound
from core.schema import Provider, ProviderReview
from kernel.errors import Conflict


def owner(engine: Engine, r: redis.Redis, plans: Plans, email: str) -> int:
    return accounts.create_account(engine, r, plans, email=email).id


def test_rotating_revokes_every_old_token_and_shows_a_new_one(
    engine: Engine, r: redis.Redis, plans: Plans
) -> None:
    alice = owner(engine, r, plans, "alice@example.com")
    bob = owner(engine, r, plans, "bob@example.com")
    new = registry.create_provider(engine, account_id=alice, name="4090")
    second = registry.issue_token(engine, new.provider.id)
    with pytest.raises(ProviderNotFound):  # Bob at Alice's GPU: as if it did not exist
        registry.rotate_token(engine, account_id=bob, provider_id=new.provider.id)
    assert registry.authenticate(engine, new.token).id == new.provider.id  # untouched

    fresh = registry.rotate_token(engine, account_id=alice, provider_id=new.provider.id)
    for old in (new.token, second):
        with pytest.raises(ProviderAuthError):
            registry.authenticate(engine, old)
    assert registry.authenticate(engine, fresh).id == new.provider.id
    assert fresh.startswith("dgpp-") and fresh not in (new.token, second)


def test_removing_a_gpu_is_final_and_only_its_owners(
    engine: Engine, r: redis.Redis, plans: Plans
) -> None:
    alice = owner(engine, r, plans, "alice@example.com")
    bob = owner(engine, r, plans, "bob@example.com")
    new = registry.create_provider(engine, account_id=alice, name="garage")
    registry.review(engine, new.provider.id, ProviderReview.approved)
    with pytest.raises(ProviderNotFound):
        registry.remove_provider(engine, account_id=bob, provider_id=new.provider.id)
    with pytest.raises(ProviderNotFound):
        registry.remove_provider(engine, account_id=alice, provider_id="prv_nope")
    assert registry.get_provider(engine, new.provider.id).review == "approved"

    gone = registry.remove_provider(engine, account_id=alice, provider_id=new.provider.id)
    assert (gone.review, gone.status) == ("revoked", "offline")
    with Session(engine) as session:
        assert session.get(Provider, new.provider.id).review_note == registry.REMOVED_NOTE
    with pytest.raises(ProviderAuthError):
        registry.authenticate(engine, new.token)
    again = registry.remove_provider(engine, account_id=alice, provider_id=new.provider.id)
    assert again.review == "revoked"
    with pytest.raises(Conflict):  # no token for a removed GPU
        registry.rotate_token(engine, account_id=alice, provider_id=new.provider.id)
    with pytest.raises(Conflict):  # nor can the operator bring it back
        registry.review(engine, new.provider.id, ProviderReview.approved)
    assert registry.provider_terms(engine)[new.provider.id].review == "revoked"
