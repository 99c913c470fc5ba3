"""The pool's gateway on the real platform (`darkgpu up`): the ingress reaches the models only
through it, with the pool's credential; a consumer can neither call it nor steer it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from core.settings import ENV_PREFIX
from serve_app.pool_protocol import (
    ANSWER_WITHIN_HEADER,
    MODEL_HEADER,
    NOT_TAKEN_HEADER,
    SERVED_BY_HEADER,
    STALLED_HEADER,
    TAKE_WITHIN_HEADER,
    ServedBy,
    parse_nodes,
    parse_replicas,
)
from tests.control_secrets import data_dir_secrets, store_bytes

LOCAL = "darkgpu-tiny"
BODY = {"model": LOCAL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def pool_url(platform) -> str:
    """The pool's gateway: its own server, in its own Ray cluster, not the public API's."""
    return f"http://127.0.0.1:{platform.env['DARKGPU_POOL_HTTP_PORT']}/pool"


@pytest.fixture(scope="module")
def pool_token(platform) -> str:
    return (Path(platform.env["DARKGPU_DATA_DIR"]) / "pool_token").read_text().strip()


def test_the_public_api_does_not_reach_the_pool(platform, pool_token: str) -> None:
    """The pool is another Ray cluster whose gateway answers on a port of its own: the
    public API's port has no `/pool` (before, the pool's gateway was an app of the same Serve)."""
    auth = {"authorization": f"Bearer {pool_token}"}
    public = platform.api_url.removesuffix("/v1") + "/pool"
    for path in ("replicas", "nodes"):
        assert httpx.get(f"{public}/{path}", headers=auth, timeout=30).status_code == 404


def test_the_pool_serves_no_one_without_its_credential(platform, pool_url: str) -> None:
    _, consumer_key = platform.new_key(usd="1")
    for authorization in (None, f"Bearer {consumer_key}", "Bearer guess"):
        headers = {MODEL_HEADER: LOCAL, "x-darkgpu-replicas": "any"}
        if authorization:
            headers["authorization"] = authorization
        answer = httpx.post(f"{pool_url}/chat", json=BODY, headers=headers, timeout=30)
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["type"] == "auth"
        assert SERVED_BY_HEADER not in answer.headers
        for path in ("replicas", "nodes"):
            listing = httpx.get(f"{pool_url}/{path}", headers=headers, timeout=30)
            assert listing.status_code == 401, listing.text
            assert path not in listing.json()
        drain = {"node_id": "ab" * 28, "reason": "a consumer asks"}
        refused = httpx.post(f"{pool_url}/drain", json=drain, headers=headers, timeout=30)
        assert refused.status_code == 401, refused.text


def test_with_the_credential_the_pool_lists_its_replicas_and_serves_those_listed(
    pool_url: str, pool_token: str
) -> None:
    """What the ingress does: it reads the pool's replicas (each with the node the pool's GCS
    placed it on, and what it reports of itself), then sends each request listing those that
    may take it; the pool names who served. Anyone holding the credential could do the same:
    it guards the pool from the outside, not from its own members."""
    auth = {"authorization": f"Bearer {pool_token}"}
    listing = parse_replicas(httpx.get(f"{pool_url}/replicas", headers=auth, timeout=30).content)
    assert listing.online == {LOCAL}  # Serve's controller's word: its replica is running
    local = [r for r in listing.replicas if r.model == LOCAL]
    assert len(local) == 1, listing
    assert local[0].stats["provider_id"] == "local" and local[0].stats["draining"] is False
    assert len(local[0].node_id) == 56 and int(local[0].node_id, 16) >= 0
    headers = {**auth, MODEL_HEADER: LOCAL, "x-darkgpu-replicas": local[0].replica_id}
    answer = httpx.post(f"{pool_url}/chat", json=BODY, headers=headers, timeout=120)
    assert answer.status_code == 200, answer.text
    served = ServedBy.from_header(answer.headers[SERVED_BY_HEADER])
    assert (served.provider_id, served.replica) == ("local", local[0].replica_id)
    assert answer.json()["choices"][0]["message"]["role"] == "assistant"
    unknown = httpx.post(f"{pool_url}/chat", json=BODY, timeout=30,
                         headers={**headers, MODEL_HEADER: "no-such-model"})  # fmt: skip
    assert unknown.status_code == 404
    unlisted = httpx.post(f"{pool_url}/chat", json=BODY, timeout=30,
                          headers={**auth, MODEL_HEADER: LOCAL})  # fmt: skip
    assert unlisted.status_code == 400, unlisted.text  # the router would take it nowhere


def refuses_bad_seconds(
    pool_url: str, headers: dict[str, str], header: str, above_most: str
) -> None:
    """Each value of `header` that is not a number of seconds within its bounds is a 400."""
    for bad in ("0", "-1", "nan", "inf", above_most, "soon", ""):
        refused = httpx.post(f"{pool_url}/chat", json=BODY, timeout=30,
                             headers={**headers, header: bad})  # fmt: skip
        assert refused.status_code == 400, (bad, refused.text)
        assert refused.json()["error"]["type"] == "invalid_request"


def test_a_replica_has_the_time_given_to_take_a_request_then_all_the_engine_needs(
    pool_url: str, pool_token: str
) -> None:
    """A request that none of its listed replicas takes in the time the ingress gives
    (`x-darkgpu-take-within`) is given back, 503 with `x-darkgpu-not-taken`, for the ingress
    to route again; one a replica took is answered however long its engine takes. (Before,
    the ingress's routing timeout covered the whole wait for the answer's first bytes: a
    whole answer slower than 3 s was cut and generated again, ten times, then refused.)"""
    auth = {"authorization": f"Bearer {pool_token}", MODEL_HEADER: LOCAL}
    listing = parse_replicas(httpx.get(f"{pool_url}/replicas", headers=auth, timeout=30).content)
    local = [r.replica_id for r in listing.replicas if r.model == LOCAL]
    nobody = {**auth, "x-darkgpu-replicas": "no-such-replica", TAKE_WITHIN_HEADER: "0.5"}
    given_back = httpx.post(f"{pool_url}/chat", json=BODY, headers=nobody, timeout=30)
    assert given_back.status_code == 503, given_back.text
    assert given_back.headers[NOT_TAKEN_HEADER] == "1"
    assert SERVED_BY_HEADER not in given_back.headers
    # 200 tokens take the tiny model's engine 0.5 s or more, five times what the replica is
    # given to take the request; on a loaded machine taking it may itself need longer: given
    # back, it is sent again, as the ingress does
    taken = {**auth, "x-darkgpu-replicas": local[0], TAKE_WITHIN_HEADER: "0.1"}
    long = {**BODY, "max_tokens": 200, "ignore_eos": True}
    for _ in range(30):
        answer = httpx.post(f"{pool_url}/chat", json=long, headers=taken, timeout=120)
        if NOT_TAKEN_HEADER not in answer.headers:
            break
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 200
    refuses_bad_seconds(pool_url, taken, TAKE_WITHIN_HEADER, above_most="61")


def test_a_replica_that_took_a_request_and_gave_nothing_in_time_is_cut_and_named(
    pool_url: str, pool_token: str
) -> None:
    """A replica that took a request has the time the ingress gives it
    (`x-darkgpu-answer-within`) for its engine's first item: here 0.05 s for a whole answer of
    200 tokens (0.5 s or more of engine). The gateway cuts it and answers 503
    `x-darkgpu-stalled`, naming who took it, for the ingress to route the request around it.
    (Before, nothing bounded it but the ingress's read timeout, 300 s: a provider's engine
    could hold a consumer's whole answer that long.) Given the time, the same answer comes."""
    auth = {"authorization": f"Bearer {pool_token}", MODEL_HEADER: LOCAL}
    listing = parse_replicas(httpx.get(f"{pool_url}/replicas", headers=auth, timeout=30).content)
    local = [r.replica_id for r in listing.replicas if r.model == LOCAL]
    long = {**BODY, "max_tokens": 200, "ignore_eos": True}
    taken = {**auth, "x-darkgpu-replicas": local[0], TAKE_WITHIN_HEADER: "30"}
    cut = httpx.post(f"{pool_url}/chat", json=long, timeout=120,
                     headers={**taken, ANSWER_WITHIN_HEADER: "0.05"})  # fmt: skip
    assert cut.status_code == 503, cut.text
    assert cut.headers[STALLED_HEADER] == "1"
    assert ServedBy.from_header(cut.headers[SERVED_BY_HEADER]).replica == local[0]
    answer = httpx.post(f"{pool_url}/chat", json=long, timeout=120,
                        headers={**taken, ANSWER_WITHIN_HEADER: "100"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 200
    refuses_bad_seconds(pool_url, taken, ANSWER_WITHIN_HEADER, above_most="86401")


def test_a_consumer_cannot_steer_the_pools_router(platform) -> None:
    """The router's headers reach the pool only as the ingress wrote them: a consumer's own
    (here allowing a replica that does not exist, which would leave the request unrouted
    and answered 503 after the routing attempts, and no time to take it or answer it,
    which the pool would refuse) are not passed on."""
    _, key = platform.new_key(usd="1")
    steer = {"x-darkgpu-replicas": "no-such-replica", "x-darkgpu-demoted": "local",
             TAKE_WITHIN_HEADER: "0", ANSWER_WITHIN_HEADER: "0"}  # fmt: skip
    client = openai.OpenAI(base_url=platform.api_url, api_key=key, default_headers=steer,
                           max_retries=0, timeout=60)  # fmt: skip
    answer = client.chat.completions.create(model=LOCAL, messages=BODY["messages"], max_tokens=2)
    assert answer.choices[0].message.role == "assistant"


def test_with_the_credential_the_pool_lists_its_nodes_and_drains_only_a_node_id(
    pool_url: str, pool_token: str
) -> None:
    """What the control plane binds, plans and removes by: the pool's GCS table, as the
    gateway lists it (the head here: this platform has no provider node)."""
    auth = {"authorization": f"Bearer {pool_token}"}
    listed = parse_nodes(httpx.get(f"{pool_url}/nodes", headers=auth, timeout=30).content)
    alive = [n for n in listed if n.alive]
    assert len(alive) == 1 and alive[0].resources["CPU"] >= 1 and not alive[0].draining
    for bad in ({"node_id": "head", "reason": "x"}, {"node_id": alive[0].node_id}, []):
        refused = httpx.post(f"{pool_url}/drain", json=bad, headers=auth, timeout=30)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["type"] == "invalid_request"


def _control_secrets(platform) -> dict[str, str]:
    """Each secret of the control plane, by name: what no member of the pool may find (those
    under the data directory, and what the operator set in the environment)."""
    data = Path(platform.env["DARKGPU_DATA_DIR"])
    return {
        **data_dir_secrets(data),
        "the Stripe key": platform.env["DARKGPU_STRIPE_SECRET_KEY"],
        "the webhook secret": platform.env["DARKGPU_STRIPE_WEBHOOK_SECRET"],
        "the database": str(data / "darkgpu.db"),
        "the money Redis": platform.env["DARKGPU_REDIS_URL"].rsplit(":", 1)[1],
    }


def _as_member(
    platform, what: str, cluster_port_setting: str, timeout_s: float = 120
) -> subprocess.CompletedProcess:
    """`tests.serve_app.pool_member` run with the pool's Ray token (what every provider's
    agent is given) against the cluster at that port."""
    data = Path(platform.env["DARKGPU_DATA_DIR"])
    env = {**platform.env, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(data / "ray_auth_token")}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{platform.env[cluster_port_setting]}"
    return subprocess.run([sys.executable, "-m", "tests.serve_app.pool_member", what, address],
                          env=env, capture_output=True, text=True, timeout=timeout_s)  # fmt: skip


def test_a_member_of_the_pool_finds_no_secret_of_the_control_plane(
    platform, pool_token: str
) -> None:
    """What every provider's node can do: join the pool's cluster with the Ray token its agent
    was given, read the pool's key-value store (where Serve keeps what each deployment was
    bound with) and try the control plane's cluster with it. It finds no secret of the control
    plane, and the control plane's cluster does not take the token."""
    done = _as_member(platform, "store", "DARKGPU_POOL_RAY_PORT")
    assert done.returncode == 0, done.stderr[-3000:]
    held = store_bytes(done.stdout)
    assert b"pool-gateway" in held  # the pool's deployments are there: it was read whole
    secrets = _control_secrets(platform)
    found = [name for name, secret in secrets.items() if secret.encode() in held]
    assert found == []
    tried = _as_member(platform, "join", "DARKGPU_RAY_PORT", timeout_s=300)
    assert tried.returncode != 0 and '"joined"' not in tried.stdout
    assert "InvalidAuthToken" in tried.stderr or "Authentication" in tried.stderr, tried.stderr[
        -2000:
    ]


def test_a_member_of_the_pool_finds_no_secret_where_its_deployments_run(
    platform, pool_token: str
) -> None:
    """A member runs a task on every node of the pool, its head included (where the gateway
    and the platform's own models run), and reads the environment Ray gives workers there.
    The operator started the platform with its Stripe keys in the environment (DARKGPU_*,
    as this platform's fixture does): the pool's head was started without any of them."""
    done = _as_member(platform, "environ", "DARKGPU_POOL_RAY_PORT")
    assert done.returncode == 0, done.stderr[-3000:]
    environments = json.loads(done.stdout.strip().splitlines()[-1])
    assert environments and all("RAY_AUTH_TOKEN_PATH" in env for env in environments.values())
    held = json.dumps(environments)
    secrets = _control_secrets(platform)
    assert [name for name, secret in secrets.items() if secret in held] == []
    settings = {
        name for env in environments.values() for name in env if name.startswith(ENV_PREFIX)
    }
    assert settings == set()
