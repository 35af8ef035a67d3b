"""The job runner: handlers run in threads, report progress, fail, cancel, stop, recover."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any

import pytest

from tandem.catalog import Catalog
from tandem.catalog import queries as q
from tandem.catalog.models import utcnow
from tandem.domain.jobs import JobStatus
from tandem.errors import Conflict, SourceUnreadable
from tandem.jobs.queue import INTERRUPTED_MESSAGE, cancel_job, claim_next, submit_job
from tandem.jobs.runner import Handler, JobContext, JobRunner


@pytest.fixture
def make_runner(catalog: Catalog) -> Iterator[Any]:
    runners: list[JobRunner] = []

    def make(handlers: Mapping[str, Handler], **kw: Any) -> JobRunner:
        kw.setdefault("poll_interval", 0.05)
        kw.setdefault("heartbeat_interval", 0.05)
        kw.setdefault("flush_interval", 0.0)
        runner = JobRunner(catalog, handlers, **kw)
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        assert runner.stop(timeout=10)


def _wait_until(predicate: Any, timeout: float = 30.0) -> None:
    """Poll for a state; the deadline only bounds a failure."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _status(catalog: Catalog, job_id: str) -> JobStatus:
    with catalog.read() as session:
        return q.get_job(session, job_id=job_id).status


def test_runner_executes_a_handler_and_records_progress(catalog: Catalog, make_runner: Any) -> None:
    seen: list[Mapping[str, Any]] = []

    def capture(ctx: JobContext) -> dict[str, Any]:
        seen.append(ctx.job.params)
        ctx.set_message("reading /srv")
        for done in range(0, 101, 25):
            ctx.progress(done, 100)
            ctx.add_sent(10)
            ctx.check_canceled()
        ctx.log("captured 100 bytes")
        ctx.set_image("img_aaaaaaaaaaaa")
        return {"image": "img_aaaaaaaaaaaa"}

    runner = make_runner({"capture": capture})
    runner.start()
    job = runner.submit("capture", app="db", params={"path": "/srv"}, lifecycle=True)
    done = runner.wait(job.id, timeout=10)
    assert done.status is JobStatus.SUCCEEDED, done.message
    assert (done.bytes_done, done.bytes_total, done.bytes_sent) == (100, 100, 50)
    assert done.message == "reading /srv"
    assert done.result == {"image": "img_aaaaaaaaaaaa"}
    assert done.image == "img_aaaaaaaaaaaa"
    assert done.runner == runner.runner_id
    assert seen == [{"path": "/srv"}]
    with catalog.read() as session:
        assert [line.text for line in q.list_job_log(session, job_id=job.id)] == [
            "captured 100 bytes"
        ]


def test_tandem_error_fails_the_job_with_its_message(catalog: Catalog, make_runner: Any) -> None:
    def capture(ctx: JobContext) -> None:
        raise SourceUnreadable(path="/srv", reason="permission denied")

    runner = make_runner({"capture": capture})
    runner.start()
    done = runner.wait(runner.submit("capture", app="db").id)
    assert done.status is JobStatus.FAILED
    assert done.message == (
        "Cannot read the source /srv: permission denied. Check that it exists and is readable."
    )


def test_unexpected_error_is_an_internal_error_with_traceback(
    catalog: Catalog, make_runner: Any
) -> None:
    def capture(ctx: JobContext) -> None:
        raise ValueError("boom")

    runner = make_runner({"capture": capture})
    runner.start()
    done = runner.wait(runner.submit("capture", app="db").id)
    assert done.status is JobStatus.FAILED
    assert done.message == "internal error: ValueError: boom"
    with catalog.read() as session:
        (line,) = q.list_job_log(session, job_id=done.id)
    assert line.level == "error"
    assert "Traceback" in line.text and "raise ValueError" in line.text


def test_cancel_a_running_job(catalog: Catalog, make_runner: Any) -> None:
    started = threading.Event()

    def replicate(ctx: JobContext) -> None:
        started.set()
        while True:
            ctx.check_canceled()
            time.sleep(0.01)

    runner = make_runner({"replicate": replicate})
    runner.start()
    job = runner.submit("replicate", app="db", lifecycle=True)
    assert started.wait(10)
    with pytest.raises(Conflict), catalog.begin() as session:
        submit_job(session, type="failover", app="db", lifecycle=True)
    with catalog.begin() as session:
        cancel_job(session, job_id=job.id, actor="alice")
    done = runner.wait(job.id)
    assert done.status is JobStatus.CANCELED
    assert done.message == "canceled by the operator"


def test_heartbeat_tells_a_quiet_handler_about_cancellation(
    catalog: Catalog, make_runner: Any
) -> None:
    """A handler that never reports still learns of a cancel through the heartbeat."""
    started = threading.Event()

    def quiet(ctx: JobContext) -> None:
        started.set()
        _wait_until(lambda: ctx.cancel_requested)

    runner = make_runner({"quiet": quiet}, flush_interval=3600)
    runner.start()
    job = runner.submit("quiet")
    assert started.wait(10)
    with catalog.begin() as session:
        cancel_job(session, job_id=job.id)
    assert runner.wait(job.id).status is JobStatus.SUCCEEDED  # it chose to return normally


def test_workers_run_jobs_in_parallel(catalog: Catalog, make_runner: Any) -> None:
    barrier = threading.Barrier(2, timeout=10)

    def mount(ctx: JobContext) -> None:
        barrier.wait()  # only returns if both jobs run at the same time

    runner = make_runner({"mount": mount}, workers=2)
    runner.start()
    jobs = [runner.submit("mount", app="db"), runner.submit("mount", app="db")]
    for job in jobs:
        assert runner.wait(job.id).status is JobStatus.SUCCEEDED


