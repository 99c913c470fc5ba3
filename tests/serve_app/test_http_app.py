"""The app is built by a function: fresh for each caller, none at import, and the ingress's
routes resolvable on a replica (the deployment's class travels to it by reference)."""

from __future__ import annotations

import pickle
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient
from ray import cloudpickle

import serve_app.ingress
from kernel.errors import Conflict
from serve_app.http_app import create_app
from serve_app.services import Services
from tests.serve_app.test_errors import _raising


def test_apps_are_built_fresh_and_nothing_is_built_at_import(tmp_path: Path) -> None:
    module = vars(serve_app.ingress)
    assert not [name for name, value in module.items() if isinstance(value, FastAPI)]
    svc = Services.create({"data_dir": str(tmp_path)})
    first, second = create_app(svc), create_app(svc, _raising([Conflict("Taken.")]))
    assert first is not second and first.state.services is second.state.services is svc
    assert TestClient(first).get("/raise/0").status_code == 404  # routes are not shared
    assert TestClient(second).get("/raise/0").status_code == 409
    svc.db.dispose()


def test_the_ingress_class_reaches_a_replica_by_reference() -> None:
    """Serve pickles the deployment's class for each replica. The ingress's own class must
    arrive as itself (by reference), so its methods keep this module's globals, where FastAPI
    resolves `request: Request` and the other postponed annotations of the routes."""
    wrapper = serve_app.ingress.INGRESS.func_or_class
    arrived = pickle.loads(cloudpickle.dumps(wrapper))
    assert serve_app.ingress.Ingress in arrived.__mro__
    assert arrived.chat_completions.__globals__ is vars(serve_app.ingress)
