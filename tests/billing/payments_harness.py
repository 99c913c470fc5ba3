"""What the payment tests share: the fake Stripe, a real StripeClient on it, the webhook
handler, and helpers that buy bundles and deliver signed events end to end."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import redis
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from billing import accounts, ledger, webhooks
from billing.checkout import create_checkout
from billing.plans import Plans
from core.schema import AccountLimits, Provider
from core.settings import Settings
from kernel import redis_keys as rk
from tests.billing.fake_stripe import API_KEY, WEBHOOK_SECRET, FakeStripe, client_for, signed


@dataclass
class Harness:
    engine: Engine
    r: redis.Redis
    plans: Plans
    fake: FakeStripe = field(default_factory=FakeStripe)

    def __post_init__(self) -> None:
        self.client = client_for(self.fake)
        self.handler = webhooks.WebhookHandler(self.engine, self.r, self.plans, self.client)
        self.settings = Settings(stripe_secret_key=API_KEY, stripe_webhook_secret=WEBHOOK_SECRET)

    def account(self, plan: str | None = None) -> int:
        email = f"{uuid.uuid4().hex[:10]}@example.com"
        return accounts.create_account(self.engine, self.r, self.plans, email=email, plan=plan).id

    def checkout(self, account_id: int, bundle: str = "solo", capped: bool = False) -> str:
        result = create_checkout(
            self.engine,
            self.client,
            self.plans,
            self.settings,
            account_id=account_id,
            bundle=bundle,
            capped_budget=capped,
        )
        return result.id

    def deliver_raw(self, payload: str) -> webhooks.EventResult:
        """Verify a signed event like the route does, then handle it."""
        event = webhooks.verify(payload.encode(), signed(payload), WEBHOOK_SECRET)
        return self.handler.handle(event)

    def deliver(self, type_: str, obj: dict[str, Any], **kw: Any) -> webhooks.EventResult:
        return self.deliver_raw(self.fake.event(type_, obj, **kw))

    def buy(self, account_id: int, bundle: str = "solo", capped: bool = False) -> str:
        """Checkout, pay by card and deliver `checkout.session.completed`; the session id."""
        session_id = self.checkout(account_id, bundle, capped)
        result = self.deliver("checkout.session.completed", self.fake.pay(session_id))
        assert result.outcome == "applied", result
        return session_id

    def balance(self, account_id: int) -> int:
        with Session(self.engine) as session:
            return ledger.balance(session, ledger.customer_credits(account_id))

    def redis_balance(self, account_id: int) -> int:
        return int(self.r.get(rk.balance(account_id)) or 0)

    def cap(self, account_id: int) -> int | None:
        with Session(self.engine) as session:
            limits = session.get(AccountLimits, account_id)
            return limits.tokens_per_day if limits else None

    def provider(self, owner: int, provider_id: str | None = None) -> str:
        pid = provider_id or f"prv_{uuid.uuid4().hex[:12]}"
        with Session(self.engine) as session, session.begin():
            session.add(Provider(id=pid, account_id=owner, name=f"gpu {pid}", review="approved"))
        return pid

    def providers_of(self, owner: int) -> list[str]:
        with Session(self.engine) as session:
            return list(session.scalars(select(Provider.id).where(Provider.account_id == owner)))
