"""The agent's client of the platform's provider endpoints (serve_app/routes_providers.py).

Every call sends `Authorization: Bearer dgpp-…`. Errors come back in the OpenAI shape; they
become `PlatformError` (with `status` and `code`), `PlatformAuthError` for a 401.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

TIMEOUT_S = 30.0


class PlatformError(RuntimeError):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class PlatformAuthError(PlatformError):
    pass


class PlatformClient:
    def __init__(self, api_url: str, token: str, client: httpx.Client | None = None) -> None:
        self.api_url = api_url.rstrip("/")
        self._token = token
        self._client = client or httpx.Client(timeout=TIMEOUT_S)

    def _call(
        self, method: str, path: str, json: Any = None, prefix: str = "/v1/providers"
    ) -> dict[str, Any]:
        url = f"{self.api_url}{prefix}{path}"
        headers = {"authorization": f"Bearer {self._token}"}
        try:
            response = self._client.request(method, url, json=json, headers=headers)
        except httpx.HTTPError as exc:
            raise PlatformError(0, f"cannot reach {self.api_url}: {exc}") from None
        if response.status_code >= 400:
            try:
                error = response.json().get("error", {})
            except ValueError:
                error = {}
            message = error.get("message") or f"HTTP {response.status_code}"
            kind = PlatformAuthError if response.status_code == 401 else PlatformError
            raise kind(response.status_code, message, error.get("code"))
        answer: dict[str, Any] = response.json()
        return answer

    def exchange(self) -> dict[str, Any]:
        """POST /v1/providers/auth: provider id, cluster address, Ray token."""
        return self._call("POST", "/auth")

    def challenge(self) -> str:
        return str(self._call("POST", "/challenge")["challenge"])

    def register(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/register", body)

    def heartbeat(self, status: str, reason: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/heartbeat", {"status": status, "reason": reason})

    def join_ticket(self) -> str:
        """POST /v1/providers/tickets: a one-time ticket to bind the node about to join."""
        return str(self._call("POST", "/tickets")["ticket"])

    def bind_node(self, ticket: str, node_id: str, models: Sequence[str] = ()) -> dict[str, Any]:
        """POST /v1/providers/nodes: this provider serves from that Ray node, those catalog
        models (none: any that fits)."""
        body = {"ticket": ticket, "node_id": node_id, "models": list(models)}
        return self._call("POST", "/nodes", body)

    def me(self) -> dict[str, Any]:
        return self._call("GET", "/me")

    def market(self) -> dict[str, Any]:
        """GET /v1/market: demand per model, last week's earnings per GPU by size."""
        return self._call("GET", "/market", prefix="/v1")
