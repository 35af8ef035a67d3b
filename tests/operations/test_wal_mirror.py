"""WAL mirrored to the peer over real HTTPS: what the DR window and production's RPO say
while a database is busy and while it is idle (its point moves on with no new byte)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tandem.catalog import queries as q
from tandem.domain.lifecycle import AppKind, AppState
from tandem.operations import apps, wal
from tandem.transport.peer import WalHeld, WalPush
from tests.operations.test_wal import T0, mirror, seg
from tests.operations.two_sites import TEMPLATE, TwoSites, two_sites


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[TwoSites]:
    with two_sites(tmp_path) as built:
        yield built


class Mirrored:
    """A PostgreSQL app ``db`` at production, protected by the mirroring template, and its
    mirror record at DR with a base image (stopped at T0 + 3 s); WAL held at production
    with ``hold`` and pushed to DR as the shipper pushes it."""

    def __init__(self, sites: TwoSites) -> None:
        self.prod, self.dr = sites.prod.site, sites.dr.site
        with self.prod.catalog.begin() as session:
            self.app_id = q.add_app(
                session,
                name="db",
                kind=AppKind.POSTGRESQL,
                host="host1",
                path="/pg",
                state=AppState.MANAGED,
            ).id
            q.set_app_template(session, name="db", template=TEMPLATE)
        self.dr_app_id = mirror(self.dr, "db", origin="prod")

    def hold(self, offset: int, data: bytes, seconds: float) -> None:
        wal.store(
            self.prod, app_id=self.app_id, name=seg(2), offset=offset, data=data,
            complete=False, seen=T0 + timedelta(seconds=seconds),
        )  # fmt: skip
        with self.prod.catalog.read() as session:
            wal.push(self.prod, q.get_app(session, name="db"))

    def held_here(self) -> datetime | None:
        """The moment production judges the app's RPO on: what the peer was told."""
        with self.prod.catalog.read() as session:
            app = q.get_app(session, name="db")
            template = q.get_template(session, name=TEMPLATE)
            return apps.wal_points(session, [app], {TEMPLATE: template}).get("db")

    def dr_end(self) -> datetime | None:
        with self.dr.catalog.read() as session:
            app = q.get_app(session, name="db")
        return wal.window(self.dr, app).end


def test_an_idle_databases_point_reaches_the_peer_without_new_bytes(sites: TwoSites) -> None:
    m = Mirrored(sites)
    # Busy: new bytes carry their point to the peer.
    m.hold(0, b"w" * 100, 10)
    assert m.dr_end() == m.held_here() == T0 + timedelta(seconds=10)

    # Idle: not a byte more, but every commit before T0 + 20 s is held; the peer is told.
    m.hold(100, b"", 20)
    assert m.dr_end() == m.held_here() == T0 + timedelta(seconds=20)

    # A point less than SEEN_PUSH_EVERY ahead is not sent alone, and production's RPO is
    # judged on what the peer was told, not on what production holds.
    assert wal.SEEN_PUSH_EVERY > 2
    m.hold(100, b"", 22)
    assert m.dr_end() == m.held_here() == T0 + timedelta(seconds=20)


def test_a_peer_that_lost_wal_it_acknowledged_is_sent_it_again(sites: TwoSites) -> None:
    """The DR site rebuilt, or a segment pruned there before production recorded the
    answer: production's record says the peer holds bytes it does not. The peer answers
    what it holds and production resends from there, rather than being refused forever."""
    m = Mirrored(sites)
    m.hold(0, b"w" * 100, 10)
    with m.dr.catalog.begin() as session:
        q.delete_wal_segments(session, app_id=m.dr_app_id, names=[seg(2)])
    (wal.wal_dir(m.dr, m.dr_app_id) / seg(2)).unlink()

    m.hold(100, b"x" * 50, 20)
    with m.dr.catalog.read() as session:
        at_dr = q.get_wal_segment(session, app_id=m.dr_app_id, name=seg(2))
    assert at_dr is not None and wal.read_segment(m.dr, at_dr) == b"w" * 100 + b"x" * 50
    with m.prod.catalog.read() as session:
        here = q.get_wal_segment(session, app_id=m.app_id, name=seg(2))
    assert here is not None and here.mirrored == 150
    assert m.dr_end() == T0 + timedelta(seconds=20)


def test_a_peer_that_keeps_answering_less_is_not_followed_round(
    sites: TwoSites, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trust: a peer answering that it holds nothing, whatever is sent, costs one resend
    per segment and push, never a loop; production records what the peer said."""
    m = Mirrored(sites)
    m.hold(0, b"w" * 100, 10)
    monkeypatch.setattr(wal, "PUSH_MAX", 40)  # the segment goes in several pieces
    calls: list[int] = []

    def forgetful(site: object, *, peer: str, app: str, body: WalPush) -> WalHeld:
        calls.append(body.offset)
        return WalHeld(name=body.name, size=0)

    monkeypatch.setattr(wal, "receive_push", forgetful)
    m.hold(100, b"x" * 50, 20)
    assert calls == [100, 0]
    with m.prod.catalog.read() as session:
        here = q.get_wal_segment(session, app_id=m.app_id, name=seg(2))
    assert here is not None and here.mirrored == 0
