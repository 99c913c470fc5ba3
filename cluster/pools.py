"""Supply pools: where the control plane reaches the model deployments, and with what.

The pool's credential is what the ingress presents to a pool's gateway (`serve_app.pool`):
the `pool_token` setting, or, on the local platform, a random one made once into
`<data_dir>/pool_token` (mode 0600), as the Ray token is (`cluster.local`). Rotating it:
`darkgpu down`, remove the file (or set a new `pool_token`), `darkgpu up`.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from core.settings import Settings

TOKEN_FILE = "pool_token"


def pool_token(settings: Settings) -> str:
    """The pool's credential: the setting, else the local one (made on first use)."""
    configured = settings.pool_token.get_secret_value()
    if configured:
        return configured
    path = Path(settings.resolved_data_dir) / TOKEN_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    # written whole under another name, then linked into place: a process that reads it
    # meanwhile finds no file or the whole token, never a part; the first link wins
    fd, made = tempfile.mkstemp(dir=path.parent, prefix=".pool_token.")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(made, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(made)
    return path.read_text().strip()
