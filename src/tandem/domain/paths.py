"""Host paths an operator names: app paths, clone paths, mount points, failback targets.

Rules (one place; the operations check every path through ``check_path`` and API models may
use the ``CanonicalPath`` type for an early 422)
- A path is canonical: absolute, no ``.`` or ``..`` component, no empty component (``//``),
  no trailing ``/``, no NUL byte, at most ``MAX_PATH`` bytes of UTF-8, and not ``/`` itself.
- A path that is not canonical is refused with the canonical form to use, never silently
  rewritten: what the catalog holds is what the operator typed, and two spellings of one
  folder cannot slip past the overlap rule below.
- Two paths overlap when they are equal or one is inside the other (by components, so
  ``/srv/a`` and ``/srv/ab`` do not). Apps on one host never overlap: restoring one would
  overwrite or delete the other's files.

Pure: no file system access. Whether a path is a symlink on the host is the agent's business
(``storage.targets`` opens targets without following any).
"""

from __future__ import annotations

import posixpath
from typing import Annotated

from pydantic import AfterValidator

from tandem.errors import InvalidInput

MAX_PATH = 4096


def canonical_form(path: str) -> str:
    """The canonical spelling of an absolute ``path`` (``..`` resolved lexically)."""
    clean = posixpath.normpath(path)
    if clean.startswith("//"):  # normpath keeps a leading "//" (POSIX leaves it open)
        clean = "/" + clean.lstrip("/")
    return clean


def path_problem(path: str) -> str | None:
    """Why ``path`` is not a canonical host path (a sentence saying what to write), or None."""
    shown = repr(path[:200]) + ("…" if len(path) > 200 else "")
    if "\x00" in path:
        return f"{shown} holds a NUL byte; give a path without it"
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH:
        return f"{shown} is longer than {MAX_PATH} bytes; give a shorter path"
    if not path.startswith("/"):
        return f"{shown} is not an absolute path; give a full path starting with /, e.g. /srv/app"
    clean = canonical_form(path)
    if clean == "/":
        return f"{shown} is the root folder /; give a folder or file below it, e.g. /srv/app"
    if clean != path:
        return f"{shown} is not in canonical form; write it as {clean!r}"
    return None


def check_path(path: str, what: str = "--path") -> str:
    """``path`` if it is canonical; ``InvalidInput`` naming ``what`` and the fix otherwise."""
    problem = path_problem(path)
    if problem is not None:
        raise InvalidInput(detail=f"{what} {problem}")
    return path


def _pydantic_check(path: str) -> str:
    problem = path_problem(path)
    if problem is not None:
        raise ValueError(f"the path {problem}")
    return path


CanonicalPath = Annotated[str, AfterValidator(_pydantic_check)]
"""A pydantic field type for a canonical host path (``path_problem`` is the message)."""


def overlaps(a: str, b: str) -> bool:
    """Whether two canonical paths are equal or one is inside the other."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")
