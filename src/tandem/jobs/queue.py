"""The persistent job queue: rows of the catalog's ``jobs`` table.

Invariants
- Every operation is a job row; its status follows ``tandem.domain.jobs.JOB_TRANSITIONS``.
- At most one *lifecycle* job per app is queued or running. The database enforces it (a
  partial unique index), so concurrent submits cannot both pass; ``submit_job`` turns the
  violation into ``Conflict`` naming the job that holds the app.
- A queued job is claimed by exactly one runner: on PostgreSQL with
  ``SELECT ... FOR UPDATE SKIP LOCKED`` (runners never wait on each other), on SQLite with one
  ``UPDATE ... WHERE id = (SELECT ...) AND status = 'queued' RETURNING`` statement, which is
  atomic because SQLite has a single writer.
- A running job's row carries its runner and a heartbeat. A job left ``running`` by a runner
  that died is failed with ``INTERRUPTED_MESSAGE`` by ``recover_jobs``, or re-queued when its
  type is resumable (idempotent: resume = run again) and it has attempts left.
- Canceling a queued job ends it at once; canceling a running one sets ``cancel_requested``,
  which the operation sees through ``JobContext.check_canceled()`` and obeys by stopping.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tandem.catalog.models import Job, utcnow
from tandem.catalog.queries import add_job_log, get_job
from tandem.domain.ids import new_job_id
from tandem.domain.jobs import ACTIVE, JobStatus, check_job_transition
from tandem.errors import AppBusy, InvalidInput, JobEnded

INTERRUPTED_MESSAGE = "interrupted: the appliance stopped while this job ran; run it again"
CANCELED_MESSAGE = "canceled by the operator"
MAX_ATTEMPTS = 3
"""A resumable job is re-queued after an interruption until it has been claimed this often."""


def _active_lifecycle_job(session: Session, app: str) -> Job | None:
    query = select(Job).where(Job.app == app, Job.lifecycle.is_(True), Job.status.in_(list(ACTIVE)))
    return session.scalar(query.order_by(Job.created).limit(1))


def _busy(app: str, other: Job) -> AppBusy:
    return AppBusy(app=app, type=other.type, job=other.id, status=other.status.value)


def submit_job(
    session: Session,
    *,
    type: str,
    app: str | None = None,
    params: Mapping[str, Any] | None = None,
    lifecycle: bool = False,
    image: str | None = None,
    actor: str | None = None,
) -> Job:
    """Queue a job. A lifecycle job is refused with ``Conflict`` while the app has another."""
    if lifecycle and app is None:
        raise InvalidInput(detail=f"a lifecycle job ({type}) needs an application")
    if lifecycle and app is not None:
        other = _active_lifecycle_job(session, app)
        if other is not None:
            raise _busy(app, other)
    job = Job(
        id=new_job_id(),
        type=type,
        app=app,
        image=image,
        params=dict(params or {}),
        lifecycle=lifecycle,
        actor=actor,
        status=JobStatus.QUEUED,
        created=utcnow(),
    )
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError as exc:
        # Another transaction queued a lifecycle job for the app since we looked.
        other = _active_lifecycle_job(session, app) if app is not None else None
        if other is None:
            raise
        raise _busy(app or "", other) from exc
    return job


def claim_next(
    session: Session, runner_id: str, *, types: Collection[str] | None = None
) -> Job | None:
    """Claim the oldest queued job (of ``types``, if given) for ``runner_id``, or ``None``."""
    now = utcnow()
    pick = select(Job.id).where(Job.status == JobStatus.QUEUED)
    if types is not None:
        pick = pick.where(Job.type.in_(list(types)))
    pick = pick.order_by(Job.created, Job.id).limit(1)
    claim = update(Job).values(
        status=JobStatus.RUNNING,
        runner=runner_id,
        started=now,
        heartbeat=now,
        attempts=Job.attempts + 1,
    )
    job_id: str | None
    if session.get_bind().dialect.name == "postgresql":
        job_id = session.scalar(pick.with_for_update(skip_locked=True))
        if job_id is None:
            return None
        session.execute(
            claim.where(Job.id == job_id),
            execution_options={"synchronize_session": False},
        )
    else:
        job_id = session.scalar(
            claim.where(Job.id == pick.scalar_subquery(), Job.status == JobStatus.QUEUED)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
        if job_id is None:
            return None
    return session.get(Job, job_id, populate_existing=True)


def release_job(session: Session, *, job_id: str, runner_id: str) -> Job:
    """Give back a job that ``runner_id`` claimed but did not start (the runner is stopping):
    it is queued again as if never claimed."""
    job = get_job(session, job_id=job_id)
    if job.status is JobStatus.RUNNING and job.runner == runner_id:
        job.status = check_job_transition(job.id, job.status, JobStatus.QUEUED)
        job.runner = None
        job.started = None
        job.heartbeat = None
        job.attempts = max(0, job.attempts - 1)
        session.flush()
    return job


def running_runners(session: Session) -> set[str]:
    """The ids of the runners that have a job running."""
    query = select(Job.runner).where(Job.status == JobStatus.RUNNING, Job.runner.is_not(None))
    return {runner for runner in session.scalars(query.distinct()) if runner}


def heartbeat(session: Session, *, runner_id: str, job_ids: Collection[str]) -> dict[str, bool]:
    """Refresh the heartbeat of ``runner_id``'s running jobs; return each one's cancel flag."""
    if not job_ids:
        return {}
    mine = (Job.id.in_(list(job_ids)), Job.runner == runner_id, Job.status == JobStatus.RUNNING)
    session.execute(
        update(Job).where(*mine).values(heartbeat=utcnow()),
        execution_options={"synchronize_session": False},
    )
    rows = session.execute(select(Job.id, Job.cancel_requested).where(*mine))
    return {job_id: bool(flag) for job_id, flag in rows}


def update_progress(
    session: Session,
    *,
    job_id: str,
    bytes_done: int | None = None,
    bytes_total: int | None = None,
    bytes_sent: int | None = None,
    message: str | None = None,
    image: str | None = None,
) -> bool:
    """Record a running job's progress (absolute values) and heartbeat.

    Returns whether cancellation was requested, so the caller learns it on every update.
    """
    job = get_job(session, job_id=job_id)
    if bytes_done is not None:
        job.bytes_done = bytes_done
    if bytes_total is not None:
        job.bytes_total = bytes_total
    if bytes_sent is not None:
        job.bytes_sent = bytes_sent
    if message is not None:
        job.message = message
    if image is not None:
        job.image = image
    job.heartbeat = utcnow()
    session.flush()
    return job.cancel_requested


def finish_job(
    session: Session,
    *,
    job_id: str,
    status: JobStatus,
    message: str,
    result: Mapping[str, Any] | None = None,
) -> Job:
    """End a running job with a terminal ``status``."""
    job = get_job(session, job_id=job_id)
    check_job_transition(job.id, job.status, status)
    job.status = status
    job.message = message
    if result is not None:
        job.result = dict(result)
    job.finished = utcnow()
    session.flush()
    return job


def cancel_job(session: Session, *, job_id: str, actor: str | None = None) -> Job:
    """Cancel a job: a queued one ends now, a running one is asked to stop.

    Canceling a canceled job is a no-op; canceling one that ended otherwise is a ``Conflict``.
    """
    job = get_job(session, job_id=job_id)
    who = f" by {actor}" if actor else ""
    if job.status is JobStatus.QUEUED:
        job.status = JobStatus.CANCELED
        job.message = "canceled before it started"
        job.finished = utcnow()
        add_job_log(session, job_id=job.id, text=f"canceled{who} before it started")
    elif job.status is JobStatus.RUNNING:
        if not job.cancel_requested:
            job.cancel_requested = True
            add_job_log(session, job_id=job.id, text=f"cancel requested{who}")
    elif job.status is not JobStatus.CANCELED:
        raise JobEnded(job=job.id, status=job.status.value, action="be canceled")
    session.flush()
    return job


def interrupt_job(
    session: Session,
    job: Job,
    *,
    runner_id: str,
    resumable: bool,
    max_attempts: int = MAX_ATTEMPTS,
) -> Job:
    """End or re-queue a running job whose runner stopped (or died) under it."""
    if job.cancel_requested:
        status, message = JobStatus.CANCELED, "canceled: the appliance stopped while it ran"
    elif resumable and job.attempts < max_attempts:
        status, message = JobStatus.QUEUED, "re-queued: the appliance stopped while it ran"
    else:
        status, message = JobStatus.FAILED, INTERRUPTED_MESSAGE
    check_job_transition(job.id, job.status, status)
    gone = job.runner
    job.status = status
    job.message = message
    if status is JobStatus.QUEUED:
        job.runner = None
        job.heartbeat = None
    else:
        job.finished = utcnow()
    add_job_log(
        session,
        job_id=job.id,
        level="warning",
        text=f"{message} (attempt {job.attempts}; its runner {gone} stopped; "
        f"noted by runner {runner_id})",
    )
    session.flush()
    return job


def recover_jobs(
    session: Session,
    runner_id: str,
    *,
    stale_after: float | None = None,
    runners: Collection[str] | None = None,
    resumable: Collection[str] = frozenset(),
    max_attempts: int = MAX_ATTEMPTS,
) -> list[Job]:
    """Deal with jobs left running by a runner that is gone; return them.

    With ``stale_after`` (seconds) only jobs whose heartbeat is that old are taken (several
    runners share the catalog); with ``runners``, only the jobs of those runners (known to
    be dead); with neither, every running job is, which is right when the one local runner
    starts, since nothing can be running then. Each job is taken by one caller only (rows
    locked ``SKIP LOCKED`` on PostgreSQL, re-checked as still running), so runners noticing
    the same dead one at once recover its jobs once.
    """
    query = select(Job).where(Job.status == JobStatus.RUNNING)
    if runners is not None:
        query = query.where(Job.runner.in_(list(runners)))
    if stale_after is not None:
        cutoff = utcnow() - timedelta(seconds=stale_after)
        query = query.where(
            or_(Job.heartbeat < cutoff, Job.heartbeat.is_(None) & (Job.started < cutoff))
        )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    jobs = list(session.scalars(query.order_by(Job.created, Job.id)))
    for job in jobs:
        interrupt_job(
            session,
            job,
            runner_id=runner_id,
            resumable=job.type in resumable,
            max_attempts=max_attempts,
        )
    return jobs
