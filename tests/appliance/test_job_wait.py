"""``GET /api/v1/jobs/{id}?wait=S``: the answer comes when the job ends, not a poll later."""

from __future__ import annotations

import threading
import time
from typing import Any

from tandem.jobs.runner import JobContext
from tests.appliance.conftest import Api

HOLD = "test-hold"


def _held_job(api: Api) -> tuple[str, threading.Event]:
    """A running job whose handler returns once the event is set."""
    release = threading.Event()
    started = threading.Event()

    def hold(ctx: JobContext) -> dict[str, Any]:
        started.set()
        release.wait(60)
        return {"held": True}

    runner = api.appliance.runner
    runner.handlers[HOLD] = hold
    runner.start()
    job = runner.submit(HOLD)
    assert started.wait(30), "the held job never started"
    return job.id, release


def test_a_waiting_request_is_answered_when_the_job_ends(api: Api) -> None:
    job_id, release = _held_job(api)
    try:
        # Still running at the end of the wait: answered with the job as it is.
        r = api.client.get(f"/api/v1/jobs/{job_id}", params={"wait": 0.2}, headers=api.headers())
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "running"

        answers: list[dict[str, Any]] = []
        waiter = threading.Thread(
            target=lambda: answers.append(
                api.client.get(
                    f"/api/v1/jobs/{job_id}",
                    params={"wait": 10},
                    headers=api.headers("viewer"),
                    timeout=30,
                ).json()
            )
        )
        t0 = time.monotonic()
        waiter.start()
        release.set()
        waiter.join(30)
        assert answers and answers[0]["status"] == "succeeded"
        # Answered at the job's end, well before the 10 s the request allowed.
        assert time.monotonic() - t0 < 9
    finally:
        release.set()


def test_wait_is_bounded_and_checked(api: Api) -> None:
    job_id, release = _held_job(api)
    try:
        for bad in ("-1", "11", "soon"):
            r = api.client.get(
                f"/api/v1/jobs/{job_id}", params={"wait": bad}, headers=api.headers()
            )
            assert r.status_code == 422, r.text
            assert "wait" in r.text
    finally:
        release.set()
