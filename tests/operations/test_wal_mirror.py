"""WAL mirrored to the peer over real HTTPS: what the DR window and production's RPO say
while a database is busy and while it is idle (its point moves on with no new byte)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tandem.catalog import queries as q
from tandem.domain.lifecycle import AppKind, AppState
from tandem.operations import apps, wal
from tests.operations.test_wal import T0, mirror, seg
from tests.operations.two_sites import TEMPLATE, TwoSites, two_sites


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[TwoSites]:
    with two_sites(tmp_path) as built:
        yield built


def test_an_idle_databases_point_reaches_the_peer_without_new_bytes(sites: TwoSites) -> None:
    prod, dr = sites.prod.site, sites.dr.site
    with prod.catalog.begin() as session:
        q.add_app(
            session,
            name="db",
            kind=AppKind.POSTGRESQL,
            host="host1",
            path="/pg",
            state=AppState.MANAGED,
        )
        q.set_app_template(session, name="db", template=TEMPLATE)
    mirror(dr, "db", origin="prod")  # the DR record and its base image (stopped at T0 + 3 s)

    def held_here() -> tuple[str, object]:
        with prod.catalog.read() as session:
            app = q.get_app(session, name="db")
            template = q.get_template(session, name=TEMPLATE)
            point = apps.wal_points(session, [app], {TEMPLATE: template}).get("db")
        return app.id, point

    def dr_end() -> object:
        with dr.catalog.read() as session:
            app = q.get_app(session, name="db")
        return wal.window(dr, app).end

    app_id, _ = held_here()

    def hold(offset: int, data: bytes, seconds: float) -> None:
        wal.store(
            prod, app_id=app_id, name=seg(2), offset=offset, data=data, complete=False,
            seen=T0 + timedelta(seconds=seconds),
        )  # fmt: skip
        with prod.catalog.read() as session:
            wal.push(prod, q.get_app(session, name="db"))

    # Busy: new bytes carry their point to the peer.
    hold(0, b"w" * 100, 10)
    assert dr_end() == T0 + timedelta(seconds=10)
    assert held_here()[1] == T0 + timedelta(seconds=10)

    # Idle: not a byte more, but every commit before T0 + 20 s is held; the peer is told.
    hold(100, b"", 20)
    assert dr_end() == T0 + timedelta(seconds=20)
    assert held_here()[1] == T0 + timedelta(seconds=20)

    # A point less than SEEN_PUSH_EVERY ahead is not sent alone, and production's RPO is
    # judged on what the peer was told, not on what production holds.
    assert wal.SEEN_PUSH_EVERY > 2
    hold(100, b"", 22)
    assert dr_end() == T0 + timedelta(seconds=20)
    assert held_here()[1] == T0 + timedelta(seconds=20)
