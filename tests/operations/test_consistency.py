"""Every image records how it was cut; the app's --consistency says what it may be cut from."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tandem.appliance.documents import image_out
from tandem.appliance.scheduler import RETRY_FIRST, Scheduler
from tandem.catalog import queries as q
from tandem.domain.consistency import ConsistencyMode
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppKind
from tandem.operations import apps, capture, images, templates
from tandem.transport.server import free_port
from tests.agent.loopfs import loop_mounts
from tests.operations.conftest import Live
from tests.operations.test_capture_restore import protect, run


@pytest.fixture
def mkfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    with loop_mounts(tmp_path) as make:
        yield make


def cut_of(live: Live, image: str | None) -> str | None:
    with live.appliance.site.catalog.read() as session:
        return image_out(q.get_image(session, image_id=image or "")).consistency


def test_an_app_on_a_btrfs_subvolume_is_cut_from_a_snapshot(
    live: Live, mkfs: Callable[[str], Path]
) -> None:
    fs = mkfs("btrfs")
    subprocess.run(
        ["btrfs", "subvolume", "create", str(fs / "db")], check=True, capture_output=True
    )
    (fs / "db" / "table").write_bytes(b"rows" * 1000)
    protect(live, "db", AppKind.FILESYSTEM, fs / "db")
    job = run(live, capture.submit_capture(live.appliance.site, app="db", actor="t"))
    assert job.status is JobStatus.SUCCEEDED, job.message
    assert cut_of(live, job.image) == "snapshot-btrfs"
    assert job.result is not None and job.result["consistency"] == "snapshot-btrfs"


def test_live_files_are_recorded_as_crash_unsafe_with_the_reason(
    live: Live, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_bytes(b"x")
    protect(live, "web", AppKind.FILESYSTEM, data)
    job = run(live, capture.submit_capture(live.appliance.site, app="web", actor="t"))
    assert job.status is JobStatus.SUCCEEDED, job.message
    assert cut_of(live, job.image) == "crash-unsafe"
    assert job.result is not None and "no point-in-time source" in job.result["consistency_reason"]


def test_snapshot_mode_fails_where_there_is_no_snapshot(live: Live, tmp_path: Path) -> None:
    site = live.appliance.site
    data = tmp_path / "data"
    data.mkdir()
    protect(live, "web", AppKind.FILESYSTEM, data)
    apps.set_hooks(site, name="web", hooks={}, consistency=ConsistencyMode.SNAPSHOT)
    job = run(live, capture.submit_capture(site, app="web", actor="t"))
    assert job.status is JobStatus.FAILED
    assert "No point in time" in job.message and "--consistency" in job.message
    with site.catalog.read() as session:
        assert q.list_images(session, app="web") == []


def test_hooks_mode_freezes_and_always_thaws(live: Live, tmp_path: Path) -> None:
    site = live.appliance.site
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_bytes(b"x")
    events = tmp_path / "events"
    protect(
        live,
        "web",
        AppKind.FILESYSTEM,
        data,
        freeze=f'echo "freeze $TANDEM_OPERATION $TANDEM_APP_PATH" >> {events}',
        thaw=f'echo "thaw $TANDEM_OPERATION" >> {events}',
    )
    apps.set_hooks(site, name="web", hooks={}, consistency=ConsistencyMode.HOOKS)
    job = run(live, capture.submit_capture(site, app="web", actor="t"))
    assert job.status is JobStatus.SUCCEEDED, job.message
    assert cut_of(live, job.image) == "hooks"
    assert events.read_text().splitlines() == [f"freeze capture {data}", "thaw capture"]

    (data / "f").unlink()
    data.rmdir()  # the capture fails: the thaw runs all the same
    job = run(live, capture.submit_capture(site, app="web", actor="t"))
    assert job.status is JobStatus.FAILED
    assert events.read_text().splitlines()[2:] == [f"freeze capture {data}", "thaw capture"]


def test_hooks_mode_without_a_freeze_hook_says_what_to_do(live: Live, tmp_path: Path) -> None:
    site = live.appliance.site
    data = tmp_path / "data"
    data.mkdir()
    protect(live, "web", AppKind.FILESYSTEM, data)
    apps.set_hooks(site, name="web", hooks={}, consistency=ConsistencyMode.HOOKS)
    job = run(live, capture.submit_capture(site, app="web", actor="t"))
    assert job.status is JobStatus.FAILED
    assert "no freeze hook" in job.message and "--freeze SCRIPT" in job.message


def test_a_capture_that_cannot_be_cut_is_retried_before_the_interval(
    live: Live, tmp_path: Path
) -> None:
    site = live.appliance.site
    data = tmp_path / "data"
    data.mkdir()
    protect(live, "web", AppKind.FILESYSTEM, data)
    templates.add_template(site, name="hourly", every="1h", keep=None, mirror=False)
    apps.protect_app(site, name="web", template="hourly", actor="test")
    apps.set_hooks(site, name="web", hooks={}, consistency=ConsistencyMode.SNAPSHOT)
    scheduler = Scheduler(site)
    assert scheduler.run_due(time.time()) == ["web"]
    with site.catalog.read() as session:
        (job,) = q.list_jobs(session, app="web")
    job = run(live, job)
    assert job.status is JobStatus.FAILED
    assert job.result == {"error": "PointInTimeUnavailable"}
    assert job.finished is not None
    failed_at = job.finished.timestamp()
    assert scheduler.run_due(failed_at + RETRY_FIRST / 2) == []
    assert scheduler.run_due(failed_at + RETRY_FIRST + 0.01) == ["web"]  # not an hour later
    with site.catalog.read() as session:
        assert [j.status for j in q.list_jobs(session, app="web")][1:] == [JobStatus.FAILED]


def test_removing_an_app_removes_the_clones_its_host_kept_for_the_next_capture(
    live: Live, mkfs: Callable[[str], Path]
) -> None:
    """A capture keeps its reflink clones beside the tree (the next one reads only what
    changed); once the app is gone they would hold its blocks for nobody. With the host
    unreachable the app is still removed, and the answer says what to remove by hand."""
    site = live.appliance.site
    fs = mkfs("xfs")
    for name in ("db", "web"):
        (fs / name).mkdir()
        (fs / name / "table").write_bytes(b"rows" * 1000)
        protect(live, name, AppKind.FILESYSTEM, fs / name)
        job = run(live, capture.submit_capture(site, app=name, actor="t"))
        assert job.status is JobStatus.SUCCEEDED, job.message
        assert cut_of(live, job.image) == "reflink"
        gone = run(live, images.submit_delete(site, image_id=job.image or "", actor="t"))
        assert gone.status is JobStatus.SUCCEEDED, gone.message
        apps.unprotect_app(site, name=name, actor="t")
    kept = sorted(n for n in os.listdir(fs) if n.startswith(".tandem-pit-keep-"))
    # Each app's clones, and beside them the walk they stand for (pit.KEPT_WALK).
    assert len(kept) == 4 and sum(n.endswith(".walk") for n in kept) == 2

    assert apps.remove_app(site, name="db") is None
    left = sorted(n for n in os.listdir(fs) if n.startswith(".tandem-pit-keep-"))
    assert len(left) == 2 and left[1] == left[0] + ".walk" and left[0] in kept  # web's

    with site.catalog.begin() as session:
        q.get_host(session, name="h1").url = f"https://127.0.0.1:{free_port()}"
    note = apps.remove_app(site, name="web")
    assert note is not None and ".tandem-pit-keep-" in note and "h1" in note
    assert "web" not in {a.name for a in apps.list_apps(site)}
    assert sorted(n for n in os.listdir(fs) if n.startswith(".tandem-pit-keep-")) == left
