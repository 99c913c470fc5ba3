"""Secrets the local platform makes for itself, once, under its data directory (mode 0600):
the pool's credential (`cluster.pools`), the attestation challenges' key
(`cluster.registry`). A configured setting always wins over the file."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path


def made_once(path: Path) -> str:
    """The secret in `path`, made (64 hex digits) by the first caller."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    # written whole under another name, then linked into place: a process that reads it
    # meanwhile finds no file or the whole secret, never a part; the first link wins
    fd, made = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
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
