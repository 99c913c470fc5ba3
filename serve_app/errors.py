"""The one mapping of errors to the OpenAI shape, with the types of the spec's error table.

`{"error": {"message", "type", "param", "code"}}`; the official SDK raises the exception
class of the status (BadRequestError, AuthenticationError, NotFoundError, ...). Every error
the platform raises on purpose is a `kernel.errors.DarkGpuError` that carries its status,
type, code, parameter and headers, so a route raises it and never builds a response:
`install_error_handlers` answers it here, with FastAPI's validation errors, Starlette's HTTP
errors (404 for an unknown route, 405, ...) and Stripe failing. Nothing else ever reaches a
client: an unexpected exception, or an `InternalError` (a broken invariant), is logged with
its trace and answered with one sentence.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import stripe
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from billing.stripe_client import error_text
from kernel.errors import (
    AuthError,
    BillingError,
    Conflict,
    DarkGpuError,
    InternalError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
)

logger = logging.getLogger("darkgpu.ingress")
UNEXPECTED = "The server had an error processing your request."
PAYMENT_PROVIDER_DOWN = "The payment provider did not answer; try again shortly."

# For a status decided outside the platform (an engine's error, Starlette's 405, an
# admission refusal): the class whose type the spec gives that status.
_CLASS_OF_STATUS: dict[int, type[DarkGpuError]] = {
    400: InvalidRequest,
    401: AuthError,
    402: BillingError,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    429: RateLimited,
    503: Unavailable,
}


def body(error: DarkGpuError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }


def sse(error: DarkGpuError) -> str:
    """The error as one server-sent event, for a stream that has already begun."""
    return f"data: {json.dumps(body(error))}\n\n"


def error_response(error: DarkGpuError) -> JSONResponse:
    return JSONResponse(body(error), status_code=error.status, headers=error.headers)


def error_of_status(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> DarkGpuError:
    """The error for a status someone else chose: the class of that status where the spec
    names one; otherwise a 4xx is an `invalid_request` and a 5xx an `internal_error` that keep
    their own number (405, 422, 502, ...)."""
    kind = _CLASS_OF_STATUS.get(status) or (InvalidRequest if status < 500 else DarkGpuError)
    error = kind(message, code=code, param=param, headers=headers)
    error.status = status
    return error


def model_not_found(model_id: str) -> NotFound:
    return NotFound(
        f"The model '{model_id}' does not exist.", param="model", code="model_not_found"
    )


def engine_error(code: Any, message: Any, param: Any = None) -> DarkGpuError:
    """An error the engine reported (vLLM's `{"code": 400, "type": "BadRequestError", …}`)
    in the spec's shape: its status kept where it is one (else 500), its message shown only
    for a 4xx (a 5xx's may hold the engine's internals)."""
    try:
        status = int(code)
    except (TypeError, ValueError):
        status = 500
    status = status if 400 <= status < 600 else 500
    shown = str(message) if status < 500 else "The model failed to process the request."
    return error_of_status(status, shown, param=param if isinstance(param, str) else None)


def no_replica(model_id: str, retry_after_s: int) -> Unavailable:
    return Unavailable(
        f"No provider is online for the model '{model_id}' right now; retry shortly.",
        code="no_provider_online",
        headers={"Retry-After": str(retry_after_s)},
    )


def model_warming(model_id: str, retry_after_s: int) -> Unavailable:
    return Unavailable(
        f"The model '{model_id}' is starting on a provider's GPU; retry in {retry_after_s} s.",
        code="model_warming",
        headers={"Retry-After": str(retry_after_s)},
    )


def payment_provider_down(exc: stripe.StripeError) -> Unavailable:
    """Stripe failing (down, timing out, refusing our key) as the 503 a client may retry; the
    cause goes to the log only."""
    logger.error("Stripe call failed: %s", error_text(exc))
    return Unavailable(PAYMENT_PROVIDER_DOWN, code="payments_unavailable")


def _param_of(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def validation_error(exc: Exception) -> InvalidRequest:
    """A pydantic or FastAPI validation error as one 400, naming the first bad field."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    if not errors:
        return InvalidRequest(str(exc) or "Invalid request.")
    first = errors[0]
    param = _param_of(tuple(first.get("loc", ())))
    message = first.get("msg", "Invalid value")
    return InvalidRequest(f"{param}: {message}" if param else message, param=param)


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(InternalError(UNEXPECTED))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DarkGpuError)
    async def _meant(request: Request, exc: DarkGpuError) -> JSONResponse:
        if isinstance(exc, InternalError):  # a broken invariant: its words stay in the log
            return _unexpected(request, exc)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error: DarkGpuError
        if exc.status_code == 404:
            error = NotFound(f"Unknown route: {request.method} {request.url.path}")
        else:
            error = error_of_status(exc.status_code, str(exc.detail), headers=exc.headers)
        return error_response(error)

    @app.exception_handler(stripe.StripeError)
    async def _stripe(request: Request, exc: stripe.StripeError) -> JSONResponse:
        return error_response(payment_provider_down(exc))

    @app.exception_handler(Exception)
    async def _other(request: Request, exc: Exception) -> JSONResponse:
        return _unexpected(request, exc)
