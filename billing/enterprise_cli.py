"""`darkgpu admin enterprise …`: the enterprise contact form's inquiries, for the operator.

    darkgpu admin enterprise list [--all] [--csv]   those not handled yet (--all: every one)
    darkgpu admin enterprise handled --id N         mark one answered

The database comes from `DARKGPU_*` variables (core.settings) and is upgraded first if
needed, as every `darkgpu admin` command does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer
from sqlalchemy import Engine

from billing import csv_cells, enterprise
from core.db import make_engine, migrate
from core.settings import Settings
from kernel.errors import DarkGpuError

app = typer.Typer(help="Enterprise inquiries from the public site.", no_args_is_help=True)
T = TypeVar("T")
COLUMNS = ("id", "created_at", "name", "email", "company", "message", "handled_at")


def _run(action: Callable[[Engine], T]) -> T:
    engine = make_engine(Settings().database_url)
    try:
        migrate(engine)
        return action(engine)
    except DarkGpuError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        engine.dispose()


@app.command("list")
def list_inquiries(
    all_: Annotated[bool, typer.Option("--all", help="Handled ones too.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV instead of JSON.")] = False,
) -> None:
    """The inquiries, oldest first: JSON (or CSV, its cells safe for spreadsheets)."""
    found = _run(lambda engine: enterprise.inquiries(engine, include_handled=all_))
    if not as_csv:
        typer.echo(json.dumps([i.to_json() for i in found], indent=2, ensure_ascii=False))
        return
    out = csv_cells.DictWriter(sys.stdout, COLUMNS)
    out.writeheader()
    for inquiry in found:
        out.writerow(inquiry.to_json())


@app.command("handled")
def handled(inquiry_id: Annotated[int, typer.Option("--id", help="The inquiry's id.")]) -> None:
    """Mark an inquiry answered: `list` no longer shows it without --all."""
    done = _run(lambda engine: enterprise.mark_handled(engine, inquiry_id))
    typer.echo(json.dumps(done.to_json(), indent=2, ensure_ascii=False))
