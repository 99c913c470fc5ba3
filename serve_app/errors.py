"""Errors in the OpenAI shape, with the types of the spec's error table.

`{"error": {"message", "type", "param", "code"}}`; the official SDK raises the exception
class of the status (BadRequestError, AuthenticationError, NotFoundError, ...). Nothing
else ever reaches a client: unexpected exceptions become a 500 without their trace.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("darkgpu.ingress")

# The spec's error types, by HTTP status.
INVALID_REQUEST = "invalid_request"
AUTH = "auth"
BILLING = "billing"
NOT_FOUND = "not_found"
RATE_LIMIT = "rate_limit"
SERVICE_UNAVAILABLE = "service_unavailable"
INTERNAL = "internal_error"

_TYPE_OF_STATUS = {
    400: INVALID_REQUEST,
    401: AUTH,
    402: BILLING,
    404: NOT_FOUND,
    405: INVALID_REQUEST,
    413: INVALID_REQUEST,
    422: INVALID_REQUEST,
    429: RATE_LIMIT,
    503: SERVICE_UNAVAILABLE,
}


def type_of_status(status: int) -> str:
    return _TYPE_OF_STATUS.get(status, INTERNAL if status >= 500 else INVALID_REQUEST)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or type_of_status(status)
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def sse(self) -> str:
        """The error as one server-sent event, for a stream that has already begun."""
        return f"data: {json.dumps(self.body())}\n\n"

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model_id: str) -> APIError:
    return APIError(
        404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found"
    )


def no_replica(model_id: str, retry_after_s: int) -> APIError:
    return APIError(
        503,
        f"No provider is online for the model '{model_id}' right now; retry shortly.",
        code="no_provider_online",
        headers={"Retry-After": str(retry_after_s)},
    )


def _param_of(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def validation_error(exc: Exception) -> APIError:
    """A pydantic or FastAPI validation error as one 400, naming the first bad field."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    if not errors:
        return invalid_request(str(exc) or "Invalid request.")
    first = errors[0]
    param = _param_of(tuple(first.get("loc", ())))
    message = first.get("msg", "Invalid value")
    return invalid_request(f"{param}: {message}" if param else message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error = APIError(404, f"Unknown route: {request.method} {request.url.path}")
        else:
            error = APIError(exc.status_code, str(exc.detail), headers=exc.headers)
        return error.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "The server had an error processing your request.").response()
