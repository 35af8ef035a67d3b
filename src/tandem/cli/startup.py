"""What keeps `tandem` quick to start: each command is a new process, and what its imports
cost is paid by every operator call (issues #14, #15).

Two installed extras would be imported by the HTTP stack for nothing a command does:
- httpx imports its own command-line client (``httpx._main``: pygments, click, rich.syntax)
  when those are installed;
- httpcore imports trio when it is installed (pyfuse3, the agent's ``fuse`` extra, needs
  it) to support async clients under trio; a command's client is synchronous.
``hidden`` makes such an import fail for the duration of a block, so the library takes its
"not installed" path; it is made visible again afterwards, so a later ``import trio`` (the
agent's FUSE child) works as usual.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def hidden(*modules: str) -> Iterator[None]:
    """Within the block, importing any of ``modules`` not yet imported raises ImportError."""
    absent = [m for m in modules if m not in sys.modules]
    for m in absent:
        sys.modules[m] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for m in absent:
            if m in sys.modules and sys.modules[m] is None:
                del sys.modules[m]


def import_http_client() -> None:
    """Import httpcore (which httpx imports when its first client is made) without trio."""
    with hidden("trio"):
        import httpcore  # noqa: F401
