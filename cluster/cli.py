"""`darkgpu admin provider …`: the operator's hand on providers (Typer).

A new provider is `pending`: its agent is not given the cluster's address or Ray token until
the operator approves it (`approve`; a provider whose confidential-computing attestation
passes is approved by that rule). `suspend` stops its traffic at the ingress's next registry
reading (seconds), refuses its agent's sign-in, and holds its earnings until it is approved
again; `revoke` is final and also revokes every token.

A leaked token or a retired machine: `tokens revoke` ends every token of the provider at once
(`darkgpu auth` with one is refused, and the running agent's next heartbeat is refused, so it
leaves the cluster); `tokens issue` makes a new one, printed once (only its SHA-256 is kept).
`strikes` lists usage strikes (billing.strikes): requests whose engine reported more completion
tokens than the ingress delivered, beyond the tolerance.
The database comes from `DARKGPU_*` variables (core.settings) and is upgraded first if needed,
as every `darkgpu admin` command does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from cluster import registry
from core.db import make_engine, migrate
from core.schema import ProviderReview, UsageStrike
from core.settings import Settings
from kernel.errors import DarkGpuError

app = typer.Typer(help="Providers: their review and agent tokens.", no_args_is_help=True)
tokens_app = typer.Typer(help="A provider's agent tokens (dgpp-…).", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")

T = TypeVar("T")
ProviderOpt = Annotated[str, typer.Option("--provider", help="The provider's id (prv_…).")]


def _run(action: Callable[[Engine], T]) -> T:
    engine = make_engine(Settings().database_url)
    try:
        migrate(engine)
        return action(engine)
    except DarkGpuError as exc:  # an unknown provider, for one
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        engine.dispose()


def _print(data: dict[str, Any] | list[dict[str, Any]]) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


@tokens_app.command("issue")
def tokens_issue(provider: ProviderOpt) -> None:
    """A new token for the provider, printed once; its earlier ones stay valid until revoked."""
    token = _run(lambda engine: registry.issue_token(engine, provider))
    _print({"provider_id": provider, "token": token})


@tokens_app.command("revoke")
def tokens_revoke(provider: ProviderOpt) -> None:
    """Revoke every token of the provider: its agent can no longer sign in or heartbeat."""

    def revoke(engine: Engine) -> int:
        registry.get_provider(engine, provider)  # an unknown id is an error, not "0 revoked"
        return registry.revoke_tokens(engine, provider)

    _print({"provider_id": provider, "revoked": _run(revoke)})


NoteOpt = Annotated[str | None, typer.Option("--note", help="Why (kept with the decision).")]


@app.command("list")
def provider_list(
    review: Annotated[
        str | None, typer.Option(help="Only these: pending | approved | suspended | revoked.")
    ] = None,
) -> None:
    """Providers, oldest first, with their review, tier and status."""
    wanted = None if review is None else ProviderReview(review)
    rows = _run(lambda engine: registry.list_providers(engine))
    _print([p.to_json() for p in rows if wanted is None or p.review == wanted.value])


def _review(provider: str, decision: ProviderReview, note: str | None) -> None:
    _print(_run(lambda engine: registry.review(engine, provider, decision, note=note)).to_json())


@app.command("approve")
def provider_approve(provider: ProviderOpt, note: NoteOpt = None) -> None:
    """Let the provider join and serve (or lift its suspension)."""
    _review(provider, ProviderReview.approved, note)


@app.command("suspend")
def provider_suspend(provider: ProviderOpt, note: NoteOpt = None) -> None:
    """No more traffic, no sign-in, earnings held; `approve` lifts it."""
    _review(provider, ProviderReview.suspended, note)


@app.command("revoke")
def provider_revoke(provider: ProviderOpt, note: NoteOpt = None) -> None:
    """For good: as `suspend`, and every token revoked; it can never be approved again."""
    _review(provider, ProviderReview.revoked, note)


@app.command("strikes")
def provider_strikes(
    provider: Annotated[
        str | None, typer.Option("--provider", help="Only this provider's (prv_…).")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
) -> None:
    """Usage strikes, newest first: requests whose engine reported more completion tokens
    than the ingress delivered, beyond the tolerance (billed at the ingress's count;
    billing.strikes records them)."""
    _print(_run(lambda engine: _strikes(engine, provider, limit)))


def _strikes(engine: Engine, provider: str | None, limit: int) -> list[dict[str, Any]]:
    query = select(UsageStrike).order_by(UsageStrike.id.desc()).limit(max(0, limit))
    if provider is not None:
        registry.get_provider(engine, provider)  # an unknown id is an error, not "none"
        query = query.where(UsageStrike.provider_id == provider)
    with Session(engine) as session:
        return [
            {
                "provider_id": row.provider_id,
                "request_id": row.request_id,
                "model": row.model,
                "reported_tokens": row.reported_tokens,
                "counted_tokens": row.counted_tokens,
                "created_at": row.created_at.isoformat(),
            }
            for row in session.scalars(query)
        ]
