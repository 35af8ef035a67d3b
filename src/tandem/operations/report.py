"""The drill report of an application: its latest DR operations at this appliance.

For each step of the DR lifecycle (test failover, failover, syncback, restore, failback, and
the replica-style failback with its commit or undo) the newest job of that type at this
appliance, with its times and bytes moved; the RPO achieved by the latest failover (how old
its replica was when the failover started); the latest failback downtime.

A drill spans both sites — test failover, failover and syncback run at the DR appliance,
the restore of a syncback image at the production appliance — so each appliance reports the
steps it ran. The report is read from the catalog only: it never contacts the peer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from tandem.catalog import queries as q
from tandem.catalog.models import Job
from tandem.domain.images import ImageKind
from tandem.domain.jobs import JobStatus
from tandem.errors import NotFound
from tandem.operations import (
    failback,
    failover,
    replica_failback,
    restore,
    syncback,
    testfailover,
)
from tandem.operations.site import Site

STEPS: tuple[tuple[str, str], ...] = (
    (testfailover.TYPE, "Test failover"),
    (failover.TYPE, "Failover"),
    (syncback.TYPE, "Syncback"),
    (restore.TYPE, "Restore"),
    (failback.TYPE, "Failback (snapshot style)"),
    (replica_failback.TYPE, "Failback (replica style)"),
    (replica_failback.COMMIT_TYPE, "Commit failback"),
    (replica_failback.UNDO_TYPE, "Undo failback"),
)
"""The DR steps a report covers, in lifecycle order: (job type, title)."""

JOBS_SCANNED = 1000


@dataclass(frozen=True)
class Step:
    """The newest job of one DR step."""

    type: str
    title: str
    job: Job

    @property
    def seconds(self) -> float | None:
        if self.job.started is None or self.job.finished is None:
            return None
        return (self.job.finished - self.job.started).total_seconds()

    @property
    def database(self) -> str | None:
        """A recovered database (test failover, failover of a PostgreSQL app): the point
        reached, and the pg_amcheck result when the operator asked for it."""
        result = self.job.result or {}
        if "recovered_to" not in result:
            return None
        shown = f"recovered to {result['recovered_to'] or 'the base image alone'}"
        checked = result.get("amcheck")
        if isinstance(checked, dict):
            verdict = "no corruption found" if checked.get("ok") else "CORRUPTION FOUND"
            shown += f"; pg_amcheck: {verdict} ({checked.get('seconds')} s)"
        else:
            shown += "; pg_amcheck not run (--verify)"
        return shown


@dataclass(frozen=True)
class DrillReport:
    app: str
    site: str
    steps: list[Step]
    """Only the steps that ran at this appliance, in lifecycle order."""
    rpo_seconds: float | None
    """Age of the replica the latest failover started from, at the moment it started (a
    PostgreSQL app: of the last commit it recovered)."""
    rpo_image: str | None
    downtime_seconds: float | None
    """The latest failback downtime: DR app stopped → production app started."""
    syncbacks: int
    """Successful syncbacks among the scanned jobs (catch-up ones and the final one)."""

    @property
    def bytes_moved(self) -> int:
        return sum(step.job.bytes_sent for step in self.steps)


def drill_report(site: Site, *, app: str) -> DrillReport:
    with site.catalog.read() as session:
        q.get_app(session, name=app)
        jobs = q.list_jobs(session, app=app, limit=JOBS_SCANNED)  # newest first
        newest: dict[str, Job] = {}
        for job in jobs:
            newest.setdefault(job.type, job)
        steps = [Step(t, title, newest[t]) for t, title in STEPS if t in newest]
        rpo, rpo_image = _rpo(session, newest.get(failover.TYPE))
    syncbacks = sum(1 for j in jobs if j.type == syncback.TYPE and j.status is JobStatus.SUCCEEDED)
    return DrillReport(
        app=app,
        site=site.name,
        steps=steps,
        rpo_seconds=rpo,
        rpo_image=rpo_image,
        downtime_seconds=failback.downtimes(site).get(app),
        syncbacks=syncbacks,
    )


def _rpo(session: Session, job: Job | None) -> tuple[float | None, str | None]:
    """How old the failover's replica was when the failover started.

    The replica is the failover image's base (or the job's image, if the job names the
    replica itself); ``None`` once either was deleted (a snapshot-style failback deletes
    the failover image). A recovered database's RPO is the age of its last replayed
    commit instead (the replica is only its base; the WAL carried it further).
    """
    if job is None or job.status is not JobStatus.SUCCEEDED or job.started is None:
        return None, None
    result = job.result or {}
    if result.get("recovered_to"):
        reached = datetime.fromisoformat(str(result["recovered_to"]))
        if reached.tzinfo is None:
            reached = reached.replace(tzinfo=UTC)
        return max(0.0, (job.started - reached).total_seconds()), result.get("base")
    image_id = (job.result or {}).get("image") or job.image
    try:
        image = q.get_image(session, image_id=str(image_id))
        if image.kind is not ImageKind.REPLICA and image.parent_id:
            image = q.get_image(session, image_id=image.parent_id)
    except NotFound:
        return None, None
    return max(0.0, (job.started - image.created).total_seconds()), image.id
