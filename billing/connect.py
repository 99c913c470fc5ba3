"""Stripe Connect (Express) onboarding for provider owners.

A DarkGPU account that owns providers gets one Express account (created on its first
onboarding request, idempotency key `connect-account:<account id>`, recorded in
`payout_accounts`) that receives the weekly transfers of every provider it owns; the
onboarding link is a fresh `account_onboarding` AccountLink each time (they expire within
minutes and are single-use). Whether payouts are enabled comes from `account.updated`
webhooks (billing.webhooks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import stripe
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing.stripe_client import plain
from core.schema import Account, PayoutAccount, Provider
from core.settings import Settings
from kernel.errors import NotFound


class NoProviders(NotFound):
    """Payouts are for accounts that own a provider; this one owns none."""

    code = "no_providers"


@dataclass(frozen=True)
class OnboardingLink:
    url: str
    expires_at: int | None
    stripe_account_id: str
    payouts_enabled: bool
    details_submitted: bool

    def to_json(self) -> dict[str, Any]:
        return {"object": "account_link", **asdict(self)}


def owned_providers(engine: Engine, account_id: int) -> list[tuple[str, str]]:
    """(id, name) of the providers the account owns."""
    with Session(engine) as session:
        rows = session.execute(
            select(Provider.id, Provider.name)
            .where(Provider.account_id == account_id)
            .order_by(Provider.id)
        ).all()
    return [(pid, name) for pid, name in rows]


def payout_account(engine: Engine, account_id: int) -> PayoutAccount | None:
    with Session(engine, expire_on_commit=False) as session:
        return session.get(PayoutAccount, account_id)


def onboarding_link(
    engine: Engine, client: stripe.StripeClient, settings: Settings, *, account_id: int
) -> OnboardingLink:
    if not owned_providers(engine, account_id):
        raise NoProviders(f"account {account_id} owns no providers")
    row = payout_account(engine, account_id)
    if row is None:
        row = _create_account(engine, client, account_id)
    link = plain(
        client.v1.account_links.create(
            params={
                "account": row.stripe_account_id,
                "type": "account_onboarding",
                "refresh_url": settings.connect_refresh_url,
                "return_url": settings.connect_return_url,
            }
        )
    )
    return OnboardingLink(
        url=link["url"],
        expires_at=link.get("expires_at"),
        stripe_account_id=row.stripe_account_id,
        payouts_enabled=row.payouts_enabled,
        details_submitted=row.details_submitted,
    )


def _create_account(engine: Engine, client: stripe.StripeClient, account_id: int) -> PayoutAccount:
    with Session(engine) as session:
        account = session.get(Account, account_id)
        if account is None:
            raise NoProviders(f"no account {account_id}")
        email = account.email
    created = plain(
        client.v1.accounts.create(
            params={
                "type": "express",
                "email": email,
                "capabilities": {"transfers": {"requested": True}},
                "metadata": {"darkgpu_account_id": str(account_id)},
            },
            options={"idempotency_key": f"connect-account:{account_id}"},
        )
    )
    try:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            row = PayoutAccount(
                account_id=account_id,
                stripe_account_id=created["id"],
                payouts_enabled=bool(created.get("payouts_enabled")),
                details_submitted=bool(created.get("details_submitted")),
                stripe_updated_s=0,
            )
            session.add(row)
        return row
    except IntegrityError:  # a concurrent request recorded it (same idempotency key)
        found = payout_account(engine, account_id)
        if found is None:
            raise
        return found
