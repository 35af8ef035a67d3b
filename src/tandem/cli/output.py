"""Rendering and error handling shared by every command.

Contract (CLI.md): with ``--json`` exactly one JSON document goes to stdout and nothing
else; progress and logs go to stderr. Errors are one line on stderr, exit 1 (2 for usage),
never a traceback.

Rich is imported when something is rendered for people, not when a command starts (each
call is a new process; issue #14): ``stdout`` and ``stderr`` make their Console on first
use, and a progress bar on a stderr that is no terminal (a script, ``--json`` piped) is
none at all, as Rich itself would show nothing there.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, Self, TypeVar, cast

import typer
from pydantic import BaseModel

from tandem.domain.units import human_bytes
from tandem.errors import TandemError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress


class _LazyConsole:
    """A Rich Console made on first use (see the module's docstring)."""

    def __init__(self, *, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def made(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.made(), name)


stderr = cast("Console", _LazyConsole(stderr=True))
stdout = cast("Console", _LazyConsole(stderr=False))


def real(console: Console) -> Console:
    """The Console itself, for what Rich hands it to (a ``Live``, a ``Progress``): ``stdout``
    and ``stderr`` only stand for theirs until first used."""
    lazy: object = console
    return lazy.made() if isinstance(lazy, _LazyConsole) else console


__all__ = ["human_bytes"]  # re-exported: the commands render sizes with it

P = ParamSpec("P")
R = TypeVar("R")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    line = " ".join(message.split())  # one line, whatever the message holds
    if not interactive_stderr():  # what Rich prints there: the text, unstyled, unwrapped
        sys.stderr.write(f"error: {line}\n")
        sys.stderr.flush()
        return typer.Exit(code)
    from rich.markup import escape

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


def interactive_stderr() -> bool:
    """Whether Rich would draw live progress on stderr: a terminal, or one forced by the
    environment variables Rich reads (``FORCE_COLOR``, ``TTY_INTERACTIVE``)."""
    env = os.environ
    if env.get("TTY_INTERACTIVE") or env.get("FORCE_COLOR"):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


class NoProgress:
    """What a progress bar is where none would show: the calls ``Progress`` takes, nothing
    drawn, Rich not imported."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def add_task(self, description: str, **_: Any) -> int:
        return 0

    def update(self, task: int, **_: Any) -> None:
        return None

    def advance(self, task: int, advance: float = 1) -> None:
        return None


def byte_progress(description: str) -> Progress:
    """A Rich progress bar on stderr for byte counts (one that draws nothing when stderr is
    no terminal, as Rich's own would, without importing Rich)."""
    if not interactive_stderr():
        return cast("Progress", NoProgress())
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=real(stderr),
        transient=True,
    )
