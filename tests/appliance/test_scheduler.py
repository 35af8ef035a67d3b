"""The capture schedule: due apps get a capture job, busy or failing apps are not hammered."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from tandem.appliance.scheduler import RETRY_FIRST, Scheduler, retry_delay
from tandem.catalog import queries as q
from tandem.domain.jobs import JobStatus
from tests.appliance.conftest import Booted, seed_app


def test_due_apps_get_one_capture_each(booted: Booted) -> None:
    appliance = booted.appliance
    seed_app(appliance, "web")  # template "daily": every 86400 s, never captured yet
    seed_app(appliance, "idle", managed=False)
    scheduler = Scheduler(appliance.site)
    now = time.time()
    assert scheduler.run_due(now) == ["web"]
    assert scheduler.run_due(now + 1) == []  # the app has a queued job
    with appliance.catalog.begin() as session:
        (job,) = q.list_jobs(session, app="web")
        assert (job.type, job.actor, job.lifecycle) == ("capture", "scheduler", True)
        job.status = JobStatus.FAILED  # as if the capture failed
    # A failed capture is retried after the interval, not at the next tick.
    assert scheduler.run_due(now + 60) == []
    assert scheduler.run_due(now + 86401) == ["web"]


def test_the_scheduler_thread_submits(booted: Booted) -> None:
    appliance = booted.appliance
    seed_app(appliance, "web")
    scheduler = Scheduler(appliance.site, tick=0.05)
    scheduler.start()
    try:
        deadline = time.monotonic() + 30  # a deadline for a failure, not a pace
        while time.monotonic() < deadline:
            with appliance.catalog.read() as session:
                if q.list_jobs(session, app="web"):
                    break
            time.sleep(0.05)
    finally:
        scheduler.stop()
    with appliance.catalog.read() as session:
        assert [j.actor for j in q.list_jobs(session, app="web")] == ["scheduler"]


def fail_newest_capture(booted: Booted, error: str | None, finished: float) -> None:
    """End the app's running or queued capture as failed with ``error`` at ``finished``."""
    with booted.appliance.catalog.begin() as session:
        job = q.list_jobs(session, app="web")[0]
        assert job.status is JobStatus.QUEUED
        job.status = JobStatus.FAILED
        job.result = {"error": error} if error else None
        job.finished = datetime.fromtimestamp(finished, UTC)


def test_a_capture_that_could_not_be_cut_is_retried_with_backoff(booted: Booted) -> None:
    seed_app(booted.appliance, "web")  # every 86400 s
    scheduler = Scheduler(booted.appliance.site)
    start = time.time()
    assert scheduler.run_due(start) == ["web"]
    fail_newest_capture(booted, "SourceChanged", start + 1)
    assert scheduler.run_due(start + 1 + RETRY_FIRST - 0.5) == []
    # (+0.01: the catalog keeps microseconds, which may round the end up.)
    assert scheduler.run_due(start + 1 + RETRY_FIRST + 0.01) == ["web"]  # before the interval
    # The second failure in a row waits twice as long.
    fail_newest_capture(booted, "PointInTimeUnavailable", start + 10)
    assert scheduler.run_due(start + 10 + RETRY_FIRST) == []
    assert scheduler.run_due(start + 10 + 2 * RETRY_FIRST + 0.01) == ["web"]
    with booted.appliance.catalog.read() as session:
        statuses = [j.status for j in q.list_jobs(session, app="web")]
    # Every failure stays in the Monitor, each retry is a job of its own.
    assert statuses == [JobStatus.QUEUED, JobStatus.FAILED, JobStatus.FAILED]


def test_other_capture_failures_wait_for_the_interval(booted: Booted) -> None:
    seed_app(booted.appliance, "web")
    scheduler = Scheduler(booted.appliance.site)
    start = time.time()
    assert scheduler.run_due(start) == ["web"]
    fail_newest_capture(booted, "Unreachable", start + 1)
    assert scheduler.run_due(start + 3600) == []
    assert scheduler.run_due(start + 86401) == ["web"]


def test_the_backoff_doubles_and_is_capped_at_the_interval() -> None:
    assert [retry_delay(n, 3600) for n in (1, 2, 3)] == [
        RETRY_FIRST,
        2 * RETRY_FIRST,
        4 * RETRY_FIRST,
    ]
    assert retry_delay(50, 60) == 60
    assert retry_delay(1000, 86400) == 86400
