"""The model catalog as the platform's pages and public figures read it: the catalog file
(`Settings.models_file`), parsed once per change of the file."""

from __future__ import annotations

from pathlib import Path

from cluster.catalog import Catalog, load_catalog
from serve_app.services import Services

_catalogs: dict[Path, tuple[int, Catalog]] = {}


def catalog_of(svc: Services) -> Catalog:
    path = Path(svc.settings.models_file)
    changed = path.stat().st_mtime_ns if path.exists() else -1
    cached = _catalogs.get(path)
    if cached is None or cached[0] != changed:
        _catalogs[path] = cached = (changed, load_catalog(path))
    return cached[1]
