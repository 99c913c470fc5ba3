"""OpenAI-style rate-limit headers and durations ("1s", "6m0s", "12ms", "1h2m3s")."""

from __future__ import annotations

import math

LIMIT_REQUESTS = "x-ratelimit-limit-requests"
REMAINING_REQUESTS = "x-ratelimit-remaining-requests"
RESET_REQUESTS = "x-ratelimit-reset-requests"
LIMIT_TOKENS = "x-ratelimit-limit-tokens"
REMAINING_TOKENS = "x-ratelimit-remaining-tokens"
RESET_TOKENS = "x-ratelimit-reset-tokens"


def format_duration(ms: float) -> str:
    """Milliseconds as a Go-style duration, rounded up to the millisecond."""
    total = max(0, math.ceil(ms))
    if total < 1000:
        return f"{total}ms"
    hours, rest = divmod(total, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    sec_text = f"{secs}.{millis:03d}".rstrip("0").rstrip(".") if millis else str(secs)
    if hours:
        return f"{hours}h{minutes}m{sec_text}s"
    if minutes:
        return f"{minutes}m{sec_text}s"
    return f"{sec_text}s"


def retry_after_seconds(ms: float) -> int:
    return max(1, math.ceil(ms / 1000))


def rate_limit_headers(
    *,
    rpm_limit: int,
    rpm_remaining: int,
    rpm_reset_ms: float,
    tok_limit: int,
    tok_remaining: int,
    tok_reset_ms: float,
) -> dict[str, str]:
    headers = {
        LIMIT_REQUESTS: str(rpm_limit),
        REMAINING_REQUESTS: str(max(0, rpm_remaining)),
        RESET_REQUESTS: format_duration(rpm_reset_ms),
    }
    if tok_limit >= 0:  # absent only for an uncapped account on a model with free output
        headers[LIMIT_TOKENS] = str(tok_limit)
        headers[REMAINING_TOKENS] = str(max(0, tok_remaining))
        headers[RESET_TOKENS] = format_duration(tok_reset_ms)
    return headers
