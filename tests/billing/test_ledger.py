import pytest
import redis
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing import accounts as svc
from billing import ledger
from billing.plans import Plans
from billing.schema import LedgerEntry


def test_transfer_moves_money_and_sums_to_zero(
    engine: Engine, r: redis.Redis, plans: Plans
) -> None:
    account = svc.create_account(engine, r, plans, email="l@example.com", plan="paid")
    credits = ledger.customer_credits(account.id)
    with Session(engine) as session, session.begin():
        first = ledger.post_transfer(
            session,
            idempotency_key="t1",
            kind="grant",
            legs=[ledger.Leg(ledger.PAYMENT_CLEARING, credits, 1000)],
        )
        again = ledger.post_transfer(
            session,
            idempotency_key="t1",
            kind="grant",
            legs=[ledger.Leg(ledger.PAYMENT_CLEARING, credits, 1000)],
        )
        split = ledger.post_transfer(
            session,
            idempotency_key="t2",
            kind="usage",
            legs=[
                ledger.Leg(credits, ledger.provider_payable("prov"), 950),
                ledger.Leg(credits, ledger.PLATFORM_REVENUE, 50),
            ],
        )
    assert first is not None and split is not None and again is None
    with Session(engine) as session:
        assert ledger.balance(session, credits) == 0
        assert ledger.balance(session, ledger.provider_payable("prov")) == 950
        assert ledger.balance(session, ledger.PLATFORM_REVENUE) == 50
        assert ledger.balance(session, ledger.PAYMENT_CLEARING) == -1000
        assert ledger.entries_sum(session) == 0
        entries = session.scalars(
            select(LedgerEntry).where(LedgerEntry.transfer_id == split).order_by(LedgerEntry.id)
        ).all()
    assert [e.amount for e in entries] == [-950, 950, -50, 50]
    assert entries[2].balance_after == 0


def test_customer_credits_never_go_negative(engine: Engine, r: redis.Redis, plans: Plans) -> None:
    account = svc.create_account(engine, r, plans, email="n@example.com")  # $10 grant
    credits = ledger.customer_credits(account.id)
    with Session(engine) as session, session.begin():
        with pytest.raises(ledger.InsufficientFunds):
            ledger.post_transfer(
                session,
                idempotency_key="too-much",
                kind="usage",
                legs=[ledger.Leg(credits, ledger.PLATFORM_REVENUE, 10 * 10**9 + 1)],
            )
        assert not ledger.transfer_exists(session, "too-much")
        assert ledger.balance(session, credits) == 10 * 10**9
    # and the database itself refuses a negative customer balance
    with pytest.raises(IntegrityError):
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE ledger_accounts SET balance = -1 WHERE name = :n"),
                {"n": credits.name},
            )


def test_legs_must_be_positive(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        with pytest.raises(ledger.LedgerError):
            ledger.post_transfer(
                session,
                idempotency_key="neg",
                kind="x",
                legs=[ledger.Leg(ledger.PAYMENT_CLEARING, ledger.PLATFORM_REVENUE, -5)],
            )
        with pytest.raises(ledger.LedgerError):
            ledger.post_transfer(session, idempotency_key="none", kind="x", legs=[])


def test_transfer_batch_posts_like_one_at_a_time(
    engine: Engine, r: redis.Redis, plans: Plans
) -> None:
    account = svc.create_account(engine, r, plans, email="b@example.com", plan="paid")
    credits = ledger.customer_credits(account.id)
    prov = ledger.provider_payable("prov-b")
    with Session(engine) as session, session.begin():
        ledger.post_transfer(
            session,
            idempotency_key="fund",
            kind="grant",
            legs=[ledger.Leg(ledger.PAYMENT_CLEARING, credits, 1000)],
        )
    with Session(engine) as session, session.begin():
        batch = ledger.TransferBatch(
            session, [credits, prov, ledger.PLATFORM_REVENUE], ["u1", "u2", "u3", "fund"]
        )

        def usage(key: str, amount: int) -> bool:
            return batch.post(
                idempotency_key=key,
                kind="usage",
                legs=[
                    ledger.Leg(credits, prov, amount * 95 // 100),
                    ledger.Leg(credits, ledger.PLATFORM_REVENUE, amount - amount * 95 // 100),
                ],
            )

        assert usage("u1", 600)
        with pytest.raises(ledger.InsufficientFunds):
            usage("u2", 500)  # 400 left: refused, nothing changes
        assert usage("u3", 400)
        assert not usage("u1", 600)  # posted in this batch already
        assert not batch.post(  # posted before the batch
            idempotency_key="fund",
            kind="grant",
            legs=[ledger.Leg(ledger.PAYMENT_CLEARING, credits, 1000)],
        )
        with pytest.raises(ledger.LedgerError):
            batch.post(
                idempotency_key="elsewhere",
                kind="x",
                legs=[ledger.Leg(ledger.PAYMENT_CLEARING, ledger.PLATFORM_REVENUE, 1)],
            )
        ids = batch.flush()
        assert batch.flush() == []
    assert len(ids) == 2
    with Session(engine) as session:
        assert ledger.balance(session, credits) == 0
        assert ledger.balance(session, prov) == 570 + 380
        assert ledger.balance(session, ledger.PLATFORM_REVENUE) == 30 + 20
        assert not ledger.transfer_exists(session, "u2")
        assert ledger.entries_sum(session) == 0
        entries = session.scalars(
            select(LedgerEntry).where(LedgerEntry.transfer_id.in_(ids)).order_by(LedgerEntry.id)
        ).all()
        credit_rows = session.scalars(
            select(ledger.LedgerAccount).where(ledger.LedgerAccount.name == credits.name)
        ).one()
    assert [e.transfer_id for e in entries] == [ids[0]] * 4 + [ids[1]] * 4
    assert [e.amount for e in entries] == [-570, 570, -30, 30, -380, 380, -20, 20]
    mine = [e for e in entries if e.ledger_account_id == credit_rows.id]
    assert [e.balance_after for e in mine] == [430, 400, 20, 0]
    assert [e.account_version for e in mine] == [2, 3, 4, 5]  # 1: the funding
    assert credit_rows.version == 5
