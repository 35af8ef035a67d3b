"""Capture and restore as jobs, through a real agent and the appliance's transfer sessions."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from tandem.catalog import queries as q
from tandem.catalog.models import Job
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppKind
from tandem.domain.rules import RESTORE_CONFIRMATIONS, Role
from tandem.drill.lab import install_hook_script
from tandem.errors import RemoteError
from tandem.operations import apps, capture, hosts, images, monitor, restore, templates
from tandem.storage.manifest import VolumeManifest, load_manifest
from tests.operations.conftest import Live
from tests.poolfiles import chunk_files, drops_pages, resident_bytes

MiB = 1024 * 1024


def run(live: Live, job: Job, timeout: float = 60) -> Job:
    return live.appliance.runner.wait(job.id, timeout=timeout)


def protect(live: Live, name: str, kind: AppKind, path: Path, **scripts: str) -> None:
    """Protect the app; each hook given (``stop="..."``) becomes a script of that body in the
    agent's scripts/ folder, named ``NAME-HOOK`` and registered by that name."""
    site = live.appliance.site
    hooks = {}
    for hook, body in scripts.items():
        hooks[hook] = f"{name}-{hook}"
        install_hook_script(Path(live.agent["scripts"]).parent, hooks[hook], "#!/bin/sh\n" + body)
    apps.add_app(
        site, name=name, host="h1", kind=kind, path=str(path), hooks=hooks, role=Role.ADMIN
    )
    if "manual" not in {t.name for t in templates.list_templates(site)}:
        templates.add_template(site, name="manual", every=None, keep=None, mirror=False)
    apps.protect_app(site, name=name, template="manual", actor="test")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tree_capture_is_incremental_and_restores(live: Live, tmp_path: Path) -> None:
    site = live.appliance.site
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for i in range(8):
        (data / "sub" / f"f{i}").write_bytes(os.urandom(200_000))
    events = tmp_path / "events"
    protect(
        live,
        "web",
        AppKind.FILESYSTEM,
        data,
        stop=f'echo "stop $TANDEM_SITE $TANDEM_OPERATION $TANDEM_APP_PATH $TANDEM_IMAGE">>{events}',
        start=f'echo "start $TANDEM_APP $TANDEM_SITE" >> {events}',
    )
    first = run(live, capture.submit_capture(site, app="web", actor="t"))
    assert first.status is JobStatus.SUCCEEDED, first.message
    assert first.bytes_sent >= 8 * 200_000 and first.bytes_done == first.bytes_total == 1_600_000
    assert first.image is not None and first.result is not None
    assert first.result["incremental"] is False
    original = {p.name: digest(p) for p in (data / "sub").iterdir()}

    (data / "sub" / "f3").write_bytes(os.urandom(1000))
    second = run(live, capture.submit_capture(site, app="web", label="two", actor="t"))
    assert second.status is JobStatus.SUCCEEDED, second.message
    assert second.bytes_sent < 20_000 and second.result is not None
    assert second.result["incremental"] is True
    with site.catalog.read() as session:
        image = q.get_image(session, image_id=second.image or "")
        assert (image.label, image.parent_id) == ("two", first.image)

    job = restore.submit_restore(
        site, app="web", image=first.image, confirm=RESTORE_CONFIRMATIONS, actor="t"
    )
    done = run(live, job)
    assert done.status is JobStatus.SUCCEEDED, done.message
    assert {p.name: digest(p) for p in (data / "sub").iterdir()} == original
    assert (
        events.read_text()
        == f"stop production restore {data} {first.image}\nstart web production\n"
    )
    assert 0 < done.bytes_sent < 300_000  # only the one changed file's chunk came back
    log = [line.text for line in monitor.job_log(site, job_id=done.id)]
    assert "stop hook 'web-stop' succeeded on host h1" in log
    assert "start hook 'web-start' succeeded on host h1" in log


def test_volume_capture_and_restore(live: Live, tmp_path: Path) -> None:
    site = live.appliance.site
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(9 * MiB))
    protect(live, "disk", AppKind.VOLUME, disk)
    first = run(live, capture.submit_capture(site, app="disk"))
    assert first.status is JobStatus.SUCCEEDED, first.message
    before = digest(disk)
    with open(disk, "r+b") as fh:
        fh.seek(5 * MiB)
        fh.write(b"\x01" * 100)
    second = run(live, capture.submit_capture(site, app="disk"))
    assert second.bytes_sent < 5 * MiB
    done = run(
        live,
        restore.submit_restore(
            site, app="disk", image=first.image or "", confirm=RESTORE_CONFIRMATIONS
        ),
    )
    assert done.status is JobStatus.SUCCEEDED, done.message
    assert digest(disk) == before
    assert done.bytes_sent < MiB  # one 64 KiB block differs, plus digests


