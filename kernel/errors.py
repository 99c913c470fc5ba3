"""The one exception tree: every error the platform raises on purpose derives from
`DarkGpuError`, and each class says how it reaches a client — an HTTP status and the type of
the spec's error table (`{"error": {"message", "type", "param", "code"}}`).

Modules raise these (or their own subclasses of them); the API maps the whole tree to the
OpenAI shape in one place (serve_app.errors) and the console to its pages in one place
(serve_app.console.web). A raise site picks the class for its meaning and a `code` that names
the case (`model_not_found`, `insufficient_credits`, …); it never builds a response itself.
"""

from __future__ import annotations

from collections.abc import Mapping

# The spec's error types.
INVALID_REQUEST = "invalid_request"
AUTH = "auth"
BILLING = "billing"
NOT_FOUND = "not_found"
RATE_LIMIT = "rate_limit"
SERVICE_UNAVAILABLE = "service_unavailable"
INTERNAL = "internal_error"


class DarkGpuError(Exception):
    """An error the platform means: an HTTP status, the spec's error type, an optional code
    and request parameter, and headers the answer must carry (`Retry-After`)."""

    status: int = 500
    type: str = INTERNAL
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = dict(headers or {})


class InvalidRequest(DarkGpuError):
    """400: the request itself is wrong; sending it again will not help."""

    status = 400
    type = INVALID_REQUEST


class PayloadTooLarge(InvalidRequest):
    status = 413


class Conflict(InvalidRequest):
    """409: the request conflicts with what exists (an email taken, a state already left)."""

    status = 409


class AuthError(DarkGpuError):
    """401: no credential, or one that is malformed, unknown or revoked."""

    status = 401
    type = AUTH


class Forbidden(AuthError):
    """403: a valid credential that may not do this."""

    status = 403


class BillingError(DarkGpuError):
    """402: the account cannot pay for this."""

    status = 402
    type = BILLING


class NotFound(DarkGpuError):
    status = 404
    type = NOT_FOUND


class RateLimited(DarkGpuError):
    status = 429
    type = RATE_LIMIT


class Unavailable(DarkGpuError):
    """503: a dependency or capacity is missing right now; retrying later may succeed."""

    status = 503
    type = SERVICE_UNAVAILABLE


class InternalError(DarkGpuError):
    """500: a broken invariant; logged in full, shown to a client in one sentence."""
