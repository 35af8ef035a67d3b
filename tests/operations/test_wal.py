"""The WAL held by an appliance: stored idempotently and verified, taken from the peer only
for its PostgreSQL mirrors, and the recoverable window and plan a recovery is refused by."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import blake3
import pytest

from tandem.catalog import queries as q
from tandem.catalog.models import App, Job, Template
from tandem.domain import wal as wal_names
from tandem.domain.images import ImageKind
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppKind, AppState
from tandem.domain.wal import SEGMENT, segment_name
from tandem.errors import Conflict, InvalidInput, RecoveryPointUnavailable, StorageError
from tandem.operations import pg_recovery, wal
from tandem.operations.apps import risk_of
from tandem.operations.report import drill_report
from tandem.operations.site import Site
from tandem.transport.peer import WalPush
from tests.appliance.conftest import Booted

T0 = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
PG = {
    "start_lsn": "0/2000028",
    "start_time": (T0 + timedelta(seconds=2)).isoformat(),
    "start_wal": segment_name(1, 2 * SEGMENT),
    "timeline": 1,
    "stop_lsn": "0/2000100",
    "stop_time": (T0 + timedelta(seconds=3)).isoformat(),
    "backup_label": "START WAL LOCATION: 0/2000028\n",
    "tablespace_map": "",
}


def mirror(site: Site, name: str = "db", origin: str = "prod") -> str:
    with site.catalog.begin() as session:
        app = q.add_app(
            session,
            name=name,
            kind=AppKind.POSTGRESQL,
            host="h",
            path="/pg",
            origin=origin,
            state=AppState.MANAGED,
        )
        q.add_image(
            session,
            app=name,
            kind=ImageKind.REPLICA,
            manifest="0" * 64,
            pg=PG,
            created=T0 + timedelta(seconds=3),
            origin=origin,
        )
        return app.id


def seg(n: int) -> str:
    return segment_name(1, n * SEGMENT)


def test_a_segment_grows_by_appending_and_a_resent_piece_changes_nothing(booted: Booted) -> None:
    site = booted.appliance.site
    app_id = mirror(site)
    name = seg(2)
    wal.store(site, app_id=app_id, name=name, offset=0, data=b"a" * 100, complete=False, seen=T0)
    # the same bytes again (a retry after a break), then more from an offset inside them
    wal.store(site, app_id=app_id, name=name, offset=0, data=b"a" * 100, complete=False, seen=T0)
    row = wal.store(
        site,
        app_id=app_id,
        name=name,
        offset=50,
        data=b"a" * 50 + b"b" * 50,
        complete=True,
        seen=T0 + timedelta(1),
    )
    assert (row.size, row.complete) == (150, True)
    assert wal.read_segment(site, row) == b"a" * 100 + b"b" * 50
    with pytest.raises(Conflict):  # a piece past what is held would leave a hole
        wal.store(site, app_id=app_id, name=seg(3), offset=10, data=b"x", complete=False, seen=T0)
    (wal.wal_dir(site, app_id) / name).write_bytes(b"a" * 99 + b"X" + b"b" * 50)
    with pytest.raises(StorageError, match="does not match its digest"):
        wal.read_segment(site, row)


def push(name: str, data: bytes, complete: bool = False) -> WalPush:
    return WalPush(
        name=name,
        offset=0,
        data=base64.b64encode(data).decode(),
        complete=complete,
        digest=blake3.blake3(data).hexdigest(),
        seen=T0,
    )


def test_the_peer_sends_wal_only_of_its_postgresql_mirrors_and_with_the_right_digest(
    booted: Booted,
) -> None:
    site = booted.appliance.site
    mirror(site, "db", origin="prod")
    assert wal.receive_push(site, peer="prod", app="db", body=push(seg(2), b"x" * 10)).size == 10
    with pytest.raises(Conflict, match="not a PostgreSQL mirror"):
        wal.receive_push(site, peer="other", app="db", body=push(seg(2), b"x" * 10))
    past = push(seg(2), b"x").model_copy(update={"offset": 50})
    with pytest.raises(Conflict, match="not a PostgreSQL mirror"):  # refused before answering
        wal.receive_push(site, peer="other", app="db", body=past)  # what is held
    assert wal.receive_push(site, peer="prod", app="db", body=past).size == 10  # stores nothing
    bad = push(seg(3), b"y" * 10).model_copy(update={"digest": "0" * 64})
    with pytest.raises(InvalidInput, match="digest"):
        wal.receive_push(site, peer="prod", app="db", body=bad)
    with pytest.raises(ValueError):  # a name that is no segment never reaches the disk
        push("../../etc/passwd", b"")


def test_a_time_outside_the_window_or_past_a_gap_is_refused_saying_where(booted: Booted) -> None:
    site = booted.appliance.site
    app_id = mirror(site)
    for n in (2, 3):
        wal.store(
            site,
            app_id=app_id,
            name=seg(n),
            offset=0,
            data=b"w",
            complete=True,
            seen=T0 + timedelta(seconds=10 * n),
        )
    wal.store(
        site,
        app_id=app_id,
        name=seg(5),
        offset=0,
        data=b"w",
        complete=False,
        seen=T0 + timedelta(seconds=50),
    )
    with site.catalog.read() as session:
        app = q.get_app(session, name="db")
    window = wal.window(site, app)
    assert window.start == T0 + timedelta(seconds=3)
    assert window.end == T0 + timedelta(seconds=30) and window.gap == "0/4000000"
    chosen = pg_recovery.plan(site, app, T0 + timedelta(seconds=20))
    assert chosen.segments == [seg(2), seg(3)]
    with pytest.raises(RecoveryPointUnavailable, match="before its oldest base") as early:
        pg_recovery.plan(site, app, T0)
    assert "recoverable window" in early.value.message
    with pytest.raises(RecoveryPointUnavailable, match="gap at LSN 0/4000000"):
        pg_recovery.plan(site, app, T0 + timedelta(seconds=45))
    with pytest.raises(RecoveryPointUnavailable, match="gap at LSN 0/4000000"):
        pg_recovery.plan(site, app, None)  # the latest lies past the gap


def test_a_window_read_between_the_stores_of_one_listing_claims_nothing_it_lacks(
    booted: Booted,
) -> None:
    """One listing vouches for a commit made at T0+8 s, which lies in the segment that
    listing began (3). Its segments are stored (and sent to the peer) one at a time: a
    window or a ``--latest`` plan read after the completed segment 2 is stored and before
    3 is must end where the previous listing left it, not at the new point (a recovery then
    stopped at 2 and lost the commit while the window claimed it)."""
    site = booted.appliance.site
    app_id = mirror(site)
    before = T0 + timedelta(seconds=5)
    wal.store(site, app_id=app_id, name=seg(2), offset=0, data=b"a", complete=False, seen=before)
    now = T0 + timedelta(seconds=10)
    stamps = wal_names.vouched([seg(2), seg(3), "00000001.history"], now, before)
    assert stamps == {seg(2): before, seg(3): now, "00000001.history": before}
    wal.store(
        site, app_id=app_id, name=seg(2), offset=1, data=b"b", complete=True, seen=stamps[seg(2)]
    )
    with site.catalog.read() as session:
        app = q.get_app(session, name="db")
    assert wal.window(site, app).end == before
    assert pg_recovery.plan(site, app, None).window.end == before
    with pytest.raises(RecoveryPointUnavailable, match="does not reach it yet"):
        pg_recovery.plan(site, app, T0 + timedelta(seconds=8))
    wal.store(site, app_id=app_id, name=seg(3), offset=0, data=b"c", complete=False, seen=now)
    assert wal.window(site, app).end == now
    assert pg_recovery.plan(site, app, None).segments == [seg(2), seg(3)]


def test_a_history_file_stored_first_vouches_for_nothing(booted: Booted) -> None:
    """A listing (point S1) holds a new timeline's history, its segment 2 (complete) and 3
    (where commits before S1 lie). The pull stores the history, then reading segment 2
    fails. The next listing's older segments carry the point held before: not S1, which
    nothing stored vouched for, or a window read between its segments 2 and 3 would claim
    commits that lie in 3."""
    site = booted.appliance.site
    app_id = mirror(site)  # a base on timeline 1 at 0/2000028
    history, two, three = (
        "00000002.history",
        segment_name(2, 2 * SEGMENT),
        segment_name(2, 3 * SEGMENT),
    )
    s1, s2 = T0 + timedelta(seconds=20), T0 + timedelta(seconds=30)

    def stamps(seen: datetime) -> dict[str, datetime]:
        with site.catalog.read() as session:
            held = [(r.name, r.seen) for r in q.list_wal_segments(session, app_id=app_id)]
        return wal_names.vouched([history, two, three], seen, wal_names.floor_of(held) or T0)

    first = stamps(s1)
    text = b"1\t0/2000100\tno recovery target specified\n"
    wal.store(site, app_id=app_id, name=history, offset=0, data=text, complete=True,
              seen=first[history])  # fmt: skip
    second = stamps(s2)  # the read of segment 2 failed: listed again
    assert second[two] < s1
    wal.store(site, app_id=app_id, name=two, offset=0, data=b"2", complete=True, seen=second[two])
    with site.catalog.read() as session:
        app = q.get_app(session, name="db")
    end = wal.window(site, app).end
    assert end is None or end < s1
    wal.store(site, app_id=app_id, name=three, offset=0, data=b"3", complete=False,
              seen=second[three])  # fmt: skip
    assert wal.window(site, app).end == s2
    assert pg_recovery.plan(site, app, None).segments == [two, three]


def test_the_wal_of_a_promoted_copy_extends_the_window_on_its_new_timeline(
    booted: Booted,
) -> None:
    """At DR after a failover: the replica's timeline 1, then the DR copy's timeline 2 from
    the segment of its promotion, with its history file; a recovery follows them both and
    stages the history first. The history is never pruned."""
    site = booted.appliance.site
    app_id = mirror(site)
    for n, timeline, complete in ((2, 1, True), (3, 1, False), (3, 2, True), (4, 2, False)):
        wal.store(
            site,
            app_id=app_id,
            name=segment_name(timeline, n * SEGMENT),
            offset=0,
            data=b"w",
            complete=complete,
            seen=T0 + timedelta(seconds=10 * n + timeline),
        )
    history = b"1\t0/3000100\tno recovery target specified\n"
    wal.store(
        site,
        app_id=app_id,
        name="00000002.history",
        offset=0,
        data=history,
        complete=True,
        seen=T0 + timedelta(seconds=31),
    )
    with site.catalog.read() as session:
        app = q.get_app(session, name="db")
        row = q.get_wal_segment(session, app_id=app_id, name="00000002.history")
        assert row is not None and row.timeline == 2
    window = wal.window(site, app)
    assert window.end == T0 + timedelta(seconds=42) and window.gap is None
    chosen = pg_recovery.plan(site, app, None)
    assert chosen.segments == [seg(2), segment_name(2, 3 * SEGMENT), segment_name(2, 4 * SEGMENT)]
    assert chosen.histories == ["00000002.history"]
    assert "00000002.history" not in wal.prune(site, app)
    with pytest.raises(InvalidInput):
        wal.receive_push(
            site,
            peer="prod",
            app="db",
            body=WalPush(
                name="00000003.history",
                offset=0,
                data=base64.b64encode(b"x").decode(),
                complete=True,
                digest=blake3.blake3(b"y").hexdigest(),
                seen=T0,
            ),
        )


def test_segments_older_than_the_oldest_base_image_are_pruned(booted: Booted) -> None:
    site = booted.appliance.site
    app_id = mirror(site)
    for n in (1, 2):
        wal.store(site, app_id=app_id, name=seg(n), offset=0, data=b"w", complete=True, seen=T0)
    with site.catalog.read() as session:
        app = q.get_app(session, name="db")
    assert wal.prune(site, app) == [seg(1)]
    with site.catalog.read() as session:
        assert [s.name for s in q.list_wal_segments(session, app_id=app_id)] == [seg(2)]
    assert not (wal.wal_dir(site, app_id) / seg(1)).exists()


def test_a_postgresql_app_whose_wal_is_fresh_is_not_at_risk_for_an_old_base() -> None:
    app = App(
        name="db",
        kind=AppKind.POSTGRESQL,
        peer_active=False,
        created=T0,
        last_capture=T0,
        last_replicated=T0,
    )
    template = Template(name="t", mirror=True, max_lag_seconds=60)
    now = T0 + timedelta(hours=1)
    assert risk_of(app, template, now).at_risk  # the base image alone is an hour old
    fresh = risk_of(app, template, now, wal_point=now - timedelta(seconds=2))
    assert not fresh.at_risk and fresh.rpo_seconds == 2.0


def test_the_drill_report_gives_a_recovered_database_its_rpo_and_pg_amcheck_result(
    booted: Booted,
) -> None:
    site = booted.appliance.site
    mirror(site)
    reached = T0 + timedelta(minutes=5)
    with site.catalog.begin() as session:
        for n, (type_, checked) in enumerate(
            (("test-failover", {"ok": False, "seconds": 1.5}), ("failover", None))
        ):
            session.add(
                Job(
                    id=f"job-{n}",
                    type=type_,
                    app="db",
                    status=JobStatus.SUCCEEDED,
                    started=reached + timedelta(seconds=7),
                    finished=reached + timedelta(seconds=9),
                    result={"recovered_to": reached.isoformat(), "amcheck": checked, "base": "b"},
                )
            )
    shown = drill_report(site, app="db")
    assert shown.rpo_seconds == 7.0  # the failover started 7 s after the last commit held
    assert shown.rpo_image == "b"
    tested, over = shown.steps
    assert tested.database is not None and "CORRUPTION FOUND" in tested.database
    assert over.database is not None and "pg_amcheck not run (--verify)" in over.database


def test_the_peer_sends_no_wal_for_a_mirror_that_is_no_postgresql_app(booted: Booted) -> None:
    """Guards ``receive_push``'s kind check: a file-system mirror holds no WAL."""
    site = booted.appliance.site
    with site.catalog.begin() as session:
        app = q.add_app(
            session, name="files", kind=AppKind.FILESYSTEM, host="h", path="/srv",
            origin="prod", state=AppState.MANAGED,
        )  # fmt: skip
        app_id = app.id
    with pytest.raises(Conflict, match="not a PostgreSQL mirror"):
        wal.receive_push(site, peer="prod", app="files", body=push(seg(2), b"x" * 10))
    with site.catalog.read() as session:
        assert q.list_wal_segments(session, app_id=app_id) == []