def test_submit_wakes_an_idle_worker(catalog: Catalog, make_runner: Any) -> None:
    runner = make_runner({"noop": lambda ctx: None}, poll_interval=3600, workers=2)
    assert runner.idle_workers == 0
    runner.start()
    _wait_until(lambda: runner.idle_workers == 2)  # both found nothing: they wait an hour
    job = runner.submit("noop")
    # Only a wake-up makes it run within the hour.
    assert runner.wait(job.id, timeout=30).status is JobStatus.SUCCEEDED
    _wait_until(lambda: runner.idle_workers == 2)  # and they wait again


def test_start_recovers_orphaned_jobs(catalog: Catalog, make_runner: Any) -> None:
    with catalog.begin() as session:
        orphan = submit_job(session, type="failover", app="db", lifecycle=True)
        resumable = submit_job(session, type="replicate", app="web")
    for _ in range(2):
        with catalog.begin() as session:
            assert claim_next(session, "crashed-runner") is not None
    ran: list[str] = []
    runner = make_runner(
        {"failover": lambda ctx: ran.append(ctx.job.id), "replicate": lambda ctx: ran.append("r")},
        resumable={"replicate"},
    )
    runner.start()
    assert runner.wait(resumable.id).status is JobStatus.SUCCEEDED
    failed = runner.wait(orphan.id)
    assert (failed.status, failed.message) == (JobStatus.FAILED, INTERRUPTED_MESSAGE)
    assert ran == ["r"]


@pytest.mark.parametrize("resumable", [False, True])
def test_stop_interrupts_running_jobs(catalog: Catalog, make_runner: Any, resumable: bool) -> None:
    started = threading.Event()

    def replicate(ctx: JobContext) -> None:
        started.set()
        while True:
            ctx.check_canceled()
            time.sleep(0.01)

    kinds = {"replicate"} if resumable else set()
    runner = make_runner({"replicate": replicate}, resumable=kinds)
    runner.start()
    job = runner.submit("replicate", app="db", lifecycle=True)
    assert started.wait(10)
    assert runner.stop(timeout=10)
    with catalog.read() as session:
        row = q.get_job(session, job_id=job.id)
    if resumable:
        assert row.status is JobStatus.QUEUED
        # The next runner picks it up again.
        again = make_runner({"replicate": lambda ctx: {"attempt": ctx.job.attempts}})
        again.start()
        done = again.wait(job.id)
        assert (done.status, done.result) == (JobStatus.SUCCEEDED, {"attempt": 2})
    else:
        assert (row.status, row.message) == (JobStatus.FAILED, INTERRUPTED_MESSAGE)


def test_only_registered_types_are_claimed(catalog: Catalog, make_runner: Any) -> None:
    runner = make_runner({"capture": lambda ctx: None})
    runner.start()
    other = runner.submit("restore", app="db")
    mine = runner.submit("capture", app="web")
    assert runner.wait(mine.id).status is JobStatus.SUCCEEDED
    assert _status(catalog, other.id) is JobStatus.QUEUED


def test_shared_catalog_runner_recovers_stale_jobs_periodically(
    catalog: Catalog, make_runner: Any
) -> None:
    """With several runners, a job is recovered only once its runner stopped heartbeating."""
    with catalog.begin() as session:
        job = submit_job(session, type="capture", app="db")
        assert claim_next(session, "vanished-runner") is not None
    runner = make_runner({"other": lambda ctx: None}, exclusive=False, stale_after=600)
    runner.start()
    assert _status(catalog, job.id) is JobStatus.RUNNING  # fresh at start-up: left alone
    # The other runner is gone: its heartbeat grows old while this one runs.
    with catalog.begin() as session:
        row = q.get_job(session, job_id=job.id)
        row.heartbeat = utcnow() - timedelta(seconds=3600)
    failed = runner.wait(job.id, timeout=30)
    assert (failed.status, failed.message) == (JobStatus.FAILED, INTERRUPTED_MESSAGE)


def test_a_restarted_runner_recovers_at_once_the_jobs_of_its_dead_local_process(
    catalog: Catalog, make_runner: Any
) -> None:
    """On a shared catalog a job is an orphan at start-up only if its runner is gone: a
    runner of this machine whose process has exited (no heartbeat timeout to wait for),
    never one that is alive, nor one of another machine."""
    import subprocess
    import sys

    from tandem.jobs.runner import dead_local_runners, default_runner_id

    exited = subprocess.run(
        [sys.executable, "-c", "from tandem.jobs.runner import default_runner_id as r; print(r())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    alive = default_runner_id()  # this very process
    elsewhere = "otherhost-0badf00d-1-abcdef"
    assert dead_local_runners([exited, alive, elsewhere, "r1"]) == [exited]
    jobs = {}
    with catalog.begin() as session:
        for runner_id, app in ((exited, "a"), (alive, "b"), (elsewhere, "c")):
            jobs[runner_id] = submit_job(session, type="capture", app=app).id
            claimed = claim_next(session, runner_id)
            assert claimed is not None and claimed.id == jobs[runner_id]
    make_runner({"other": lambda ctx: None}, exclusive=False, stale_after=600).start()
    assert _status(catalog, jobs[exited]) is JobStatus.FAILED
    assert _status(catalog, jobs[alive]) is JobStatus.RUNNING
    assert _status(catalog, jobs[elsewhere]) is JobStatus.RUNNING
    with catalog.read() as session:
        lines = [entry.text for entry in q.list_job_log(session, job_id=jobs[exited])]
    assert any(f"its runner {exited} stopped" in line for line in lines)
