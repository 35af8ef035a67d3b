"""A PostgreSQL app failed back in the replica style (SPEC §5) with real daemons, driven by
the CLI: ``failback --target original`` stops both databases itself (production's before
the first pass, the DR copy's before the protective snapshot), production gets the DR
writes; an undo brings the DR copy back to the protective snapshot and running (its WAL
captured again); a second failback is committed and production streams its WAL again on
the DR copy's timeline."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import Cli, Drill, wait_for
from tests.e2e.pgsite import (
    HISTORY,
    amcheck,
    drill,
    failed_over,
    server_now,
    shared_dir,
    streams_on_its_slot,
    window_end,
)
from tests.e2e.test_live_apps import INVARIANT, as_postgres

__all__ = ["drill", "shared_dir"]  # the fixtures, used by name


def state(cli: Cli, app: str) -> str:
    return str(next(x for x in cli("apps") if x["name"] == app)["state"])


def test_a_database_fails_back_replica_style_is_undone_then_committed_and_streams_again(
    drill: Drill, shared_dir: Path
) -> None:
    a, b = drill.a, drill.b
    with failed_over(drill, shared_dir) as over:
        prod, writer = over.prod, over.writer
        as_postgres(
            str(writer.bin / "pgbench"), *writer.conn(), "-n", "-c", "2", "-t", "100", "postgres"
        )
        writer.sql("INSERT INTO marks VALUES ('dr')")
        at_dr = writer.sql(HISTORY)

        # Production was brought up again meanwhile (say, to look at it): the failback stops
        # it before writing; then the DR copy stops before the protective snapshot.
        prod.start()
        back = b("failback", "db", "--target", "original")
        assert back["job"]["status"] == "succeeded", back["job"]
        assert state(b, "db") == "failback-pending"
        assert not (prod.data / "postmaster.pid").exists()
        assert not (over.dr_path / "postmaster.pid").exists()
        prod.start()
        assert prod.sql(HISTORY) == at_dr and prod.sql("SELECT site FROM marks") == "dr"
        prod.sql("INSERT INTO marks VALUES ('prod-before-undo')")  # undone with the failback

        undone = b("undo-failback", "db")
        assert undone["job"]["status"] == "succeeded", undone["job"]
        assert state(b, "db") == "failed-over"
        assert not (prod.data / "postmaster.pid").exists()  # production stopped again
        # The DR copy runs again where it listened, from the protective snapshot, and its
        # WAL is captured at DR again.
        assert writer.sql(HISTORY) == at_dr and writer.sql("SELECT site FROM marks") == "dr"
        streams_on_its_slot(writer)  # the DR copy's WAL streamed again
        writer.sql("INSERT INTO marks VALUES ('dr-after-undo')")
        at_dr = writer.sql(HISTORY)
        sums = writer.sql(INVARIANT)
        written = server_now(writer)
        wait_for(lambda: (end := window_end(b, "db")) and end > written, 60, "the DR WAL")

        again = b("failback", "db", "--target", "original")
        assert again["job"]["status"] == "succeeded", again["job"]
        committed = b("commit-failback", "db")
        assert committed["job"]["status"] == "succeeded", committed["job"]
        assert state(b, "db") == "managed"
        prod.start()  # no --power-on (and no start hook): the operator starts it
        assert prod.sql(HISTORY) == at_dr
        assert prod.sql("SELECT string_agg(site, ',' ORDER BY site) FROM marks") == (
            "dr,dr-after-undo"
        )
        assert prod.sql(INVARIANT) == sums and len(set(sums.split("|"))) == 1
        checked = amcheck(prod)
        assert checked.returncode == 0, checked.stdout + checked.stderr

        # Production streams again, on the timeline the DR copy began at its promotion.
        timeline = "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"
        assert prod.sql(timeline) == "00000002"
        streams_on_its_slot(prod)  # production's WAL streamed again, on one slot
        prod.sql("INSERT INTO marks VALUES ('home')")
        home = server_now(prod)
        for site in (a, b):

            def past(cli: Cli = site) -> bool:
                end = window_end(cli, "db")
                return end is not None and end > home

            wait_for(past, 60, "the window past a commit made after the failback")
