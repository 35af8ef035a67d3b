"""Entry point of the `tandem` command."""

from __future__ import annotations

import typer

from tandem.cli import demo, storage

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="tandem: two-site disaster recovery.",
)
app.add_typer(storage.app, name="storage")
app.command("demo")(demo.demo)


def main() -> None:
    app()
