"""The public site's pages: no sign-in, nothing stored per visitor.

    GET /                     what the platform is, the catalog's models and prices
    GET /earnings             the provider earnings calculator (?tier=, ?gpu=)
    GET /credits              the prepaid-credits storefront
    GET /quickstart           the OpenAI SDK against this platform's base URL
    GET /economics            the 95/5 split and what the 5% pays for
    GET /faq                  earnings reality, hardware wear, crypto, trust, latency
    GET /status               the models, whether each is available now, measured latency
    GET /enterprise, POST     the enterprise contact form (`enterprise_routes`)
    GET /site/static/{name}   the site's stylesheet

Every figure comes from where the platform keeps it: prices from the catalog file
(`Settings.models_file`, read again when it changes), bundles and plans from the plans file,
the split and payout terms from `kernel.money`, availability from the ingress's model cards
(absent where no ingress runs: then it says so) and latency from the ingress's own metrics
(`latency`). The route class is the console's: errors become pages in words.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

from cluster.catalog import CatalogModel
from kernel.errors import NotFound
from kernel.money import (
    MIN_PAYOUT_CENTS,
    NANO_PER_USD,
    NUSD_PER_CENT,
    PROVIDER_SHARE_PCT,
    split_cost,
)
from serve_app.catalog_file import catalog_of
from serve_app.console.account_routes import ModelCards
from serve_app.console.web import ConsoleRoute, Svc, template_env
from serve_app.services import Services
from serve_app.site import earnings, latency, storefront

HERE = Path(__file__).resolve().parent
STATIC = {"site.css": "text/css; charset=utf-8"}
CONSOLE = "/console"
NAV = (
    ("/", "home", "Models & prices"),
    ("/credits", "credits", "Credits"),
    ("/earnings", "earnings", "Earnings calculator"),
    ("/quickstart", "quickstart", "Quickstart"),
    ("/economics", "economics", "Economics"),
    ("/faq", "faq", "FAQ"),
    ("/status", "status", "Status"),
    ("/enterprise", "enterprise", "Enterprise"),
)

router = APIRouter(route_class=ConsoleRoute)
templates = template_env(HERE / "templates")


def page(name: str, active: str, **context: Any) -> HTMLResponse:
    html = templates.get_template(name).render(active=active, nav=NAV, console=CONSOLE, **context)
    return HTMLResponse(html)


# --- what the pages read --------------------------------------------------------------------


@dataclass(frozen=True)
class Listed:
    model: CatalogModel
    available: bool | None  # None: no ingress here to ask


async def listed(request: Request, svc: Services) -> list[Listed]:
    """The catalog's models as the API lists them: a local model only where it is served."""
    catalog = catalog_of(svc)
    cards: ModelCards | None = getattr(request.app.state, "model_cards", None)
    online = {c["id"]: bool(c["available"]) for c in await cards()} if cards else None
    out = []
    for model in catalog.models:
        if online is None:
            if not model.is_local:
                out.append(Listed(model, None))
        elif model.id in online:
            out.append(Listed(model, online[model.id]))
    return out


def base_url(request: Request, svc: Services) -> str:
    """The platform's public address: `public_url`, else the one this request came to."""
    if svc.settings.public_url:
        return svc.settings.public_url.rstrip("/")
    scheme = request.headers.get("x-forwarded-proto") or request.url.scheme
    return f"{scheme}://{request.headers.get('host', request.url.netloc)}"


# --- pages ----------------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
async def landing(request: Request, svc: Svc) -> Response:
    models = await listed(request, svc)
    free = svc.plans.get(svc.plans.default_plan)
    return page(
        "landing.html",
        "home",
        models=models,
        free=free,
        api=base_url(request, svc) + "/v1",
        share_pct=PROVIDER_SHARE_PCT,
    )


Tier = Annotated[str, Query(max_length=32)]
GpuSize = Annotated[int | None, Query(ge=1, le=10_000)]


@router.get("/earnings", include_in_schema=False)
def earnings_page(svc: Svc, tier: Tier = earnings.DEFAULT_TIER, gpu: GpuSize = None) -> Response:
    chosen = earnings.TIER_BY_NAME.get(tier)
    if chosen is None:
        raise NotFound(f"There is no tier “{tier}”: choose conservative, typical or optimistic.")
    if gpu is not None and gpu not in {g.vram_gb for g in earnings.GPUS}:
        raise NotFound(f"There is no {gpu} GB GPU in the calculator.")
    return page(
        "earnings.html",
        "earnings",
        tiers=earnings.TIERS,
        tier=chosen,
        gpus=earnings.GPUS,
        gpu=gpu,
        table=earnings.table(catalog_of(svc), chosen, gpu),
        share_pct=PROVIDER_SHARE_PCT,
        reference_gb=earnings.REFERENCE_VRAM_GB,
        prompt_ratio=earnings.PROMPT_TOKENS_PER_OUTPUT_TOKEN,
        days=earnings.DAYS_PER_MONTH,
        cent=NUSD_PER_CENT,
        caps=[
            f"{b.default_tokens_per_day:,}"
            for b in sorted(svc.plans.bundles.values(), key=lambda b: b.price_nusd)
            if b.default_tokens_per_day
        ],
    )


@router.get("/credits", include_in_schema=False)
async def credits_page(request: Request, svc: Svc) -> Response:
    models = [entry.model for entry in await listed(request, svc)]
    return page(
        "credits.html",
        "credits",
        offers=storefront.offers(svc.plans, models),
        example_tokens=storefront.EXAMPLE_TOKENS_PER_REQUEST,
        paid=svc.plans.plans.get("paid"),
    )


@router.get("/quickstart", include_in_schema=False)
async def quickstart(request: Request, svc: Svc) -> Response:
    models = await listed(request, svc)
    ready = [m for m in models if m.available] or models
    example = ready[0].model.id if ready else "MODEL"
    return page("quickstart.html", "quickstart", api=base_url(request, svc) + "/v1", model=example)


@router.get("/economics", include_in_schema=False)
def economics(svc: Svc) -> Response:
    provider, platform = split_cost(NANO_PER_USD)
    free = svc.plans.get(svc.plans.default_plan)
    return page(
        "economics.html",
        "economics",
        share_pct=PROVIDER_SHARE_PCT,
        provider=provider,
        platform=platform,
        dollar=NANO_PER_USD,
        min_payout_cents=MIN_PAYOUT_CENTS,
        free=free,
    )


@router.get("/faq", include_in_schema=False)
def faq(svc: Svc) -> Response:
    return page(
        "faq.html",
        "faq",
        share_pct=PROVIDER_SHARE_PCT,
        conservative=earnings.TIER_BY_NAME[earnings.DEFAULT_TIER],
        min_payout_cents=MIN_PAYOUT_CENTS,
    )


@router.get("/status", include_in_schema=False)
async def status(request: Request, svc: Svc) -> Response:
    models = await listed(request, svc)
    measured = await run_in_threadpool(latency.read, svc.settings.metrics_port)
    return page("status.html", "status", models=models, latency=measured)


@router.get("/site/static/{name}", include_in_schema=False)
def static(name: str) -> Response:
    if name not in STATIC:
        raise NotFound("There is no such page.")
    body = (HERE / "static" / name).read_bytes()
    return Response(body, media_type=STATIC[name], headers={"Cache-Control": "max-age=300"})
