"""Supply pools: where the control plane reaches the model deployments, and with what.

The pool's credential is what the ingress presents to a pool's gateway (`serve_app.pool`):
the `pool_token` setting, or, on the local platform, a random one made once into
`<data_dir>/pool_token` (mode 0600), as the Ray token is (`cluster.local`). Rotating it:
`darkgpu down`, remove the file (or set a new `pool_token`), `darkgpu up`.
"""

from __future__ import annotations

from pathlib import Path

from core.local_secrets import made_once
from core.settings import Settings

TOKEN_FILE = "pool_token"


def pool_token(settings: Settings) -> str:
    """The pool's credential: the setting, else the local one (made on first use)."""
    configured = settings.pool_token.get_secret_value()
    if configured:
        return configured
    return made_once(Path(settings.resolved_data_dir) / TOKEN_FILE)
