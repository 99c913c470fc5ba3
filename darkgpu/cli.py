"""`darkgpu`: the one command. Providers: `auth`, `serve`, `status`; operators: `up`, `down`,
`admin …`.

A provider machine installs the agent alone (`pip install darkgpu`: no SQL, Serve, Redis or
Stripe), so the operator's commands are added only where the platform's packages import;
elsewhere each of them says which extra to install instead of failing with a traceback.
"""

from __future__ import annotations

import typer
from rich.markup import escape

from agent_bootstrap.cli import register_commands as register_provider_commands

PLATFORM_EXTRA = "pip install 'darkgpu[platform]'"
OPERATOR_COMMANDS = ("up", "down", "admin")
# our own packages: a module of these missing is a broken install, never an absent extra
OWN_PACKAGES = frozenset(
    {"kernel", "core", "billing", "cluster", "serve_app", "agent_bootstrap", "darkgpu"}
)

HELP = (
    "`darkgpu`: the one command. Operators: `up`, `down`, `admin …`; providers: `auth`, "
    "`serve`, `status`."
)

app = typer.Typer(no_args_is_help=True, add_completion=False, help=HELP)
register_provider_commands(app)


def add_missing_platform(target: typer.Typer, missing: str) -> None:
    """`up`, `down` and `admin` as commands that name the extra to install (exit 1)."""

    def register(name: str) -> None:
        def command() -> None:  # whatever follows (`admin account create …`) is ignored
            typer.echo(
                f"`darkgpu {name}` is an operator command: it needs the platform, which is not "
                f"installed here (no module named {missing!r}). Install it with: "
                f"{PLATFORM_EXTRA}",
                err=True,
            )
            raise typer.Exit(1)

        target.command(
            name,
            help=escape(f"Operator command: needs the platform ({PLATFORM_EXTRA})."),
            context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        )(command)

    for name in OPERATOR_COMMANDS:
        register(name)


try:
    from darkgpu import operator_cli
except ModuleNotFoundError as exc:
    if not exc.name or exc.name.split(".")[0] in OWN_PACKAGES:
        raise
    add_missing_platform(app, exc.name)
else:
    operator_cli.register_commands(app)


if __name__ == "__main__":
    app()
