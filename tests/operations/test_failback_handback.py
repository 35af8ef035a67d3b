"""A failback while production is unreachable: it ends at the DR site, and production is
told to resume mirroring once it answers (the pending hand-back), with no operator step."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.appliance.scheduler import Scheduler
from tandem.catalog import queries as q
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppKind, AppState
from tandem.operations import apps, capture, failback, failover, peers
from tandem.transport.api import FailoverIn
from tests.appliance.live import free_port
from tests.operations.two_sites import TEMPLATE, TwoSites, two_sites


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[TwoSites]:
    with two_sites(tmp_path) as built:
        yield built


def _capture(sites: TwoSites, app: str) -> JobStatus | None:
    """Capture at production; returns how its replication to the DR site ended (None: none
    was queued, production knows the app is failed over at the DR site)."""
    done = sites.run(sites.prod, capture.submit_capture(sites.prod.site, app=app, actor="t"))
    assert done.status is JobStatus.SUCCEEDED, done.message
    assert done.result is not None, done.message
    if done.result["mirror_job"] is None:
        return None
    mirror = sites.prod.runner.wait(done.result["mirror_job"], timeout=60)
    return mirror.status


def _point_peer(sites: TwoSites, url: str) -> str:
    """Make the DR site reach production at ``url``; returns the URL it had."""
    peer = peers.the_peer(sites.dr.site)
    assert peer is not None
    with sites.dr.catalog.begin() as session:
        row = q.get_peer(session, name=peer.name)
        old, row.url = row.url, url
    return old


def test_production_unreachable_at_failback_resumes_mirroring_when_it_returns(
    sites: TwoSites,
) -> None:
    app, data = "ledger", sites.root / "ledger"
    data.mkdir()
    (data / "rows.txt").write_text("one\n")
    apps.add_app(sites.prod.site, name=app, host="host1", kind=AppKind.FILESYSTEM, path=str(data))
    apps.protect_app(sites.prod.site, name=app, template=TEMPLATE, actor="t")
    assert _capture(sites, app) is JobStatus.SUCCEEDED
    job = failover.submit(
        sites.dr.site,
        app,
        FailoverIn(host="host2", confirm=["FAILOVER"], mount_point=str(sites.root / "ledger-dr")),
        actor="t",
    )
    assert sites.run(sites.dr, job).status is JobStatus.SUCCEEDED

    # Production is down: the forced failback still ends, and remembers what to tell it.
    reachable = _point_peer(sites, f"https://127.0.0.1:{free_port()}")
    job = failback.submit_failback(sites.dr.site, app=app, force=True, actor="t")
    done = sites.run(sites.dr, job)
    assert done.status is JobStatus.SUCCEEDED, done.message
    assert "will be told to resume mirroring once it answers" in (done.message or "")
    with sites.dr.catalog.read() as session:
        at_dr = q.get_app(session, name=app)
        assert at_dr.state is AppState.MANAGED
        epoch = at_dr.writer_epoch
    assert failback.pending_handbacks(sites.dr.site) == {app: epoch}
    scheduler = Scheduler(sites.dr.site)
    scheduler.run_due()  # still unreachable: stays pending
    assert failback.pending_handbacks(sites.dr.site) == {app: epoch}

    # Production is back but was never told: it still knows the app as failed over at the
    # DR site (told at failover), so it does not mirror it ...
    _point_peer(sites, reachable)
    (data / "rows.txt").write_text("one\ntwo\n")
    assert _capture(sites, app) is None
    assert apps.get_app(sites.prod.site, name=app).peer_active
    # ... until the scheduler hands the failback over, with no operator step.
    scheduler.run_due(now=1e12)
    assert failback.pending_handbacks(sites.dr.site) == {}
    with sites.prod.catalog.read() as session:
        assert q.get_app(session, name=app).writer_epoch == epoch
        assert not q.get_app(session, name=app).peer_active
    assert _capture(sites, app) is JobStatus.SUCCEEDED
