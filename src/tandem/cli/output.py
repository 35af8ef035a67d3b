"""Rendering and error handling shared by every command.

Contract (CLI.md): with ``--json`` exactly one JSON document goes to stdout and nothing
else; progress and logs go to stderr. Errors are one line on stderr, exit 1 (2 for usage),
never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from tandem.domain.units import human_bytes
from tandem.errors import TandemError

stderr = Console(stderr=True)
stdout = Console()

__all__ = ["human_bytes"]  # re-exported: the commands render sizes with it

P = ParamSpec("P")
R = TypeVar("R")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    line = " ".join(message.split())  # one line, whatever the message holds
    stderr.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn tandem errors (and stray OS errors) into one-line messages and exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except TandemError as exc:
            raise fail(exc.message, exc.exit_code) from None
        except OSError as exc:
            raise fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except Exception as exc:
            # The contract is one line and no traceback; TANDEM_DEBUG=1 shows it for bugs.
            if os.environ.get("TANDEM_DEBUG"):
                raise
            raise fail(
                f"internal error: {type(exc).__name__}: {exc} (TANDEM_DEBUG=1 shows more)"
            ) from None

    return wrapper


def plain(doc: Any) -> Any:
    """A document as the JSON the CLI prints and renders: the client's models dumped in
    their JSON form (lists and dicts of them too); anything else as it is."""
    if isinstance(doc, BaseModel):
        return doc.model_dump(mode="json")
    if isinstance(doc, list):
        return [plain(d) for d in doc]
    if isinstance(doc, dict):
        return {k: plain(v) for k, v in doc.items()}
    return doc


def emit_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(plain(doc), indent=2, default=str) + "\n")
    sys.stdout.flush()


def byte_progress(description: str) -> Progress:
    """A Rich progress bar on stderr for byte counts."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
    )
