"""Signing up, buying credits and lending a GPU, against the real platform (`darkgpu up`)
with Stripe's API answered by a fake over HTTP and webhooks signed for real."""

from __future__ import annotations

import httpx
import openai

from tests.billing.fake_stripe import WEBHOOK_SECRET, signed

LOCAL = "darkgpu-tiny"


def post(platform, path: str, key: str | None = None, **kwargs) -> httpx.Response:
    headers = kwargs.pop("headers", {})
    if key:
        headers["authorization"] = f"Bearer {key}"
    return httpx.post(platform.api_url + path, headers=headers, timeout=60, **kwargs)


def get(platform, path: str, key: str | None = None, **kwargs) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.get(platform.api_url + path, headers=headers, timeout=60, **kwargs)


def test_sign_up_get_ten_dollars_and_call_the_api(platform):
    response = post(
        platform,
        "/auth/signup",
        json={"email": "new@example.com", "password": "correct horse battery"},
    )
    assert response.status_code == 201, response.text
    account = response.json()
    assert account["credits_usd"] == "10" and account["plan"] == "free"
    key = account["api_key"]["key"]
    assert key.startswith("dgpu-")
    again = post(
        platform, "/auth/signup", json={"email": "new@example.com", "password": "another password"}
    )
    assert again.status_code == 409  # one account, one grant
    client = openai.OpenAI(base_url=platform.api_url, api_key=key, max_retries=0)
    answer = client.chat.completions.create(
        model=LOCAL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    # billed: the ingress's recount of the text delivered, at most the 2 tokens generated (the
    # random test model's 2 tokens may be half a UTF-8 character: no text, nothing billed)
    assert len(answer.choices) == 1 and answer.usage.prompt_tokens >= 1
    assert 0 <= answer.usage.completion_tokens <= 2


def test_buy_a_bundle_through_checkout_and_its_webhook(platform):
    account_id, key = platform.new_key("free")
    session = post(platform, "/billing/checkout", key, json={"bundle": "solo"})
    assert session.status_code == 200, session.text
    assert session.json()["amount_cents"] == 5000 and session.json()["url"].startswith("http")

    paid = platform.stripe.pay(session.json()["id"])
    event = platform.stripe.event("checkout.session.completed", paid)
    forged = post(
        platform,
        "/billing/stripe/webhook",
        content=event,
        headers={"stripe-signature": signed(event, "whsec_wrong")},
    )
    assert forged.status_code == 400
    assert get(platform, "/credits", key).json()["balance_nusd"] == 10 * 10**9

    headers = {"stripe-signature": signed(event, WEBHOOK_SECRET)}
    first = post(platform, "/billing/stripe/webhook", content=event, headers=headers)
    assert first.status_code == 200 and first.json()["outcome"] == "applied", first.text
    duplicate = post(platform, "/billing/stripe/webhook", content=event, headers=headers)
    assert duplicate.json()["outcome"] == "duplicate"

    credits = get(platform, "/credits", key).json()
    assert credits["balance_nusd"] == 60 * 10**9  # $10 signup + $50 Solo, once
    # the paid plan: credits are its only limit (the free plan's allowance is never lowered)
    assert credits["plan"] == "paid" and credits["tokens_per_day"] is None


def test_lend_a_gpu_provider_token_credentials_and_attestation(platform):
    _, key = platform.new_key("free")
    created = post(platform, "/providers", key, json={"name": "my-4090"})
    assert created.status_code == 201, created.text
    provider = created.json()
    token = provider["token"]
    assert token.startswith("dgpp-")

    assert post(platform, "/providers/auth", "dgpp-" + "x" * 43).status_code == 401
    pending = post(platform, "/providers/auth", token)
    assert pending.status_code == 200, pending.text
    body = pending.json()  # signing up gives nobody the cluster: the operator approves first
    assert body["provider_id"] == provider["id"] and body["review"] == "pending"
    assert body["cluster_address"] is None and body["ray_auth_token"] is None
    platform.admin("provider", "approve", "--provider", provider["id"])
    body = post(platform, "/providers/auth", token).json()
    assert body["review"] == "approved" and body["cluster_address"] and body["ray_auth_token"]

    attestation = get(platform, f"/providers/{provider['id']}/attestation")
    assert attestation.status_code == 200
    assert attestation.json()["trust_tier"] == "basic"
    assert get(platform, "/providers/prv_nope/attestation").status_code == 404
    earnings = get(platform, "/providers/me/earnings", key)
    assert earnings.status_code == 200 and earnings.json()["payable_nusd"] == 0
