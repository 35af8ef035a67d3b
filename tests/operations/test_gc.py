"""Garbage collection as the appliance's ``gc`` job: off the capture path, scheduled,
resumable, and safe beside captures and replications that run while it sweeps."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tandem.appliance.daemon import Appliance
from tandem.appliance.scheduler import Scheduler
from tandem.catalog import queries as q
from tandem.catalog.models import utcnow
from tandem.domain.images import ImageKind
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppKind
from tandem.errors import Conflict
from tandem.jobs.queue import submit_job
from tandem.operations import apps, capture, gc, images
from tandem.storage import gc as pool_gc
from tests.appliance.conftest import Booted, seed_app, seed_image
from tests.operations.two_sites import TEMPLATE, TwoSites, two_sites
from tests.poolfiles import age_pool


def age(appliance: Appliance) -> None:
    """Make every chunk and manifest an hour old: only marks and touches keep them now."""
    pool = appliance.site.pool
    age_pool(pool, 3600)


def chunk_count(appliance: Appliance) -> int:
    return sum(1 for _ in appliance.site.pool.iter_chunks())


class SweepGate:
    """Holds every collection at its first fan-out directory until ``release``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.waiting = 0
        self.cond = threading.Condition()
        self.open = threading.Event()
        real = pool_gc._sweep_fan

        def gated(pool, fan, marked, cutoff):  # type: ignore[no-untyped-def]
            if fan == 0:
                with self.cond:
                    self.waiting += 1
                    self.cond.notify_all()
                assert self.open.wait(60), "the test never released the sweep"
            return real(pool, fan, marked, cutoff)

        monkeypatch.setattr(pool_gc, "_sweep_fan", gated)

    def wait_for(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.waiting >= n, 30), "no sweep started"

    def release(self) -> None:
        self.open.set()


def test_retention_only_marks_and_the_scheduler_collects(booted: Booted, tmp_path: Path) -> None:
    appliance = booted.appliance
    seed_app(appliance)
    src = tmp_path / "src"
    src.mkdir()
    ids = []
    for _ in range(3):
        (src / "a").write_bytes(os.urandom(200_000))
        ids.append(seed_image(appliance, "web", src))
    age(appliance)
    before = chunk_count(appliance)
    removed = images.prune_snapshots(appliance.site, None, app="web", keep=1)
    assert sorted(removed) == sorted(ids[:2])
    assert chunk_count(appliance) == before  # retention walked nothing
    assert gc.pending(appliance.site) == 2

    gc.configure(appliance.site, {"gc.after_deletions": 3, "gc.every_seconds": 3600})
    with appliance.catalog.begin() as session:
        q.set_setting(session, key=gc.LAST_KEY, value=str(int(time.time())))
    scheduler = Scheduler(appliance.site)
    now = time.time()
    assert scheduler.collect_garbage(now) is None  # 2 of 3 deletions, collected an hour ago
    assert scheduler.collect_garbage(now + 3601) is not None  # the interval passed
    assert scheduler.collect_garbage(now + 7200) is None  # one is queued already
    with pytest.raises(Conflict, match="already queued"):
        gc.submit_gc(appliance.site, actor="t")

    appliance.runner.start()
    job = gc.active_job(appliance.site)
    assert job is not None and job.actor == "scheduler"
    done = appliance.runner.wait(job.id, timeout=30)
    assert done.status is JobStatus.SUCCEEDED, done.message
    assert done.result is not None and done.result["chunks_removed"] == 2
    assert chunk_count(appliance) == before - 2
    assert gc.pending(appliance.site) == 0
    assert images.verify_image(appliance.site, image_id=ids[2])["ok"]

    # Nothing deleted since: a scheduled collection ends at once without sweeping.
    with appliance.catalog.begin() as session:
        idle = submit_job(session, type=gc.TYPE, params={"force": False}, actor="scheduler")
    done = appliance.runner.wait(idle.id, timeout=30)
    assert done.result is not None and done.result["skipped"] is True
    assert not gc.due(appliance.site, time.time() + 10 * 86_400)


def test_collections_after_the_first_count_only_what_changed(
    booted: Booted, tmp_path: Path
) -> None:
    appliance = booted.appliance
    seed_app(appliance)
    src = tmp_path / "src"
    src.mkdir()
    ids = []
    for _ in range(4):
        (src / "a").write_bytes(os.urandom(200_000))
        ids.append(seed_image(appliance, "web", src))
    appliance.runner.start()

    def collect() -> dict[str, object]:
        done = appliance.runner.wait(gc.submit_gc(appliance.site, actor="t").id, timeout=30)
        assert done.status is JobStatus.SUCCEEDED and done.result is not None, done.message
        return done.result

    first = collect()
    assert first["full"] is True and first["manifests_marked"] == 4
    images.prune_snapshots(appliance.site, None, app="web", keep=3)
    age(appliance)
    before = chunk_count(appliance)
    second = collect()
    assert second["full"] is False
    assert second["manifests_marked"] == 0 and second["manifests_unmarked"] == 1
    assert second["chunks_removed"] == 1 and chunk_count(appliance) == before - 1
    for image_id in ids[1:]:
        assert images.verify_image(appliance.site, image_id=image_id)["ok"]

    gc.configure(appliance.site, {"gc.full_every_seconds": 3600})
    assert gc.status(appliance.site)["settings"]["gc.full_every_seconds"] == 3600
    with open(pool_gc.refs_path(appliance.site.pool), "r+b") as fh:
        fh.write(b"not a database at all")  # the counts lost: the next one makes them again
    third = collect()
    assert third["full"] is True and third["chunks_removed"] == 0


