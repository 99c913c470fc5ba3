"""The ingress's side of holds that live as long as their request (serve_app.holds), on a
real Redis: the holds in flight are extended while they run, and a stream's checkpoints are
paced (the first usage at once, then every N tokens or T seconds, one write at a time)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from billing.admission import Admission, Admitted, connect
from billing.plans import load_plans
from core.db import make_engine, migrate
from kernel import redis_keys as rk
from serve_app.holds import HoldKeeper, StreamCheckpoints
from serve_app.recount import Delivered, RunningCount
from serve_app.streaming import Usage
from tests.billing import conftest as billing
from tests.billing.conftest import IN, MODEL, OUT, REDIS_URL, REPO, make_customer

r = billing.r  # the billing tests' Redis, emptied before and after


@pytest.fixture
async def adm(r: redis.Redis, tmp_path: Path) -> AsyncIterator[Admission]:
    """Admission with a 6 s TTL and two open holds, "a" and "b"."""
    plans = load_plans(REPO / "configs" / "plans.toml")
    engine = make_engine(f"sqlite:///{tmp_path / 'setup.db'}")
    migrate(engine)
    customer = make_customer(engine, r, plans, usd=1)
    client = connect(REDIS_URL)
    admission = Admission(client, plans, hold_ttl_s=6)
    for rid in ("a", "b"):
        admitted = await admission.admit(
            api_key=customer.key, request_id=rid, model=MODEL, prompt_tokens=10,
            max_tokens=100, customer_tag=None,
        )  # fmt: skip
        assert isinstance(admitted, Admitted)
    yield admission
    await client.aclose()
    engine.dispose()


def checkpoint(r: redis.Redis, rid: str) -> tuple[int, int] | None:
    p, c = r.hmget(rk.hold(rid), "cp_prompt", "cp_completion")
    return None if p is None else (int(p), int(c))


async def written(cps: StreamCheckpoints) -> None:
    """Let a checkpoint write started by `delivered` finish."""
    for _ in range(100):
        await asyncio.sleep(0.005)
        if cps._writing is None or cps._writing.done():
            return


async def test_a_stream_checkpoints_its_first_usage_then_every_n_tokens(
    adm: Admission, r: redis.Redis
) -> None:
    cps = StreamCheckpoints(adm, "a", "prov-a", (IN, OUT), every_tokens=4, every_s=3600)
    cps.delivered(Usage(0, 0))  # nothing delivered yet: nothing to keep
    await written(cps)
    assert checkpoint(r, "a") is None
    seen = []
    for completion in range(1, 11):
        cps.delivered(Usage(10, completion))
        await written(cps)
        seen.append(checkpoint(r, "a"))
    assert seen == [(10, 1)] * 4 + [(10, 5)] * 4 + [(10, 9)] * 2
    assert r.hmget(rk.hold("a"), "cp_provider", "cp_pin", "cp_pout") == [
        b"prov-a", str(IN).encode(), str(OUT).encode()]  # fmt: skip
    # one write at a time: a chunk while one is in flight waits for the next chunk
    cps.delivered(Usage(10, 13))
    cps.delivered(Usage(10, 17))
    await written(cps)
    assert checkpoint(r, "a") == (10, 13)
    cps.delivered(Usage(10, 17))
    await written(cps)
    assert checkpoint(r, "a") == (10, 17)


async def test_a_slow_stream_checkpoints_every_few_seconds(adm: Admission, r: redis.Redis) -> None:
    cps = StreamCheckpoints(adm, "a", "prov-a", None, every_tokens=1000, every_s=0.2)
    cps.delivered(Usage(10, 1))
    await written(cps)
    cps.delivered(Usage(10, 2))
    await written(cps)
    assert checkpoint(r, "a") == (10, 1)
    await asyncio.sleep(0.25)
    cps.delivered(Usage(10, 2))
    await written(cps)
    assert checkpoint(r, "a") == (10, 2)
    assert r.hmget(rk.hold("a"), "cp_pin", "cp_pout") == [b"", b""]  # the reserved prices


async def extended(r: redis.Redis, rid: str, since: float) -> float:
    """The hold's expiry once it is later than `since` (the keeper's next turn)."""
    for _ in range(500):
        score = r.zscore(rk.HOLDS, rid)
        if score is not None and score > since:
            return score
        await asyncio.sleep(0.01)
    raise AssertionError(f"hold {rid} was not extended")


async def test_the_keeper_extends_the_holds_in_flight_until_they_finish(
    adm: Admission, r: redis.Redis
) -> None:
    keeper = HoldKeeper(adm, checkpoint_tokens=4, every_s=0.05)
    assert HoldKeeper(adm, checkpoint_tokens=4).every_s == 2.0  # a third of the TTL
    a, b = r.zscore(rk.HOLDS, "a"), r.zscore(rk.HOLDS, "b")
    keeper.track("a")
    keeper.track("b")
    a, b = await extended(r, "a", a), await extended(r, "b", b)
    assert a > (time.time() + 6 - 1) * 1000  # now + the TTL
    keeper.untrack("a")  # the request finished: its settlement ends the hold
    b = await extended(r, "b", await extended(r, "b", b))
    assert r.zscore(rk.HOLDS, "a") <= a + 100  # at most the turn under way when it finished
    keeper.untrack("b")
    for _ in range(500):
        if keeper._task is not None and keeper._task.done():
            break
        await asyncio.sleep(0.01)
    assert keeper._task is not None and keeper._task.done()  # nothing in flight: it rests
    keeper.track("b")  # and wakes with the next request
    await extended(r, "b", r.zscore(rk.HOLDS, "b"))
    keeper.untrack("b")


async def test_a_checkpoint_holds_the_ingress_count_of_what_it_delivered(
    adm: Admission, r: redis.Redis
) -> None:
    """A patched engine reports 40 completion tokens per chunk; the ingress delivered a few
    characters. The checkpoint (what the reaper bills if the ingress dies) holds the ingress's
    own count of the text delivered before the chunk in hand, with the report beside it; each
    checkpoint counts only the text new since the last (here one "token" per character)."""
    delivered = Delivered()
    running = RunningCount(delivered, lambda texts: [len(t) for t in texts])
    cps = StreamCheckpoints(adm, "a", "prov-a", (IN, OUT), every_tokens=1, running=running)
    for i, word in enumerate(["abc", "de", "fghi"]):
        cps.delivered(Usage(10, 40 * i))  # the usage of the chunks relayed before this one
        await written(cps)
        delivered.add_chunk({"choices": [{"index": 0, "delta": {"content": word}}]})
    assert checkpoint(r, "a") == (10, 5)  # "abc" + "de": the engine said 80
    assert r.hget(rk.hold("a"), "cp_reported") == b"80"
    delivered.add_chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    cps.delivered(Usage(10, 400))
    await written(cps)
    assert checkpoint(r, "a") == (10, 10)  # + "fghi" and the EOS token
    # an engine reporting less than was delivered is taken at its word
    cps.delivered(Usage(10, 401))
    await written(cps)
    assert checkpoint(r, "a") == (10, 10)
    assert await adm.reap(now=time.time() + 3600) == 2  # both holds of the fixture
    [event] = [f for _id, f in r.xrange(rk.USAGE_STREAM) if f[b"request_id"] == b"a"]
    assert (event[b"completion_tokens"], event[b"reported_completion_tokens"]) == (b"10", b"401")
