"""The Stripe client, made from settings, and what callers need to read its answers.

`make_stripe_client(settings)` returns a `stripe.StripeClient` for `DARKGPU_STRIPE_SECRET_KEY`
(optionally at `DARKGPU_STRIPE_API_BASE`, e.g. a local stand-in of Stripe's API); tests
inject an `http_client`. With no key, payments are off: `PaymentsNotConfigured`.

Stripe errors fall in two groups, and money code must tell them apart:
- definite: Stripe answered and did nothing (4xx: invalid request, insufficient balance,
  account disabled, card declined, permission, authentication);
- ambiguous: no answer, a 5xx, a rate limit, or an idempotency conflict; the operation may
  have happened, so it may only be retried with the same idempotency key.
"""

from __future__ import annotations

from typing import Any

import stripe

from core.settings import Settings
from kernel.errors import Unavailable


class PaymentsNotConfigured(Unavailable):
    """No Stripe secret key (or webhook secret) is configured: the payment routes answer 503."""

    code = "payments_unavailable"


def make_stripe_client(
    settings: Settings,
    *,
    http_client: stripe.HTTPClient | None = None,
    max_network_retries: int = 2,
) -> stripe.StripeClient:
    key = settings.stripe_secret_key.get_secret_value()
    if not key:
        raise PaymentsNotConfigured("payments are not configured (DARKGPU_STRIPE_SECRET_KEY)")
    base = {"api": settings.stripe_api_base.rstrip("/")} if settings.stripe_api_base else None
    return stripe.StripeClient(
        key,
        http_client=http_client,
        base_addresses=base,  # type: ignore[arg-type]
        max_network_retries=max_network_retries,
    )


def maybe_stripe_client(settings: Settings) -> stripe.StripeClient | None:
    """The client, or None when payments are not configured."""
    try:
        return make_stripe_client(settings)
    except PaymentsNotConfigured:
        return None


def plain(obj: Any) -> dict[str, Any]:
    """A Stripe object (or a dict) as plain nested dicts."""
    if isinstance(obj, stripe.StripeObject):
        return obj.to_dict()
    return dict(obj)


def is_definite_failure(exc: stripe.StripeError) -> bool:
    """True when Stripe answered with a refusal (nothing happened there)."""
    if isinstance(exc, stripe.APIConnectionError | stripe.RateLimitError | stripe.IdempotencyError):
        return False
    status = exc.http_status
    return status is not None and 400 <= status < 500


def error_text(exc: stripe.StripeError) -> str:
    code = getattr(exc, "code", None)
    message = exc.user_message or str(exc) or exc.__class__.__name__
    return f"{code}: {message}" if code else message
