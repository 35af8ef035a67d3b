"""What the PostgreSQL end-to-end tests share: a real cluster made for a test, the drill of
two sites, the point-in-time helpers, and a database failed over to the DR site (the first
half of every failback test: production under pgbench, protected and mirrored, stopped,
failed over to the latest WAL and checked with ``pg_amcheck``)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Cli, Drill, running_drill, wait_for
from tests.e2e.test_live_apps import Cluster, as_postgres, shared_dir

__all__ = ["drill", "shared_dir"]  # the fixtures, used by name

CONFIRM = ("--confirm", "DATA LOSS", "--confirm", "OVERWRITE OTHER APPS")
HISTORY = "SELECT count(*), max(mtime) FROM pgbench_history"
PGBENCH_CLIENTS = "FROM pg_stat_activity WHERE application_name = 'pgbench'"


def make_cluster(root: Path, name: str, *options: str) -> Cluster:
    sockets = root / "sockets"
    sockets.mkdir(exist_ok=True)
    shutil.chown(sockets, "postgres", "postgres")
    data = root / name
    data.mkdir()
    shutil.chown(data, "postgres", "postgres")
    data.chmod(0o700)
    cluster = Cluster(data, sockets)
    as_postgres(
        str(cluster.bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"
    )
    if options:
        with open(data / "postgresql.conf", "a") as conf:
            conf.write("\n".join(options) + "\n")
    cluster.start()
    return cluster


def window_end(cli: Cli, app: str) -> datetime | None:
    rows = cli("images", app)
    end = rows[0]["window"]["end"] if rows and rows[0].get("window") else None
    return datetime.fromisoformat(end) if end else None


def server_now(cluster: Cluster) -> datetime:
    return datetime.fromisoformat(cluster.sql("SELECT clock_timestamp()"))


def bench(cluster: Cluster) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            str(cluster.bin / "pgbench"),
            *cluster.conn(),
            "-n",
            "-c",
            "2",
            "-j",
            "1",
            "-R",
            "50",
            "-T",
            "600",
            "postgres",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
    )


def stop_bench(cluster: Cluster, load: subprocess.Popen[bytes]) -> None:
    """End a ``bench`` run: runuser goes, and pgbench with its sessions."""
    load.kill()
    load.wait()
    cluster.sql(f"SELECT pg_terminate_backend(pid) {PGBENCH_CLIENTS}")
    wait_for(lambda: cluster.sql(f"SELECT count(*) {PGBENCH_CLIENTS}") == "0", 30, "no pgbench")


@pytest.fixture
def drill(tmp_path: Path) -> Iterator[Drill]:
    with running_drill(tmp_path) as built:
        yield built


def recovered(root: Path, result: dict[str, Any]) -> Cluster:
    """The database a test failover started at DR, to query."""
    copy = Cluster(Path(result["paths"][0]), Path(result["socket_dir"]))
    copy.port = int(result["port"])
    return copy


def amcheck(cluster: Cluster) -> subprocess.CompletedProcess[str]:
    """``pg_amcheck --heapallindexed`` over every database of ``cluster``."""
    return as_postgres(
        str(cluster.bin / "pg_amcheck"),
        *cluster.conn(),
        "--all",
        "--heapallindexed",
        "--install-missing",
        check=False,
    )


def wal_written(cluster: Cluster) -> None:
    """Wait until tandem's receiver reports the WAL of every commit so far written.
    Replication is asynchronous: a commit returns before the receiver has it
    (pg_receivewal --synchronous answers at once); WAL the agent lists after this has it."""
    lsn = cluster.sql("SELECT pg_current_wal_lsn()")
    reported = f"SELECT bool_or(write_lsn >= '{lsn}') FROM pg_stat_replication"
    wait_for(lambda: cluster.sql(reported) == "t", 60, "the receiver to write the WAL")


def streams_on_its_slot(cluster: Cluster, app: str = "db") -> None:
    """Wait until tandem's receiver streams from ``cluster`` on the app's slot, its only
    slot. A count of ``pg_stat_replication`` says nothing on its own: it also lists the
    walsender of ``pg_receivewal --create-slot`` while the slot is being made."""
    slots = "SELECT string_agg(slot_name || ':' || active, ',') FROM pg_replication_slots"
    wait_for(lambda: cluster.sql(slots) == f"tandem_{app}:true", 60, "the stream on its slot")
    streaming = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
    wait_for(lambda: cluster.sql(streaming) == "1", 60, "one receiver streaming")


@dataclass
class FailedOver:
    """Production (stopped) and the DR copy running after a planned failover."""

    prod: Cluster
    writer: Cluster
    dr_path: Path
    at_prod: str
    """``HISTORY`` at production when it stopped."""
    failover: dict[str, Any]


@contextmanager
def failed_over(drill: Drill, shared_dir: Path, app: str = "db") -> Iterator[FailedOver]:
    """Production under pgbench protected and mirrored, a ``marks`` table made, production
    stopped once the DR window passes it, and a planned failover to the latest WAL with
    ``--verify``: nothing committed at production is lost. Production is stopped at the
    end."""
    prod = make_cluster(shared_dir, "pgdata")
    try:
        yield _fail_over(drill, shared_dir, app, prod)
    finally:
        prod.stop()


def _fail_over(drill: Drill, shared_dir: Path, app: str, prod: Cluster) -> FailedOver:
    a, b = drill.a, drill.b
    as_postgres(str(prod.bin / "pgbench"), *prod.conn(), "-i", "-q", "-s", "1", "postgres")
    as_postgres(str(prod.bin / "pgbench"), *prod.conn(), "-n", "-t", "50", "postgres")
    a("app", "add", app, "--host", "host1", "--kind", "postgresql", "--path", str(prod.data))
    a("app", "protect", app, "--template", "mirrored")
    assert a("capture", app)["job"]["status"] == "succeeded"
    at_prod = prod.sql(HISTORY)
    prod.sql("CREATE TABLE marks (site text)")
    wal_written(prod)
    done = server_now(prod)
    wait_for(lambda: (end := window_end(b, app)) and end > done, 60, "the WAL at DR")
    prod.stop()  # a planned failover: production stops first

    dr_path = shared_dir / "dr"
    over = b(
        "failover",
        app,
        "--host",
        "host2",
        "--confirm",
        "FAILOVER",
        "--latest",
        "--verify",
        "--mount-point",
        str(dr_path),
    )
    assert over["job"]["status"] == "succeeded", over["job"]
    assert over["recovery"]["amcheck"]["ok"], over["recovery"]["amcheck"]
    writer = recovered(shared_dir, over["job"]["result"])
    assert writer.sql(HISTORY) == at_prod  # nothing committed at production is lost
    # Nothing of the recovery's is left to be carried home.
    assert "restore_command" not in (dr_path / "postgresql.auto.conf").read_text()
    return FailedOver(prod, writer, dr_path, at_prod, over)
