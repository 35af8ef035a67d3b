"""Cursor paging of the list routes (``/apps``, ``/apps/{name}/images``, ``/jobs``).

Contract
- ``?limit=N`` asks for a page of at most N rows; ``?after=CURSOR`` for the rows after the
  one the cursor names. The body stays the plain JSON list it always was, so a client that
  does not page sees no change.
- When more rows follow a page, the answer carries ``X-Next-Cursor: CURSOR`` and a
  ``Link: <URL>; rel="next"`` header (RFC 8288) to the next page; the last page has neither.
- A cursor is the last row's key in the list's order: an app's name, an image's or a job's
  id. Lists are ordered by a unique key (name; creation time then id), so a page never
  repeats or skips a row that existed when the first page was read. A cursor that names
  nothing (a job pruned since) is a 422 saying to list again from the start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, TypeVar

from fastapi import Query, Request, Response

T = TypeVar("T")

MAX_PAGE = 10_000

Limit = Annotated[
    int | None,
    Query(ge=1, le=MAX_PAGE, description="At most this many rows (a page); none: all."),
]


def page(
    rows: Sequence[T],
    *,
    limit: int | None,
    request: Request,
    response: Response,
    key: Callable[[T], str],
) -> list[T]:
    """The first ``limit`` of ``rows`` (fetched with ``limit + 1`` to learn whether more
    follow), and the next-page headers on ``response`` when they do."""
    if limit is None or len(rows) <= limit:
        return list(rows)
    shown = list(rows[:limit])
    cursor = key(shown[-1])
    response.headers["X-Next-Cursor"] = cursor
    url = request.url.remove_query_params("after").include_query_params(after=cursor)
    response.headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
    return shown


def fetch(limit: int | None) -> int | None:
    """How many rows to ask the catalog for: one more than shown, to know if more follow."""
    return None if limit is None else limit + 1
