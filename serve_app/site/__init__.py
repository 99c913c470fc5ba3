"""The public site, served by the platform at `/`: what DarkGPU is, the catalog's models and
prices, the prepaid-credits storefront, the provider earnings calculator, a quickstart, the
economics, the FAQ, a status page and the enterprise contact form (`enterprise_routes`). No
sign-in: every page is the same for everyone and nothing is stored per visitor (the contact
form stores what is sent). Server-rendered (no script needed); the console's stylesheet plus
`static/site.css`. The routes: `routes`; include `router` in the platform's app.
"""

from __future__ import annotations

from serve_app.site import enterprise_routes
from serve_app.site.routes import router

router.include_router(enterprise_routes.router)

__all__ = ["router"]
