"""Live applications, end to end: captures of an app that keeps writing are taken, and never
torn. Real daemons, driven by the CLI; the app's data on loop-mounted btrfs and ext4."""

from __future__ import annotations

import glob
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.agent.loopfs import PairWriter, loop_mounts, torn
from tests.e2e.conftest import Site, free_port

PAIRS = 32
CONFIRM = ["--confirm", "DATA LOSS", "--confirm", "OVERWRITE OTHER APPS"]


@pytest.fixture
def mkfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    with loop_mounts(tmp_path) as make:
        yield make


def pair_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.iterdir() if p.name.startswith("pair")}


def test_every_capture_of_a_busy_app_on_btrfs_is_taken_and_consistent(
    site: Site, mkfs: Callable[[str], Path]
) -> None:
    cli = site.cli
    fs = mkfs("btrfs")
    data = fs / "db"
    subprocess.run(["btrfs", "subvolume", "create", str(data)], check=True, capture_output=True)
    app = cli(
        "app", "add", "busy", "--host", site.host, "--kind", "filesystem", "--path", str(data)
    )
    assert app["consistency"] == "auto"
    cli("template", "add", "busy-manual")
    cli("app", "protect", "busy", "--template", "busy-manual")
    images = []
    start_time = time.time()
    with PairWriter(data, PAIRS, size=64 * 1024) as writer:
        start = writer.rounds
        for _ in range(3):
            taken = cli("capture", "busy")
            assert taken["job"]["status"] == "succeeded", taken["job"]
            result = taken["job"]["result"]
            # When the cut began and how long it took: what the bench measures pauses by.
            assert result["cut_seconds"] is not None and result["cut_at"] > start_time
            images.append(taken["image"]["id"])
        assert writer.rounds > start  # it wrote through every capture
    listed = {i["id"]: i for i in cli("images", "busy")}
    assert {listed[i]["consistency"] for i in images} == {"snapshot-btrfs"}
    for image in images:  # each restored copy is a state the app had at one instant
        done = cli("restore", "busy", "--image", image, *CONFIRM)
        assert done["job"]["status"] == "succeeded", done["job"]
        assert torn(pair_files(data), PAIRS) == []

    # Only the last capture's snapshot is kept (for the next capture to compare with); the
    # one before is removed after the capture, off its time.
    def left() -> list[str]:
        return [n for n in (p.name for p in fs.iterdir()) if n.startswith(".tandem")]

    deadline = time.monotonic() + 30
    while len(left()) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(left()) == 1 and left()[0].startswith(".tandem-pit-keep-"), left()


def test_a_busy_app_on_ext4_is_never_captured_torn(site: Site, mkfs: Callable[[str], Path]) -> None:
    """ext4 has no point-in-time source: the live files are read and checked after reading,
    so a capture under a writer that never pauses fails (saying why), or holds a state the
    app had; it never succeeds torn."""
    cli = site.cli
    fs = mkfs("ext4")
    data = fs / "db"
    data.mkdir()
    cli("app", "add", "live", "--host", site.host, "--kind", "filesystem", "--path", str(data))
    cli("template", "add", "live-manual")
    cli("app", "protect", "live", "--template", "live-manual")
    outcomes = []
    with PairWriter(data, PAIRS, size=64 * 1024):
        for _ in range(2):
            run = cli.run("capture", "live", check=False)
            outcomes.append(run)
    for run in outcomes:
        if run.code == 0:
            assert run.doc["image"]["consistency"] == "crash-unsafe"
            done = cli("restore", "live", "--image", run.doc["image"]["id"], *CONFIRM)
            assert done["job"]["status"] == "succeeded", done["job"]
            assert torn(pair_files(data), PAIRS) == []
        else:
            assert "changed" in run.error and "Traceback" not in run.stderr

    cli("app", "set", "live", "--consistency", "snapshot")
    refused = cli.run("capture", "live", check=False)
    assert refused.code != 0 and "Traceback" not in refused.stderr
    assert "No point in time" in refused.error and "ext4" in refused.error


def test_a_consistency_that_does_not_exist_is_refused_and_nothing_changes(
    site: Site, tmp_path: Path
) -> None:
    cli = site.cli
    bad = cli.run(
        "app",
        "add",
        "odd",
        "--host",
        site.host,
        "--kind",
        "filesystem",
        "--path",
        str(tmp_path),
        "--consistency",
        "sometimes",
        check=False,
    )
    assert bad.code == 2 and "Traceback" not in bad.stderr and "--consistency" in bad.stderr
    assert "odd" not in {a["name"] for a in cli("apps")}


# --- PostgreSQL under pgbench --------------------------------------------------------------


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"))
    if not found:
        pytest.fail("PostgreSQL is missing: install the Debian package postgresql")
    return Path(found[-1]).parent


