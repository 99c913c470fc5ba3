"""The accounts deployment: the console, the public site, sign-up, payments and webhooks,
keys, caps, the provider and node routes, and the account's credits and usage.

Everything here is slow on purpose or touches the database: argon2 password hashes, Stripe
calls, mail, SQL reports. It runs in a replica of its own so that none of it shares the
inference ingress's event loop or its GIL; the ingress forwards these routes to it
(`serve_app.forwarding`), and no HTTP reaches it any other way (it has no route of its own
in Serve: only the application's ingress does). The model cards its pages show come from
the ingress, over a handle, where the catalog and the replicas' availability live.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from kernel.errors import Unavailable
from kernel.labels import CONTROL_SELECTOR
from serve_app.forwarding import Forwarded, Reply, call_app
from serve_app.http_app import create_app
from serve_app.services import Services


class Accounts:
    def __init__(self, args: dict[str, Any]) -> None:
        self._services = Services.create(args)
        self._ingress: DeploymentHandle[Any] | None = None
        self._app: FastAPI = create_app(self._services, model_cards=self._model_cards)

    async def handle(self, request: Forwarded) -> Reply:
        return await call_app(self._app, request)

    async def _model_cards(self) -> list[dict[str, Any]]:
        """The ingress's model cards (the catalog, and which models have a replica online)."""
        if self._ingress is None:  # the ingress of the application this replica is part of
            self._ingress = serve.get_app_handle(serve.get_replica_context().app_name)
        try:
            cards: list[dict[str, Any]] = await self._ingress.model_cards.remote()
        except Exception:  # noqa: BLE001 - the ingress is restarting: say so in the page
            raise Unavailable("The model catalog is not available right now.") from None
        return cards


# Applied by call, as the ingress's are (`serve_app.ingress`): the class stays importable by
# its name, so Ray pickles it by reference.
ACCOUNTS = serve.deployment(
    name="accounts",
    max_ongoing_requests=200,
    # the operator's nodes only (it holds every secret); no CPU reserved, as the billing
    # actor: it shares the control node with the ingress, which keeps the reserved core
    ray_actor_options={"num_cpus": 0, "label_selector": CONTROL_SELECTOR},
)(Accounts)
