"""The pool's application holds no secret of the control plane: a pool's cluster is readable
by every node in it (Serve keeps each deployment's arguments in the cluster's key-value
store), so what is bound into the pool's app is what a provider can read."""

from __future__ import annotations

import json
from pathlib import Path

from ray import cloudpickle

from cluster.pools import pools
from core.settings import Settings
from kernel.labels import TrustTier
from serve_app.app import build_app
from serve_app.pool import build_pool_app, pool_arguments
from serve_app.pool_protocol import credential_digest

SECRETS = {
    "stripe_secret_key": "sk_live_stripe_secret",
    "stripe_webhook_secret": "whsec_webhook_secret",
    "database_url": "postgresql+psycopg://ledger:db_password@db.internal/darkgpu",
    "redis_url": "redis://platform:redis_password@money.internal:6381/0",
    "state_redis_url": "redis://platform:state_password@state.internal:6382/0",
    "smtp_password": "smtp_password",
    "attestation_secret": "attestation_secret",
}


def test_the_pool_app_binds_the_credentials_digest_and_no_secret(tmp_path: Path) -> None:
    args = {"data_dir": str(tmp_path), **SECRETS}
    token = pools(Settings(**args))[TrustTier.basic].credential()
    bound = cloudpickle.dumps(build_pool_app(args))  # what Serve would keep of it
    for secret in (*SECRETS.values(), "db_password", "redis_password", token):
        assert secret.encode() not in bound, secret
    assert credential_digest(token).encode() in bound


def test_the_credential_is_made_once_and_kept_private(tmp_path: Path) -> None:
    basic, verified = pools(Settings(data_dir=tmp_path)).values()
    first = basic.credential()
    assert basic.credential() == first and len(first) == 64
    assert (tmp_path / "pool_token").stat().st_mode & 0o777 == 0o600
    # each pool its own
    assert verified.credential() not in (first, "") and verified.tier is TrustTier.verified
    assert (tmp_path / "verified_pool_token").stat().st_mode & 0o777 == 0o600
    configured = Settings(data_dir=tmp_path, pool_token="configured",
                          verified_pool={"token": "other"})  # fmt: skip
    assert [p.credential() for p in pools(configured).values()] == ["configured", "other"]


def test_the_pool_is_handed_nothing_of_the_data_directory(tmp_path: Path) -> None:
    """What the pool's deploy process is given (it runs as the pool's user where one is set,
    who may not read the data directory): JSON naming no path in it, once the local models
    are elsewhere (`darkgpu up` puts them in the pool's user's folder)."""
    data, models = tmp_path / "data", tmp_path / "pool-models"
    args = {"data_dir": str(data), "local_models_dir": str(models), **SECRETS}
    arguments = pool_arguments(args)
    sent = json.dumps(arguments)
    assert str(data) not in sent and str(models) in sent
    for secret in SECRETS.values():
        assert secret not in sent
    assert arguments["credential_sha256"] == credential_digest(
        pools(Settings(**args))[TrustTier.basic].credential()
    )


def test_the_ingress_is_bound_with_each_configured_pools_credential(tmp_path: Path) -> None:
    """The ingress's replica may run on a control node without the data directory: each
    pool's credential crosses as an argument; a tier without a pool has none made."""
    for tiers in (["basic"], ["basic", "verified"]):
        data = tmp_path / "-".join(tiers)
        args = build_app({"data_dir": str(data), "pool_tiers": tiers})._bound_deployment.init_args[
            1
        ]
        made = pools(Settings(data_dir=data, pool_tiers=tiers))
        assert args["pool_token"] == made[TrustTier.basic].credential()
        verified = made.get(TrustTier.verified)
        assert args["verified_pool"]["token"] == (verified.credential() if verified else "")
        assert (data / "verified_pool_token").exists() == (verified is not None)
