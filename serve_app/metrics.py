"""Ingress metrics, exported by Ray next to its own (`ray_darkgpu_*` on the metrics port).

`ray.serve.metrics` adds the deployment, replica and application tags, and each node's
metrics agent serves them on `--metrics-export-port` (`DARKGPU_METRICS_PORT`, 8080).
"""

from __future__ import annotations

from ray.serve import metrics

_LATENCY_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "darkgpu_requests",
            description="Requests by endpoint, model and HTTP status.",
            tag_keys=("endpoint", "model", "status"),
        )
        self.tokens = metrics.Counter(
            "darkgpu_tokens",
            description="Tokens processed, by model and direction (in: prompt, out: completion).",
            tag_keys=("model", "direction"),
        )
        self.latency = metrics.Histogram(
            "darkgpu_request_latency_seconds",
            description="Time from request to last byte, by endpoint and model.",
            boundaries=_LATENCY_BOUNDARIES,
            tag_keys=("endpoint", "model"),
        )
        self.ttft = metrics.Histogram(
            "darkgpu_time_to_first_token_seconds",
            description="Time from request to first generated token (streams), by model.",
            boundaries=_LATENCY_BOUNDARIES,
            tag_keys=("model",),
        )

    def observe(
        self,
        *,
        endpoint: str,
        model: str,
        status: int,
        seconds: float,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "model": model, "status": str(status)})
        self.latency.observe(seconds, tags={"endpoint": endpoint, "model": model})
        if prompt_tokens:
            self.tokens.inc(prompt_tokens, tags={"model": model, "direction": "in"})
        if completion_tokens:
            self.tokens.inc(completion_tokens, tags={"model": model, "direction": "out"})

    def observe_ttft(self, model: str, seconds: float) -> None:
        self.ttft.observe(seconds, tags={"model": model})
