"""Integer nano-dollars (nUSD): exact conversion from and to decimal dollar strings.

No floats touch money: a dollar amount is parsed as a `Decimal` and must come out as a whole
number of nano-dollars, or it is refused.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

NANO_PER_USD = 10**9
# Balances live in Redis too, where Lua does arithmetic in doubles: every integer below 2**53
# is exact there. No single balance may reach it (about $9 million).
MAX_BALANCE_NUSD = 2**53 - 1


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
