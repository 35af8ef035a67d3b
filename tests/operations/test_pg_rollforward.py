"""Restoring a catch-up syncback of a database (a base backup of the DR copy while it ran):
planned against the DR WAL production holds, refused before any job exists when that WAL
does not reach the backup's end (naming the first segment missing) or the target is
before it; the end-to-end roll-forward is tests/e2e/test_postgresql_rollforward.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tandem.catalog import queries as q
from tandem.domain.images import ImageKind
from tandem.domain.lifecycle import AppKind, AppState
from tandem.domain.rules import RESTORE_CONFIRMATIONS
from tandem.domain.wal import SEGMENT, segment_name
from tandem.errors import InvalidInput, RecoveryPointUnavailable, WalNotHome
from tandem.operations import pg_recovery, restore, wal
from tandem.operations.site import Site
from tests.appliance.conftest import Booted
from tests.operations.test_wal import PG, T0

SYNCBACK_PG = {
    "start_lsn": "0/5000028",
    "start_time": (T0 + timedelta(minutes=5)).isoformat(),
    "start_wal": segment_name(2, 5 * SEGMENT),
    "timeline": 2,
    "stop_lsn": "0/5000100",
    "stop_time": (T0 + timedelta(minutes=5, seconds=1)).isoformat(),
    "backup_label": "START WAL LOCATION: 0/5000028\n",
    "tablespace_map": "",
}


def failed_over_home(site: Site) -> tuple[str, str, str]:
    """Production's record of a database failed over at the peer: its own base image
    (timeline 1) and a catch-up syncback from the DR copy (timeline 2). Returns the ids of
    the app, the snapshot and the syncback."""
    with site.catalog.begin() as session:
        q.add_host(session, name="h", url="https://h", token="t", fingerprint="00")
        app = q.add_app(
            session,
            name="db",
            kind=AppKind.POSTGRESQL,
            host="h",
            path="/pg",
            state=AppState.MANAGED,
        )
        app.peer_active = True
        snap = q.add_image(
            session,
            app="db",
            kind=ImageKind.SNAPSHOT,
            manifest="0" * 64,
            pg=PG,
            created=T0 + timedelta(seconds=3),
        )
        back = q.add_image(
            session,
            app="db",
            kind=ImageKind.SYNCBACK,
            manifest="1" * 64,
            pg=SYNCBACK_PG,
            consistency="base-backup",
            created=T0 + timedelta(minutes=5, seconds=2),
        )
        return app.id, snap.id, back.id


def hold(site: Site, app_id: str, name: str, data: bytes, *, complete: bool = False) -> None:
    seen = T0 + timedelta(minutes=6)
    wal.store(site, app_id=app_id, name=name, offset=0, data=data, complete=complete, seen=seen)


def rolled(site: Site, image: str, target: datetime | None = None) -> pg_recovery.Plan:
    with site.catalog.read() as session:
        app = q.get_app(session, name="db")
        img = q.get_image(session, image_id=image)
    return pg_recovery.rollforward(site, app, img, target)


def test_a_catch_up_syncback_is_refused_until_its_wal_reaches_the_backups_end(
    booted: Booted,
) -> None:
    site = booted.appliance.site
    app_id, _, back = failed_over_home(site)
    first = segment_name(2, 5 * SEGMENT)

    with pytest.raises(WalNotHome) as none_held:
        rolled(site, back)
    assert first in none_held.value.message and "0/5000100" in none_held.value.message
    assert "final syncback" in none_held.value.message  # the other way home

    hold(site, app_id, first, b"w" * 0x50)  # the push has begun: short of the backup's end
    with pytest.raises(WalNotHome) as short:
        rolled(site, back)
    assert f"{first} (held up to LSN 0/5000050)" in short.value.message

    # The restore is refused the same way before a job exists.
    with pytest.raises(WalNotHome):
        restore.submit_restore(
            site, app="db", image=back, confirm=list(RESTORE_CONFIRMATIONS), latest=True
        )
    with site.catalog.read() as session:
        assert not [j for j in q.list_jobs(session) if j.type == restore.TYPE]

    hold(site, app_id, first, b"w" * 0x200)  # past the backup's end: consistent
    chosen = rolled(site, back)
    assert chosen.base.id == back and chosen.segments == [first]


def test_a_target_before_the_syncback_is_consistent_is_refused_naming_when_it_is(
    booted: Booted,
) -> None:
    site = booted.appliance.site
    app_id, _, back = failed_over_home(site)
    hold(site, app_id, segment_name(2, 5 * SEGMENT), b"w" * 0x200)
    with pytest.raises(RecoveryPointUnavailable) as early:
        rolled(site, back, T0 + timedelta(minutes=5))
    assert "consistent only from 2026-12-02 10:05:01" in early.value.message


def test_time_and_latest_are_refused_for_an_image_restored_as_it_is(booted: Booted) -> None:
    site = booted.appliance.site
    _, snap, _ = failed_over_home(site)
    with pytest.raises(InvalidInput, match="restored as it is"):
        restore.submit_restore(
            site, app="db", image=snap, confirm=list(RESTORE_CONFIRMATIONS), latest=True
        )
    at = datetime(2026, 12, 2, 10, 6, tzinfo=UTC).isoformat()
    with pytest.raises(InvalidInput, match="restored as it is"):
        restore.submit_restore(
            site, app="db", image=snap, confirm=list(RESTORE_CONFIRMATIONS), time=at
        )
