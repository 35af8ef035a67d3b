"""The audit trail: one row for every state-changing API call.

Invariants
- Every request whose method is not a read (GET/HEAD/OPTIONS) is recorded, API calls under
  ``/api/`` and the console's forms alike (sign-in included), with the caller (token name
  and role, or none when authentication failed), method, path and the status it was
  answered with, including refusals (401, 403, 4xx) and crashes (500).
- Chunk transfers of a job's session (``/api/v1/sessions/...``) are not recorded one by one:
  the job that opened the session is the audited act, and its batches would drown the trail.
- The record is written before the answer is sent, so a client that got an answer can find
  its record. A failure to write it is logged and does not change the answer.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tandem.catalog import queries as q
from tandem.catalog.db import Catalog

log = logging.getLogger(__name__)

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
UNAUDITED_PREFIX = "/api/v1/sessions/"


class AuditMiddleware:
    """A pure ASGI middleware (it does not buffer streamed answers)."""

    def __init__(self, app: ASGIApp, catalog: Catalog) -> None:
        self.app = app
        self.catalog = catalog

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if (
            scope["type"] != "http"
            or scope["method"] in READ_METHODS
            or path.startswith(UNAUDITED_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        recorded = False

        async def record(status: int) -> None:
            nonlocal recorded
            recorded = True
            state: dict[str, Any] = scope.get("state") or {}
            principal = state.get("principal")
            await run_in_threadpool(
                self._record,
                getattr(principal, "name", None),
                getattr(getattr(principal, "role", None), "value", None),
                str(scope["method"]),
                path,
                status,
            )

        async def send_recorded(message: Message) -> None:
            # Recorded before the answer leaves: whoever sees the answer finds the record.
            if message["type"] == "http.response.start" and not recorded:
                await record(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_recorded)
        finally:
            if not recorded:
                await record(500)  # it crashed before answering

    def _record(
        self, actor: str | None, role: str | None, method: str, path: str, status: int
    ) -> None:
        try:
            with self.catalog.begin() as session:
                q.add_audit(
                    session, actor=actor, role=role, method=method, path=path, status=status
                )
        except Exception:
            log.exception("could not write the audit record of %s %s", method, path)
