"""Entry point of the `tandem` command."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="tandem: two-site DR")


def main() -> None:
    app()
