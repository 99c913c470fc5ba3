"""The provider routes on a small app, against real SQLite / PostgreSQL and Redis, called the
way the agent calls them (agent_bootstrap.api / credentials over the TestClient)."""

from __future__ import annotations

import base64
import hmac
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agent_bootstrap import credentials as creds
from agent_bootstrap.agent import Agent, AgentDeps, NodeSpec, Phase
from agent_bootstrap.api import PlatformClient
from agent_bootstrap.cli import market_lines
from agent_bootstrap.config import ProviderConfig
from agent_bootstrap.evidence import make_evidence
from agent_bootstrap.keys import load_or_create
from agent_bootstrap.nvml import RecordedReader, detect
from agent_bootstrap.paths import mode_of
from billing.plans import Plans
from cluster import nodes, registry
from cluster.attestation import (
    AttestationError,
    NoVerifier,
    SignedReportVerifier,
    check_challenge,
    issue_challenge,
)
from cluster.nodes import ClusterNode
from cluster.registry import ProviderPlatform
from core.schema import Provider, ProviderReview
from core.settings import Settings
from kernel.labels import PROVIDER_ID_LABEL, TrustTier
from serve_app.http_app import create_app
from serve_app.pool_admin import PoolAdmin
from serve_app.pool_protocol import credential_digest, credential_matches, nodes_body
from serve_app.routes_nodes import node_table
from serve_app.services import Services
from tests.agent_bootstrap.proc_tables import StaticProcTable
from tests.billing import conftest as billing
from tests.cluster.cc_pki import DevicePki
from tests.cluster.nvml_readings import H100, H100_CC_ON
from tests.http_server import serving

db_url = billing.db_url
engine = billing.engine
r = billing.r
plans = billing.plans

RAY_TOKEN = "ray-cluster-token-0123456789"  # the basic pool's
VERIFIED_RAY_TOKEN = "verified-pool-token-9876543210"


@dataclass
class Platform:
    client: TestClient
    services: Services
    consumer_key: str
    token_file: Path

    def post(self, path: str, key: str | None = None, **kw):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return self.client.post(path, headers=headers, **kw)

    def get(self, path: str, key: str | None = None):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return self.client.get(path, headers=headers)

    def new_provider(self, name: str = "rig") -> tuple[str, str]:
        response = self.post("/v1/providers", self.consumer_key, json={"name": name})
        assert response.status_code == 201, response.text
        return response.json()["id"], response.json()["token"]


@pytest.fixture
def platform(
    db_url: str, engine: Engine, r: redis.Redis, plans: Plans, tmp_path: Path
) -> Iterator[Platform]:
    token_file = tmp_path / "ray_auth_token"
    token_file.write_text(RAY_TOKEN + "\n")
    verified_file = tmp_path / "verified_ray_auth_token"
    verified_file.write_text(VERIFIED_RAY_TOKEN + "\n")
    services = Services.create({"database_url": db_url, "redis_url": billing.REDIS_URL})
    services.providers = ProviderPlatform(
        Settings(
            data_dir=tmp_path,
            cluster_address="10.8.0.1:6380",
            ray_auth_token_path=token_file,
            verified_pool={
                "cluster_address": "10.8.1.1:6384",
                "ray_auth_token_path": str(verified_file),
            },
            heartbeat_interval_s=7,
        )
    )
    app = create_app(services)
    customer = billing.make_customer(engine, r, plans, plan="paid")
    with TestClient(app) as client:
        yield Platform(client, services, customer.key, token_file)
    services.db.dispose()


def _public_key() -> str:
    raw = X25519PrivateKey.generate().public_key().public_bytes_raw()
    return base64.b64encode(raw).decode()


def _register_body(reading=H100) -> dict:
    return {**detect(RecordedReader(reading)).facts(), "public_key": _public_key()}


def test_creating_a_provider_needs_a_consumer_key(platform: Platform) -> None:
    missing = platform.post("/v1/providers", json={"name": "x"})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "auth"
    provider_id, token = platform.new_provider("garage")
    assert provider_id.startswith("prv_") and token.startswith("dgpp-")
    as_consumer = platform.post("/v1/providers", token, json={"name": "y"})
    assert as_consumer.status_code == 401  # a provider token is not a consumer key
    listed = platform.get("/v1/providers", platform.consumer_key).json()["data"]
    assert [p["id"] for p in listed] == [provider_id]
    assert "token" not in listed[0]
    default_name = platform.post("/v1/providers", platform.consumer_key)
    assert default_name.status_code == 201 and default_name.json()["name"] == "my-gpu"


