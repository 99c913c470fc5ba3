"""Schemathesis against the platform's OpenAPI schema: no request it can make is a 5xx.

The platform's app is built with `openapi_url=None`, so `GET /openapi.json` is not served; the
schema is the one FastAPI makes of the app the ingress replica serves (`create_app` with the
ingress's routes, as `Ingress.__serve_build_asgi_app__` builds it). Routes that read their
body themselves declare none there: the generation routes get the body the OpenAI API
documents (`GENERATION_BODIES`), so that schemathesis sends real requests to the engine as
well as broken ones. When the platform serves its schema, the test takes that one instead.

Every operation is called on the real platform (`darkgpu up`: Ray, vLLM, Redis, SQL, and the
fake Stripe of tests/conftest.py, so nothing spends real money) with a real consumer key (a
provider's token for the provider agent's routes), in schemathesis's positive and negative
modes, a bounded number of cases each, derandomized. The check is schemathesis's
`not_a_server_error`: every answer below 500, or 503 with Retry-After where a dependency is
named down (none is here, so any 503 fails too). Every 5xx is collected and listed.
"""

from __future__ import annotations

import copy
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup

from serve_app.http_app import create_app
from serve_app.ingress import Ingress
from serve_app.services import Services
from tests.platform_redis import admin_client

CASES = 25  # per operation and mode
LOCAL = "darkgpu-tiny"
# The provider agent's routes take a provider token (dgpp-…), every other one a consumer key.
PROVIDER_ROUTES = {
    "/v1/providers/auth",
    "/v1/providers/challenge",
    "/v1/providers/register",
    "/v1/providers/heartbeat",
    "/v1/providers/me",
}
_text = {"type": "string", "maxLength": 64}
_ids = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255},
        "minItems": 1, "maxItems": 16}  # fmt: skip
_common = {
    "model": {"type": "string", "enum": [LOCAL]},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 4},
    "n": {"type": "integer", "minimum": 1, "maximum": 3},
    "stop": {"anyOf": [_text, {"type": "array", "items": _text, "maxItems": 4}]},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "stream": {"type": "boolean"},
    "ignore_eos": {"type": "boolean"},
}
GENERATION_BODIES: dict[str, dict[str, Any]] = {
    "/v1/completions": {
        "type": "object",
        "required": ["model", "prompt", "max_tokens"],
        "properties": {
            **_common,
            "prompt": {
                "anyOf": [
                    _text,
                    {"type": "array", "items": _text, "minItems": 1, "maxItems": 4},
                    _ids,
                    {"type": "array", "items": _ids, "minItems": 1, "maxItems": 4},
                ]
            },
            "echo": {"type": "boolean"},
            "logprobs": {"type": "integer", "minimum": 0, "maximum": 5},
        },
    },
    "/v1/chat/completions": {
        "type": "object",
        "required": ["model", "messages", "max_tokens"],
        "properties": {
            **_common,
            "messages": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "required": ["role", "content"],
                    "properties": {
                        "role": {"type": "string", "enum": ["system", "user", "assistant"]},
                        "content": _text,
                    },
                },
            },
            "logprobs": {"type": "boolean"},
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 5},
        },
    },
}


def built_schema() -> dict[str, Any]:
    """The schema FastAPI makes of the ingress replica's app (no connection is opened)."""
    services = Services.create({"data_dir": tempfile.mkdtemp(prefix="darkgpu-schema-")})
    try:
        # the ingress's route table only: `routes()` binds methods, it reads no state
        app = create_app(services, Ingress.routes(object.__new__(Ingress)))
        return copy.deepcopy(app.openapi())
    finally:
        services.db.dispose()


def served_schema(api_url: str) -> dict[str, Any] | None:
    answer = httpx.get(api_url.removesuffix("/v1") + "/openapi.json", timeout=30)
    return answer.json() if answer.status_code == 200 else None


def with_generation_bodies(schema: dict[str, Any]) -> dict[str, Any]:
    for path, body in GENERATION_BODIES.items():
        operation = schema["paths"][path]["post"]
        operation.setdefault(
            "requestBody",
            {"required": True, "content": {"application/json": {"schema": body}}},
        )
    return schema


@pytest.fixture(scope="module")
def keys(platform) -> dict[str, str]:
    _, key = platform.new_key("paid", usd="5")
    created = httpx.post(
        f"{platform.api_url}/providers",
        json={"name": "fuzzed"},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert created.status_code == 201, created.text
    return {"consumer": key, "provider": created.json()["token"]}


@dataclass
class Fuzzed:
    """What the calls got: each operation's statuses, and every server error as a curl line."""

    statuses: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    no_negative: list[str] = field(default_factory=list)  # nothing in it can be made invalid


def fuzz(operation: Any, mode: GenerationMode, base_url: str, token: str, out: Fuzzed) -> None:
    headers = {"authorization": f"Bearer {token}"}
    label = f"{operation.method.upper()} {operation.path}"

    @settings(
        max_examples=CASES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=120)
        out.statuses[f"{label} {response.status_code}"] += 1
        try:
            case.validate_response(response, checks=[not_a_server_error], headers=headers)
        except (Failure, FailureGroup):  # a server error: each one is listed at the end
            curl = case.as_curl_command(headers=headers)
            out.server_errors.append(f"{curl}\n  -> {response.status_code} {response.text[:300]}")

    try:
        call()
    except Unsatisfiable:
        if mode is not GenerationMode.NEGATIVE:
            raise
        out.no_negative.append(label)


def test_no_request_schemathesis_makes_is_a_server_error(platform, keys):
    schema_dict = served_schema(platform.api_url)
    print(f"\n/openapi.json served: {schema_dict is not None}")
    schema_dict = with_generation_bodies(schema_dict or built_schema())
    schema = schemathesis.openapi.from_dict(schema_dict)
    base_url = platform.api_url.removesuffix("/v1")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {*GENERATION_BODIES, "/v1/credits", "/v1/usage"}
    out = Fuzzed()
    r = admin_client(platform.env, "money")
    try:
        for operation in operations:
            token = keys["provider" if operation.path in PROVIDER_ROUTES else "consumer"]
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz(operation, mode, base_url, token, out)
    finally:  # sign-ups were throttled per address: its allowance back, for the tests after
        for key in r.scan_iter("dg:throttle:*"):
            r.delete(key)
        r.close()
    print(f"{sum(out.statuses.values())} calls over {len(operations)} operations:")
    for line, count in sorted(out.statuses.items()):
        print(f"  {line}: {count}")
    print(f"no invalid request to make for: {', '.join(out.no_negative)}")
    assert not out.server_errors, "\n".join(out.server_errors)
