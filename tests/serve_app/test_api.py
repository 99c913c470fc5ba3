"""The API as a consumer sees it: the official OpenAI SDK against a real platform
(`darkgpu up`: a Ray head, Serve, the ingress, and vLLM on the CPU serving the local model)."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest

from tests.exact_tokens import EXACT

LOCAL = "darkgpu-tiny"
MSG = [{"role": "user", "content": "Tell me a story about a small robot."}]


@pytest.fixture(scope="module")
def api_key(platform):
    return platform.new_key("paid", usd="5")[1]


@pytest.fixture(scope="module")
def client(platform, api_key):
    return openai.OpenAI(base_url=platform.api_url, api_key=api_key, max_retries=0)


@pytest.fixture(scope="module")
def http(platform, api_key):
    with httpx.Client(
        base_url=platform.api_url.removesuffix("/v1"),
        headers={"authorization": f"Bearer {api_key}"},
        timeout=60,
    ) as c:
        yield c


def test_second_up_says_it_is_running(platform):
    again = platform.darkgpu("up", timeout=120)
    assert again.returncode == 0
    assert "already running" in again.stdout


def test_model_list_is_the_catalog_with_prices_and_availability(client):
    models = {m.id: m for m in client.models.list().data}
    assert {"qwen3.5-7b", "deepseek-v3", "qwen25-14b-awq", "qwen25-32b-awq", LOCAL} <= set(models)
    local = models[LOCAL].model_dump()
    assert local["available"] is True
    assert local["pricing"] == {
        "input_usd_per_1m": "0.015",
        "output_usd_per_1m": "0.06",
        "input_nusd_per_token": 15,
        "output_nusd_per_token": 60,
    }
    big = models["deepseek-v3"].model_dump()
    assert big["available"] is False and big["min_vram_gb"] == 160
    one = client.models.retrieve("qwen3.5-7b").model_dump()
    assert one["pricing"]["output_nusd_per_token"] == 60


def test_chat(client):
    raw = client.chat.completions.with_raw_response.create(
        model=LOCAL, messages=MSG, max_tokens=8, extra_body=EXACT
    )
    completion = raw.parse()
    assert raw.headers["x-darkgpu-provider"] == "local"
    assert re.fullmatch(r"req_[0-9a-f]{32}", raw.headers["x-darkgpu-request-id"])
    assert completion.id.endswith(raw.headers["x-darkgpu-request-id"])
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 8
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8


def test_stream_with_usage(client):
    with client.chat.completions.with_streaming_response.create(
        model=LOCAL,
        messages=MSG,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EXACT,
    ) as response:
        assert response.headers["x-darkgpu-provider"] == "local"
        assert response.headers["x-darkgpu-request-id"].startswith("req_")
        chunks = list(response.parse())
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content is not None) >= 6


def test_stream_without_usage_has_none(client):
    chunks = list(
        client.chat.completions.create(
            model=LOCAL, messages=MSG, max_tokens=4, stream=True, extra_body=EXACT
        )
    )
    assert chunks and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions(client):
    completion = client.completions.create(
        model=LOCAL, prompt="Once upon a time", max_tokens=5, extra_body=EXACT
    )
    assert completion.usage.completion_tokens == 5
    streamed = list(
        client.completions.create(
            model=LOCAL,
            prompt="Hello",
            extra_body=EXACT,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert streamed[-1].usage.completion_tokens == 3


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
        ({"messages": MSG, "max_tokens": 100_000}, "max_tokens"),
        ({"messages": MSG, "temperature": "hot"}, "temperature"),
    ],
)
def test_bad_input_is_a_bad_request(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=LOCAL, **kwargs)
    assert info.value.body["type"] == "invalid_request"
    assert info.value.body["param"] == param
    assert info.value.response.headers["x-darkgpu-request-id"].startswith("req_")


def test_prompt_past_the_context_is_a_bad_request(client):
    long_prompt = [{"role": "user", "content": "robot " * 400}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=LOCAL, messages=long_prompt, max_tokens=8)
    assert info.value.body["type"] == "invalid_request"
    assert "Traceback" not in info.value.response.text


def test_malformed_json_and_missing_fields(http):
    response = http.post(
        "/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request"
    assert response.headers["x-darkgpu-request-id"].startswith("req_")
    response = http.post("/v1/chat/completions", json={"model": LOCAL})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    response = http.post("/v1/completions", json={"model": LOCAL})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_unknown_model_and_route_are_not_found(client, http):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=MSG)
    assert info.value.body["type"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    response = http.get("/v1/no/such/route")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"
    assert response.headers["x-darkgpu-request-id"].startswith("req_")


def test_catalog_model_without_a_replica_is_unavailable(client):
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="qwen3.5-7b", messages=MSG)
    assert info.value.status_code == 503
    assert info.value.body["type"] == "service_unavailable"
    assert int(info.value.response.headers["retry-after"]) > 0


def test_health_and_readiness(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == [LOCAL]


def test_the_status_page_shows_the_served_model_through_the_accounts_replica(http):
    """The site runs in the accounts deployment (the ingress forwards it there); which models
    are served it asks the ingress (its model cards): without them it would list no local
    model, and it would say nothing is available."""
    page = http.get("/status")
    assert page.status_code == 200
    assert f'<tr data-model="{LOCAL}">' in page.text
    assert '<span class="ok">yes</span>' in page.text


def test_sixteen_concurrent_requests_are_all_answered(platform, api_key):
    async def main():
        async with openai.AsyncOpenAI(
            base_url=platform.api_url, api_key=api_key, max_retries=0
        ) as aclient:
            return await asyncio.gather(
                *(
                    aclient.chat.completions.create(
                        model=LOCAL,
                        max_tokens=8,
                        extra_body=EXACT,
                        messages=[{"role": "user", "content": f"Request number {i}"}],
                    )
                    for i in range(16)
                )
            )

    results = asyncio.run(main())
    assert len(results) == 16
    assert len({r.id for r in results}) == 16
    # 8 tokens generated each; the usage billed is the ingress's recount of the text delivered,
    # never above the engine's 8, and on the random test model sometimes below it, even none
    # where it loops on half a UTF-8 character (serve_app.recount; this test asked for exactly
    # 8 before, and failed now and then)
    assert all(0 <= r.usage.completion_tokens <= 8 for r in results), [r.usage for r in results]


def test_ingress_metrics_are_exported_next_to_rays(platform, client):
    client.chat.completions.create(model=LOCAL, messages=MSG, max_tokens=3)
    list(client.chat.completions.create(model=LOCAL, messages=MSG, max_tokens=3, stream=True))
    wanted = (
        "ray_darkgpu_requests_total",
        "ray_darkgpu_tokens_total",
        "ray_darkgpu_request_latency_seconds_bucket",
        "ray_darkgpu_time_to_first_token_seconds_bucket",
        "ray_serve_",
    )
    deadline = time.monotonic() + 60
    while True:  # Ray's metrics agent exports every few seconds
        text = httpx.get(platform.metrics_url, timeout=10).text
        missing = [name for name in wanted if name not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, missing
    ok = re.search(
        r'ray_darkgpu_requests_total\{[^}]*model="darkgpu-tiny"[^}]*provider="local"'
        r'[^}]*status="200"[^}]*\} '
        r"(\d+)",
        text,
    )
    assert ok and int(ok.group(1)) >= 1
    assert re.search(r'ray_darkgpu_tokens_total\{[^}]*direction="out"', text)
