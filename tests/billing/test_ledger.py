import threading
import time

import pytest
import redis
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from billing import accounts as svc
from billing import ledger
from billing.plans import Plans
from core.schema import LedgerAccount, LedgerEntry
from kernel.money import NANO_PER_USD, split_cost


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
                legs=[ledger.Leg(credits, ledger.PLATFORM_REVENUE, 10 * NANO_PER_USD + 1)],
            )
        assert not ledger.transfer_exists(session, "too-much")
        assert ledger.balance(session, credits) == 10 * NANO_PER_USD
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


def test_each_entry_carries_its_accounts_running_balance_and_version(
    engine: Engine, r: redis.Redis, plans: Plans
) -> None:
    account = svc.create_account(engine, r, plans, email="v@example.com", plan="paid")
    credits = ledger.customer_credits(account.id)
    with Session(engine) as session, session.begin():
        for key, amount in (("in-1", 700), ("in-2", 300)):
            ledger.post_transfer(
                session,
                idempotency_key=key,
                kind="grant",
                legs=[ledger.Leg(ledger.PAYMENT_CLEARING, credits, amount)],
            )
    with Session(engine) as session, session.begin():
        ledger.post_transfer(
            session,
            idempotency_key="out",
            kind="usage",
            legs=[ledger.Leg(credits, ledger.PLATFORM_REVENUE, 400)],
        )
    with Session(engine) as session:
        row = session.scalars(select(LedgerAccount).where(LedgerAccount.name == credits.name)).one()
        mine = session.scalars(
            select(LedgerEntry)
            .where(LedgerEntry.ledger_account_id == row.id)
            .order_by(LedgerEntry.id)
        ).all()
    assert [(e.amount, e.balance_after, e.account_version) for e in mine] == [
        (700, 700, 1),
        (300, 1000, 2),
        (-400, 600, 3),
    ]
    assert (row.balance, row.version) == (600, 3)


def test_a_batch_checks_each_transfer_against_the_running_balances(
    engine: Engine, r: redis.Redis, plans: Plans
) -> None:
    """What the meter relies on: a transfer the balance cannot cover is refused alone, the
    ones after it still post; a key posted before or earlier in the batch posts nothing."""
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
            provider, platform = split_cost(amount)
            return batch.post(
                idempotency_key=key,
                kind="usage",
                legs=[
                    ledger.Leg(credits, prov, provider),
                    ledger.Leg(credits, ledger.PLATFORM_REVENUE, platform),
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
    assert [e.transfer_id for e in entries] == [ids[0]] * 4 + [ids[1]] * 4
    assert [e.amount for e in entries] == [-570, 570, -30, 30, -380, 380, -20, 20]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # SQLite has one writer
def test_a_key_raced_on_other_accounts_posts_once(
    engine: Engine, r: redis.Redis, plans: Plans
) -> None:
    """Two transactions post one key on different accounts: no account lock orders them, so
    the second's insert waits on the first's key and, when that commits, finds it taken."""
    first = ledger.customer_credits(svc.create_account(engine, r, plans, email="1@x.io").id)
    second = ledger.customer_credits(svc.create_account(engine, r, plans, email="2@x.io").id)
    legs = {
        "first": [ledger.Leg(ledger.PAYMENT_CLEARING, first, 5)],
        "second": [ledger.Leg(ledger.PROMOTIONAL_GRANTS, second, 5)],
    }
    with Session(engine) as session, session.begin():
        for spec in (first, second, ledger.PAYMENT_CLEARING, ledger.PROMOTIONAL_GRANTS):
            ledger.ensure_account(session, spec)
    results: dict[str, int | None] = {}

    def post(name: str, session: Session) -> None:
        results[name] = ledger.post_transfer(
            session, idempotency_key="raced", kind="grant", legs=legs[name]
        )

    with Session(engine) as winner:
        winner.begin()
        post("first", winner)
        with Session(engine) as loser, loser.begin():
            racer = threading.Thread(target=post, args=("second", loser))
            racer.start()
            _wait_for_a_lock_wait(engine)
            winner.commit()
            racer.join(timeout=30)
    assert results["first"] is not None and results["second"] is None
    with Session(engine) as session:
        grant = 10 * NANO_PER_USD  # the free plan's signup credits
        assert ledger.balance(session, first) == grant + 5
        assert ledger.balance(session, second) == grant
        assert ledger.entries_sum(session) == 0


def _wait_for_a_lock_wait(engine: Engine) -> None:
    deadline = time.monotonic() + 10
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()"
                )
            ).scalar_one()
            conn.rollback()
            if waiting:
                return
            time.sleep(0.02)
    raise AssertionError("the second transaction never waited on the first")