def test_a_capture_leaves_the_appliance_page_cache_once_stored(live: Live, tmp_path: Path) -> None:
    """What an agent's capture stores is bulk ingest: once durable, it does not stay in the
    appliance's page cache (where it would evict what the appliance and its host read)."""
    site = live.appliance.site
    if not drops_pages(site.pool.tmp_dir):
        pytest.skip("the pool is on tmpfs, whose pages are the data")
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(9 * MiB))
    protect(live, "bulk", AppKind.VOLUME, disk)
    job = run(live, capture.submit_capture(site, app="bulk"))
    assert job.status is JobStatus.SUCCEEDED, job.message
    image = images.get_image(site, image_id=job.image or "")
    manifest = load_manifest(site.pool, bytes.fromhex(image.manifest))
    assert isinstance(manifest, VolumeManifest)
    chunks = [c for c in manifest.chunks if c]
    files = chunk_files(site.pool, chunks)
    assert len(files) == 3
    assert [resident_bytes(f) for f in files] == [0, 0, 0]


def test_a_failing_stop_command_restores_nothing(live: Live, tmp_path: Path) -> None:
    site = live.appliance.site
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("one")
    protect(live, "web", AppKind.FILESYSTEM, data, stop="echo cannot stop >&2; exit 3")
    first = run(live, capture.submit_capture(site, app="web"))
    (data / "f").write_text("two")
    done = run(
        live,
        restore.submit_restore(
            site, app="web", image=first.image or "", confirm=RESTORE_CONFIRMATIONS
        ),
    )
    assert done.status is JobStatus.FAILED
    assert done.message == (
        "The stop hook 'web-stop' of application 'web' exited with status 3 on host h1 "
        "(cannot stop). Fix the script on the host (its output is in the job's log) and run "
        "the operation again; nothing was restored"
    )
    assert (data / "f").read_text() == "two"
    with site.catalog.read() as session:
        assert [t.operation.value for t in q.list_transitions(session, app="web")] == ["protect"]


def test_a_stop_hook_the_host_does_not_have_restores_nothing(live: Live, tmp_path: Path) -> None:
    site = live.appliance.site
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("one")
    protect(live, "web", AppKind.FILESYSTEM, data)
    # registered, but never installed on h1
    apps.set_hooks(site, name="web", hooks={"stop": "web-stop"}, role=Role.ADMIN)
    first = run(live, capture.submit_capture(site, app="web"))
    (data / "f").write_text("two")
    done = run(
        live,
        restore.submit_restore(
            site, app="web", image=first.image or "", confirm=RESTORE_CONFIRMATIONS
        ),
    )
    assert done.status is JobStatus.FAILED
    folder = live.agent["scripts"]
    assert done.message.startswith(
        "The host refuses to run hook script 'web-stop': there is no such file in the folder. "
        f"A hook is an executable regular file in the agent's scripts folder {folder}"
    )
    assert done.message.endswith("; nothing was restored")
    assert (data / "f").read_text() == "two"


def test_a_canceled_capture_leaves_no_image(live: Live, tmp_path: Path) -> None:
    site = live.appliance.site
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as fh:
        for _ in range(32):
            fh.write(os.urandom(MiB))
    protect(live, "disk", AppKind.VOLUME, disk)
    # Holding the session registry stops the running capture where it opens its transfer
    # session, however fast the machine: it is canceled while running, then let go.
    with site.sessions._lock:
        job = capture.submit_capture(site, app="disk")
        deadline = time.monotonic() + 30
        while monitor.get_job(site, job_id=job.id).status is not JobStatus.RUNNING:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        monitor.cancel_job(site, job_id=job.id, actor="t")
    done = run(live, job)
    assert done.status is JobStatus.CANCELED, done.message
    with site.catalog.read() as session:
        assert q.list_images(session, app="disk") == []
    assert site.sessions._sessions == {}  # the session was closed, its chunks discarded


def test_a_wrong_agent_token_is_not_the_callers_fault(live: Live, tmp_path: Path) -> None:
    site = live.appliance.site
    with pytest.raises(
        RemoteError, match=r"host h2 answered with an error: its agent at .* refused"
    ):
        hosts.add_host(
            site,
            name="h2",
            url=live.agent["url"],
            token="wrong",
            fingerprint=live.agent["fingerprint"],
        )
    assert [h.name for h in hosts.list_hosts(site)] == ["h1"]