def test_a_collection_stopped_midway_is_finished_by_the_next(
    booted: Booted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    appliance = booted.appliance
    seed_app(appliance)
    src = tmp_path / "src"
    src.mkdir()
    made = []
    for _ in range(2):
        for j in range(40):
            (src / f"f{j}").write_bytes(os.urandom(5_000))
        made.append(seed_image(appliance, "web", src))
    age(appliance)
    with appliance.catalog.begin() as session:
        q.delete_image(session, image_id=made[0])
    gate = SweepGate(monkeypatch)
    runner = appliance.runner
    runner.start()
    job = gc.submit_gc(appliance.site, actor="t")
    gate.wait_for(1)  # inside its sweep
    # The appliance stops under the job: its handler is told to stop at its next step.
    stopper = threading.Thread(target=runner.stop)
    stopper.start()
    deadline = time.monotonic() + 10
    while not any(ctx.stopping for ctx in list(runner._active.values())):
        assert time.monotonic() < deadline, "the runner never asked the job to stop"
        time.sleep(0.01)
    gate.release()
    stopper.join(30)
    with appliance.catalog.read() as session:
        stopped = q.get_job(session, job_id=job.id)
    assert stopped.status is JobStatus.FAILED and "interrupted" in stopped.message
    assert pool_gc.unfinished(appliance.site.pool)
    assert gc.due(appliance.site)  # an unfinished collection is due at once

    runner.start()
    again = runner.wait(gc.submit_gc(appliance.site, actor="t").id, timeout=30)
    assert again.status is JobStatus.SUCCEEDED, again.message
    assert again.result is not None and again.result["resumed"] is True
    assert again.result["resumed_at_fan"] > 0
    assert again.result["chunks_removed"] == 40
    assert not pool_gc.unfinished(appliance.site.pool)
    assert images.verify_image(appliance.site, image_id=made[1])["ok"]


def test_job_rows_past_the_retention_are_deleted(booted: Booted) -> None:
    appliance = booted.appliance
    gc.configure(appliance.site, {"jobs.keep_days": 30})
    with appliance.catalog.begin() as session:
        old = submit_job(session, type="capture", app="x", actor="t")
        q.add_job_log(session, job_id=old.id, text="a line")
        old.status, old.finished = JobStatus.SUCCEEDED, utcnow() - timedelta(days=31)
        recent = submit_job(session, type="capture", app="y", actor="t")
        recent.status, recent.finished = JobStatus.FAILED, utcnow() - timedelta(days=29)
        waiting = submit_job(session, type="capture", app="z", actor="t")
        waiting.created = utcnow() - timedelta(days=90)
    assert gc.prune_jobs(appliance.site) == 1
    with appliance.catalog.read() as session:
        assert {j.id for j in q.list_jobs(session)} == {recent.id, waiting.id}
        assert q.list_job_log(session, job_id=old.id) == []


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[TwoSites]:
    with two_sites(tmp_path) as built:
        yield built


def _capture(sites: TwoSites, app: str) -> str:
    """Capture at production and wait for its replication; the snapshot's id."""
    done = sites.run(sites.prod, capture.submit_capture(sites.prod.site, app=app, actor="t"))
    assert done.status is JobStatus.SUCCEEDED, done.message
    assert done.result is not None, done.message
    mirror = sites.prod.runner.wait(done.result["mirror_job"], timeout=60)
    assert mirror.status is JobStatus.SUCCEEDED, mirror.message
    return str(done.result["image"])


def test_captures_and_replications_run_and_stay_whole_while_both_sites_sweep(
    sites: TwoSites, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, data = "ledger", sites.root / "ledger"
    data.mkdir()
    first = os.urandom(600_000)
    (data / "a").write_bytes(first)
    apps.add_app(sites.prod.site, name=app, host="host1", kind=AppKind.FILESYSTEM, path=str(data))
    apps.protect_app(sites.prod.site, name=app, template=TEMPLATE, actor="t")
    _capture(sites, app)
    (data / "a").write_bytes(os.urandom(600_000))
    _capture(sites, app)
    # Retention drops the first image at both sites: its chunks are garbage, and old.
    images.prune_snapshots(sites.prod.site, None, app=app, keep=1)
    images.prune_snapshots(sites.dr.site, None, app=app, keep=1, kind=ImageKind.REPLICA)
    for appliance in (sites.prod, sites.dr):
        age(appliance)

    gate = SweepGate(monkeypatch)
    jobs = {a: gc.submit_gc(a.site, actor="t") for a in (sites.prod, sites.dr)}
    gate.wait_for(2)  # both collections took their snapshot and are sweeping

    # Meanwhile the data goes back to its first content: the capture and its replication
    # reuse exactly the garbage chunks the sweeps are about to judge.
    (data / "a").write_bytes(first)
    started = time.monotonic()
    third = _capture(sites, app)
    assert time.monotonic() - started < 30  # neither waited for a collection
    gate.release()
    for appliance, job in jobs.items():
        done = appliance.runner.wait(job.id, timeout=60)
        assert done.status is JobStatus.SUCCEEDED, done.message
        assert done.result is not None and done.result["manifests_removed"] >= 1

    assert images.verify_image(sites.prod.site, image_id=third)["ok"]
    assert images.verify_image(sites.dr.site, image_id=third)["ok"]  # the replica's id
    for appliance in (sites.prod, sites.dr):
        with appliance.catalog.read() as session:
            for image in q.list_images(session, app=app):
                assert images.verify_image(appliance.site, image_id=image.id)["ok"], image.id