@pytest.mark.parametrize("path", ["/auth", "/challenge", "/heartbeat", "/register"])
def test_agent_endpoints_refuse_consumer_keys_and_junk(platform: Platform, path: str) -> None:
    for key in (None, platform.consumer_key, "dgpp-" + "x" * 43):
        response = platform.post(f"/v1/providers{path}", key, json={})
        assert response.status_code == 401, response.text
        assert response.json()["error"]["type"] == "auth"
        assert response.json()["error"]["code"] == "invalid_provider_token"
    assert platform.get("/v1/providers/me", platform.consumer_key).status_code == 401


def test_darkgpu_auth_exchanges_the_token_for_private_credentials(
    platform: Platform, tmp_path: Path
) -> None:
    provider_id, token = platform.new_provider()
    home = tmp_path / "cfg"
    pending = creds.exchange("http://testserver", token, client=platform.client)
    assert (pending.review, pending.cluster_address, pending.ray_auth_token) == (
        "pending", None, None)  # fmt: skip
    creds.save(pending, home)
    assert not creds.ray_token_path(home).exists()
    registry.review(platform.services.db, provider_id, ProviderReview.approved)
    got = creds.exchange("http://testserver", token, client=platform.client)
    assert got.provider_id == provider_id and got.review == "approved"
    # a basic provider joins the basic pool: never given the verified pool's address or token
    assert got.cluster_address == "10.8.0.1:6380"
    assert got.ray_auth_token == RAY_TOKEN
    assert got.heartbeat_interval_s == 7
    saved = creds.save(got, home)
    assert mode_of(saved) == 0o600 and mode_of(creds.ray_token_path(home)) == 0o600
    assert mode_of(home) == 0o700
    assert creds.ray_token_path(home).read_text() == RAY_TOKEN
    assert creds.load(home) == got
    with pytest.raises(creds.CredentialsError, match="refused"):
        creds.exchange("http://testserver", "dgpp-" + "q" * 43, client=platform.client)


def test_auth_is_503_while_the_cluster_has_no_token(platform: Platform) -> None:
    provider_id, token = platform.new_provider()
    registry.review(platform.services.db, provider_id, ProviderReview.approved)
    platform.token_file.unlink()
    response = platform.post("/v1/providers/auth", token)
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "service_unavailable"
    assert response.json()["error"]["code"] == "cluster_not_ready"


def test_register_heartbeat_me_and_the_public_attestation(platform: Platform) -> None:
    provider_id, token = platform.new_provider()
    body = _register_body(H100) | {"price_floor_pct": 10}
    registered = platform.post("/v1/providers/register", token, json=body)
    assert registered.status_code == 200, registered.text
    got = registered.json()
    assert got["trust_tier"] == "basic" and got["tier_reason"] == "confidential computing is off"
    assert got["status"] == "paused" and got["price_floor_pct"] == 10
    assert got["node"] == {
        "labels": {
            "darkgpu.io/provider-id": provider_id,
            "darkgpu.io/trust-tier": "basic",
            "darkgpu.io/gpu-model": "NVIDIA_H100_80GB_HBM3",
        },
        "resources": {"vram_gb": 80},
    }

    beat = platform.post("/v1/providers/heartbeat", token, json={"status": "online"})
    assert beat.status_code == 200 and beat.json()["status"] == "online"
    assert beat.json()["heartbeat_interval_s"] == 7

    doc = platform.get(f"/v1/providers/{provider_id}/attestation").json()  # no key needed
    assert doc["object"] == "provider.attestation" and doc["provider_id"] == provider_id
    assert doc["trust_tier"] == "basic" and doc["basis"].startswith("software")
    assert doc["public_key"]["value"] == body["public_key"]
    assert doc["public_key"]["type"] == "x25519"
    assert doc["gpu"]["name"] == "NVIDIA H100 80GB HBM3" and doc["gpu"]["vram_gb"] == 79.6
    assert doc["confidential_computing"] == {"state": "off", "evidence": None, "note": None}
    assert doc["status"] == "online" and doc["last_heartbeat_at"]

    me = platform.get("/v1/providers/me", token).json()
    assert me["id"] == provider_id and me["status"] == "online"
    assert me["earnings"] == {"requests": 0, "earned_nusd": 0, "payable_nusd": 0}


