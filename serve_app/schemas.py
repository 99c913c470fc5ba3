"""Request bodies: parsed into vLLM's OpenAI models, with the checks the spec asks for.

Every failure is a 400 `invalid_request` naming the parameter: a body that is not a JSON
object, a missing or wrongly typed field, an empty `messages`, an unknown role, and
`max_tokens` below 1 or past the model's context.

Every multiplier of the work a request asks for is bounded here, so that admission can
reserve its worst case (`completions`): at most MAX_PROMPTS prompts in a prompt list, `n` at
most MAX_N, and at most MAX_COMPLETIONS sequences in all (prompts x n). Shapes whose cost the
ingress cannot bound, or not worth supporting, are refused, naming the parameter:
`best_of` above `n`, beam search, prompt embeddings, `suffix` (fill-in-the-middle), a
chat template sent with the request, and a stream that echoes the prompt with logprobs for
n > 1 choices (vLLM's stream fails part-way on it). `echo` and logprobs change no usage the
engine reports (vLLM counts each prompt once and every generated token; echoed text is not
billed again).

vLLM's request models check more themselves (a `tool_choice` naming no tool, negative
`logprobs`, a `response_format` without its schema, ...) and raise its own
`VLLMClientError`, which pydantic passes through unwrapped: it is a 400 here too, naming the
parameter vLLM names (`engine_refusal`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from vllm.exceptions import VLLMClientError

from cluster.catalog import CatalogModel
from kernel.errors import InvalidRequest
from serve_app.errors import validation_error

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_PROMPTS = 64
MAX_N = 16
MAX_COMPLETIONS = 64


def decode_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:  # nested deeper than Python's parser goes: not a request
        raise InvalidRequest("The request body is nested too deeply.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def require_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string.", param="model")
    return model


def _check_messages(body: dict[str, Any]) -> None:
    if "messages" not in body:
        raise InvalidRequest("Missing required parameter: 'messages'.", param="messages")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise InvalidRequest("'messages' must be an array of messages.", param="messages")
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object.", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest(
                f"messages[{i}].role: {role!r} is not one of {sorted(ROLES)}.",
                param=f"messages[{i}].role",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(
                f"messages[{i}].content must be a string or an array of content parts.",
                param=f"messages[{i}].content",
            )


def _check_max_tokens(body: dict[str, Any], model: CatalogModel) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"'{name}' must be an integer.", param=name)
        if value < 1:
            raise InvalidRequest(f"'{name}' must be at least 1.", param=name)
        if value > model.context_length:
            raise InvalidRequest(
                f"'{name}' is {value}, past the context length of '{model.id}' "
                f"({model.context_length} tokens).",
                param=name,
                code="context_length_exceeded",
            )


def _check_stream(body: dict[str, Any]) -> None:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    if options and not stream:
        raise InvalidRequest(
            "'stream_options' is only allowed when 'stream' is true.", param="stream_options"
        )


def _int_param(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be an integer.", param=name)
    return value


def _check_multipliers(body: dict[str, Any], prompts: int) -> None:
    """Bound the sequences a request makes the engine generate (see the module's doc)."""
    n = _int_param(body, "n")
    if n is not None and not 1 <= n <= MAX_N:
        raise InvalidRequest(f"'n' must be between 1 and {MAX_N}.", param="n")
    n = n or 1
    best_of = _int_param(body, "best_of")
    if best_of is not None and best_of > n:
        raise InvalidRequest(
            f"'best_of' ({best_of}) above 'n' ({n}) is not supported.", param="best_of"
        )
    if prompts * n > MAX_COMPLETIONS:
        raise InvalidRequest(
            f"This request asks for {prompts} prompt(s) x n={n} = {prompts * n} completions; "
            f"at most {MAX_COMPLETIONS} are allowed per request.",
            param="n" if prompts == 1 else "prompt",
        )
    if body.get("use_beam_search"):
        raise InvalidRequest("'use_beam_search' is not supported.", param="use_beam_search")
    for name in ("prompt_embeds", "suffix", "chat_template"):
        if body.get(name) is not None:
            raise InvalidRequest(f"'{name}' is not supported.", param=name)


def _check_stream_echo(body: dict[str, Any]) -> None:
    """vLLM's completion stream fails part-way (an error event of its own 500) when it echoes
    the prompt with logprobs for more than one choice: refused before anything is reserved."""
    n = body.get("n")
    several = isinstance(n, int) and not isinstance(n, bool) and n > 1
    if body.get("stream") and body.get("echo") and body.get("logprobs") is not None and several:
        raise InvalidRequest(
            "'logprobs' with 'echo' in a stream of n > 1 choices is not supported; "
            "ask for one choice, or no stream.",
            param="logprobs",
        )


def _prompt_count(prompt: Any) -> int:
    """How many prompts `prompt` holds: a string or one list of token ids is one."""
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise InvalidRequest(
                f"'prompt' holds {len(prompt)} prompts; at most {MAX_PROMPTS} are allowed.",
                param="prompt",
            )
        return len(prompt)
    return 1


def _engine_body(body: dict[str, Any], request_id: str) -> dict[str, Any]:
    """The body sent to the engine: our request id, and usage always reported.

    Billing counts what the engine reports, whatever the client asked: a stream always
    carries usage on every chunk (the ingress strips what the client did not ask for).
    """
    out = dict(body, request_id=request_id)
    if out.get("stream"):
        out["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return out


def engine_refusal(exc: VLLMClientError) -> InvalidRequest:
    """vLLM's refusal of a request, as the 400 the engine's own server answers it with."""
    param = getattr(exc, "parameter", None)
    message = str(exc.args[0]) if exc.args else str(exc)
    return InvalidRequest(message, param=param if isinstance(param, str) else None)


def _read_parts(request: ChatCompletionRequest) -> ChatCompletionRequest:
    """Every message field vLLM types as an `Iterable` (content parts, tool calls) read now.

    Pydantic leaves a value that matched no list type a lazy iterator, validated only as it
    is read: Ray cannot pickle it to the model replica (a 500), and its parts are unchecked.
    Read here, a bad part is a 400 naming its message, and the request travels."""
    for i, message in enumerate(request.messages):
        for name, value in list(message.items()):
            if isinstance(value, Iterator):
                try:
                    message[name] = list(value)  # type: ignore[literal-required]
                except (ValidationError, ValueError) as exc:
                    param = f"messages[{i}].{name}"
                    raise InvalidRequest(
                        f"{param}: {validation_error(exc).message}", param=param
                    ) from None
    return request


def parse_chat(body: dict[str, Any], model: CatalogModel, request_id: str) -> ChatCompletionRequest:
    _check_messages(body)
    _check_max_tokens(body, model)
    _check_stream(body)
    _check_multipliers(body, 1)
    try:
        request = ChatCompletionRequest.model_validate(_engine_body(body, request_id))
    except (ValidationError, ValueError) as exc:
        raise validation_error(exc) from None
    except VLLMClientError as exc:
        raise engine_refusal(exc) from None
    return _read_parts(request)


def parse_completion(
    body: dict[str, Any], model: CatalogModel, request_id: str
) -> CompletionRequest:
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt")
    if prompt == "" or prompt == []:
        raise InvalidRequest("'prompt' must not be empty.", param="prompt")
    _check_max_tokens(body, model)
    _check_stream(body)
    _check_multipliers(body, _prompt_count(prompt))
    _check_stream_echo(body)
    try:
        return CompletionRequest.model_validate(_engine_body(body, request_id))
    except (ValidationError, ValueError) as exc:
        raise validation_error(exc) from None
    except VLLMClientError as exc:
        raise engine_refusal(exc) from None
