"""The web console, served by the platform itself at `/console`: sign up and in, the
account's overview, API keys, usage, billing and models, and the provider's pages.

Server-rendered HTML (Jinja2 templates in `templates/`), one stylesheet and one small script
in `static/`, served by these routes: nothing is fetched from the internet. Sessions and CSRF
tokens: `sessions`; pages in words on every error: `web.error_page`.
"""

from __future__ import annotations

from fastapi import APIRouter

from kernel.errors import NotFound
from serve_app.console import (
    account_routes,
    auth_routes,
    caps_routes,
    operator_routes,
    password_routes,
    provider_routes,
)
from serve_app.console.web import PREFIX, ConsoleRoute

router = APIRouter()
router.include_router(auth_routes.router)
router.include_router(account_routes.router)
router.include_router(provider_routes.router)
router.include_router(password_routes.router)
router.include_router(caps_routes.router)
router.include_router(operator_routes.router)
unknown = APIRouter(route_class=ConsoleRoute)


@unknown.api_route(PREFIX + "/{path:path}", methods=["GET", "POST"], include_in_schema=False)
def not_found(path: str) -> None:
    raise NotFound("There is no such page in the console.")


router.include_router(unknown)  # last: after every real page
