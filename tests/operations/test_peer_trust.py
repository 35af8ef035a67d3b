"""Two live sites: the DR site is production's peer, not its admin.

- A replica-style failback names its target only as a lookup into production's catalog;
  a wrong or unregistered location, or a ``new`` target that holds data, is refused before
  production's app is stopped or a syncback sent.
- The identity switch of a ``new`` target is reverted by an undo and merged at commit.
- Production knows the app is failed over at the peer (told at failover, or from a
  replication refused as stale) and does not queue replications meanwhile.
- A volume's DR copy is read-only over NBD while a replica-style failback is pending.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from tandem.appliance.scheduler import Scheduler
from tandem.catalog import queries as q
from tandem.catalog.models import Job
from tandem.domain.images import ImageKind
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppKind, AppState
from tandem.domain.rules import Role
from tandem.drill.lab import install_hook_script
from tandem.errors import (
    Conflict,
    InvalidInput,
    TargetInUse,
    TargetNotRegistered,
    TransitionRefused,
)
from tandem.operations import apps, failover, replica_failback, replicate
from tandem.operations.present import export_name, restore_exports
from tandem.transport.api import FailbackIn, FailoverIn
from tandem.transport.peer import Opened
from tests.appliance.live import free_port
from tests.appliance.test_nbd import run
from tests.e2e.test_dr_presentation import tree_digests
from tests.operations.test_failback_handback import _capture, _point_peer
from tests.operations.two_sites import TEMPLATE, TwoSites, two_sites


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[TwoSites]:
    with two_sites(tmp_path) as built:
        yield built


def _protect(sites: TwoSites, name: str, kind: AppKind = AppKind.FILESYSTEM) -> Path:
    """An app at production with a stop/start command that logs, captured and mirrored."""
    root = sites.root / name
    root.mkdir()
    if kind is AppKind.VOLUME:
        data = root / "disk.img"
        data.write_bytes(os.urandom(1 << 20))
    else:
        data = root / "data"
        data.mkdir()
        (data / "rows.txt").write_text("row 1\n")
    events = root / "events"
    hooks = {}
    for hook in ("stop", "start"):
        hooks[hook] = f"{name}-{hook}"
        install_hook_script(
            sites.root / "host1", hooks[hook], f"#!/bin/sh\necho {hook} >> {events}\n"
        )
    apps.add_app(
        sites.prod.site,
        name=name,
        host="host1",
        kind=kind,
        path=str(data),
        hooks=hooks,
        role=Role.ADMIN,
    )
    apps.protect_app(sites.prod.site, name=name, template=TEMPLATE, actor="t")
    assert _capture(sites, name) is JobStatus.SUCCEEDED
    return data


def _events(sites: TwoSites, name: str) -> list[str]:
    path = sites.root / name / "events"
    return path.read_text().split() if path.exists() else []


def _fail_over(sites: TwoSites, name: str, kind: AppKind = AppKind.FILESYSTEM) -> dict[str, str]:
    mount_point = None if kind is AppKind.VOLUME else str(sites.root / name / "dr")
    asked = FailoverIn(host="host2", confirm=["FAILOVER"], mount_point=mount_point)
    job = failover.submit(sites.dr.site, name, asked, "t")
    done = sites.run(sites.dr, job)
    assert done.status is JobStatus.SUCCEEDED, done.message
    return dict(done.result or {})


def _syncbacks_at_prod(sites: TwoSites, name: str) -> list[str]:
    with sites.prod.catalog.read() as session:
        return [i.id for i in q.list_images(session, app=name, kind=ImageKind.SYNCBACK)]


def _failback(
    sites: TwoSites, name: str, target: str, host: str | None = None, path: str | None = None
) -> Job:
    asked = FailbackIn(target=target, host=host, path=path)
    job = replica_failback.submit(sites.dr.site, name, asked, "t")
    return sites.run(sites.dr, job)


def test_a_failback_target_is_only_a_lookup_in_productions_catalog(sites: TwoSites) -> None:
    """Reproduction: `failback --target new --host H --path DIR` deleted what DIR held, and a
    wrong --host was found only after production's app was stopped and a syncback sent."""
    _protect(sites, "erp")
    _fail_over(sites, "erp")
    precious = sites.root / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("not the app's\n")

    def refused(error: type[Exception], target: str, host: str, path: str) -> str:
        with pytest.raises(error) as info:
            _failback(sites, "erp", target, host, path)
        # nothing changed anywhere: production's app runs, no syncback went home
        assert _events(sites, "erp") == []
        assert _syncbacks_at_prod(sites, "erp") == []
        assert apps.get_app(sites.dr.site, name="erp").state is AppState.FAILED_OVER
        return str(info.value)

    # a location production's operators did not register: the other site cannot name it
    message = refused(TargetNotRegistered, target="new", host="host1", path=str(precious))
    assert f"tandem app add NAME --host host1 --path {precious} --kind filesystem" in message
    assert "the other site cannot name a place to write" in message
    # a wrong host is a location that is not registered either
    refused(TargetNotRegistered, target="restored", host="nohost", path=str(precious))
    refused(InvalidInput, target="original", host="host1", path=str(precious))
    # registered there, but it holds data: a new app would overwrite it
    apps.add_app(
        sites.prod.site, name="erp-new", host="host1", kind=AppKind.FILESYSTEM, path=str(precious)
    )
    message = refused(Conflict, target="new", host="host1", path=str(precious))
    assert "not missing or empty" in message
    assert (precious / "keep.txt").read_text() == "not the app's\n"
    # of another kind
    disk = sites.root / "disk.img"
    apps.add_app(sites.prod.site, name="vol", host="host1", kind=AppKind.VOLUME, path=str(disk))
    assert "is a volume" in refused(Conflict, target="restored", host="host1", path=str(disk))


