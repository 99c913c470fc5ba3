"""Request bodies: parsed into vLLM's OpenAI models, with the checks the spec asks for.

Every failure is a 400 `invalid_request` naming the parameter: a body that is not a JSON
object, a missing or wrongly typed field, an empty `messages`, an unknown role, and
`max_tokens` below 1 or past the model's context.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from cluster.catalog import CatalogModel
from serve_app.errors import invalid_request, validation_error

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def decode_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid_request(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.")
    return body


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise invalid_request("Missing required parameter: 'model'.", param="model")
    if not isinstance(model, str) or not model:
        raise invalid_request("'model' must be a non-empty string.", param="model")
    return model


def _check_messages(body: dict[str, Any]) -> None:
    if "messages" not in body:
        raise invalid_request("Missing required parameter: 'messages'.", param="messages")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise invalid_request("'messages' must be an array of messages.", param="messages")
    if not messages:
        raise invalid_request("'messages' must contain at least one message.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid_request(f"messages[{i}] must be an object.", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise invalid_request(
                f"messages[{i}].role: {role!r} is not one of {sorted(ROLES)}.",
                param=f"messages[{i}].role",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise invalid_request(
                f"messages[{i}].content must be a string or an array of content parts.",
                param=f"messages[{i}].content",
            )


def _check_max_tokens(body: dict[str, Any], model: CatalogModel) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid_request(f"'{name}' must be an integer.", param=name)
        if value < 1:
            raise invalid_request(f"'{name}' must be at least 1.", param=name)
        if value > model.context_length:
            raise invalid_request(
                f"'{name}' is {value}, past the context length of '{model.id}' "
                f"({model.context_length} tokens).",
                param=name,
                code="context_length_exceeded",
            )


def _check_stream(body: dict[str, Any]) -> None:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid_request("'stream' must be a boolean.", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid_request("'stream_options' must be an object.", param="stream_options")
    if options and not stream:
        raise invalid_request(
            "'stream_options' is only allowed when 'stream' is true.", param="stream_options"
        )


def _engine_body(body: dict[str, Any], request_id: str) -> dict[str, Any]:
    """The body sent to the engine: our request id, and usage always reported.

    Billing counts what the engine reports, whatever the client asked: a stream always
    carries usage on every chunk (the ingress strips what the client did not ask for).
    """
    out = dict(body, request_id=request_id)
    if out.get("stream"):
        out["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return out


def parse_chat(body: dict[str, Any], model: CatalogModel, request_id: str) -> ChatCompletionRequest:
    _check_messages(body)
    _check_max_tokens(body, model)
    _check_stream(body)
    try:
        return ChatCompletionRequest.model_validate(_engine_body(body, request_id))
    except (ValidationError, ValueError) as exc:
        raise validation_error(exc) from None


def parse_completion(
    body: dict[str, Any], model: CatalogModel, request_id: str
) -> CompletionRequest:
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid_request("Missing required parameter: 'prompt'.", param="prompt")
    if prompt == "" or prompt == []:
        raise invalid_request("'prompt' must not be empty.", param="prompt")
    _check_max_tokens(body, model)
    _check_stream(body)
    try:
        return CompletionRequest.model_validate(_engine_body(body, request_id))
    except (ValidationError, ValueError) as exc:
        raise validation_error(exc) from None
