"""A real Prometheus server scrapes the running platform with the shipped config
(`configs/prometheus.yml`: Ray's service-discovery file), and every query of the shipped
Grafana dashboard (`configs/grafana/darkgpu.json`) returns data through Prometheus' HTTP API.

Traffic covers every metric: answers (JSON and a stream), each refusal reason, settlement
(spend, the billing actor's backlog gauges). It is sent twice, the second time once
Prometheus holds every series, so that rates and quantiles have an increase to see (a
counter's first sample is not an increase). Nothing is timed: every check polls until its
data arrives, within a generous deadline.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import yaml

from cluster.processes import cmdline
from tests.exact_tokens import EXACT

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO / "configs" / "prometheus.yml"
DASHBOARD = REPO / "configs" / "grafana" / "darkgpu.json"
SD_FILE = "prom_metrics_service_discovery.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
LOCAL = "darkgpu-tiny"
MSG = [{"role": "user", "content": "Tell me a story about a small robot."}]
# Grafana's variables, as a person looking at this platform would pick them; the window
# is wide so that a rate still sees this test's traffic while the test polls.
VARIABLES = {"$__rate_interval": "5m", "$model": LOCAL}
REASONS = {"auth", "rate_limit", "cap", "credits", "no_provider"}
DEADLINE_S = 240


def session_dir(gcs_port: int) -> Path:
    """The Ray session directory of the cluster whose GCS listens on `gcs_port`: its
    dashboard writes the service-discovery file there (and links /tmp/ray's to the newest
    session on the machine, which may be another cluster's)."""
    for proc in psutil.process_iter():
        cmd = cmdline(proc)
        if f"--gcs_server_port={gcs_port}" in cmd and "--log_dir=" in cmd:
            return Path(cmd.split("--log_dir=", 1)[1].split()[0]).parent
    raise AssertionError(f"no Ray GCS on port {gcs_port}")


def scrape_config(shipped: dict[str, Any], sd_files: list[Path]) -> dict[str, Any]:
    """The shipped config, pointed at this platform's discovery files (its two clusters':
    the control plane's and the supply pool's) and scraping faster."""
    config = json.loads(json.dumps(shipped))
    # a scrape of a busy node's agent may take seconds (its timeout is at most the interval)
    config["global"].update(scrape_interval="5s", scrape_timeout="5s", evaluation_interval="5s")
    (job,) = config["scrape_configs"]
    (sd,) = job["file_sd_configs"]
    assert sd["files"] == [f"/tmp/ray/{SD_FILE}"]  # where Ray's default temp dir puts it
    sd.update(files=[str(f) for f in sd_files], refresh_interval="2s")
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(
    check: Callable[[], Any], what: str | Callable[[], str], deadline_s: float = DEADLINE_S
) -> Any:
    """`check()`'s first truthy answer; fails naming `what` (or what `what()` says)."""
    deadline = time.monotonic() + deadline_s
    while True:
        answer = check()
        if answer or time.monotonic() > deadline:
            assert answer, f"{what() if callable(what) else what}: nothing within {deadline_s} s"
            return answer
        time.sleep(1)


class Prometheus:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = self.http.get("/api/v1/query", params={"query": expr})
        assert response.status_code == 200, f"{expr}: {response.text}"
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def finite(self, expr: str) -> list[dict[str, Any]]:
        """The series of `expr` with a number (not NaN), or [] while there are none."""
        return [s for s in self.query(expr) if math.isfinite(float(s["value"][1]))]

    def value(self, expr: str) -> float | None:
        """The value of a one-series `expr` (None while it has none)."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def by(self, expr: str, label: str) -> dict[str, float]:
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.query(expr)}


@pytest.fixture(scope="module")
def prometheus(platform, tmp_path_factory) -> Iterator[Prometheus]:
    assert Path(PROMETHEUS).exists(), "Prometheus is needed (Debian package `prometheus`)"
    sd_files = [session_dir(int(platform.env[f"DARKGPU_{head}"])) / SD_FILE
                for head in ("RAY_PORT", "POOL_RAY_PORT")]  # fmt: skip
    for sd_file in sd_files:
        poll(sd_file.exists, f"Ray's service-discovery file {sd_file}")
    work = tmp_path_factory.mktemp("prometheus")
    shipped = yaml.safe_load(SHIPPED_CONFIG.read_text())
    (work / "prometheus.yml").write_text(yaml.safe_dump(scrape_config(shipped, sd_files)))
    url = f"http://127.0.0.1:{free_port()}"
    with (work / "prometheus.log").open("w") as log:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
             f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address={url.removeprefix('http://')}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def ready() -> bool:
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
            try:
                return httpx.get(f"{url}/-/ready", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        poll(ready, "Prometheus ready")
        yield Prometheus(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def send_traffic(platform, keys: dict[str, str]) -> None:
    """One answer of each kind and one refusal of each reason."""

    def sdk(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=platform.api_url, api_key=key, max_retries=0)

    ok = sdk(keys["ok"])
    ok.chat.completions.create(model=LOCAL, messages=MSG, max_tokens=4, extra_body=EXACT)
    stream = ok.chat.completions.create(
        model=LOCAL, messages=MSG, max_tokens=4, stream=True, extra_body=EXACT
    )
    assert len(list(stream)) >= 4
    refusals = {
        "auth": (sdk("dgpu-" + "0" * 43), openai.AuthenticationError, {}),
        "rate_limit": (sdk(keys["rpm"]), openai.RateLimitError, {}),
        "cap": (sdk(keys["cap"]), openai.RateLimitError, {}),
        "credits": (sdk(keys["broke"]), openai.APIStatusError, {}),
        "no_provider": (ok, openai.InternalServerError, {"provider": {"trust_tier": "verified"}}),
    }
    for reason, (client, error, body) in refusals.items():
        if reason in ("rate_limit", "cap"):  # use up the minute's requests, the day's tokens
            try:  # every token granted is generated (EXACT ignores EOS): an early EOS of the
                # random model left the day's cap not used up, and the next request served
                client.chat.completions.create(
                    model=LOCAL, messages=MSG, max_tokens=50, extra_body=EXACT
                )
            except openai.RateLimitError:  # used up already (the second round)
                pass
        with pytest.raises(error) as caught:
            client.chat.completions.create(model=LOCAL, messages=MSG, max_tokens=2, extra_body=body)
        expected = {"auth": 401, "rate_limit": 429, "cap": 429, "credits": 402}
        assert caught.value.status_code == expected.get(reason, 503), reason


@pytest.fixture(scope="module")
def keys(platform) -> dict[str, str]:
    keys = {"ok": platform.new_key("paid", usd="5")[1], "broke": platform.new_key("paid")[1]}
    account, keys["rpm"] = platform.new_key("free")
    platform.admin("account", "update", "--account", str(account), "--rpm", "1")
    account, keys["cap"] = platform.new_key("free")
    platform.admin("cap", "set", "--account", str(account), "--tokens-per-day", "40")
    return keys


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target in the dashboard, its variables substituted."""
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"an unknown variable in {panel['title']!r}: {expr}"
            queries.append((panel["title"], expr))
    return queries


def test_the_dashboard_is_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"]
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat")
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])
    assert len(dashboard_queries()) >= 20