def test_a_failback_never_lands_on_another_app_in_service(sites: TwoSites) -> None:
    """``--target restored`` named any app registered at the location: failing back onto
    another protected app of production restored this app's data over that app's folder
    (and deleted what the image did not hold)."""
    _protect(sites, "shop")
    payroll = _protect(sites, "payroll")  # protected, with images: an app in service
    _fail_over(sites, "shop")
    before = tree_digests(payroll)
    with pytest.raises(TargetInUse) as info:
        _failback(sites, "shop", target="restored", host="host1", path=str(payroll))
    assert "'payroll'" in str(info.value) and "tandem app add" in str(info.value)
    assert tree_digests(payroll) == before
    assert _events(sites, "shop") == []  # production's app was not even stopped
    assert _syncbacks_at_prod(sites, "shop") == []
    # an unprotected app with images of its own is no placeholder either
    apps.unprotect_app(sites.prod.site, name="payroll", actor="t")
    with pytest.raises(TargetInUse):
        _failback(sites, "shop", target="restored", host="host1", path=str(payroll))
    assert tree_digests(payroll) == before


def test_a_new_target_takes_the_identity_undo_reverts_it_commit_merges(sites: TwoSites) -> None:
    data = _protect(sites, "crm")
    _fail_over(sites, "crm")
    dr_copy = sites.root / "crm" / "dr"
    (dr_copy / "rows.txt").write_text("row 1\nrow 2 written at the DR site\n")
    target = sites.root / "crm-new"
    apps.add_app(
        sites.prod.site, name="crm-new", host="host1", kind=AppKind.FILESYSTEM, path=str(target)
    )

    done = _failback(sites, "crm", target="new", host="host1", path=str(target))
    assert done.status is JobStatus.SUCCEEDED, done.message
    assert tree_digests(target) == tree_digests(dr_copy)
    assert (data / "rows.txt").read_text() == "row 1\n"  # the original is untouched
    at_prod = apps.get_app(sites.prod.site, name="crm")
    assert (at_prod.host, at_prod.path) == ("host1", str(target))

    undone = sites.run(
        sites.dr, replica_failback.submit_end(sites.dr.site, app="crm", undo=True, actor="t")
    )
    assert undone.status is JobStatus.SUCCEEDED, undone.message
    at_prod = apps.get_app(sites.prod.site, name="crm")
    assert (at_prod.host, at_prod.path) == ("host1", str(data))  # the identity is reverted
    assert at_prod.peer_active  # the DR copy is the writer again

    # the target holds the first attempt now: not new any more, but a restored copy
    with pytest.raises(Conflict, match="not missing or empty"):
        _failback(sites, "crm", target="new", host="host1", path=str(target))
    done = _failback(sites, "crm", target="restored", host="host1", path=str(target))
    assert done.status is JobStatus.SUCCEEDED, done.message
    committed = sites.run(
        sites.dr, replica_failback.submit_end(sites.dr.site, app="crm", undo=False, actor="t")
    )
    assert committed.status is JobStatus.SUCCEEDED, committed.message
    # no --power-on: the commit says production's app is stopped and how to start it
    assert "crm is stopped at prod" in (committed.message or "")
    assert "start it there" in (committed.message or "")
    at_prod = apps.get_app(sites.prod.site, name="crm")
    assert (at_prod.path, at_prod.peer_active) == (str(target), False)
    names = [a.name for a in apps.list_apps(sites.prod.site)]
    assert "crm-new" not in names  # the placeholder is merged into the app
    mirror = apps.get_app(sites.dr.site, name="crm")
    assert (mirror.state, mirror.path) == (AppState.MANAGED, str(target))  # shown, learnt
    assert _capture(sites, "crm") is JobStatus.SUCCEEDED  # mirroring resumed


