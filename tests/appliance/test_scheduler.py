"""The capture schedule: due apps get a capture job, busy or failing apps are not hammered."""

from __future__ import annotations

import time

from tandem.appliance.scheduler import Scheduler
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
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with appliance.catalog.read() as session:
                if q.list_jobs(session, app="web"):
                    break
            time.sleep(0.05)
    finally:
        scheduler.stop()
    with appliance.catalog.read() as session:
        assert [j.actor for j in q.list_jobs(session, app="web")] == ["scheduler"]