def test_a_cc_provider_becomes_verified_through_the_routes(platform: Platform) -> None:
    pki = DevicePki.make()
    platform.services.providers.verifier = SignedReportVerifier([pki.root])
    provider_id, token = platform.new_provider()
    key = X25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw()
    api = PlatformClient("http://testserver", token, platform.client)
    reader = RecordedReader(H100_CC_ON, report_signer=pki.sign_report)
    facts = detect(reader).facts()
    evidence = make_evidence(reader, public, api.challenge(), 1)
    body = {
        **facts,
        "public_key": base64.b64encode(public).decode(),
        "cc_evidence": evidence.model_dump(),
    }
    got = api.register(body)
    assert got["trust_tier"] == "verified", got["tier_reason"]
    assert got["review"] == "approved"  # the rule: its attestation passed
    # it joins the verified tier's pool, and only it: the basic one's token is not given
    joined = api.exchange()
    assert (joined["trust_tier"], joined["cluster_address"], joined["ray_auth_token"]) == (
        "verified", "10.8.1.1:6384", VERIFIED_RAY_TOKEN
    )  # fmt: skip
    assert got["node"]["labels"]["darkgpu.io/trust-tier"] == "verified"
    doc = platform.get(f"/v1/providers/{provider_id}/attestation").json()
    assert doc["trust_tier"] == "verified"
    assert doc["basis"] == "nvidia-confidential-computing"
    assert doc["confidential_computing"]["state"] == "on"
    assert doc["confidential_computing"]["evidence"]["nonce"] == evidence.nonce
    assert doc["confidential_computing"]["evidence"]["gpus"][0]["report"] == (
        evidence.gpus[0].report
    )
    # Without a configured verifier, the same kind of evidence leaves it basic.
    platform.services.providers.verifier = NoVerifier()
    again = make_evidence(reader, public, api.challenge(), 1)
    redone = api.register({**body, "cc_evidence": again.model_dump()})
    assert redone["trust_tier"] == "basic"
    doc = platform.get(f"/v1/providers/{provider_id}/attestation").json()
    assert doc["confidential_computing"]["evidence"] is None


def test_bad_requests_get_openai_shaped_errors(platform: Platform) -> None:
    _, token = platform.new_provider()
    no_gpu = platform.post("/v1/providers/register", token, json={"public_key": _public_key()})
    assert no_gpu.status_code == 400
    assert no_gpu.json()["error"]["type"] == "invalid_request"
    assert no_gpu.json()["error"]["param"] == "gpu"
    bad_key = platform.post(
        "/v1/providers/register", token, json=_register_body() | {"public_key": "abc"}
    )
    assert bad_key.status_code == 400 and bad_key.json()["error"]["code"] == "invalid_public_key"
    sleepy = platform.post("/v1/providers/heartbeat", token, json={"status": "sleeping"})
    assert sleepy.status_code == 400
    unknown = platform.get("/v1/providers/prv_0000/attestation")
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found"
    long_name = platform.post("/v1/providers", platform.consumer_key, json={"name": "x" * 101})
    assert long_name.status_code == 400


class RecordingRay:
    """Records the agent's Ray commands; the node it "starts" shows in `table` as the GCS
    would show it (alive, with the labels it was started with)."""

    NODE_ID = "ab" * 28

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.started: list[ClusterNode] = []

    def join(self, spec: NodeSpec) -> None:
        self.calls.append(("join", spec))
        self.started = [ClusterNode(self.NODE_ID, alive=True, labels=dict(spec.labels))]

    def node_id(self) -> str:
        return self.NODE_ID

    def table(self) -> list[ClusterNode]:
        return self.started

    def drain(self, message: str, deadline_s: int) -> None:
        self.calls.append(("drain", message))

    def leave(self) -> None:
        self.calls.append(("leave", None))


