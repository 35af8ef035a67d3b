"""The Monitor: jobs, their logs, and cancellation."""

from __future__ import annotations

from collections.abc import Sequence

from tandem.catalog import queries as q
from tandem.catalog.models import Audit, Job, JobLog
from tandem.domain.jobs import JobStatus
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


def get_job(site: Site, *, job_id: str) -> Job:
    with site.catalog.read() as session:
        return q.get_job(session, job_id=job_id)


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
