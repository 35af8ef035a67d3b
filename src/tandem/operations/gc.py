"""Garbage collection of the pool, as a job of the appliance (type ``gc``), and the
retention of job rows.

Invariants
- Deleting an image (a ``delete-image`` job, retention, a failback) only removes its row
  and counts the deletion (``queries.GC_DELETED_KEY``, same transaction); no capture,
  replication or deletion ever walks the pool. The chunks go at the next ``gc`` job.
- A ``gc`` job runs ``storage.gc.collect``: incremental (reference counts of what changed
  since the last collection), full when ``gc.full_every_seconds`` passed since the last
  full one (a week by default; a full one also finds what no image ever named). The
  snapshot of live manifests and active writers is taken under ``Site.gc_lock``
  (in-process order; across processes the order of the snapshot's two reads suffices, see
  ``storage.gc``); the counting and sweep run without it, so captures never wait for a
  collection.
- At most one ``gc`` job is queued or running (a second submit is a ``Conflict``), and one
  collection runs at a time across every appliance process of the catalog: it holds the
  catalog lock ``LOCK`` (a PostgreSQL advisory lock) and the pool's own flock. The snapshot
  needs no lock shared with captures of other processes (``storage.gc``: writers are listed
  before the catalog is read). A job killed or canceled midway leaves its progress in the
  pool (``storage.gc``): the next one resumes it.
- The scheduler submits one (actor ``scheduler``) when the pool has unfinished work, or when
  images were deleted since the last collection and either ``gc.after_deletions`` of them
  were, or ``gc.every_seconds`` passed since the last one. A scheduled job finds nothing to
  do when nothing was deleted and ends at once; one an operator starts always sweeps.
- Job rows that ended more than ``jobs.keep_days`` days ago are deleted with their log
  (by every ``gc`` job and by the scheduler, hourly). Queued and running jobs never are.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select

from tandem.catalog import queries as q
from tandem.catalog.locks import CatalogLock
from tandem.catalog.models import Job, JobLog, utcnow
from tandem.domain.jobs import ACTIVE, TERMINAL
from tandem.errors import ChoiceInvalid, GcElsewhere, GcRunning, OutOfRange
from tandem.jobs.queue import submit_job
from tandem.jobs.runner import JobContext
from tandem.operations.jobparams import ForceParams
from tandem.operations.site import Site
from tandem.operations.spec import Spec
from tandem.storage import gc as pool_gc

TYPE = "gc"
Params = ForceParams
COLLECTED_KEY = "gc.collected"
"""``GC_DELETED_KEY`` as the last finished collection read it in its snapshot."""
LOCK = "gc"
"""The catalog lock a collection holds: one at a time across the appliance processes."""
LAST_KEY = "gc.last"
"""Unix time the last collection finished."""
SINCE_KEY = "gc.interval_from"
"""Before any collection finished: when the scheduler first found deletions waiting."""

SETTINGS: dict[str, int] = {
    "gc.after_deletions": 100,
    "gc.every_seconds": 86_400,
    "jobs.keep_days": 30,
    "gc.full_every_seconds": int(pool_gc.FULL_EVERY),
}
"""The settings of collection and job retention, and their defaults."""


def _int_setting(site: Site, key: str) -> int:
    with site.catalog.read() as session:
        value = q.get_setting(session, key=key)
    return SETTINGS[key] if value is None else int(value)


def settings(site: Site) -> dict[str, int]:
    return {key: _int_setting(site, key) for key in SETTINGS}


def configure(site: Site, values: dict[str, int | None]) -> dict[str, int]:
    """Change some of ``SETTINGS`` (``None``: leave it); each must be a positive number."""
    for key, value in values.items():
        if key not in SETTINGS:
            raise ChoiceInvalid(what="setting", value=key, choices=", ".join(SETTINGS))
        if value is not None and value <= 0:
            raise OutOfRange(what=key, value=value, allowed="a positive number")
    with site.catalog.begin() as session:
        for key, value in values.items():
            if value is not None:
                q.set_setting(session, key=key, value=str(value))
    return settings(site)


def _counter(site: Site, key: str) -> int:
    with site.catalog.read() as session:
        return int(q.get_setting(session, key=key) or 0)


def pending(site: Site) -> int:
    """Images deleted since the snapshot of the last finished collection."""
    return _counter(site, q.GC_DELETED_KEY) - _counter(site, COLLECTED_KEY)


def active_job(site: Site) -> Job | None:
    with site.catalog.read() as session:
        query = select(Job).where(Job.type == TYPE, Job.status.in_(list(ACTIVE)))
        return session.scalar(query.limit(1))


def status(site: Site) -> dict[str, Any]:
    """What the Monitor and ``tandem gc --status`` show."""
    job = active_job(site)
    last = _counter(site, LAST_KEY)
    return {
        "pending_deletions": pending(site),
        "unfinished": pool_gc.unfinished(site.pool),
        "last_finished": last or None,
        "job": job.id if job is not None else None,
        "settings": settings(site),
    }


def submit_gc(site: Site, *, actor: str | None = None, force: bool = True) -> Job:
    """Queue a collection now (``force``: sweep even if nothing was deleted)."""
    with site.catalog.begin() as session:
        other = session.scalar(
            select(Job).where(Job.type == TYPE, Job.status.in_(list(ACTIVE))).limit(1)
        )
        if other is not None:
            raise GcRunning(job=other.id, status=other.status.value)
        job = submit_job(session, type=TYPE, params=Params(force=force).stored(), actor=actor)
    site.wake()
    return job


def due(site: Site, now: float | None = None) -> bool:
    """Whether the scheduler should start a collection now."""
    if pool_gc.unfinished(site.pool):
        return True
    waiting = pending(site)
    if waiting <= 0:
        return False
    now = time.time() if now is None else now
    every = _int_setting(site, "gc.every_seconds")
    last = _counter(site, LAST_KEY) or _counter(site, SINCE_KEY)
    if not last:
        # Never collected: the interval starts at the first look that finds deletions, not
        # at 1970 (which made a new appliance collect after its very first deletion).
        with site.catalog.begin() as session:
            q.set_setting(session, key=SINCE_KEY, value=str(int(now)))
        last = int(now)
    return waiting >= _int_setting(site, "gc.after_deletions") or now - last >= every


def prune_jobs(site: Site, *, now: datetime | None = None) -> int:
    """Delete the job rows that ended more than ``jobs.keep_days`` ago; how many."""
    cutoff = (now or utcnow()) - timedelta(days=_int_setting(site, "jobs.keep_days"))
    with site.catalog.begin() as session:
        old = select(Job.id).where(Job.finished < cutoff, Job.status.in_(list(TERMINAL)))
        ids = list(session.scalars(old))
        for i in range(0, len(ids), 500):
            batch = ids[i : i + 500]
            session.execute(delete(JobLog).where(JobLog.job_id.in_(batch)))
            session.execute(delete(Job).where(Job.id.in_(batch)))
    return len(ids)


def run_gc(site: Site, ctx: JobContext, params: Params) -> dict[str, Any]:
    """The job handler."""
    force = params.force
    if not force and pending(site) <= 0 and not pool_gc.unfinished(site.pool):
        pruned = prune_jobs(site)
        ctx.set_message(f"nothing deleted since the last collection; {pruned} old job(s) pruned")
        return {"skipped": True, "jobs_pruned": pruned}
    seen: dict[str, int] = {}

    def live() -> list[bytes]:
        # Inside gc_lock: the deletion count and the manifests, in one read.
        with site.catalog.read() as session:
            seen["deleted"] = int(q.get_setting(session, key=q.GC_DELETED_KEY) or 0)
            return [bytes.fromhex(m) for m in q.live_manifests(session)]

    def progress(step: pool_gc.GcProgress) -> None:
        what = {
            "mark": "counting new images' manifests",
            "unmark": "counting down deleted images' manifests",
            "sweep": "sweeping chunks",
            "packs": "sweeping packs",
        }.get(step.phase, step.phase)
        ctx.set_message(f"{what}: {step.done}/{step.total}")

    if pool_gc.unfinished(site.pool):
        ctx.log("resuming the collection a previous run left unfinished")
    started = time.monotonic()
    with CatalogLock(site.catalog, LOCK) as held:
        if not held:
            raise GcElsewhere()
        run = pool_gc.collect(
            site.pool,
            live,
            snapshot_lock=site.gc_lock,
            progress=progress,
            check=ctx.check_canceled,
            full_every=_int_setting(site, "gc.full_every_seconds"),
        )
    with site.catalog.begin() as session:
        collected = int(q.get_setting(session, key=COLLECTED_KEY) or 0)
        q.set_setting(session, key=COLLECTED_KEY, value=str(max(collected, seen["deleted"])))
        q.set_setting(session, key=LAST_KEY, value=str(int(time.time())))
    pruned = prune_jobs(site)
    doc = {
        "full": run.full,
        "chunks_kept": run.chunks_kept,
        "chunks_removed": run.chunks_removed,
        "bytes_freed": run.bytes_freed,
        "manifests_removed": run.manifests_removed,
        "manifests_marked": run.manifests_marked,
        "chunks_marked": run.chunks_marked,
        "manifests_unmarked": run.manifests_unmarked,
        "chunks_dead": run.chunks_dead,
        "resumed": run.resumed,
        "resumed_at_fan": run.resumed_at_fan,
        "packs_deleted": run.packs_deleted,
        "packs_rewritten": run.packs_rewritten,
        "packs_spared": run.packs_spared,
        "orphan_packs_deleted": run.orphans_deleted,
        "seconds": round(time.monotonic() - started, 3),
        "jobs_pruned": pruned,
    }
    ctx.log(
        f"{'full' if run.full else 'incremental'} pool garbage collection: "
        f"{run.manifests_marked} manifest(s) counted, {run.manifests_unmarked} counted down; "
        f"{run.chunks_removed} chunk(s) removed, "
        f"{run.bytes_freed} bytes freed, {run.chunks_kept} kept; "
        f"{run.packs_deleted} pack(s) deleted, {run.packs_rewritten} rewritten, "
        f"{run.orphans_deleted} orphan pack(s) deleted"
        + (f" (resumed at fan-out {run.resumed_at_fan:02x})" if run.resumed else "")
    )
    ctx.set_message(
        f"{run.chunks_removed} chunk(s) removed ({run.bytes_freed} bytes), "
        f"{run.chunks_kept} kept, {run.packs_deleted} pack(s) deleted, "
        f"{run.packs_rewritten} rewritten; {pruned} old job(s) pruned"
    )
    return doc


def submit(site: Site, subject: str, body: None, actor: str | None = None) -> Job:
    """``submit_gc`` from the API's call (it has no body)."""
    return submit_gc(site, actor=actor)


SPEC = Spec(
    name="gc",
    job_type=TYPE,
    params=Params,
    run=run_gc,
    route="POST /gc",
    submit=submit,
    subject="site",
    lifecycle=None,
    endpoint="start_gc",
    tag="jobs",
    summary="Start a garbage collection of the pool now (a ``gc`` job).",
)