def test_the_agent_registers_and_heartbeats_through_the_routes(
    platform: Platform, tmp_path: Path
) -> None:
    """A new provider's agent registers and waits, out of the cluster, until the operator
    approves it; then it gets the cluster's credentials and joins. A suspension drains it."""
    provider_id, token = platform.new_provider()
    credentials = creds.exchange("http://testserver", token, client=platform.client)
    ray = RecordingRay()
    platform.client.app.dependency_overrides[node_table] = lambda: ray.table
    moment = [datetime(2030, 1, 7, 12, 0, tzinfo=UTC)]
    saved: list[creds.Credentials] = []
    deps = AgentDeps(
        gpu=RecordedReader(H100),
        procs=StaticProcTable([]),
        platform=PlatformClient("http://testserver", token, platform.client),
        ray=ray,
        now=lambda: moment[0],
        log=lambda line: None,
        save_credentials=saved.append,
    )

    def tick() -> Phase:
        moment[0] += timedelta(seconds=8)  # past the heartbeat interval (7 s)
        return agent.tick()

    config = ProviderConfig(api_url="http://testserver", price_floor_pct=5)
    agent = Agent(config, credentials, load_or_create(tmp_path / "x25519.key"), deps)
    agent.start()
    assert tick() is Phase.out and ray.calls == []
    assert agent.reason == "the provider is pending: waiting for the operator's approval"
    registry.review(platform.services.db, provider_id, ProviderReview.approved)
    assert tick() is Phase.out  # its heartbeat's answer says approved
    assert tick() is Phase.joined
    assert [c.ray_auth_token for c in saved] == [RAY_TOKEN]
    spec = ray.calls[0][1]
    assert isinstance(spec, NodeSpec) and spec.address == "10.8.0.1:6380"
    assert nodes.bindings(platform.services.db) == {RecordingRay.NODE_ID: provider_id}
    me = platform.get("/v1/providers/me", token).json()
    assert me["status"] == "online" and me["price_floor_pct"] == 5
    assert me["public_key"] == agent.key.public_b64
    registry.review(platform.services.db, provider_id, ProviderReview.suspended)
    assert tick() is Phase.joined  # the heartbeat brings the news
    assert tick() is Phase.draining and agent.reason == (
        "the provider is suspended: the operator suspended it")  # fmt: skip
    agent.shutdown()
    assert [c[0] for c in ray.calls] == ["join", "drain", "leave"]
    assert platform.get("/v1/providers/me", token).json()["status"] == "offline"
    assert platform.get(f"/v1/providers/{provider_id}/attestation").json()["status"] == "offline"


def test_binding_a_node_through_the_routes_refuses_what_is_not_the_providers(
    platform: Platform,
) -> None:
    """Tickets only for an approved provider's token; a node binds only as the cluster's
    table shows it: alive and labelled as that provider."""
    provider_id, token = platform.new_provider()
    other_id, _ = platform.new_provider("other")
    for key in (None, platform.consumer_key):
        assert platform.post("/v1/providers/tickets", key).status_code == 401
    pending = platform.post("/v1/providers/tickets", token)
    assert pending.status_code == 403, pending.text
    registry.review(platform.services.db, provider_id, ProviderReview.approved)
    shown: list[ClusterNode] = []
    platform.client.app.dependency_overrides[node_table] = lambda: lambda: shown
    ticket = platform.post("/v1/providers/tickets", token).json()["ticket"]
    node = RecordingRay.NODE_ID

    def bind(node_id: str = node, **more: object):
        return platform.post(
            "/v1/providers/nodes", token, json={"ticket": ticket, "node_id": node_id, **more}
        )

    assert bind().json()["error"]["code"] == "node_not_found"  # not in the table (yet)
    shown.append(ClusterNode(node, alive=True, labels={PROVIDER_ID_LABEL: other_id}))
    refused = bind()
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "node_label_mismatch"
    assert bind("not-a-node").status_code == 400
    shown[0] = ClusterNode(node, alive=True, labels={PROVIDER_ID_LABEL: provider_id})
    # the models it serves: catalog ids only, a bounded list of bounded strings
    for models in (["no-such-model"], ["darkgpu-tiny", "x" * 101], ["darkgpu-tiny"] * 65, "all"):
        refused = bind(models=models)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"].startswith("models")
    bound = bind(models=["darkgpu-tiny"])  # the same ticket: only a binding that succeeds spends it
    assert bound.status_code == 201 and bound.json()["models"] == ["darkgpu-tiny"]
    assert bind().status_code == 401  # spent
    assert nodes.bindings(platform.services.db) == {node: provider_id}
    assert nodes.allow_lists(platform.services.db) == {node: ("darkgpu-tiny",)}


def test_demand_and_reputation_are_public_and_the_agent_shows_them(platform: Platform) -> None:
    """`GET /v1/market`, `GET /v1/providers/{id}/reputation` (no key needed: counts only), the
    record in `/v1/providers/me`, and the lines `darkgpu status` prints from them."""
    provider_id, token = platform.new_provider()
    platform.post("/v1/providers/register", token, json=_register_body())
    registry.heartbeat(platform.services.db, provider_id, registry.ProviderStatus.online)
    market = platform.get("/v1/market").json()
    assert market["object"] == "market"
    catalog = {m["model"] for m in market["models"]}
    assert "darkgpu-tiny" in catalog and all(m["requests_per_hour"] == 0 for m in market["models"])
    assert market["gpu_earnings"]["data"] == []  # nobody earned last week here
    record = platform.get(f"/v1/providers/{provider_id}/reputation").json()
    assert record["uptime_pct"] > 0 and record["requests_served"] == record["strikes"] == 0
    unknown = platform.get("/v1/providers/prv_nobody/reputation")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "provider_not_found"
    me = platform.get("/v1/providers/me", token).json()
    assert me["reputation"] == {k: v for k, v in record.items() if k != "object"}
    client = PlatformClient("http://testserver", token, platform.client)
    lines = market_lines(me, client.market())
    assert lines[0].startswith("Record:    online ") and "0 usage strikes" in lines[0]
    assert any(line.startswith("Demand:    ") for line in lines)
    earned = {"gpu_earnings": {"data": [{"vram_gb_per_gpu": 80, "gpus": 3,
                                         "median_usd_per_gpu": "12.50",
                                         "most_usd_per_gpu": "20.00"}]}}  # fmt: skip
    assert market_lines(me, earned)[-1] == (
        "Last week: a 80 GB GPU earned $12.50 (median of 3; the most $20.00)")  # fmt: skip


