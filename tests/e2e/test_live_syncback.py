"""Catch-up syncback while the app keeps serving at the DR site (SPEC §4 step 1), end to end:
real daemons, a real NBD client writing all the while, PostgreSQL under pgbench.

The volume writer is sequential: write ``k`` goes to slot ``k % SLOTS`` (the slots spread
over chunks and blocks), and write ``k + 1`` starts once ``k`` is acknowledged; the latest
acknowledged ``k`` is kept in a file. The state after write ``K`` is therefore slots holding
exactly ``K - SLOTS + 1 … K``: an image cut at one instant holds such a run, and a copy read
while the writer went on (a torn one) holds a gap.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.agent.loopfs import PairWriter, loop_mounts, torn
from tests.e2e.conftest import Drill, job_row, protect_and_replicate, wait_for
from tests.e2e.test_dr_presentation import need
from tests.e2e.test_live_apps import INVARIANT, PAIRS, Cluster, as_postgres, pair_files, shared_dir


def _ended(row: dict[str, Any]) -> dict[str, Any] | None:
    """The job's row once it has ended, else None (for ``wait_for``)."""
    return row if row["status"] in ("succeeded", "failed", "canceled") else None


__all__ = ["shared_dir"]  # the fixture, used here

MiB = 1024 * 1024
CONFIRM = ("--confirm", "DATA LOSS", "--confirm", "OVERWRITE OTHER APPS")
SLOTS = 96
STRIDE = MiB + 64 * 1024  # slot i at i * STRIDE: spread over chunks and sub-blocks
RECORD = 4096

WRITER = r"""
import os, struct
slots, stride, record = int(os.environ["SLOTS"]), int(os.environ["STRIDE"]), 4096
acked, stop = os.environ["ACKED"], os.environ["STOP"]
fd = os.open(acked, os.O_WRONLY | os.O_CREAT, 0o644)
k = 0
while not os.path.exists(stop):
    k += 1
    h.pwrite(struct.pack(">Q", k) * (record // 8), (k % slots) * stride)
    os.pwrite(fd, b"%020d" % k, 0)
h.flush()
os.close(fd)
"""