def test_production_knows_the_app_is_failed_over_and_stops_mirroring_it(
    sites: TwoSites, caplog: pytest.LogCaptureFixture
) -> None:
    _protect(sites, "told")
    _protect(sites, "untold")
    # told at failover
    _fail_over(sites, "told")
    assert apps.get_app(sites.prod.site, name="told").peer_active
    # production unreachable at failover: it learns it when its replication is refused
    reachable = _point_peer(sites, f"https://127.0.0.1:{free_port()}")
    _fail_over(sites, "untold")
    _point_peer(sites, reachable)
    assert not apps.get_app(sites.prod.site, name="untold").peer_active
    (sites.root / "untold" / "data" / "rows.txt").write_text("row 1\nrow 2\n")
    assert _capture(sites, "untold") is JobStatus.FAILED  # refused as stale ...
    assert apps.get_app(sites.prod.site, name="untold").peer_active  # ... and learnt
    for name in ("told", "untold"):
        assert _capture(sites, name) is None  # no replication queued
    with pytest.raises(TransitionRefused, match="failed over at dr"):
        replicate.submit_replicate(sites.prod.site, app="told", actor="t")
    # nor does the scheduler queue one, or even try (it used to, every 30 s, each failing)
    scheduler = Scheduler(sites.prod.site)
    with caplog.at_level(logging.INFO, logger="tandem.appliance.scheduler"):
        scheduler.run_due(now=1e12)
    assert "replication" not in caplog.text
    with sites.prod.catalog.read() as session:
        open_jobs = [
            j
            for j in q.list_jobs(session, limit=100)
            if j.type == "replicate" and j.status in (JobStatus.QUEUED, JobStatus.RUNNING)
        ]
    assert open_jobs == []


def test_a_volume_dr_copy_is_read_only_while_the_failback_is_pending(sites: TwoSites) -> None:
    _protect(sites, "db", AppKind.VOLUME)
    shown = _fail_over(sites, "db", AppKind.VOLUME)
    uri, image = shown["nbd_uri"], shown["image"]
    script = (
        "h.set_strict_mode(0)\n"
        "try:\n"
        "    h.pwrite(b'x' * 512, 4096)\n"
        "    print('written')\n"
        "except nbd.Error as e:\n"
        "    print(e.errno if isinstance(e.errno, str) else errno.errorcode[e.errno])\n"
    )

    def write() -> list[str]:
        return run("nbdsh", "-u", uri, "-c", "import errno", "-c", script).stdout.split()

    assert write() == ["written"]  # failed over: the DR copy is the writer
    done = _failback(sites, "db", target="original")
    assert done.status is JobStatus.SUCCEEDED, done.message
    assert write() == ["EPERM"]  # pending: production holds it, the copy stays as it is
    # ... also after the appliance restarts its exports
    presenter = sites.dr.site.presenter
    assert presenter is not None
    presenter.remove_export(export_name(image))
    sites.dr.site.overlays.pop(image).close()
    assert restore_exports(sites.dr.site) == [image]
    assert write() == ["EPERM"]
    undone = sites.run(
        sites.dr, replica_failback.submit_end(sites.dr.site, app="db", undo=True, actor="t")
    )
    assert undone.status is JobStatus.SUCCEEDED, undone.message
    assert write() == ["written"]  # undone: the DR copy is the writer again


def test_the_peer_client_refuses_an_answer_of_another_shape() -> None:
    with pytest.raises(ValidationError):
        Opened.model_validate({"session": "ab", "token": "t", "command": "id"})
