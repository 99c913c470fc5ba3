"""Measured latency for the status page: the ingress's own histograms, read from the
metrics endpoint of the node it runs on (Ray's metrics agent, `Settings.metrics_port`,
where `serve_app.metrics` exports `ray_darkgpu_*`).

Only what was measured is shown: a model with no observations, or a metrics endpoint that
does not answer, reads "not yet measured", never a guess. A histogram keeps counts per
bucket, not the requests' times, so the median is given as the bucket bound it falls under
("under 0.25 s"), which is what the data supports. Counts are summed over the ingress
replicas (each exports its own series).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger("darkgpu.site")
REQUEST_LATENCY = "ray_darkgpu_request_latency_seconds"
TIME_TO_FIRST_TOKEN = "ray_darkgpu_time_to_first_token_seconds"
FETCH_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Measured:
    count: int  # requests observed since the ingress started
    median_under_s: float  # the smallest bucket bound at or above the median


def metrics_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/metrics"


def fetch(url: str) -> str | None:
    """The exposition text, or None where nothing answers (no platform, no metrics yet)."""
    try:
        answer = httpx.get(url, timeout=FETCH_TIMEOUT_S)
    except httpx.HTTPError as exc:
        logger.info("no metrics at %s: %r", url, exc)
        return None
    return answer.text if answer.status_code == 200 else None


def medians(text: str, family: str) -> dict[str, Measured]:
    """Per model, the median bucket of histogram `family` in exposition `text`."""
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for metric in text_string_to_metric_families(text):
        for sample in metric.samples:  # by the sample's name: with or without a TYPE line
            model = sample.labels.get("model")
            if sample.name != f"{family}_bucket" or not model or "le" not in sample.labels:
                continue
            buckets[model][float(sample.labels["le"])] += sample.value
    out = {}
    for model, cumulative in buckets.items():
        total = cumulative.get(math.inf, 0.0)
        if total <= 0:
            continue
        bound = next(le for le in sorted(cumulative) if cumulative[le] >= total / 2)
        out[model] = Measured(int(total), bound)
    return out


@dataclass(frozen=True)
class Latencies:
    measured: bool  # the metrics endpoint answered
    request: dict[str, Measured]
    first_token: dict[str, Measured]


def read(port: int) -> Latencies:
    text = fetch(metrics_url(port))
    if text is None:
        return Latencies(False, {}, {})
    try:
        return Latencies(True, medians(text, REQUEST_LATENCY), medians(text, TIME_TO_FIRST_TOKEN))
    except ValueError as exc:  # not an exposition: nothing measured, said so
        logger.warning("unreadable metrics: %r", exc)
        return Latencies(False, {}, {})
