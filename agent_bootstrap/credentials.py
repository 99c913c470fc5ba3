"""`darkgpu auth`: exchange a provider token for the agent's credentials, kept private.

`POST {api_url}/v1/providers/auth` with `Authorization: Bearer dgpp-…` answers
`{"provider_id", "cluster_address", "ray_auth_token", "heartbeat_interval_s"}`. The agent
keeps them, with the provider token, in `~/.config/darkgpu/credentials.json`, and the Ray
token also alone in `~/.config/darkgpu/ray_auth_token` (what `RAY_AUTH_TOKEN_PATH` names for
`ray start`); both mode 0600, in a 0700 directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent_bootstrap.api import PlatformClient, PlatformError
from agent_bootstrap.paths import (
    CREDENTIALS_FILE,
    RAY_TOKEN_FILE,
    config_dir,
    mode_of,
    write_private,
)
from kernel.tokens import looks_like_provider_token


class CredentialsError(RuntimeError):
    pass


class Credentials(BaseModel):
    model_config = ConfigDict(extra="ignore")

    api_url: str
    provider_id: str
    provider_token: str
    # none until the operator approves the provider (`review`): only then does the platform
    # hand out the cluster's address and Ray token
    cluster_address: str | None = None
    ray_auth_token: str | None = Field(default=None, min_length=1)
    review: str = "approved"  # what a platform that predates reviews means
    heartbeat_interval_s: int = Field(default=15, ge=1)


def exchange(api_url: str, token: str, client: httpx.Client | None = None) -> Credentials:
    """Ask the platform for this provider's credentials."""
    token = token.strip()
    if not looks_like_provider_token(token):
        raise CredentialsError("That is not a provider token (they start with dgpp-).")
    try:
        answer = PlatformClient(api_url, token, client).exchange()
    except PlatformError as exc:
        raise CredentialsError(f"The platform refused the token: {exc}") from None
    try:
        return Credentials(api_url=api_url.rstrip("/"), provider_token=token, **answer)
    except ValidationError as exc:
        raise CredentialsError(f"The platform's answer was not understood: {exc}") from None


def save(credentials: Credentials, directory: Path | None = None) -> Path:
    directory = directory or config_dir()
    path = directory / CREDENTIALS_FILE
    write_private(path, credentials.model_dump_json(indent=2) + "\n")
    token = directory / RAY_TOKEN_FILE
    if credentials.ray_auth_token:
        write_private(token, credentials.ray_auth_token)
    else:  # a provider no longer approved keeps no cluster token
        token.unlink(missing_ok=True)
    return path


def ray_token_path(directory: Path | None = None) -> Path:
    return (directory or config_dir()) / RAY_TOKEN_FILE


def load(directory: Path | None = None) -> Credentials:
    path = (directory or config_dir()) / CREDENTIALS_FILE
    if not path.exists():
        raise CredentialsError("Not signed in: run `darkgpu auth` with your provider token.")
    if mode_of(path) & 0o077:
        raise CredentialsError(f"{path} is readable by other users; run `chmod 600 {path}`.")
    try:
        return Credentials.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError):
        raise CredentialsError(f"{path} is damaged: run `darkgpu auth` again.") from None
