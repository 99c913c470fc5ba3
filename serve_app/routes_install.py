"""The provider installer, served by the platform (no sign-in: a provider runs
`curl -fsSL <platform>/install.sh | bash` before it has any credential).

`GET /install.sh`: agent_bootstrap/install.sh pointed at this platform (serve_app.installer).
`GET /install/<wheel>`: the agent's wheel the script names (and checks by its SHA-256); any
other name is a 404. Both are built from the running source, so what a provider installs is
what this platform runs.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, PlainTextResponse

from kernel.errors import NotFound
from serve_app import installer
from serve_app.services import Services, services

router = APIRouter()
Svc = Annotated[Services, Depends(services)]
NO_CACHE = {"Cache-Control": "no-cache"}


@router.get("/install.sh", include_in_schema=False)
async def install_script(svc: Svc) -> PlainTextResponse:
    wheel = await run_in_threadpool(installer.agent_wheel, svc.settings)
    script = installer.render_script(svc.settings, wheel)
    return PlainTextResponse(script, media_type="text/x-shellscript", headers=NO_CACHE)


@router.get(installer.WHEEL_PATH + "/{name}", include_in_schema=False)
async def agent_wheel(svc: Svc, name: Annotated[str, Path(max_length=200)]) -> FileResponse:
    wheel = await run_in_threadpool(installer.agent_wheel, svc.settings)
    if name != wheel.name:
        raise NotFound(f"No such file: {name!r}. The installer names the agent's wheel.")
    return FileResponse(
        wheel.path,
        media_type="application/octet-stream",
        filename=wheel.name,
        headers={**NO_CACHE, "X-Checksum-Sha256": wheel.sha256},
    )
