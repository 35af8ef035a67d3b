"""A powered-off VM disk written in place through ``qemu-nbd`` (what a VM restore does on
the production host), without libvirt: the qcow2 file ends up holding the image."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from tandem.agent.vm import ServedDisk
from tandem.storage import vmimage
from tandem.storage.pool import ChunkPool

MiB = 1024 * 1024


class Disk:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


def raw_of(disk: Path, out: Path) -> bytes:
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(out)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out.read_bytes()


def test_a_qcow2_disk_is_diff_restored_in_place(pool: ChunkPool, tmp_path: Path) -> None:
    if shutil.which("qemu-nbd") is None:
        pytest.fail("qemu-nbd is missing: install qemu-utils (`make tools` does)")
    rng = random.Random(9)
    size = 6 * MiB
    image_data = rng.randbytes(3 * MiB) + bytes(size - 3 * MiB)
    slots = vmimage.layout([("vda", size, "qcow2", "")])
    manifest = vmimage.capture_disks(
        pool,
        [vmimage.DiskSource(slots[0], Disk(image_data), [(0, size)])],
        meta={"vm": {"disks": [s.as_dict() for s in slots]}},
    )[1]
    disk = tmp_path / "vda.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(size)], check=True, timeout=60
    )
    # What the disk holds now: the image with 1 MiB rewritten, and data where it has zeros.
    now = bytearray(image_data)
    now[MiB : 2 * MiB] = b"\x33" * MiB
    now[5 * MiB : 5 * MiB + 65536] = b"\x44" * 65536
    (tmp_path / "now.raw").write_bytes(now)
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "qcow2",
            str(tmp_path / "now.raw"),
            str(disk),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    served = ServedDisk(str(disk), "qcow2", str(tmp_path), "vda")
    try:
        stats = vmimage.restore_disks(pool, manifest, {"vda": served})
        served.flush()
    finally:
        served.close()
    assert raw_of(disk, tmp_path / "out.raw") == image_data
    assert stats.bytes_written == MiB + 65536  # the rewritten MiB, and the block zeroed