def test_a_provider_holding_the_pools_ray_token_cannot_issue_itself_a_challenge(
    platform: Platform,
) -> None:
    """Every approved provider is given the pool's Ray token: the attestation challenges' key
    was derived from it, so a provider could mint fresh challenges for old evidence."""
    provider_id, _ = platform.new_provider()
    now = time.time()
    from_token = hmac.new(RAY_TOKEN.encode(), b"darkgpu attestation", "sha256").digest()
    forged = issue_challenge(from_token, provider_id, now)
    key = platform.services.providers.secret()
    with pytest.raises(AttestationError):
        check_challenge(key, provider_id, forged, now)
    issued = platform.services.providers.challenge(provider_id, now)
    assert check_challenge(key, provider_id, issued, now)
    assert key == platform.services.providers.secret()  # made once, kept


def test_a_tier_without_a_pool_gets_no_credentials_and_binds_no_node(
    platform: Platform, tmp_path: Path
) -> None:
    """A platform that runs the basic pool only: a verified provider is told so (503, a
    clear message), never handed the basic pool's token, and none of its nodes binds."""
    settings = platform.services.providers.settings
    platform.services.providers = ProviderPlatform(
        Settings(**{**settings.as_args(), "pool_tiers": ["basic"]})
    )
    platform.services.pools = {}
    provider_id, token = platform.new_provider()
    registry.review(platform.services.db, provider_id, ProviderReview.approved)
    with Session(platform.services.db) as session, session.begin():
        session.get(Provider, provider_id).trust_tier = TrustTier.verified.value
    refused = platform.post("/v1/providers/auth", token)
    assert refused.status_code == 503, refused.text
    assert "No supply pool takes providers of the verified tier" in refused.text
    assert RAY_TOKEN not in refused.text
    ticket = platform.post("/v1/providers/tickets", token).json()["ticket"]
    body = {"ticket": ticket, "node_id": RecordingRay.NODE_ID}
    bound = platform.post("/v1/providers/nodes", token, json=body).json()
    assert bound["error"]["code"] == "node_not_found"


def test_a_node_is_bound_only_from_its_providers_tier_pool(platform: Platform) -> None:
    """Each pool's node table is its own gateway's (two real HTTP servers here, as the two
    pools' gateways answer `GET <pool>/nodes`): a basic provider's node that shows up in the
    verified pool (it found that pool's token somewhere) is not found, so never bound there;
    in its own pool it binds."""
    provider_id, token = platform.new_provider()
    registry.review(platform.services.db, provider_id, ProviderReview.approved)
    node = ClusterNode(RecordingRay.NODE_ID, alive=True, labels={PROVIDER_ID_LABEL: provider_id})
    tables: dict[TrustTier, list[ClusterNode]] = {TrustTier.basic: [], TrustTier.verified: [node]}

    def gateway(tier: TrustTier) -> Starlette:
        async def listed(request: Request) -> Response:
            if not credential_matches(request.headers.get("authorization"), digest):
                return Response(status_code=401)
            return Response(nodes_body(tables[tier]), media_type="application/json")

        return Starlette(routes=[Route("/pool/nodes", listed)])

    digest = credential_digest("pool credential")
    with serving(gateway(TrustTier.basic)) as basic, serving(gateway(TrustTier.verified)) as ver:
        platform.services.pools = {
            TrustTier.basic: PoolAdmin(f"{basic}/pool", "pool credential"),
            TrustTier.verified: PoolAdmin(f"{ver}/pool", "pool credential"),
        }

        def bind() -> dict:
            ticket = platform.post("/v1/providers/tickets", token).json()["ticket"]
            body = {"ticket": ticket, "node_id": node.node_id}
            return platform.post("/v1/providers/nodes", token, json=body).json()

        assert bind()["error"]["code"] == "node_not_found"  # in the verified pool only
        tables[TrustTier.basic].append(node)
        assert bind()["node_id"] == node.node_id