def test_prometheus_scrapes_the_platform_and_every_dashboard_query_has_data(
    platform, prometheus, keys
):
    # Ray lists each node's agent by the node's address, which need not be the loopback one
    metrics_port = platform.env["DARKGPU_METRICS_PORT"]

    targets: list[dict[str, Any]] = []

    def scraped() -> bool:
        targets[:] = prometheus.http.get("/api/v1/targets").json()["data"]["activeTargets"]
        return any(t["labels"]["instance"].endswith(f":{metrics_port}") and t["health"] == "up"
                   for t in targets)  # fmt: skip

    def seen() -> str:
        found = [(t["labels"]["instance"], t["health"], t["lastError"]) for t in targets]
        return f"Prometheus scraping port {metrics_port} (from Ray's file); saw {found}"

    poll(scraped, seen)

    send_traffic(platform, keys)
    # the series exist in Prometheus: the second round's traffic is an increase of them
    for name in ("ray_darkgpu_requests_total", "ray_darkgpu_refusals_total",
                 "ray_darkgpu_time_to_first_token_seconds_count",
                 "ray_darkgpu_admission_latency_seconds_count",
                 "ray_darkgpu_settlement_latency_seconds_count",
                 "ray_darkgpu_spend_nusd_total"):  # fmt: skip
        poll(lambda name=name: prometheus.query(name), name)
    send_traffic(platform, keys)

    for title, expr in dashboard_queries():
        poll(lambda expr=expr: prometheus.finite(expr), f"{title!r}: {expr}")

    refusals = "sum by (reason) (ray_darkgpu_refusals_total)"
    poll(lambda: REASONS <= set(prometheus.by(refusals, "reason")), "a refusal of each reason")
    served = prometheus.by(
        f'sum by (provider) (ray_darkgpu_requests_total{{model="{LOCAL}", status="200"}})',
        "provider",
    )
    assert served.get("local", 0) >= 4  # the head node is provider `local`
    serving = prometheus.by("max by (tier) (ray_darkgpu_providers_serving)", "tier")
    assert serving["basic"] >= 1 and serving["verified"] == 0
    # spend is what the billing actor wrote to the ledger: at least what this test's key paid
    paid = billed_nusd(platform, keys["ok"], requests=4)
    spend = f'sum(ray_darkgpu_spend_nusd_total{{model="{LOCAL}"}})'
    poll(lambda: (prometheus.value(spend) or 0) >= paid, f"spend >= {paid} nUSD")
    # the ledger has taken every event: the backlog gauges read empty
    drained = "max(ray_darkgpu_usage_stream_length) + max(ray_darkgpu_ledger_flush_lag_seconds)"
    poll(lambda: prometheus.value(drained) == 0, "an empty usage stream")
    # the dashboard's model variable lists the model
    values = prometheus.http.get(
        "/api/v1/label/model/values", params={"match[]": "ray_darkgpu_requests_total"}
    ).json()["data"]
    assert LOCAL in values


def billed_nusd(platform, key: str, requests: int) -> int:
    """The key's account's spend in the ledger, once it holds `requests` requests."""

    def usage() -> int | None:
        response = httpx.get(f"{platform.api_url}/usage", params={"group_by": "model"},
                             headers={"authorization": f"Bearer {key}"}, timeout=30)  # fmt: skip
        rows = response.json()["data"]
        if sum(r["requests"] for r in rows) < requests:
            return None
        return sum(r["cost_nusd"] for r in rows)

    return poll(usage, f"{requests} requests in the ledger")
