import pytest
import redis
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from billing import ledger, signup
from billing.plans import Plans
from core.schema import Account, AccountPassword, LedgerTransfer
from kernel import redis_keys as rk
from kernel.tokens import hash_key
from tests.billing.conftest import USD, redis_int

PASSWORD = "correct horse battery"


def grants(engine: Engine, account_id: int) -> int:
    with Session(engine) as session:
        return session.scalar(
            select(func.count())
            .select_from(LedgerTransfer)
            .where(
                LedgerTransfer.kind == "signup_grant",
                LedgerTransfer.idempotency_key == f"signup:{account_id}",
            )
        )


def test_signup_grants_ten_dollars_once(engine: Engine, r: redis.Redis, plans: Plans) -> None:
    result = signup.signup(engine, r, plans, email="Ada@Example.com", password=PASSWORD)
    body = result.to_json()
    assert body["email"] == "ada@example.com" and body["plan"] == "free"
    assert body["credits_nusd"] == 10 * USD and body["credits_usd"] == "10"
    assert body["api_key"]["key"].startswith("dgpu-")
    aid = result.account.id
    assert redis_int(r, rk.balance(aid)) == 10 * USD
    assert r.hget(rk.api_key(hash_key(body["api_key"]["key"])), "account") == str(aid).encode()

    # the same email again (any case): refused, nothing granted twice
    for email in ("ada@example.com", " ADA@example.COM "):
        with pytest.raises(signup.EmailTaken):
            signup.signup(engine, r, plans, email=email, password=PASSWORD)
    # the grant's idempotency key refuses a second grant even if asked directly
    with Session(engine) as session, session.begin():
        again = ledger.post_transfer(
            session,
            idempotency_key=f"signup:{aid}",
            kind="signup_grant",
            legs=[ledger.Leg(ledger.PROMOTIONAL_GRANTS, ledger.customer_credits(aid), 10 * USD)],
        )
    assert again is None
    assert grants(engine, aid) == 1
    with Session(engine) as session:
        assert ledger.balance(session, ledger.customer_credits(aid)) == 10 * USD
        assert session.scalar(select(func.count()).select_from(Account)) == 1
    assert redis_int(r, rk.balance(aid)) == 10 * USD


def test_password_is_an_argon2id_hash(engine: Engine, r: redis.Redis, plans: Plans) -> None:
    aid = signup.signup(engine, r, plans, email="bob@example.com", password=PASSWORD).account.id
    with Session(engine) as session:
        stored = session.get(AccountPassword, aid)
        assert stored is not None
        digest = stored.password_hash
    assert digest.startswith("$argon2id$") and PASSWORD not in digest
    assert "m=65536" in digest  # memory-hard: 64 MiB
    assert signup.verify_password(engine, "BOB@example.com", PASSWORD) == aid
    assert signup.verify_password(engine, "bob@example.com", PASSWORD + "!") is None
    assert signup.verify_password(engine, "nobody@example.com", PASSWORD) is None


@pytest.mark.parametrize(
    ("email", "password", "code"),
    [
        ("not-an-email", PASSWORD, "invalid_email"),
        ("a@b", PASSWORD, "invalid_email"),
        ("carol@example.com", "short", "password_too_short"),
        ("carol@example.com", "x" * 2000, "password_too_long"),
    ],
)
def test_bad_input_creates_nothing(
    engine: Engine, r: redis.Redis, plans: Plans, email: str, password: str, code: str
) -> None:
    with pytest.raises(signup.SignupError) as info:
        signup.signup(engine, r, plans, email=email, password=password)
    assert info.value.code == code
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Account)) == 0


def test_signup_stands_when_redis_is_down(engine: Engine, r: redis.Redis, plans: Plans) -> None:
    from billing.rebuild import rebuild

    down = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    result = signup.signup(engine, down, plans, email="dora@example.com", password=PASSWORD)
    aid = result.account.id
    assert signup.verify_password(engine, "dora@example.com", PASSWORD) == aid
    assert result.key.key is not None
    assert not r.exists(rk.api_key(hash_key(result.key.key)))
    rebuild(engine, r)  # what the billing actor does when Redis comes back
    assert r.hget(rk.api_key(hash_key(result.key.key)), "account") == str(aid).encode()
    assert redis_int(r, rk.balance(aid)) == 10 * USD
