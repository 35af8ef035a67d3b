"""What a syncback reports as written at the DR site: the bytes changed since the failover,
for a file tree as for a volume, and every syncback reports all of them (not only what
changed since the one before, and never the size of the whole tree)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppKind
from tandem.operations import apps, capture, failover, syncback
from tandem.storage.overlay import BLOCK
from tandem.transport.api import FailoverIn
from tests.operations.two_sites import TEMPLATE, TwoSites, two_sites

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoSites]:
    with two_sites(tmp_path_factory.mktemp("report")) as built:
        yield built


def _protect_and_fail_over(s: TwoSites, app: str, kind: AppKind, path: Path) -> dict[str, Any]:
    apps.add_app(s.prod.site, name=app, host="host1", kind=kind, path=str(path))
    apps.protect_app(s.prod.site, name=app, template=TEMPLATE, actor="t")
    done = s.run(s.prod, capture.submit_capture(s.prod.site, app=app, actor="t"))
    assert done.status is JobStatus.SUCCEEDED, done.message
    assert done.result is not None, done.message
    mirrored = s.prod.runner.wait(done.result["mirror_job"], timeout=60)
    assert mirrored.status is JobStatus.SUCCEEDED, mirrored.message
    mount_point = str(s.root / f"{app}-dr") if kind is AppKind.FILESYSTEM else None
    asked = FailoverIn(host="host2", confirm=["FAILOVER"], mount_point=mount_point)
    job = failover.submit(s.dr.site, app, asked, "t")
    done = s.run(s.dr, job)
    assert done.status is JobStatus.SUCCEEDED, done.message
    assert done.result is not None, done.message
    return dict(done.result)


def _syncback(s: TwoSites, app: str) -> dict[str, Any]:
    done = s.run(s.dr, syncback.submit_syncback(s.dr.site, app=app, actor="t"))
    assert done.status is JobStatus.SUCCEEDED, done.message
    assert "written at the DR site since failover" in (done.message or "")
    assert done.result is not None, done.message
    return dict(done.result)


def test_a_tree_syncback_reports_the_files_written_since_the_failover(sites: TwoSites) -> None:
    s = sites
    data = s.root / "shop"
    (data / "assets").mkdir(parents=True)
    (data / "assets" / "catalog.bin").write_bytes(os.urandom(3 * MiB))  # never touched at DR
    (data / "orders.txt").write_text("order 1\n")
    _protect_and_fail_over(s, "shop", AppKind.FILESYSTEM, data)
    at_dr = s.root / "shop-dr"

    (at_dr / "orders.txt").write_text("order 1\norder 2 taken at DR\n")  # changed: 28 bytes
    (at_dr / "invoices").mkdir()
    (at_dr / "invoices" / "2.pdf").write_bytes(os.urandom(100_000))  # added
    first = _syncback(s, "shop")
    assert first["changed_since_failover"] == 28 + 100_000  # not the 3 MiB tree

    (at_dr / "invoices" / "3.pdf").write_bytes(os.urandom(5_000))
    second = _syncback(s, "shop")
    # Since the failover, not since the first syncback: what production gets back in all.
    assert second["changed_since_failover"] == 28 + 100_000 + 5_000
    assert second["bytes_sent"] < first["bytes_sent"]  # while only the new file travels


def test_a_volume_syncback_reports_the_blocks_written_since_the_failover(
    sites: TwoSites,
) -> None:
    s = sites
    volume = s.root / "disk.img"
    volume.write_bytes(os.urandom(8 * MiB))
    image = _protect_and_fail_over(s, "disk", AppKind.VOLUME, volume)["image"]
    overlay = s.dr.site.overlays[image]

    overlay.write(0, os.urandom(2 * BLOCK))
    overlay.flush()
    assert _syncback(s, "disk")["changed_since_failover"] == 2 * BLOCK

    overlay.write(5 * MiB, os.urandom(BLOCK))
    overlay.flush()
    assert _syncback(s, "disk")["changed_since_failover"] == 3 * BLOCK