class NbdWriter:
    """``nbdsh`` running ``WRITER`` against an export until ``stop``."""

    def __init__(self, uri: str, workdir: Path) -> None:
        self.acked_path = workdir / "acked"
        self.stop_path = workdir / "stop"
        env = dict(
            os.environ,
            PATH="/usr/bin:/bin:" + os.environ.get("PATH", ""),  # nbdsh: Debian's python3
            SLOTS=str(SLOTS),
            STRIDE=str(STRIDE),
            ACKED=str(self.acked_path),
            STOP=str(self.stop_path),
        )
        self.proc = subprocess.Popen(
            [need("nbdsh", "libnbd-bin"), "-u", uri, "-c", WRITER],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def acked(self) -> int:
        """The last write the server acknowledged (0 before the first)."""
        assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
        try:
            return int(self.acked_path.read_bytes() or b"0")
        except FileNotFoundError:
            return 0

    def stop(self) -> int:
        """Stop after the write under way; returns the last acknowledged one."""
        self.stop_path.touch()
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        assert self.proc.returncode == 0, err
        return int(self.acked_path.read_bytes())


def slots_of(path: Path) -> list[int]:
    """The write number each slot of a volume file holds (0: never written)."""
    out = []
    with open(path, "rb") as fh:
        for i in range(SLOTS):
            fh.seek(i * STRIDE)
            block = fh.read(RECORD)
            (k,) = struct.unpack(">Q", block[:8])
            assert block == block[:8] * (RECORD // 8), f"slot {i} holds a torn record"
            out.append(k)
    return out


def cut_at(slots: list[int]) -> int:
    """The write ``K`` after which the volume held exactly ``slots``; fails if no one did."""
    top = max(slots)
    assert sorted(slots) == list(range(top - SLOTS + 1, top + 1)), f"torn: {sorted(slots)}"
    return top


def test_catch_up_syncback_of_a_volume_under_a_writer_is_one_instant(
    drill: Drill, tmp_path: Path
) -> None:
    d = drill
    volume = tmp_path / "busy.img"
    with open(volume, "wb") as fh:
        fh.truncate(SLOTS * STRIDE + 4 * MiB)
    protect_and_replicate(d, "busyvol", "volume", volume)
    over = d.b("failover", "busyvol", "--host", "host2", "--confirm", "FAILOVER")
    writer = NbdWriter(over["nbd_uri"], tmp_path)
    try:
        wait_for(lambda: writer.acked() >= 3 * SLOTS, 60, "the writer's first rounds", 0.05)
        before = writer.acked()
        started = d.b("syncback", "busyvol", "--label", "catch-up", "--no-wait")["job"]
        job = wait_for(
            lambda: _ended(job_row(d.dr, started["id"])),
            120,
            "the catch-up syncback",
            0.05,
        )
        after = writer.acked()
        assert job["status"] == "succeeded", job
        held = job["result"]["writes_held_seconds"]
        assert held is not None and held >= 0  # the pause, measured and on the job
        # writes go on after the cut
        wait_for(lambda: writer.acked() > after + 2 * SLOTS, 60, "writes after the cut", 0.05)
    finally:
        last = writer.stop()
    image = job["image"]

    # the catch-up image is the volume right after one acknowledged write K, with every
    # write acknowledged before the syncback began (and none begun after it ended)
    restored = d.a("restore", "busyvol", "--image", image, *CONFIRM)
    assert restored["job"]["status"] == "succeeded", restored["job"]
    k = cut_at(slots_of(volume))
    assert before <= k <= after + 1, (before, k, after)

    # the app stops; the final syncback carries the rest: nothing acknowledged is lost
    final = d.b("syncback", "busyvol", "--label", "final")
    assert final["job"]["status"] == "succeeded", final["job"]
    assert d.a("restore", "busyvol", "--image", final["image"]["id"], *CONFIRM)["job"][
        "status"
    ] == ("succeeded")
    assert cut_at(slots_of(volume)) == last
    assert d.b("failback", "busyvol")["job"]["status"] == "succeeded"


def pgbench(cluster: Cluster, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["runuser", "-u", "postgres", "--", str(cluster.bin / "pgbench"), *cluster.conn(), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
    )


def sound(cluster: Cluster) -> int:
    """Check the cluster as pgbench left it; returns its history rows."""
    checked = as_postgres(
        str(cluster.bin / "pg_amcheck"),
        *cluster.conn(),
        "--heapallindexed",
        "--install-missing",
        "-d",
        "postgres",
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    sums = cluster.sql(INVARIANT).split("|")
    assert len(set(sums)) == 1, sums
    return int(cluster.sql("SELECT count(*) FROM pgbench_history"))


@pytest.mark.parametrize(
    ("dr_fstype", "action", "cut"),
    [
        # a full copy, a subvolume: cut from a snapshot, writes never held
        ("btrfs", "copy", "snapshot-btrfs"),
        # the FUSE copy: its layer beside it cut by reflink clones, writes held for the check
        ("xfs", None, "reflink"),
    ],
)
def test_catch_up_syncback_of_postgresql_under_pgbench_at_dr(
    drill: Drill, shared_dir: Path, dr_fstype: str, action: str | None, cut: str
) -> None:
    d = drill
    app = f"pgdr-{dr_fstype}"
    sockets = shared_dir / "sockets"
    sockets.mkdir()
    shutil.chown(sockets, "postgres", "postgres")
    with loop_mounts(shared_dir) as mkfs:
        prod_fs, dr_fs = mkfs("btrfs"), mkfs(dr_fstype)
        for fs in (prod_fs, dr_fs):
            fs.chmod(0o755)
        data = prod_fs / "pgdata"
        subprocess.run(["btrfs", "subvolume", "create", str(data)], check=True, capture_output=True)
        shutil.chown(data, "postgres", "postgres")
        data.chmod(0o700)
        prod = Cluster(data, sockets)
        as_postgres(
            str(prod.bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"
        )
        prod.start()
        try:
            as_postgres(str(prod.bin / "pgbench"), *prod.conn(), "-i", "-q", "-s", "2", "postgres")
            protect_and_replicate(d, app, "filesystem", data)
        finally:
            prod.stop()  # the disaster: production is down

        dr_path = dr_fs / "pgdata"
        over = d.b(
            "failover", app, "--host", "host2", "--confirm", "FAILOVER",
            "--mount-point", str(dr_path), *(("--action", action) if action else ()),
        )  # fmt: skip
        assert over["job"]["status"] == "succeeded", over["job"]
        assert over["job"]["result"]["presentation"] == (action or "fuse")
        (dr_path / "postmaster.pid").unlink(missing_ok=True)  # production's, not ours
        dr = Cluster(dr_path, sockets)
        dr.start()  # the app serves at the DR site
        try:
            bench = pgbench(dr, "-n", "-c", "2", "-j", "2", "-R", "30", "-T", "600", "postgres")
            try:
                wait_for(
                    lambda: int(dr.sql("SELECT count(*) FROM pgbench_history")) > 20,
                    60,
                    "pgbench at the DR site",
                )
                before = int(dr.sql("SELECT count(*) FROM pgbench_history"))
                catch_up = d.b("syncback", app, "--label", "catch-up")
                assert catch_up["job"]["status"] == "succeeded", catch_up["job"]
                result = catch_up["job"]["result"]
                assert result["consistency"] == cut, result
                held = result["writes_held_seconds"]
                assert held is None if cut == "snapshot-btrfs" else held >= 0, result
                assert catch_up["image"]["consistency"] == result["consistency"]
                wait_for(
                    lambda: int(dr.sql("SELECT count(*) FROM pgbench_history")) > before + 20,
                    60,
                    "pgbench going on after the syncback",
                )
            finally:
                bench.kill()
                bench.wait()
        finally:
            dr.stop()  # downtime starts
        served = Cluster(dr_path, sockets)
        served.start()
        try:
            at_dr = sound(served)
        finally:
            served.stop()
        final = d.b("syncback", app, "--label", "final")
        assert final["job"]["status"] == "succeeded", final["job"]

        # each syncback, restored at production, is a cluster that starts and is sound
        for image, rows in ((catch_up["image"]["id"], None), (final["image"]["id"], at_dr)):
            done = d.a("restore", app, "--image", image, *CONFIRM)
            assert done["job"]["status"] == "succeeded", done["job"]
            (data / "postmaster.pid").unlink(missing_ok=True)  # the DR server's
            home = Cluster(data, sockets)
            home.start()  # crash recovery from the cut
            try:
                got = sound(home)
                assert got >= before if rows is None else got == rows
            finally:
                home.stop()
        assert d.b("failback", app)["job"]["status"] == "succeeded"


def test_a_tree_at_dr_with_no_point_in_time_source_never_syncs_back_torn(
    drill: Drill, tmp_path: Path
) -> None:
    """ext4 neither snapshots nor reflinks: the DR copy is read live and re-checked, so a
    catch-up syncback under a writer that never pauses fails saying why, or holds a state
    the app had; it never succeeds torn. Once the app stops, the final one carries all."""
    d = drill
    prod = tmp_path / "ledger"
    prod.mkdir()
    PairWriter(prod, PAIRS, size=64 * 1024)  # the files, as production left them
    protect_and_replicate(d, "ledger", "filesystem", prod)
    with loop_mounts(tmp_path) as mkfs:
        dr_path = mkfs("ext4") / "ledger"
        over = d.b(
            "failover", "ledger", "--host", "host2", "--confirm", "FAILOVER",
            "--mount-point", str(dr_path),
        )  # fmt: skip
        assert over["job"]["status"] == "succeeded", over["job"]
        assert over["job"]["result"]["presentation"] == "fuse"  # its layer on ext4 too
        with PairWriter(dr_path, PAIRS, size=64 * 1024):
            outcomes = [d.b.run("syncback", "ledger", check=False) for _ in range(2)]
        for run in outcomes:
            if run.code == 0:
                assert run.doc["job"]["result"]["consistency"] == "crash-unsafe"
                done = d.a("restore", "ledger", "--image", run.doc["image"]["id"], *CONFIRM)
                assert done["job"]["status"] == "succeeded", done["job"]
                assert torn(pair_files(prod), PAIRS) == []
            else:
                assert "changed" in run.error and "Traceback" not in run.stderr, run.stderr
        final = d.b("syncback", "ledger", "--label", "final")  # the app stopped
        assert final["job"]["status"] == "succeeded", final["job"]
        done = d.a("restore", "ledger", "--image", final["image"]["id"], *CONFIRM)
        assert done["job"]["status"] == "succeeded", done["job"]
        assert pair_files(prod) == pair_files(dr_path)
        assert d.b("failback", "ledger")["job"]["status"] == "succeeded"
