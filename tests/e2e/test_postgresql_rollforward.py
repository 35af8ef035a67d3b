"""Home sooner: a catch-up syncback of a database, taken while it ran at the DR site under
pgbench, restored at production and rolled forward with the DR copy's WAL the DR site
pushed home, to the newest WAL held. Production then holds the DR writes made after the
syncback (up to the WAL pushed), the pgbench invariant holds and pg_amcheck finds nothing.
Real daemons, driven by the CLI."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from tests.e2e.conftest import Drill, wait_for
from tests.e2e.pgsite import (
    CONFIRM,
    HISTORY,
    amcheck,
    bench,
    drill,
    failed_over,
    server_now,
    shared_dir,
    stop_bench,
    wal_written,
    window_end,
)
from tests.e2e.test_live_apps import INVARIANT, as_postgres

__all__ = ["drill", "shared_dir"]  # the fixtures, used by name


def test_a_catch_up_syncback_restored_at_production_rolls_forward_to_the_dr_wal_pushed_home(
    drill: Drill, shared_dir: Path
) -> None:
    a, b = drill.a, drill.b
    with failed_over(drill, shared_dir) as over:
        prod, writer, at_prod = over.prod, over.writer, over.at_prod
        load = bench(writer)
        try:
            wait_for(lambda: writer.sql(HISTORY) != at_prod, 60, "pgbench at DR")
            catch_up = b("syncback", "db", "--label", "catch-up")
        finally:
            stop_bench(writer, load)
        assert catch_up["job"]["status"] == "succeeded", catch_up["job"]
        assert catch_up["job"]["result"]["consistency"] == "base-backup"
        image = catch_up["image"]["id"]
        consistent = datetime.fromisoformat(catch_up["image"]["pg"]["stop_time"])

        # More DR writes after the syncback, then their WAL home at production.
        at_syncback = int(writer.sql("SELECT count(*) FROM pgbench_history"))
        as_postgres(
            str(writer.bin / "pgbench"), *writer.conn(), "-n", "-c", "2", "-t", "100", "postgres"
        )
        writer.sql("INSERT INTO marks VALUES ('dr')")
        at_dr = writer.sql(HISTORY)
        sums = writer.sql(INVARIANT)
        assert int(at_dr.split("|")[0]) == at_syncback + 200
        wal_written(writer)  # the DR site's receiver has the last commit
        written = server_now(writer)
        wait_for(
            lambda: (end := window_end(a, "db")) is not None and end > written,
            60,
            "the DR WAL pushed home to production",
        )

        # A point before the base backup ended cannot be reached from it: refused, touching
        # nothing, naming when it is consistent.
        early = consistent - timedelta(seconds=1)
        refused = a.run(
            "restore", "db", "--image", image, "--time", early.isoformat(), *CONFIRM, check=False
        )
        assert refused.code != 0 and "Traceback" not in refused.stderr
        assert "consistent only from" in refused.error, refused.error

        restored = a("restore", "db", "--image", image, "--latest", *CONFIRM)
        assert restored["job"]["status"] == "succeeded", restored["job"]
        reached = datetime.fromisoformat(restored["recovery"]["recovered_to"])
        assert consistent < reached <= written  # the last DR commit replayed
        assert "rolled forward to" in restored["job"]["message"]
        shown = a("job", "show", restored["job"]["id"])
        assert shown["result"]["recovered_to"] == restored["recovery"]["recovered_to"]
        assert "rolled forward to" in shown["message"]
        print(
            f"catch-up syncback {catch_up['job']['bytes_sent']} B rolled forward at "
            f"production to {reached.isoformat()} with "
            f"{restored['job']['result']['wal_segments']} WAL segment(s)"
        )

        prod.start()
        assert prod.sql(HISTORY) == at_dr  # every DR transaction up to the WAL pushed home
        assert prod.sql(INVARIANT) == sums and len(set(sums.split("|"))) == 1
        assert prod.sql("SELECT site FROM marks") == "dr"
        # Promoted on a timeline of its own, after the DR copy's.
        timeline = "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"
        assert prod.sql(timeline) == "00000003"
        checked = amcheck(prod)
        assert checked.returncode == 0, checked.stdout + checked.stderr
