"""The job runner: worker threads that claim queued jobs and run their handlers.

Invariants
- A handler is ``Callable[[JobContext], dict | None]``; what it returns is the job's result.
  It ends the job: returning → ``succeeded``; raising ``JobCanceled`` → ``canceled``; raising
  another ``TandemError`` → ``failed`` with that error's message; raising anything else →
  ``failed`` with "internal error: ..." and the traceback in the job log.
- Progress is written at most every ``flush_interval`` seconds (and when the job ends), so a
  handler may report per chunk. Every write also tells the context whether cancellation was
  requested; the heartbeat thread does too, for handlers that report rarely.
- ``idle_workers`` counts the workers that found nothing to claim and wait for a job to be
  queued (``wake()`` or the next poll): monitoring reads it, and so does anything that
  must know the runner has caught up.
- With several runners (``exclusive`` false) the heartbeat thread also recovers, at each
  beat, the jobs whose heartbeat is older than ``stale_after``: a vanished runner's jobs
  are recovered within ``stale_after`` plus one beat, by whichever runner looks first
  (once: ``recover_jobs``). At start it also recovers at once the jobs of runners of the
  same machine and pid namespace whose process is gone (``dead_local_runners``).
- ``ended`` (a ``JobSignal``) is notified after every job's end is committed, so a caller
  waiting for a job (the API's ``GET /jobs/{id}?wait=S``) answers at once instead of
  polling. It covers this runner's jobs only: a waiter also re-reads the catalog now and
  then, for jobs that other runners end.
- The runner needs no asyncio: it runs in its own threads beside uvicorn. ``start()`` first
  recovers jobs left running by a previous run (``tandem.jobs.queue.recover_jobs``);
  ``stop()`` asks running handlers to stop (``check_canceled()`` raises) and treats the jobs
  they abandon as interrupted: re-queued when resumable, failed otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import secrets
import socket
import threading
import time
import traceback
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tandem.catalog.db import Catalog
from tandem.catalog.models import Job
from tandem.catalog.queries import add_job_log, get_job
from tandem.domain.ids import new_id
from tandem.domain.jobs import TERMINAL, JobStatus
from tandem.errors import CatalogUnavailable, JobCanceled, TandemError
from tandem.jobs.queue import (
    CANCELED_MESSAGE,
    claim_next,
    finish_job,
    heartbeat,
    interrupt_job,
    recover_jobs,
    release_job,
    running_runners,
    submit_job,
    update_progress,
)

log = logging.getLogger(__name__)

RECORD_RETRY_MAX = 5.0
"""Longest pause, in seconds, between two tries to record a job's end in an absent catalog."""

Handler = Callable[["JobContext"], Mapping[str, Any] | None]


@dataclass(frozen=True)
class JobInfo:
    """What a handler knows of its job: a snapshot of the row when it was claimed."""

    id: str
    type: str
    app: str | None
    image: str | None
    params: Mapping[str, Any] = field(default_factory=dict)
    attempts: int = 1
    actor: str | None = None
    created: datetime | None = None

    @classmethod
    def from_row(cls, job: Job) -> JobInfo:
        return cls(
            id=job.id,
            type=job.type,
            app=job.app,
            image=job.image,
            params=dict(job.params or {}),
            attempts=job.attempts,
            actor=job.actor,
            created=job.created,
        )


