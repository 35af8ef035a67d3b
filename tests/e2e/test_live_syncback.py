"""Catch-up syncback while the app keeps serving at the DR site (SPEC §4 step 1), end to end:
real daemons, a real NBD client writing all the while, PostgreSQL under pgbench.

The volume writer is sequential: write ``k`` goes to slot ``k % SLOTS`` (each slot in a
different 4 MiB chunk region) and only once it is acknowledged does write ``k + 1`` start; the latest
acknowledged ``k`` is kept in a file. The state after write ``K`` is therefore slots holding
exactly ``K - SLOTS + 1 … K``: an image cut at one instant holds such a run, and a copy read
while the writer went on (a torn one) holds a gap.
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

from tests.e2e.conftest import Drill, job_row, protect_and_replicate, wait_for
from tests.e2e.test_dr_presentation import need

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
            lambda: (row := job_row(d.dr, started["id"]))["status"]
            in ("succeeded", "failed", "canceled")
            and row,
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
