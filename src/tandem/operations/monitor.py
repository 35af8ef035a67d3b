"""The Monitor: jobs, their logs, and cancellation."""

from __future__ import annotations

import time
from collections.abc import Sequence

from tandem.catalog import queries as q
from tandem.catalog.models import Audit, Job, JobLog
from tandem.domain.jobs import TERMINAL, JobStatus
from tandem.jobs.queue import cancel_job as _cancel
from tandem.operations.site import Site


def list_jobs(
    site: Site,
    *,
    app: str | None = None,
    status: Sequence[JobStatus] | None = None,
    after: str | None = None,
    limit: int = 100,
) -> list[Job]:
    """Jobs newest first, optionally of one app and some statuses; ``after`` (a job id) and
    ``limit`` make a page."""
    with site.catalog.read() as session:
        return q.list_jobs(
            session, app=app, status=list(status) if status else None, after=after, limit=limit
        )


MAX_WAIT = 10.0
"""Seconds ``get_job(wait=…)`` may hold a caller (the API caps ``?wait=`` here)."""
REREAD = 0.5
"""While waiting, the catalog is re-read this often: another runner process (PostgreSQL
scale-out) or a cancel ends jobs without this process's runner signalling it."""


def get_job(site: Site, *, job_id: str, wait: float = 0.0) -> Job:
    """The job's row; with ``wait`` seconds, the row once the job has ended or the time is up,
    whichever comes first (a long poll: the caller learns of the end at once)."""
    deadline = time.monotonic() + min(max(wait, 0.0), MAX_WAIT)
    while True:
        generation = site.ended.generation
        with site.catalog.read() as session:
            job = q.get_job(session, job_id=job_id)
        left = deadline - time.monotonic()
        if job.status in TERMINAL or left <= 0:
            return job
        site.ended.wait(generation, min(left, REREAD))


def job_log(site: Site, *, job_id: str) -> list[JobLog]:
    with site.catalog.read() as session:
        q.get_job(session, job_id=job_id)
        return q.list_job_log(session, job_id=job_id)


def cancel_job(site: Site, *, job_id: str, actor: str | None) -> Job:
    """Cancel a queued job now, or ask a running one to stop."""
    with site.catalog.begin() as session:
        return _cancel(session, job_id=job_id, actor=actor)


def list_audit(site: Site, *, limit: int = 100) -> list[Audit]:
    """The newest audit records first."""
    with site.catalog.read() as session:
        return q.list_audit(session, limit=limit)