class JobContext:
    """The handle a handler gets: its job, progress reporting, logging, cancellation.

    Thread-safe: a handler may report from several threads of its own.
    """

    def __init__(self, catalog: Catalog, job: JobInfo, *, flush_interval: float = 0.5) -> None:
        self.catalog = catalog
        self.job = job
        self.flush_interval = flush_interval
        self._lock = threading.Lock()
        self._cancel = threading.Event()  # the operator asked (seen in the catalog)
        self._stop = threading.Event()  # the runner is stopping
        self._done: int | None = None
        self._total: int | None = None
        self._sent = 0
        self._sent_dirty = False
        self._message: str | None = None
        self._image: str | None = None
        self._dirty = False
        self._last_flush = 0.0

    # -- reporting ------------------------------------------------------------------------

    def progress(self, done: int, total: int | None = None) -> None:
        """Bytes done so far (absolute), and the total when known."""
        with self._lock:
            self._done = done
            if total is not None:
                self._total = total
            self._dirty = True
        self._maybe_flush()

    def add_sent(self, n: int) -> None:
        """Count ``n`` more bytes that crossed between machines."""
        with self._lock:
            self._sent += n
            self._sent_dirty = True
            self._dirty = True
        self._maybe_flush()

    def set_message(self, text: str) -> None:
        """The job's one-line status (shown while it runs, kept when it succeeds)."""
        with self._lock:
            self._message = text
            self._dirty = True
        self._maybe_flush()

    def set_image(self, image_id: str) -> None:
        """Name the image this job produces or works on (the job JSON's ``image``)."""
        with self._lock:
            self._image = image_id
            self._dirty = True
        self.flush()

    def log(self, text: str, level: str = "info") -> None:
        """Append a line to the job's log (written at once)."""
        with self.catalog.begin() as session:
            add_job_log(session, job_id=self.job.id, text=text, level=level)

    @property
    def message(self) -> str | None:
        return self._message

    # -- cancellation ---------------------------------------------------------------------

    @property
    def cancel_requested(self) -> bool:
        """Whether the operator asked to cancel the job."""
        return self._cancel.is_set()

    @property
    def stopping(self) -> bool:
        """Whether the runner is stopping (the appliance shuts down)."""
        return self._stop.is_set()

    def check_canceled(self) -> None:
        """Raise ``JobCanceled`` if the job was canceled or the runner stops; call it often."""
        self._maybe_flush(poll=True)
        if self._cancel.is_set() or self._stop.is_set():
            raise JobCanceled(job=self.job.id)

    # -- persistence ----------------------------------------------------------------------

    def _maybe_flush(self, *, poll: bool = False) -> None:
        if time.monotonic() - self._last_flush >= self.flush_interval and (self._dirty or poll):
            try:
                self.flush()
            except CatalogUnavailable as exc:
                # Progress is advisory: the job goes on through a short catalog outage (the
                # writes it must make fail on their own), and the next flush catches up.
                with self._lock:
                    self._dirty = True
                    self._sent_dirty = self._sent_dirty or self._sent > 0
                log.warning("job %s: progress not recorded: %s", self.job.id, exc.message)

    def flush(self) -> None:
        """Write pending progress now and learn whether cancellation was requested."""
        with self._lock:
            done, total, message, image = self._done, self._total, self._message, self._image
            sent = self._sent if self._sent_dirty else None
            self._dirty = False
            self._last_flush = time.monotonic()
        with self.catalog.begin() as session:
            canceled = update_progress(
                session,
                job_id=self.job.id,
                bytes_done=done,
                bytes_total=total,
                bytes_sent=sent,
                message=message,
                image=image,
            )
        if canceled:
            self._cancel.set()


class JobSignal:
    """A counter of job ends that waiters can block on.

    Read ``generation`` *before* reading a job's row; ``wait(generation, timeout)`` then
    returns as soon as any job ended after that read (no end is missed in between)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    @property
    def generation(self) -> int:
        with self._cond:
            return self._generation

    def notify(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait(self, generation: int, timeout: float) -> bool:
        """Block until a job ends after ``generation`` was read, or ``timeout`` seconds;
        returns whether one did."""
        with self._cond:
            return self._cond.wait_for(lambda: self._generation != generation, timeout)


@functools.cache
def _pid_namespace() -> str:
    """8 hex digits naming this kernel boot and pid namespace: two processes with the same
    tag can tell by pid whether the other is alive. Where that cannot be known (no /proc),
    a tag of this process alone, so that no other process is ever judged dead by pid."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return secrets.token_hex(4)
    return hashlib.blake2b(f"{boot}|{namespace}".encode(), digest_size=4).hexdigest()


def default_runner_id() -> str:
    """A runner id unique to this process: host name, pid namespace, pid, a random part."""
    host = socket.gethostname()[:32]
    return f"{host}-{_pid_namespace()}-{os.getpid()}-{new_id('r')[2:8]}"


def dead_local_runners(runner_ids: Collection[str]) -> list[str]:
    """The runners among ``runner_ids`` that ran in this pid namespace (see
    ``default_runner_id``) and whose process is gone: their jobs need no heartbeat timeout."""
    here = _pid_namespace()
    dead = []
    for runner in runner_ids:
        parts = runner.rsplit("-", 3)
        if len(parts) != 4 or parts[1] != here or not parts[2].isdigit():
            continue
        pid = int(parts[2])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            dead.append(runner)
        except PermissionError:
            continue  # alive, someone else's
    return dead


