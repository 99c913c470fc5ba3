"""Ingress metrics, exported by Ray next to its own (`ray_darkgpu_*` on the metrics port).

`ray.serve.metrics` adds the deployment, replica and application tags, and each node's
metrics agent serves them on `--metrics-export-port` (`DARKGPU_METRICS_PORT`, 8080); Ray
adds the `ray_` prefix, and `_total` to counters. Labels stay small: the model (a catalog
id, or `unknown` before the body named one), endpoint, status, provider, refusal reason —
never a key, an account or a customer tag.
"""

from __future__ import annotations

from typing import cast

from ray.serve import metrics

from kernel.errors import DarkGpuError
from serve_app.provider_policy import NoProviderReason

_LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
# admission and settlement are one Redis round trip (a Lua script) each
_REDIS_BOUNDARIES = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
NO_PROVIDER = "none"  # the provider label of a request no replica served

# Refusal reasons by the refusing error's type (auth, billing) or (type, code).
_REASON_OF_TYPE = {"auth": "auth", "billing": "credits"}
_REASON_OF_CODE = {
    ("rate_limit", "rate_limit_exceeded"): "rate_limit",
    ("rate_limit", "daily_cap_exceeded"): "cap",
    ("service_unavailable", "billing_unavailable"): "billing_unavailable",
    **{("service_unavailable", r.value): "no_provider" for r in NoProviderReason},
}


def _tag_keys(*names: str) -> tuple[str]:
    """Tag names as `ray.serve.metrics` annotates them: `Tuple[str]` in Ray 2.60, meant as
    `Tuple[str, ...]` (any number of names works)."""
    return cast("tuple[str]", names)


REFUSAL_REASONS = frozenset({*_REASON_OF_TYPE.values(), *_REASON_OF_CODE.values(), "overloaded"})


def refusal_reason(error: DarkGpuError) -> str | None:
    """Why a request was refused, or None where the error is not a refusal (a bad request,
    an unknown model, an engine failure). A 503 without a known code is `overloaded` (the
    model's replicas are full, or the one chosen went away)."""
    if error.type in _REASON_OF_TYPE:
        return _REASON_OF_TYPE[error.type]
    reason = _REASON_OF_CODE.get((error.type, error.code or ""))
    if reason is None and error.type == "service_unavailable":
        return "overloaded"
    return reason


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "darkgpu_requests",
            description="Generation requests by endpoint, model, HTTP status and the provider "
            f"that served them ({NO_PROVIDER!r}: none did).",
            tag_keys=_tag_keys("endpoint", "model", "status", "provider"),
        )
        self.tokens = metrics.Counter(
            "darkgpu_tokens",
            description="Tokens processed, by model and direction (in: prompt, out: completion).",
            tag_keys=_tag_keys("model", "direction"),
        )
        self.refusals = metrics.Counter(
            "darkgpu_refusals",
            description="Generation requests refused, by model and reason (auth, rate_limit, "
            "cap, credits, no_provider, billing_unavailable, overloaded).",
            tag_keys=_tag_keys("model", "reason"),
        )
        self.latency = metrics.Histogram(
            "darkgpu_request_latency_seconds",
            description="Time from request to last byte, by endpoint and model.",
            boundaries=_LATENCY_BOUNDARIES,
            tag_keys=_tag_keys("endpoint", "model"),
        )
        self.ttft = metrics.Histogram(
            "darkgpu_time_to_first_token_seconds",
            description="Time from request to first generated token (streams), by model.",
            boundaries=_LATENCY_BOUNDARIES,
            tag_keys=("model",),
        )
        self.admission = metrics.Histogram(
            "darkgpu_admission_latency_seconds",
            description="Admission (key, rate limit, caps, credit reservation: one Redis "
            "script), by outcome (admitted, refused).",
            boundaries=_REDIS_BOUNDARIES,
            tag_keys=("outcome",),
        )
        self.overruns = metrics.Counter(
            "darkgpu_reservation_overruns",
            description="Requests whose engine usage exceeded their reservation (billed as far "
            "as the balance allowed, and logged with the request id), by model.",
            tag_keys=("model",),
        )
        self.settlement = metrics.Histogram(
            "darkgpu_settlement_latency_seconds",
            description="Settlement (bill, refund, append the usage event: one Redis script).",
            boundaries=_REDIS_BOUNDARIES,
        )

    def observe(
        self,
        *,
        endpoint: str,
        model: str,
        status: int,
        seconds: float,
        provider: str = "",
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        self.requests.inc(
            tags={
                "endpoint": endpoint,
                "model": model,
                "status": str(status),
                "provider": provider or NO_PROVIDER,
            }
        )
        self.latency.observe(seconds, tags={"endpoint": endpoint, "model": model})
        if prompt_tokens:
            self.tokens.inc(prompt_tokens, tags={"model": model, "direction": "in"})
        if completion_tokens:
            self.tokens.inc(completion_tokens, tags={"model": model, "direction": "out"})

    def observe_ttft(self, model: str, seconds: float) -> None:
        self.ttft.observe(seconds, tags={"model": model})

    def observe_error(self, model: str, error: DarkGpuError) -> None:
        """Count `error` as a refusal, if it is one."""
        reason = refusal_reason(error)
        if reason is not None:
            self.refusals.inc(tags={"model": model, "reason": reason})

    def observe_admission(self, seconds: float, admitted: bool) -> None:
        self.admission.observe(seconds, tags={"outcome": "admitted" if admitted else "refused"})

    def observe_overrun(self, model: str, tokens: int) -> None:
        """A settlement above its reservation (`tokens` over it)."""
        self.overruns.inc(tags={"model": model})

    def observe_settlement(self, seconds: float) -> None:
        self.settlement.observe(seconds)
