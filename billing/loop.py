"""The billing actor's body, as plain Python: a thread of the `billing-meter` deployment
(serve_app.app) runs it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import redis as redis_lib

from billing import low_balance
from billing.meter import Recorded, UsageMeter
from billing.payouts import run_due
from billing.stripe_client import maybe_stripe_client
from billing.sync import ready_or_rebuilt
from core.db import make_engine, migrate
from core.settings import Settings

log = logging.getLogger("billing.meter")


class BillingLoop:
    """The billing actor's body: drain the usage stream, reap expired holds, rebuild Redis
    from SQL when it comes back empty, and every reap the `chores` its host adds (the Serve
    deployment marks silent providers offline there: that is the cluster's business, not
    billing's). The week's payouts run in a thread of their own (`run` starts it): they call
    Stripe, which may be slow or away for minutes, and metering must not wait on it; so do
    the low-balance emails (`billing.low_balance`, every `alerts_every_s`), which wait on the
    SMTP server. Plain Python, run in a thread of the `billing-meter` deployment
    (serve_app.app).

    After a batch smaller than `max_batch` it waits `linger_s` before reading again, so that
    under steady traffic the ledger takes usage in batches rather than a row or two at a time:
    a batch's transaction costs the same statements whatever its size (test_meter), and at
    c=16 the meter spent 2.4 ms of CPU per request, on the cores that serve them (issue 13).
    The ledger lags the stream by that much more; balances, holds and caps live in Redis and
    do not wait for it."""

    def __init__(
        self,
        database_url: str | None = None,
        redis_url: str | None = None,
        *,
        consumer: str = "meter-1",
        max_batch: int = 500,
        block_ms: int = 1000,
        linger_s: float = 0.25,
        reap_every_s: float | None = None,
        payouts_every_s: float = 300.0,
        alerts_every_s: float = 60.0,
        settings: Settings | None = None,
        on_recorded: Recorded | None = None,
        chores: Sequence[Callable[[], object]] = (),
    ) -> None:
        settings = settings or Settings()
        self.settings = settings
        self.engine = make_engine(database_url or settings.database_url)
        migrate(self.engine)
        self.redis = redis_lib.Redis.from_url(redis_url or settings.redis_url)
        self.meter = UsageMeter(self.engine, self.redis, consumer=consumer, on_recorded=on_recorded)
        self.max_batch = max_batch
        self.block_ms = block_ms
        self.linger_s = linger_s
        # expired holds are billed their last checkpoint this long after expiring, at most
        self.reap_every_s = settings.reap_every_s if reap_every_s is None else reap_every_s
        self.payouts_every_s = payouts_every_s
        self.alerts_every_s = alerts_every_s
        self.chores = list(chores)
        self._stop = threading.Event()
        self._payouts: threading.Thread | None = None
        self._alerts: threading.Thread | None = None

    def step(self) -> int:
        ready_or_rebuilt(self.engine, self.redis, meter=self.meter)  # Redis came back empty
        return self.meter.drain_once(self.max_batch, block_ms=self.block_ms)

    def run(self, max_iterations: int | None = None) -> int:
        if self._payouts is None or not self._payouts.is_alive():
            self._payouts = threading.Thread(target=self._pay, name="payouts", daemon=True)
            self._payouts.start()
        if self._alerts is None or not self._alerts.is_alive():
            self._alerts = threading.Thread(target=self._alert, name="alerts", daemon=True)
            self._alerts.start()
        handled, iterations, last_reap = 0, 0, 0.0
        while not self._stop.is_set():
            if max_iterations is not None and iterations >= max_iterations:
                break
            iterations += 1
            try:
                batch = self.step()
                handled += batch
                if 0 < batch < self.max_batch:  # the next batch fills meanwhile
                    self._stop.wait(self.linger_s)
                if time.monotonic() - last_reap >= self.reap_every_s:
                    self.meter.reap()
                    for chore in self.chores:
                        chore()
                    last_reap = time.monotonic()
            except Exception:  # keep metering through Redis or database outages
                log.exception("billing loop step failed; retrying")
                self._stop.wait(1.0)
        return handled

    def _pay(self) -> None:
        """Every `payouts_every_s`, the week's payouts if due, until `stop`."""
        while not self._stop.is_set():
            try:
                self.pay_due_week()
            except Exception:  # Stripe or the database away: the next turn tries again
                log.exception("payout run failed; retrying")
            self._stop.wait(self.payouts_every_s)

    def _alert(self) -> None:
        """Every `alerts_every_s`, the low-balance emails that are due, until `stop`."""
        while not self._stop.is_set():
            try:
                low_balance.check(self.engine, self.redis, self.settings)
            except Exception:  # SMTP or the database away: the next turn tries again
                log.exception("low-balance check failed; retrying")
            self._stop.wait(self.alerts_every_s)

    def pay_due_week(self) -> None:
        """Monday's payouts for the week that ended, once (billing.payouts.run_due)."""
        client = maybe_stripe_client(self.settings)
        if client is not None:
            run_due(self.engine, client)

    def stop(self) -> None:
        self._stop.set()
