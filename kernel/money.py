"""Integer nano-dollars (nUSD) and every money constant: the one place each is defined.

No floats touch money: a dollar amount is parsed as a `Decimal` and must come out as a whole
number of nano-dollars, or it is refused. The provider/platform split of what a request costs
is here too, because the settlement script (Lua, billing.lua_scripts, formatted from
`PROVIDER_SHARE_PCT`), the meter that checks each usage event and the ledger verification
must all split the same way.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

NANO_PER_USD = 10**9
NUSD_PER_CENT = NANO_PER_USD // 100
# Catalog prices are published in dollars per 1M tokens: $1 per 1M is 1,000 nUSD per token.
NUSD_PER_TOKEN_AT_1_USD_PER_1M = NANO_PER_USD // 1_000_000
# Balances live in Redis too, where Lua does arithmetic in doubles: every integer below 2**53
# is exact there. No single balance may reach it (about $9 million).
MAX_BALANCE_NUSD = 2**53 - 1
# Stripe's currency for purchases and payouts (lower case, as Stripe writes it).
CURRENCY = "usd"
# Providers keep 95% of what a request costs (rounded down); the platform keeps the rest.
PROVIDER_SHARE_PCT = 95
# A provider is paid for a week only when at least this much is due (else it carries over).
MIN_PAYOUT_CENTS = 10 * 100


def split_cost(cost_nusd: int) -> tuple[int, int]:
    """(provider's share, platform's share) of a cost: the provider's `PROVIDER_SHARE_PCT`
    rounded down, the platform the rest, so the two always add up to the cost exactly."""
    provider = cost_nusd * PROVIDER_SHARE_PCT // 100
    return provider, cost_nusd - provider


def usd_to_nusd(value: str | int | Decimal) -> int:
    """`"10"` → 10_000_000_000. Refuses floats, negatives and fractions of a nano-dollar."""
    if isinstance(value, float):
        raise TypeError("dollar amounts are strings, ints or Decimals, never floats")
    try:
        amount = Decimal(str(value).strip().lstrip("$"))
    except InvalidOperation as exc:
        raise ValueError(f"not a dollar amount: {value!r}") from exc
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"not a dollar amount: {value!r}")
    nusd = amount * NANO_PER_USD
    if nusd != nusd.to_integral_value():
        raise ValueError(f"{value!r} is not a whole number of nano-dollars")
    return int(nusd)


def nusd_to_usd(nusd: int) -> str:
    """10_500_000_000 → "10.5" (exact; trailing zeros dropped, at least "0")."""
    sign = "-" if nusd < 0 else ""
    whole, frac = divmod(abs(nusd), NANO_PER_USD)
    text = f"{whole}.{frac:09d}".rstrip("0").rstrip(".")
    return sign + text
