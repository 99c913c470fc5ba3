"""The Redis servers a test's `darkgpu up` started, as their `admin` user: they run with the
`default` user off and one ACL user per role (core.redis_users), so a plain URL gets NOAUTH."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import redis

from core import redis_users

SETTINGS = {"money": "DARKGPU_REDIS_URL", "state": "DARKGPU_STATE_REDIS_URL"}


def admin_url(env: Mapping[str, str], server: str) -> str:
    url = env[SETTINGS[server]]
    passwords = redis_users.load(Path(env["DARKGPU_DATA_DIR"]))
    return redis_users.with_user(url, "admin", passwords[server]["admin"]) if passwords else url


def admin_client(env: Mapping[str, str], server: str) -> redis.Redis:
    return redis.Redis.from_url(admin_url(env, server))
