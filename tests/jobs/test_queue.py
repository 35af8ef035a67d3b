"""The persistent job queue: exclusivity, atomic claims, cancellation, recovery."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from tandem.catalog import Catalog
from tandem.catalog import queries as q
from tandem.catalog.models import Job, utcnow
from tandem.domain.jobs import JobStatus
from tandem.errors import Conflict, InvalidInput, JobEnded
from tandem.jobs.queue import (
    INTERRUPTED_MESSAGE,
    cancel_job,
    claim_next,
    finish_job,
    heartbeat,
    recover_jobs,
    release_job,
    submit_job,
    update_progress,
)


def _submit(catalog: Catalog, type: str = "capture", app: str | None = "db", **kw: object) -> Job:
    with catalog.begin() as session:
        return submit_job(session, type=type, app=app, **kw)  # type: ignore[arg-type]


def _claim(catalog: Catalog, runner: str = "r1", **kw: object) -> Job | None:
    with catalog.begin() as session:
        return claim_next(session, runner, **kw)  # type: ignore[arg-type]


def _job(catalog: Catalog, job_id: str) -> Job:
    with catalog.read() as session:
        return q.get_job(session, job_id=job_id)


# --- one lifecycle job per app --------------------------------------------------------------


def test_one_lifecycle_job_per_app(catalog: Catalog) -> None:
    first = _submit(catalog, "failover", lifecycle=True, params={"host": "dr1"})
    assert first.id.startswith("job_")
    assert first.status is JobStatus.QUEUED
    with pytest.raises(Conflict) as info:
        _submit(catalog, "syncback", lifecycle=True)
    assert first.id in str(info.value)
    assert "failover job" in str(info.value) and "queued" in str(info.value)
    # Other apps, and jobs that are not lifecycle jobs, are not held up.
    _submit(catalog, "capture", app="web", lifecycle=True)
    _submit(catalog, "mount", lifecycle=False)
    # Still refused while it runs; free again once it has ended.
    assert _claim(catalog, types=["failover"]) is not None
    with pytest.raises(Conflict, match=f"{first.id} running"):
        _submit(catalog, "syncback", lifecycle=True)
    with catalog.begin() as session:
        finish_job(session, job_id=first.id, status=JobStatus.SUCCEEDED, message="ok")
    assert _submit(catalog, "syncback", lifecycle=True).app == "db"


def test_lifecycle_job_needs_an_app(catalog: Catalog) -> None:
    with pytest.raises(InvalidInput):
        _submit(catalog, "failover", app=None, lifecycle=True)


def test_database_enforces_one_lifecycle_job(catalog: Catalog) -> None:
    """Even a writer that skips the check cannot queue a second lifecycle job for an app."""
    _submit(catalog, "failover", lifecycle=True)
    with pytest.raises(IntegrityError), catalog.begin() as session:
        session.add(Job(id="job_sneaky", type="x", app="db", lifecycle=True, created=utcnow()))
        session.flush()


def test_concurrent_lifecycle_submits_admit_one(catalog: Catalog) -> None:
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def submit() -> None:
        barrier.wait()
        try:
            _submit(catalog, "failover", lifecycle=True)
            outcomes.append("ok")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict", "conflict", "conflict", "ok"]


# --- claiming -------------------------------------------------------------------------------


def test_claims_oldest_first_and_by_type(catalog: Catalog) -> None:
    a = _submit(catalog, "capture", app="a")
    b = _submit(catalog, "mount", app="b")
    c = _submit(catalog, "capture", app="c")
    got = _claim(catalog, types=["mount"])
    assert got is not None and got.id == b.id
    got = _claim(catalog, "r2")
    assert got is not None and got.id == a.id
    assert got.status is JobStatus.RUNNING
    assert (got.runner, got.attempts) == ("r2", 1)
    assert got.started is not None and got.heartbeat is not None
    got = _claim(catalog)
    assert got is not None and got.id == c.id
    assert _claim(catalog) is None


def test_each_job_is_claimed_exactly_once(catalog: Catalog) -> None:
    submitted = {_submit(catalog, "capture", app=f"app{i}").id for i in range(30)}
    claimed: dict[str, list[str]] = {"r1": [], "r2": [], "r3": []}
    barrier = threading.Barrier(len(claimed))

    def claim_all(runner: str) -> None:
        barrier.wait()
        while (job := _claim(catalog, runner)) is not None:
            claimed[runner].append(job.id)

    threads = [threading.Thread(target=claim_all, args=(r,)) for r in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [job_id for ids in claimed.values() for job_id in ids]
    assert sorted(every) == sorted(submitted)  # all claimed, none twice
    with catalog.read() as session:
        for runner, ids in claimed.items():
            for job_id in ids:
                assert q.get_job(session, job_id=job_id).runner == runner


def test_release_gives_back_an_unstarted_claim(catalog: Catalog) -> None:
    job = _submit(catalog, lifecycle=True)
    _claim(catalog, "r1")
    with catalog.begin() as session:
        assert release_job(session, job_id=job.id, runner_id="r2").status is JobStatus.RUNNING
        back = release_job(session, job_id=job.id, runner_id="r1")
        assert (back.status, back.runner, back.attempts) == (JobStatus.QUEUED, None, 0)
    again = _claim(catalog, "r2")
    assert again is not None and again.id == job.id and again.attempts == 1


# --- progress, heartbeat, finishing -----------------------------------------------------------


def test_progress_and_finish(catalog: Catalog) -> None:
    job = _submit(catalog)
    _claim(catalog)
    with catalog.begin() as session:
        flag = update_progress(
            session, job_id=job.id, bytes_done=10, bytes_total=100, bytes_sent=4, message="m"
        )
        assert flag is False
        update_progress(session, job_id=job.id, bytes_done=50, image="img_x")
    done = _job(catalog, job.id)
    assert (done.bytes_done, done.bytes_total, done.bytes_sent) == (50, 100, 4)
    assert (done.message, done.image) == ("m", "img_x")
    with catalog.begin() as session:
        finish_job(
            session,
            job_id=job.id,
            status=JobStatus.SUCCEEDED,
            message="captured",
            result={"image": "img_x"},
        )
    ended = _job(catalog, job.id)
    assert ended.status is JobStatus.SUCCEEDED
    assert ended.result == {"image": "img_x"}
    assert ended.finished is not None and ended.started is not None
    assert ended.finished >= ended.started
    with pytest.raises(Conflict, match="already ended"), catalog.begin() as session:
        finish_job(session, job_id=job.id, status=JobStatus.FAILED, message="x")


def test_heartbeat_reports_cancel_flags(catalog: Catalog) -> None:
    mine, other = _submit(catalog, app="a"), _submit(catalog, app="b")
    _claim(catalog, "r1")
    _claim(catalog, "r2")
    with catalog.begin() as session:
        cancel_job(session, job_id=mine.id, actor="alice")
        flags = heartbeat(session, runner_id="r1", job_ids=[mine.id, other.id])
        assert flags == {mine.id: True}  # the other runner's job is not ours to beat
        assert heartbeat(session, runner_id="r1", job_ids=[]) == {}


# --- cancellation -----------------------------------------------------------------------------


def test_cancel_queued_job_ends_it_at_once(catalog: Catalog) -> None:
    job = _submit(catalog, lifecycle=True)
    with catalog.begin() as session:
        canceled = cancel_job(session, job_id=job.id, actor="alice")
        assert canceled.status is JobStatus.CANCELED
        assert canceled.finished is not None
    assert _claim(catalog) is None
    # The app is free for another lifecycle job, and canceling again is harmless.
    _submit(catalog, lifecycle=True)
    with catalog.begin() as session:
        assert cancel_job(session, job_id=job.id).status is JobStatus.CANCELED
        log = [line.text for line in q.list_job_log(session, job_id=job.id)]
    assert log == ["canceled by alice before it started"]


def test_cancel_running_job_sets_the_flag(catalog: Catalog) -> None:
    job = _submit(catalog)
    _claim(catalog)
    with catalog.begin() as session:
        running = cancel_job(session, job_id=job.id)
        assert running.status is JobStatus.RUNNING
        assert running.cancel_requested is True
        assert update_progress(session, job_id=job.id, bytes_done=1) is True


def test_cancel_finished_job_is_a_conflict(catalog: Catalog) -> None:
    job = _submit(catalog)
    _claim(catalog)
    with catalog.begin() as session:
        finish_job(session, job_id=job.id, status=JobStatus.FAILED, message="boom")
    with pytest.raises(JobEnded, match="cannot be canceled"), catalog.begin() as session:
        cancel_job(session, job_id=job.id)


# --- recovery ---------------------------------------------------------------------------------


def test_recovery_after_a_crash(catalog: Catalog) -> None:
    plain = _submit(catalog, "failover", app="a", lifecycle=True)
    resumable = _submit(catalog, "replicate", app="b")
    canceled = _submit(catalog, "capture", app="c")
    queued = _submit(catalog, "capture", app="d")
    for _ in range(3):
        _claim(catalog, "dead-runner", types=["failover", "replicate", "capture"])
    with catalog.begin() as session:
        cancel_job(session, job_id=canceled.id)
    # The runner "crashed": nothing finished its jobs. A new runner starts.
    with catalog.begin() as session:
        recovered = recover_jobs(session, "r-new", resumable={"replicate"})
        assert sorted(j.id for j in recovered) == sorted([plain.id, resumable.id, canceled.id])

    failed = _job(catalog, plain.id)
    assert failed.status is JobStatus.FAILED
    assert failed.message == INTERRUPTED_MESSAGE
    assert failed.finished is not None
    requeued = _job(catalog, resumable.id)
    assert (requeued.status, requeued.runner) == (JobStatus.QUEUED, None)
    assert _job(catalog, canceled.id).status is JobStatus.CANCELED
    assert _job(catalog, queued.id).status is JobStatus.QUEUED
    with catalog.read() as session:
        (line,) = q.list_job_log(session, job_id=plain.id)
    assert line.level == "warning" and "r-new" in line.text
    # The lifecycle job's app is free again; the re-queued job runs again.
    _submit(catalog, "failover", app="a", lifecycle=True)
    again = _claim(catalog, types=["replicate"])
    assert again is not None and again.id == resumable.id and again.attempts == 2


def test_resumable_job_gives_up_after_max_attempts(catalog: Catalog) -> None:
    job = _submit(catalog, "replicate")
    for attempt in range(1, 4):
        claimed = _claim(catalog)
        assert claimed is not None and claimed.attempts == attempt
        with catalog.begin() as session:
            recover_jobs(session, "r", resumable={"replicate"}, max_attempts=3)
    assert _job(catalog, job.id).status is JobStatus.FAILED


def test_recovery_with_several_runners_takes_only_stale_jobs(catalog: Catalog) -> None:
    fresh, stale = _submit(catalog, app="a"), _submit(catalog, app="b")
    _claim(catalog, "alive")
    _claim(catalog, "dead")
    with catalog.begin() as session:
        session.execute(
            update(Job).where(Job.id == stale.id).values(heartbeat=utcnow() - timedelta(minutes=5))
        )
    with catalog.begin() as session:
        recovered = recover_jobs(session, "r3", stale_after=60)
    assert [j.id for j in recovered] == [stale.id]
    assert _job(catalog, fresh.id).status is JobStatus.RUNNING
    assert _job(catalog, stale.id).status is JobStatus.FAILED