class JobRunner:
    """Runs queued jobs of the catalog in ``workers`` threads.

    ``exclusive`` (the default) says this is the only runner of the catalog: at start-up every
    job still marked running is an orphan. With several runners (PostgreSQL scale-out) set it
    false: only jobs whose heartbeat is older than ``stale_after`` are recovered, at start and
    periodically.
    """

    def __init__(
        self,
        catalog: Catalog,
        handlers: Mapping[str, Handler],
        workers: int = 2,
        *,
        resumable: Collection[str] = frozenset(),
        runner_id: str | None = None,
        poll_interval: float = 1.0,
        heartbeat_interval: float = 5.0,
        flush_interval: float = 0.5,
        exclusive: bool = True,
        stale_after: float | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("a job runner needs at least one worker")
        self.catalog = catalog
        self.handlers = dict(handlers)
        self.workers = workers
        self.resumable = frozenset(resumable)
        self.runner_id = runner_id or default_runner_id()
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.flush_interval = flush_interval
        self.exclusive = exclusive
        self.stale_after = stale_after if stale_after is not None else 6 * heartbeat_interval
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._active: dict[str, JobContext] = {}
        self._active_lock = threading.Lock()
        self._idle = 0  # workers waiting for a job; under _active_lock
        self._threads: list[threading.Thread] = []
        self.ended = JobSignal()

    # -- control --------------------------------------------------------------------------

    def start(self) -> None:
        """Recover orphaned jobs, then start the worker and heartbeat threads."""
        if self._threads:
            raise RuntimeError("the job runner is already started")
        self._stopping.clear()
        self.recover(starting=True)
        for n in range(self.workers):
            self._threads.append(
                threading.Thread(target=self._work, name=f"tandem-job-{n}", daemon=True)
            )
        self._threads.append(threading.Thread(target=self._beat, name="tandem-job-hb", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop claiming, ask running handlers to stop, wait up to ``timeout`` seconds.

        Returns whether every thread ended; a handler still running then keeps its job marked
        running, and the next start-up recovers it.
        """
        self._stopping.set()
        self._wake.set()
        with self._active_lock:
            for ctx in self._active.values():
                ctx._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t for t in self._threads if t.is_alive()]
        self._threads = alive
        return not alive

    def __enter__(self) -> JobRunner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def idle_workers(self) -> int:
        """How many workers found no job to claim and now wait for one to be queued."""
        with self._active_lock:
            return self._idle

    def wake(self) -> None:
        """Tell idle workers a job was queued (call it after the submitting commit)."""
        self._wake.set()

    def recover(self, *, starting: bool = False) -> list[str]:
        """Recover jobs left running by a runner that is gone; return their ids.

        Exclusive: every running job. Otherwise the jobs whose heartbeat is ``stale_after``
        old, and when ``starting`` also those of runners of this machine whose process is
        gone (a restarted appliance need not wait out the heartbeat timeout)."""
        stale = None if self.exclusive else self.stale_after
        ids: list[str] = []
        with self.catalog.begin() as session:
            if starting and not self.exclusive:
                dead = dead_local_runners(running_runners(session))
                if dead:
                    jobs = recover_jobs(
                        session, self.runner_id, runners=dead, resumable=self.resumable
                    )
                    ids.extend(job.id for job in jobs)
            jobs = recover_jobs(
                session, self.runner_id, stale_after=stale, resumable=self.resumable
            )
            ids.extend(job.id for job in jobs)
        if ids:
            log.warning("recovered %d interrupted job(s): %s", len(ids), ", ".join(ids))
            self.wake()
        return ids

    # -- conveniences ---------------------------------------------------------------------

    def submit(
        self,
        type: str,
        *,
        app: str | None = None,
        params: Mapping[str, Any] | None = None,
        lifecycle: bool = False,
        image: str | None = None,
        actor: str | None = None,
    ) -> Job:
        """Queue a job in its own transaction and wake a worker."""
        with self.catalog.begin() as session:
            job = submit_job(
                session,
                type=type,
                app=app,
                params=params,
                lifecycle=lifecycle,
                image=image,
                actor=actor,
            )
        self.wake()
        return job

    def wait(self, job_id: str, timeout: float = 60.0, interval: float = 0.05) -> Job:
        """Poll until the job ends; return its row. Raises ``TimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            with self.catalog.read() as session:
                job = get_job(session, job_id=job_id)
            if job.status in TERMINAL:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.status.value} after {timeout} s")
            time.sleep(interval)

    # -- threads --------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stopping.is_set():
            # Clear before claiming: a submit after this point sets it and the wait below
            # returns at once, so no wake-up is lost.
            self._wake.clear()
            try:
                with self.catalog.begin() as session:
                    row = claim_next(session, self.runner_id, types=self.handlers)
                    info = JobInfo.from_row(row) if row is not None else None
            except Exception:
                log.exception("claiming a job failed; retrying")
                self._stopping.wait(self.poll_interval)
                continue
            if info is None:
                with self._active_lock:
                    self._idle += 1
                try:
                    self._wake.wait(self.poll_interval)
                finally:
                    with self._active_lock:
                        self._idle -= 1
                continue
            self._run(info)

    def _run(self, info: JobInfo) -> None:
        ctx = JobContext(self.catalog, info, flush_interval=self.flush_interval)
        with self._active_lock:
            stopping = self._stopping.is_set()
            if not stopping:
                self._active[info.id] = ctx
        if stopping:
            # Claimed while stop() ran: the handler never started, so give the job back.
            with self.catalog.begin() as session:
                release_job(session, job_id=info.id, runner_id=self.runner_id)
            return
        try:
            self._execute(ctx)
        except Exception:
            # The catalog could not record the outcome: the job stays running and the next
            # start-up (or a peer runner) recovers it.
            log.exception("recording the end of job %s failed", info.id)
        finally:
            with self._active_lock:
                self._active.pop(info.id, None)

    def _execute(self, ctx: JobContext) -> None:
        info = ctx.job
        handler = self.handlers[info.type]
        try:
            result = handler(ctx)
        except JobCanceled as exc:
            if ctx.stopping and not ctx.cancel_requested:
                ctx.flush()
                with self.catalog.begin() as session:
                    interrupt_job(
                        session,
                        get_job(session, job_id=info.id),
                        runner_id=self.runner_id,
                        resumable=info.type in self.resumable,
                    )
                self.ended.notify()
                return
            message = CANCELED_MESSAGE if ctx.cancel_requested else exc.message
            self._finish(ctx, JobStatus.CANCELED, message)
        except TandemError as exc:
            self._finish(ctx, JobStatus.FAILED, exc.message, {"error": exc.code})
        except Exception as exc:
            self._recorded(ctx, lambda: ctx.log(traceback.format_exc(), level="error"))
            self._finish(ctx, JobStatus.FAILED, f"internal error: {type(exc).__name__}: {exc}")
        else:
            self._finish(ctx, JobStatus.SUCCEEDED, ctx.message or "done", result)

    def _finish(
        self,
        ctx: JobContext,
        status: JobStatus,
        message: str,
        result: Mapping[str, Any] | None = None,
    ) -> None:
        def write() -> None:
            ctx.flush()
            with self.catalog.begin() as session:
                finish_job(
                    session, job_id=ctx.job.id, status=status, message=message, result=result
                )

        self._recorded(ctx, write)
        self.ended.notify()

    def _recorded(self, ctx: JobContext, write: Callable[[], None]) -> None:
        """Run ``write`` until the catalog takes it: a job's outcome is known here and
        nowhere else, so an outage of the catalog delays it rather than leaving the job
        "running" until the next start-up. Gives up only when the runner stops (the job is
        then recovered as interrupted at the next start)."""
        delay = 0.2
        while True:
            try:
                write()
                return
            except CatalogUnavailable as exc:
                if self._stopping.is_set():
                    raise
                log.warning("job %s: %s; retrying in %.1f s", ctx.job.id, exc.message, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, RECORD_RETRY_MAX)

    def _beat(self) -> None:
        while not self._stopping.wait(self.heartbeat_interval):
            with self._active_lock:
                contexts = dict(self._active)
            try:
                if contexts:
                    with self.catalog.begin() as session:
                        flags = heartbeat(session, runner_id=self.runner_id, job_ids=contexts)
                    for job_id, canceled in flags.items():
                        if canceled:
                            contexts[job_id]._cancel.set()
                if not self.exclusive:
                    self.recover()  # only jobs already stale_after old: cheap, and prompt
            except Exception:
                log.exception("job heartbeat failed; retrying")