def as_postgres(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *argv],
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
        cwd="/",
    )


class Cluster:
    """A PostgreSQL cluster in ``data``, listening on a socket in ``sockets`` only."""

    def __init__(self, data: Path, sockets: Path) -> None:
        self.bin, self.data, self.sockets, self.port = pg_bin(), data, sockets, free_port()

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.sockets} -c listen_addresses=''"
        log = self.sockets / f"{self.data.name}.log"
        as_postgres(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(log),
            "-w",
            "start",
        )

    def stop(self) -> None:
        as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", check=False
        )

    def conn(self) -> list[str]:
        return ["-h", str(self.sockets), "-p", str(self.port)]

    def sql(self, query: str) -> str:
        return as_postgres(
            str(self.bin / "psql"), *self.conn(), "-d", "postgres", "-Atc", query
        ).stdout.strip()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder the postgres user can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="tandem-pg-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


INVARIANT = (
    "SELECT (SELECT sum(abalance) FROM pgbench_accounts), "
    "(SELECT sum(bbalance) FROM pgbench_branches), "
    "(SELECT sum(tbalance) FROM pgbench_tellers), "
    "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)"
)


@pytest.mark.parametrize(
    ("fstype", "cut"),
    [
        ("btrfs", "snapshot-btrfs"),  # auto: a snapshot of the subvolume
        ("xfs", "reflink"),  # auto: reflink clones, writes held for the check only
        ("ext4", "freeze"),  # no snapshot, no reflink: --consistency freeze
    ],
)
def test_postgresql_under_pgbench_every_capture_taken_and_each_replica_sound(
    site: Site, shared_dir: Path, fstype: str, cut: str
) -> None:
    cli = site.cli
    sockets = shared_dir / "sockets"
    sockets.mkdir()
    shutil.chown(sockets, "postgres", "postgres")
    with loop_mounts(shared_dir) as mkfs:
        fs = mkfs(fstype)
        fs.chmod(0o755)
        data = fs / "pgdata"
        if fstype == "btrfs":
            make = ["btrfs", "subvolume", "create", str(data)]
            subprocess.run(make, check=True, capture_output=True)
        else:
            data.mkdir()
        shutil.chown(data, "postgres", "postgres")
        data.chmod(0o700)
        prod = Cluster(data, sockets)
        as_postgres(
            str(prod.bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"
        )
        prod.start()
        try:
            as_postgres(str(prod.bin / "pgbench"), *prod.conn(), "-i", "-q", "-s", "2", "postgres")
            cli(
                "app",
                "add",
                f"pg-{fstype}",
                "--host",
                site.host,
                "--kind",
                "filesystem",
                "--path",
                str(data),
            )
            cli("template", "add", f"pg-{fstype}")
            cli("app", "protect", f"pg-{fstype}", "--template", f"pg-{fstype}")
            if cut == "freeze":
                cli("app", "set", f"pg-{fstype}", "--consistency", "freeze")
            bench = subprocess.Popen(
                [
                    "runuser",
                    "-u",
                    "postgres",
                    "--",
                    str(prod.bin / "pgbench"),
                    *prod.conn(),
                    "-n",
                    "-c",
                    "4",
                    "-j",
                    "2",
                    "-R",
                    "150",
                    "-T",
                    "600",
                    "postgres",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
            )
            images = []
            try:
                for _ in range(3):
                    before = int(prod.sql("SELECT count(*) FROM pgbench_history"))
                    taken = cli("capture", f"pg-{fstype}")
                    assert taken["job"]["status"] == "succeeded", taken["job"]
                    assert taken["image"]["consistency"] == cut
                    images.append(taken["image"]["id"])
                    assert (
                        int(prod.sql("SELECT count(*) FROM pgbench_history")) > before
                    )  # under load
            finally:
                bench.kill()
                bench.wait()
        finally:
            prod.stop()

        for i, image in enumerate(images):
            where = shared_dir / f"replica-{fstype}-{i}"
            mounted = cli("mount", image, "--host", site.host, "--mount-point", str(where))
            assert mounted["job"]["status"] == "succeeded", mounted["job"]
            (where / "postmaster.pid").unlink(missing_ok=True)  # the running server's, not ours
            replica = Cluster(where, sockets)
            replica.start()  # crash recovery from the cut
            try:
                checked = as_postgres(
                    str(replica.bin / "pg_amcheck"),
                    *replica.conn(),
                    "--heapallindexed",
                    "--install-missing",
                    "-d",
                    "postgres",
                    check=False,
                )
                assert checked.returncode == 0, checked.stdout + checked.stderr
                sums = replica.sql(INVARIANT).split("|")
                assert len(set(sums)) == 1, sums
                assert int(replica.sql("SELECT count(*) FROM pgbench_history")) > 0
            finally:
                replica.stop()
            cli("unmount", mounted["image"]["id"])
