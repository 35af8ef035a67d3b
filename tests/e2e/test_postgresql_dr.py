"""A PostgreSQL app through the whole DR cycle with real daemons, driven by the CLI: planned
failover to the latest WAL (checked with pg_amcheck), pgbench at the DR site, the final
syncback restored at production, failback, and the WAL streaming again from production on
the DR copy's new timeline."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import Cli, Drill, wait_for
from tests.e2e.pgsite import (
    CONFIRM,
    HISTORY,
    amcheck,
    bench,
    drill,
    failed_over,
    recovered,
    server_now,
    shared_dir,
    stop_bench,
    streams_on_its_slot,
    window_end,
)
from tests.e2e.test_live_apps import INVARIANT, as_postgres

__all__ = ["drill", "shared_dir"]  # the fixtures, used by name


def test_a_database_failed_over_comes_home_with_every_dr_transaction_and_streams_again(
    drill: Drill, shared_dir: Path
) -> None:
    a, b = drill.a, drill.b
    with failed_over(drill, shared_dir) as over:
        prod, writer, at_prod = over.prod, over.writer, over.at_prod
        # The app runs at the DR site; a catch-up syncback is taken under its load (a base
        # backup of the DR cluster) and brings the data home (restoring it rolls it forward:
        # test_postgresql_rollforward.py).
        load = bench(writer)
        try:
            wait_for(lambda: writer.sql(HISTORY) != at_prod, 60, "pgbench at DR")
            catch_up = b("syncback", "db", "--label", "catch-up")
        finally:
            stop_bench(writer, load)
        assert catch_up["job"]["status"] == "succeeded", catch_up["job"]
        assert catch_up["job"]["result"]["consistency"] == "base-backup"
        before = int(writer.sql("SELECT count(*) FROM pgbench_history"))
        as_postgres(
            str(writer.bin / "pgbench"), *writer.conn(), "-n", "-c", "2", "-t", "100", "postgres"
        )
        writer.sql("INSERT INTO marks VALUES ('dr')")
        at_dr = writer.sql(HISTORY)
        sums = writer.sql(INVARIANT)
        assert int(at_dr.split("|")[0]) == before + 200
        # Its WAL is captured at DR, on the new timeline: the window moves with it, and
        # the replica recovers to the DR copy's state (were the DR host lost).
        written = server_now(writer)
        wait_for(lambda: (end := window_end(b, "db")) and end > written, 60, "the DR WAL")
        assert writer.sql("SELECT count(*) FROM pg_stat_replication") == "1"
        replica = next(i for i in b("images", "db") if i["kind"] == "replica")
        again = b(
            "mount",
            replica["id"],
            "--host",
            "host2",
            "--latest",
            "--mount-point",
            str(shared_dir / "dr-again"),
        )
        assert again["job"]["status"] == "succeeded", again["job"]
        copy = recovered(shared_dir, again["job"]["result"])
        assert copy.sql(HISTORY) == at_dr and copy.sql("SELECT site FROM marks") == "dr"
        b("unmount", again["image"]["id"])
        writer.stop()  # downtime starts: the final syncback takes the stopped cluster

        final = b("syncback", "db", "--label", "final")
        assert final["job"]["status"] == "succeeded", final["job"]
        # What changed since the catch-up, not the cluster: the catch-up (a base backup, its
        # WAL streamed apart) held no pg_wal, the stopped cluster's final image does.
        assert final["job"]["bytes_sent"] < final["image"]["size"] // 4
        restored = a("restore", "db", "--image", final["image"]["id"], *CONFIRM)
        assert restored["job"]["status"] == "succeeded", restored["job"]
        print(
            f"syncback under pgbench {catch_up['job']['bytes_sent']} B, final syncback "
            f"{final['job']['bytes_sent']} B; failback downtime (final syncback → restored) "
            f"{restored['job']['result']['downtime_seconds']:.2f} s"
        )
        prod.start()
        assert prod.sql(HISTORY) == at_dr  # every transaction committed at DR, no more
        assert prod.sql(INVARIANT) == sums and len(set(sums.split("|"))) == 1
        assert prod.sql("SELECT site FROM marks") == "dr"
        checked = amcheck(prod)
        assert checked.returncode == 0, checked.stdout + checked.stderr

        done_back = b("failback", "db")
        assert done_back["job"]["status"] == "succeeded", done_back["job"]
        assert next(x for x in b("apps") if x["name"] == "db")["state"] == "managed"
        # The DR copy's slot came home in pg_replslot; production's stream uses its own.

        # Production streams again, on the timeline the DR copy began at its promotion.
        timeline = "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"
        assert prod.sql(timeline) == "00000002"
        streams_on_its_slot(prod)  # one slot, the stream's own
        base = a("capture", "db")
        assert base["job"]["status"] == "succeeded", base["job"]
        assert base["image"]["pg"]["timeline"] == 2
        prod.sql("INSERT INTO marks VALUES ('home')")
        home = server_now(prod)
        for site in (a, b):

            def past(cli: Cli = site) -> bool:
                end = window_end(cli, "db")
                return end is not None and end > home

            wait_for(past, 60, "the window past a commit made after the failback")
        latest = b(
            "test-failover",
            "db",
            "--host",
            "host2",
            "--latest",
            "--mount-point",
            str(shared_dir / "again"),
        )
        assert latest["job"]["status"] == "succeeded", latest["job"]
        copy = recovered(shared_dir, latest["job"]["result"])
        assert copy.sql("SELECT string_agg(site, ',' ORDER BY site) FROM marks") == "dr,home"
        b("unmount", latest["image"]["id"])

        # The DR copy's WAL came home too: production recovers to a second of the DR period
        # from its base image taken before the failover.
        before_failover = next(
            i for i in a("images", "db") if i["kind"] == "snapshot" and i["pg"]["timeline"] == 1
        )
        at = a(
            "mount",
            before_failover["id"],
            "--host",
            "host1",
            "--time",
            written.isoformat(),
            "--mount-point",
            str(shared_dir / "home-pit"),
        )
        assert at["job"]["status"] == "succeeded", at["job"]
        copy = recovered(shared_dir, at["job"]["result"])
        assert copy.sql(HISTORY) == at_dr and copy.sql("SELECT site FROM marks") == "dr"
        a("unmount", at["image"]["id"])
