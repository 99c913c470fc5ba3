"""The Redis ACL users of the local platform's own servers, and where their passwords live.

`darkgpu up` runs each Redis with the `default` user off and one user per role
(`billing.redis_server` writes their rules and the SHA-256 of each password into the server's
ACL file). The passwords are made once, by `ensure`, into `<data_dir>/redis-users.json`
(mode 0600), with the port each of the platform's own servers runs on; `Settings` fills them
into a URL that names such a server and no user, so that every
process of the platform (the ingress, the billing actor, the operator's CLI) authenticates as
its role.

Roles (the rules are in `billing.redis_server.ACL_RULES`):
- money `admin`: `darkgpu up`/`down` themselves (checks, SHUTDOWN). Nothing else uses it.
- money `platform`: the ingress, the console and the operator's CLI: all of `dg:*` but no
  administration, no dangerous commands, and none of the usage stream's consumer commands.
- money `meter`: the billing actor: drains and acknowledges the usage stream.
- state `admin`, `platform`: as above, on the state Redis.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

USERS_FILE = "redis-users.json"
ROLES: dict[str, tuple[str, ...]] = {
    "money": ("admin", "platform", "meter"),
    "state": ("admin", "platform"),
}
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

Passwords = dict[str, dict[str, str]]  # server -> user -> password


def users_path(data_dir: Path) -> Path:
    return data_dir / USERS_FILE


def _read(data_dir: Path) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = json.loads(users_path(data_dir).read_text())
    except FileNotFoundError:
        return None
    return found


def load(data_dir: Path) -> Passwords | None:
    """The passwords `ensure` made under `data_dir`, or None when it never ran there."""
    found = _read(data_dir)
    if found is None:
        return None
    return {server: dict(found.get(server, {}).get("users", {})) for server in ROLES}


def ports(data_dir: Path) -> dict[str, int]:
    """The local ports the platform's own servers run on with these users, by server."""
    found = _read(data_dir) or {}
    return {s: int(found[s]["port"]) for s in ROLES if found.get(s, {}).get("port")}


def ensure(data_dir: Path, server_ports: dict[str, int]) -> Passwords:
    """The passwords under `data_dir`, for servers the platform runs itself on `server_ports`;
    those missing (all, on the first call) are made and written, readable by this user only."""
    found = _read(data_dir) or {}
    made = {
        server: {
            "port": server_ports.get(server, found.get(server, {}).get("port")),
            "users": {
                user: found.get(server, {}).get("users", {}).get(user) or secrets.token_urlsafe(32)
                for user in users
            },
        }
        for server, users in ROLES.items()
    }
    if made != found:
        data_dir.mkdir(parents=True, exist_ok=True)
        path, tmp = users_path(data_dir), users_path(data_dir).with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(made, out)
        os.replace(tmp, path)
    return {server: made[server]["users"] for server in ROLES}


def is_local(url: str) -> bool:
    return urlsplit(url).hostname in LOCAL_HOSTS


def port_of(url: str) -> int | None:
    """The port of a local URL (None for another host)."""
    parts = urlsplit(url)
    return parts.port if parts.hostname in LOCAL_HOSTS else None


def names_user(url: str) -> bool:
    parts = urlsplit(url)
    return parts.username is not None or parts.password is not None


def with_user(url: str, user: str, password: str) -> str:
    """`url` authenticating as `user`."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
