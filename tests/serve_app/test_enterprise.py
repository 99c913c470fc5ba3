"""The enterprise contact form on the public site, on the app `create_app` builds, real
SQLite and a real Redis: what is sent is stored for the operator and listed by
`darkgpu admin enterprise list`; bad fields are told in words and store nothing; posts from
another site are refused; one client is throttled."""

from __future__ import annotations

import csv
import io
import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from billing import enterprise
from darkgpu.cli import app as darkgpu_app
from serve_app.services import Services
from tests.serve_app import test_site as site
from tests.serve_app.test_site import HOST, REDIS_URL, text_of

svc = site.svc
app = site.app
models_file = site.models_file
GOOD = {
    "name": "Ada Lovelace",
    "email": "Ada@Example.com",
    "company": "Analytical Engines Ltd",
    "message": "We need 2M tokens a day,\r\nwith the verified tier by default.",
}


def client(app: FastAPI, ip: str = "198.51.100.7") -> TestClient:
    return TestClient(app, base_url=HOST, follow_redirects=False, client=(ip, 50000))


def admin(svc: Services, monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    monkeypatch.setenv("DARKGPU_DATA_DIR", str(svc.settings.data_dir))
    monkeypatch.setenv("DARKGPU_REDIS_URL", REDIS_URL)
    done = CliRunner().invoke(darkgpu_app, ["admin", "enterprise", *args])
    assert done.exit_code == 0, done.output
    return done.stdout


def test_an_inquiry_is_stored_and_listed_for_the_operator(
    app: FastAPI, svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = client(app)
    form = c.get("/enterprise")
    assert form.status_code == 200 and "set-cookie" not in form.headers
    assert 'action="/enterprise"' in form.text
    sent = c.post("/enterprise", data=GOOD, headers={"origin": HOST})
    assert sent.status_code == 303 and sent.headers["location"] == "/enterprise?sent=1"
    assert "we have your message" in text_of(c.get(sent.headers["location"]).text)

    [stored] = enterprise.inquiries(svc.db)
    assert (stored.name, stored.email, stored.company) == (
        "Ada Lovelace", "ada@example.com", "Analytical Engines Ltd"
    )  # fmt: skip
    assert stored.message == "We need 2M tokens a day,\nwith the verified tier by default."
    listed = json.loads(admin(svc, monkeypatch, "list"))
    assert [i["id"] for i in listed] == [stored.id] and listed[0]["email"] == "ada@example.com"

    formula = {**GOOD, "company": '=HYPERLINK("http://evil")', "email": "b@example.com"}
    assert client(app).post("/enterprise", data=formula).status_code == 303
    rows = list(csv.DictReader(io.StringIO(admin(svc, monkeypatch, "list", "--csv"))))
    assert [r["company"] for r in rows] == ["Analytical Engines Ltd", '\'=HYPERLINK("http://evil")']

    done = json.loads(admin(svc, monkeypatch, "handled", "--id", str(stored.id)))
    assert done["handled_at"] is not None
    assert [i["id"] for i in json.loads(admin(svc, monkeypatch, "list"))] == [stored.id + 1]
    assert len(json.loads(admin(svc, monkeypatch, "list", "--all"))) == 2


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("email", "not-an-address", "not a valid email address"),
        ("email", "", "not a valid email address"),
        ("name", "   ", "name must be 1 to 200 characters"),
        ("name", "x" * 201, "name must be 1 to 200 characters"),
        ("company", "", "company must be 1 to 200 characters"),
        ("message", "hi", "message must be 10 to 4,000 characters"),
        ("message", "x" * 4001, "message must be 10 to 4,000 characters"),
        ("name", "Ada\x00Lovelace", "name has characters that cannot be stored"),
        ("message", "hello there\x1b[31m red", "message has characters that cannot be stored"),
    ],
)
def test_bad_fields_are_told_in_words_and_store_nothing(
    app: FastAPI, svc: Services, field: str, value: str, words: str
) -> None:
    refused = client(app).post("/enterprise", data={**GOOD, field: value})
    assert refused.status_code == 400, refused.text
    assert words in text_of(refused.text) and 'role="alert"' in refused.text
    kept = "Analytical Engines Ltd" if field != "company" else "Ada Lovelace"
    assert kept in refused.text  # the form again, with what was typed
    assert "Traceback" not in refused.text
    assert enterprise.inquiries(svc.db, include_handled=True) == []


def test_posts_from_elsewhere_and_floods_are_refused(
    app: FastAPI, svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    foreign = client(app).post("/enterprise", data=GOOD, headers={"origin": "https://evil.example"})
    assert foreign.status_code == 403
    assert client(app).post("/enterprise", json=GOOD).status_code == 415
    assert enterprise.inquiries(svc.db) == []

    for n in range(5):  # the per-address limit: 5 an hour
        assert client(app, "203.0.113.5").post("/enterprise", data=GOOD).status_code == 303, n
    flood = client(app, "203.0.113.5").post("/enterprise", data=GOOD)
    assert flood.status_code == 429 and 0 < int(flood.headers["retry-after"]) <= 3600
    assert "Too many messages from your network" in text_of(flood.text)
    assert len(enterprise.inquiries(svc.db)) == 5
    assert client(app, "192.0.2.9").post("/enterprise", data=GOOD).status_code == 303
