"""What no member of a supply pool may ever find: the control plane's secrets that `darkgpu up`
keeps under its data directory, and what a member reads of the pool's key-value store."""

from __future__ import annotations

import base64
import json
from pathlib import Path


def data_dir_secrets(data: Path) -> dict[str, str]:
    """Each secret under the data directory, by name: the pool's credential, the control
    plane's Ray token, the attestation key, every Redis user's password."""
    users = json.loads((data / "redis-users.json").read_text())
    return {
        "the pool's credential": (data / "pool_token").read_text().strip(),
        "the control plane's Ray token": (data / "control_ray_auth_token").read_text().strip(),
        "the attestation key": (data / "attestation_secret").read_text().strip(),
        **{f"Redis password {server}/{user}": password for server, found in users.items()
           for user, password in found["users"].items()},
    }  # fmt: skip


def store_bytes(printed: str) -> bytes:
    """The pool's key-value store as `tests.serve_app.pool_member store` printed it (its last
    line: base64 pairs), every key and value one after the other."""
    pairs = json.loads(printed.strip().splitlines()[-1])
    return b"".join(base64.b64decode(k) + base64.b64decode(v) for k, v in pairs)
