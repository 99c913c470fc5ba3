"""The trust tier a request inherits from its account when its `"provider"` object names
none (`darkgpu admin account update --tier verified`).

Read from Redis (`dg:acct:<id>` field `tier`) before routing, and kept a few seconds per key
so the common request costs no extra round trip: a tier change reaches requests within
`ttl_s`. Only the tier is cached; the key itself is checked by admission on every request.
"""

from __future__ import annotations

import time

from billing.admission import Admission
from kernel.labels import TrustTier
from kernel.tokens import hash_key


class AccountTiers:
    def __init__(self, admission: Admission, ttl_s: float = 5.0, max_keys: int = 10_000) -> None:
        self._admission = admission
        self._ttl_s = ttl_s
        self._max_keys = max_keys
        self._cache: dict[str, tuple[float, TrustTier | None]] = {}

    async def default_for(self, api_key: str | None) -> TrustTier | None:
        if not api_key:
            return None
        digest = hash_key(api_key)  # the cache holds no key
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            raw = await self._admission.default_tier(api_key)
        except Exception:  # noqa: BLE001 - Redis away: admission answers the request
            return None if cached is None else cached[1]
        tier = TrustTier(raw) if raw is not None and raw in TrustTier.__members__ else None
        if len(self._cache) >= self._max_keys:
            self._cache.clear()
        self._cache[digest] = (now + self._ttl_s, tier)
        return tier
