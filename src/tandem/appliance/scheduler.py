"""The capture schedule: templates' ``--every`` turned into capture jobs.

Invariants
- A managed app whose template has an interval gets a capture job when the interval has
  passed since its newest snapshot *and* since the scheduler last tried; so an app whose
  captures fail is retried once per interval, not in a tight loop, except:
- A capture that failed because its source could not be cut (``CUT_ERRORS``: it changed
  while read, or no point in time could be taken; the job's ``result.error``) is retried
  with backoff, RETRY_FIRST s after it ended, then twice as long after each further such
  failure in a row, never longer than the interval. Each retry is a job of its own, so
  every failure stays in the Monitor. (Only the scheduler's own captures are retried so:
  the catalog is asked only for an app whose last scheduled capture left no snapshot.)
- A newly protected app (no snapshot yet) is captured at the next tick.
- Fair, and no herd: with a ``capacity`` (the runner's worker count), at most that many of
  the scheduler's captures wait in the queue; due apps are submitted most overdue first
  (the earliest ``since + interval``), the rest on later ticks as the queue drains. So no
  app starves another, however many are due, and a backlog after an outage is worked off
  oldest first at the pace of the workers rather than queued all at once; the captures
  then end at different times, which spreads the next round too. While due apps wait for
  room, the scheduler runs again as soon as a job of this process ends (``Site.ended``),
  not a tick later, so the queue never runs dry while the backlog lasts: a tick would cap
  scheduled captures at ``capacity`` per tick.
- The queue's rule of one lifecycle job per app holds for scheduled captures too: while the
  app has a job (a manual capture, a restore), the scheduler skips it and tries next tick.
- A mirrored app whose newest snapshot has not reached the peer gets a replication job
  every MIRROR_RETRY seconds until it has (captures made while the peer was down follow),
  unless it is failed over at the peer (``peer_active``): then none until a failback.
- A failback that could not tell production to resume mirroring (it was unreachable) is
  handed back every MIRROR_RETRY seconds until production answers
  (``failback.deliver_handbacks``).
- Every GC_CHECK seconds it starts a garbage collection job when one is due
  (``operations.gc.due``: images deleted since the last one, past a count or an age, or an
  unfinished one to resume), unless one is queued or running; every hour it deletes the job
  rows past ``jobs.keep_days``.
- One scheduler at a time per catalog: each tick, the scheduler of a process runs only
  while it holds the catalog lock ``LOCK`` (a PostgreSQL advisory lock on a connection of
  its own, taken with ``pg_try_advisory_lock``; process-local on SQLite, where one process
  uses the catalog). The others try again each tick, so when the holder dies (its
  connection, and with it the lock, goes) another takes over within a tick. A new holder
  forgets what it tried before: its decisions come from the catalog.
- Jobs are submitted as actor ``scheduler``. The thread never dies of an error: it logs it
  and tries again at the next tick.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import UTC, datetime

from tandem.catalog import queries as q
from tandem.catalog.locks import CatalogLock
from tandem.catalog.models import Template
from tandem.domain.jobs import JobStatus
from tandem.errors import Conflict, TandemError
from tandem.operations import failback, gc, peers
from tandem.operations.capture import submit_capture
from tandem.operations.replicate import submit_replicate
from tandem.operations.site import Site

log = logging.getLogger(__name__)

ACTOR = "scheduler"
LOCK = "scheduler"
"""The catalog lock the scheduling process holds (one scheduler per catalog)."""
MIRROR_RETRY = float(os.environ.get("TANDEM_MIRROR_RETRY", "30"))
GC_CHECK = float(os.environ.get("TANDEM_GC_CHECK", "60"))
JOB_PRUNE_EVERY = 3600.0
RETRY_FIRST = float(os.environ.get("TANDEM_CAPTURE_RETRY", "5"))
CUT_ERRORS = frozenset({"SourceChanged", "PointInTimeUnavailable"})
"""The error codes of a capture whose source could not be cut: worth trying again soon."""
RECENT_JOBS = 32


def retry_delay(failures: int, every: int) -> float:
    """Seconds to wait after the ``failures``-th cut failure in a row: RETRY_FIRST,
    doubling, capped at the interval ``every``."""
    return min(RETRY_FIRST * 2.0 ** min(max(failures, 1) - 1, 30), float(every))


class Scheduler:
    def __init__(self, site: Site, *, tick: float = 1.0, capacity: int | None = None) -> None:
        self.site = site
        self.tick = tick
        self.capacity = capacity
        """Most scheduled captures left queued at once (None: no bound)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tried: dict[str, float] = {}  # app name -> unix time of the last submission
        self._mirror_tried: dict[str, float] = {}  # app name -> last catch-up replication
        self._handback_tried = 0.0
        self._gc_checked = 0.0
        self._jobs_pruned = 0.0
        self._lock = CatalogLock(site.catalog, LOCK)
        self._leading = False
        self._backlog = False  # due apps were left for want of room at the last run
        self._generation = 0  # ``site.ended`` as the last run began

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the scheduler is already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="tandem-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def leading(self) -> bool:
        """Whether this process's scheduler ran the schedule at its last tick (held ``LOCK``)."""
        return self._leading

    def _lead(self) -> bool:
        """Take (or keep) the schedule's lock; whether this process schedules this tick."""
        was = self._leading
        try:
            now = self._lock.held() or self._lock.try_acquire()
        except Exception:
            log.exception("could not take the scheduler lock; retrying at the next tick")
            now = False
        if now and not was:
            log.info("this appliance process now runs the schedule")
            # Another process may have scheduled meanwhile: start from the catalog afresh.
            self._tried.clear()
            self._mirror_tried.clear()
        elif was and not now:
            log.warning("this appliance process no longer runs the schedule")
        self._leading = now
        return now

    def _loop(self) -> None:
        try:
            while not self._pause():
                try:
                    if self._lead():
                        self.run_due()
                except Exception:
                    log.exception("the capture schedule failed; retrying at the next tick")
        finally:
            self._lock.release()
            self._leading = False

    def _pause(self) -> bool:
        """Wait until the next run: a tick, or with a backlog the next end of a job (which
        makes room in the queue), whichever comes first. Whether the scheduler stops."""
        if self._backlog:
            # A job that ended while the last run went on counts: the wait returns at once.
            self._backlog = False
            self.site.ended.wait(self._generation, self.tick)
            return self._stop.is_set()
        return self._stop.wait(self.tick)

    def run_due(self, now: float | None = None) -> list[str]:
        """Submit the captures that are due; returns the apps they were submitted for."""
        now = time.time() if now is None else now
        self._generation = self.site.ended.generation
        with self.site.catalog.read() as session:
            templates = {t.name: t for t in q.list_templates(session)}
            apps = q.scheduled_apps(session)
        due: list[tuple[float, str, q.ScheduledApp]] = []
        for app in apps:
            template = templates.get(app.template)
            if template is None or not template.every_seconds:
                continue
            last = app.last_capture.timestamp() if app.last_capture else 0.0
            tried = self._tried.get(app.name, 0.0)
            since = max(last, tried)
            if now - since < template.every_seconds and not (
                tried > last  # a scheduled capture has not yielded a snapshot yet
                and self.cut_retry_due(app.name, template.every_seconds, now)
            ):
                continue
            due.append((since + template.every_seconds, app.name, app))
        due.sort(key=lambda d: (d[0], d[1]))  # the most overdue first
        room = self._room()
        submitted = []
        for _, _, app in due:
            if room is not None and room <= 0:
                self._backlog = True
                break  # the rest wait for the queue to drain: the next job end
            try:
                job = submit_capture(self.site, app=app.name, actor=ACTOR)
            except Conflict:
                continue  # the app is busy with another lifecycle job: next tick
            except TandemError as exc:
                self._tried[app.name] = now
                log.warning("scheduled capture of %s refused: %s", app.name, exc.message)
                continue
            self._tried[app.name] = now
            submitted.append(app.name)
            if room is not None:
                room -= 1
            log.info(
                "scheduled capture of %s: job %s at %s",
                app.name,
                job.id,
                datetime.fromtimestamp(now, UTC).isoformat(),
            )
        self.catch_up_mirrors(apps, templates, now)
        if now - self._handback_tried >= MIRROR_RETRY:
            self._handback_tried = now
            for name in failback.deliver_handbacks(self.site):
                log.info("told the peer to resume mirroring %s after its failback", name)
        self.collect_garbage(now)
        return submitted

    def _room(self) -> int | None:
        """How many more captures the scheduler may queue now (None: no bound)."""
        if self.capacity is None:
            return None
        with self.site.catalog.read() as session:
            queued = q.list_jobs(session, status=JobStatus.QUEUED, limit=4 * self.capacity + 8)
        waiting = sum(1 for j in queued if j.type == "capture" and j.actor == ACTOR)
        return self.capacity - waiting

    def cut_retry_due(self, app: str, every: int, now: float) -> bool:
        """Whether ``app``'s newest capture failed for want of a cut, long enough ago
        (``retry_delay``) to try again before the interval."""
        with self.site.catalog.read() as session:
            recent = q.list_jobs(session, app=app, limit=RECENT_JOBS)
        failures, newest = 0, None
        for job in recent:
            if job.type != "capture":
                continue
            if job.status is not JobStatus.FAILED or (job.result or {}).get("error") not in (
                CUT_ERRORS
            ):
                break
            newest = newest or job
            failures += 1
        if newest is None or newest.finished is None:
            return False
        return now - newest.finished.timestamp() >= retry_delay(failures, every)

    def collect_garbage(self, now: float) -> str | None:
        """Start a garbage collection if one is due; the id of the job started."""
        if now - self._jobs_pruned >= JOB_PRUNE_EVERY:
            self._jobs_pruned = now
            pruned = gc.prune_jobs(self.site)
            if pruned:
                log.info("deleted %d job row(s) past the retention", pruned)
        if now - self._gc_checked < GC_CHECK:
            return None
        self._gc_checked = now
        if not gc.due(self.site, now) or gc.active_job(self.site) is not None:
            return None
        try:
            job = gc.submit_gc(self.site, actor=ACTOR, force=False)
        except Conflict:
            return None
        log.info("scheduled garbage collection: job %s", job.id)
        return job.id

    def catch_up_mirrors(
        self, apps: list[q.ScheduledApp], templates: dict[str, Template], now: float
    ) -> None:
        """Queue a replication for mirrored apps whose newest snapshot is not at the peer
        yet (the peer was down, or a replication failed): retried every MIRROR_RETRY s."""
        if peers.the_peer(self.site) is None:
            return
        for app in apps:
            template = templates.get(app.template)
            if template is None or not template.mirror:
                continue
            if app.peer_active:  # failed over at the peer: nothing to send until failback
                continue
            if app.last_capture is None or (
                app.last_replicated is not None and app.last_replicated >= app.last_capture
            ):
                continue
            if now - self._mirror_tried.get(app.name, 0.0) < MIRROR_RETRY:
                continue
            self._mirror_tried[app.name] = now
            try:
                submit_replicate(self.site, app=app.name, actor=ACTOR)
            except TandemError as exc:
                log.warning("catch-up replication of %s refused: %s", app.name, exc.message)
