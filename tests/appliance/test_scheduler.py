"""The capture schedule: due apps get a capture job, busy or failing apps are not hammered."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tandem.appliance.daemon import Appliance, init
from tandem.appliance.scheduler import RETRY_FIRST, Scheduler, retry_delay
from tandem.catalog import queries as q
from tandem.domain.jobs import JobStatus
from tandem.errors import InvalidInput
from tests.appliance.conftest import Booted, seed_app
from tests.appliance.live import free_port


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


def overdue(booted: Booted, app: str, by: float, every: float, now: float) -> None:
    """Make ``app``'s newest snapshot ``every + by`` seconds old at ``now``."""
    with booted.appliance.catalog.begin() as session:
        q.get_app(session, name=app).last_capture = datetime.fromtimestamp(now - every - by, UTC)


def finish_queued(booted: Booted, at: float) -> list[str]:
    """End every queued capture as a success at ``at`` (the app's newest snapshot then)."""
    with booted.appliance.catalog.begin() as session:
        done = []
        for job in q.list_jobs(session, status=JobStatus.QUEUED):
            job.status = JobStatus.SUCCEEDED
            q.get_app(session, name=job.app or "").last_capture = datetime.fromtimestamp(at, UTC)
            done.append(job.app or "")
    return sorted(done)


def test_after_an_outage_captures_queue_most_overdue_first_never_past_the_workers(
    booted: Booted,
) -> None:
    """Six apps overdue by different amounts and an app captured every minute: with two
    workers, two captures wait at a time, the most overdue first; the frequent app does not
    get ahead of the others however often it is due."""
    appliance = booted.appliance
    now = time.time()
    with appliance.catalog.begin() as session:
        q.add_template(session, name="minutely", every_seconds=60)
    names = [f"app{i}" for i in range(6)]
    for i, name in enumerate(names):
        seed_app(appliance, name)
        overdue(booted, name, 3600 * (i + 1), 86400, now)  # app5 the most overdue
    seed_app(appliance, "chatty", template="minutely")
    overdue(booted, "chatty", 1, 60, now)
    scheduler = Scheduler(appliance.site, capacity=2)
    assert scheduler.run_due(now) == ["app5", "app4"]
    assert scheduler.run_due(now + 1) == []  # two wait already: the rest wait their turn
    assert finish_queued(booted, now + 2) == ["app4", "app5"]
    assert scheduler.run_due(now + 3) == ["app3", "app2"]
    assert finish_queued(booted, now + 4) == ["app2", "app3"]
    # chatty is due again and again, but later than app1 and app0: they go first
    assert scheduler.run_due(now + 100) == ["app1", "app0"]
    assert finish_queued(booted, now + 101) == ["app0", "app1"]
    assert scheduler.run_due(now + 102) == ["chatty"]
    # each app was captured once; none is due again before its interval
    assert finish_queued(booted, now + 103) == ["chatty"]
    assert scheduler.run_due(now + 104) == []


def test_with_a_backlog_the_next_capture_is_queued_when_a_job_ends_not_a_tick_later(
    booted: Booted,
) -> None:
    """Room in the queue is made by a job's end: with due apps waiting, the scheduler looks
    again then (a tick of an hour here would otherwise hold the second app an hour)."""
    appliance = booted.appliance
    seed_app(appliance, "first")
    seed_app(appliance, "second")
    scheduler = Scheduler(appliance.site, tick=3600, capacity=1)
    assert scheduler.run_due() == ["first"]  # "second" waits for room
    scheduler.start()
    try:
        finish_queued(booted, time.time())
        appliance.site.ended.notify()  # what the runner does once a job's end is committed
        deadline = time.monotonic() + 30  # a deadline for a failure, not a pace
        while time.monotonic() < deadline:
            with appliance.catalog.read() as session:
                if q.list_jobs(session, app="second"):
                    break
            time.sleep(0.05)
    finally:
        scheduler.stop()
    with appliance.catalog.read() as session:
        assert [j.actor for j in q.list_jobs(session, app="second")] == ["scheduler"]


def test_the_worker_count_is_set_per_appliance(tmp_path: Path) -> None:
    directory = tmp_path / "appliance"
    init(directory, "site-w", f"127.0.0.1:{free_port()}", None, workers=3)
    appliance = Appliance(directory)
    try:
        assert appliance.runner.workers == 3 and appliance.scheduler.capacity == 3
    finally:
        appliance.catalog.close()
    with pytest.raises(InvalidInput, match="Give 1 to 64"):
        init(tmp_path / "other", "site-x", f"127.0.0.1:{free_port()}", None, workers=0)
    assert not (tmp_path / "other" / "config.json").exists()


def test_a_mirrored_app_whose_newest_snapshot_is_not_at_the_peer_gets_a_replication(
    booted: Booted,
) -> None:
    """Captures made while the peer was down follow: a replication every MIRROR_RETRY s
    until the peer has the newest snapshot, none while the app is failed over at the peer."""
    from tandem.appliance.scheduler import MIRROR_RETRY

    appliance = booted.appliance
    seed_app(appliance, "web", template="mirrored")
    seed_app(appliance, "other", template="mirrored")
    taken = datetime.now(UTC)
    with appliance.catalog.begin() as session:
        template = next(t for t in q.list_templates(session) if t.name == "mirrored")
        template.mirror, template.every_seconds = True, None
        q.add_peer(session, name="dr", url="https://127.0.0.1:1", token="t", fingerprint="00" * 32)
        for name in ("web", "other"):
            q.get_app(session, name=name).last_capture = taken
        q.get_app(session, name="other").last_replicated = taken  # the peer has it
    scheduler = Scheduler(appliance.site)
    now = time.time()

    def replications() -> list[str]:
        with appliance.catalog.read() as session:
            return [j.app or "" for j in q.list_jobs(session) if j.type == "replicate"]

    scheduler.run_due(now)
    assert replications() == ["web"]
    with appliance.catalog.begin() as session:
        for job in q.list_jobs(session):
            job.status = JobStatus.FAILED  # the peer was unreachable
    scheduler.run_due(now + 1)
    assert replications() == ["web"]  # not again before MIRROR_RETRY
    scheduler.run_due(now + MIRROR_RETRY + 1)
    assert replications() == ["web", "web"]
    with appliance.catalog.begin() as session:
        for job in q.list_jobs(session):
            job.status = JobStatus.FAILED
        q.get_app(session, name="web").peer_active = True  # failed over at the peer
    scheduler.run_due(now + 3 * MIRROR_RETRY)
    assert len(replications()) == 2