def test_production_takes_wal_home_only_while_failed_over_and_only_of_dr_timelines(
    booted: Booted,
) -> None:
    """Guards ``receive_push`` for this site's own app: WAL from the peer only while the
    app is failed over there, and only of the timelines the DR copy wrote after its
    promotion (newer than every base image here): the peer never adds to production's own."""
    site = booted.appliance.site
    with site.catalog.begin() as session:
        q.add_host(session, name="h", url="https://h", token="t", fingerprint="00")
        app = q.add_app(
            session, name="db", kind=AppKind.POSTGRESQL, host="h", path="/pg",
            state=AppState.MANAGED,
        )  # fmt: skip
        app_id = app.id
        q.add_image(
            session, app="db", kind=ImageKind.SNAPSHOT, manifest="0" * 64, pg=PG,
            created=T0 + timedelta(seconds=3),
        )  # fmt: skip
    dr_segment = segment_name(2, 3 * SEGMENT)
    with pytest.raises(Conflict, match="nor failed over at it"):
        wal.receive_push(site, peer="prod", app="db", body=push(dr_segment, b"x" * 10))
    with site.catalog.begin() as session:
        q.get_app(session, name="db").peer_active = True
    # production's own timeline 1 (a segment it may hold in part): never from the peer
    with pytest.raises(Conflict, match="timeline 1"):
        wal.receive_push(site, peer="prod", app="db", body=push(seg(3), b"x" * 10))
    with site.catalog.read() as session:
        assert q.list_wal_segments(session, app_id=app_id) == []
    assert wal.receive_push(site, peer="prod", app="db", body=push(dr_segment, b"x" * 10)).size
    history = b"1\t0/3000100\tno recovery target specified\n"
    assert wal.receive_push(site, peer="prod", app="db", body=push("00000002.history", history))
    with site.catalog.read() as session:
        held = {s.name: s for s in q.list_wal_segments(session, app_id=app_id)}
    assert set(held) == {dr_segment, "00000002.history"}
