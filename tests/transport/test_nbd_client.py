"""The NBD client against qemu's own server (qemu-nbd), the server libvirt's backup export
is: reads, ``base:allocation`` and a ``qemu:dirty-bitmap:`` context."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.transport.nbd import DIRTY, NbdClient, NbdProtocolError

MiB = 1024 * 1024


def qemu(*args: str) -> None:
    if shutil.which(args[0]) is None:
        pytest.fail(f"{args[0]} is missing: install qemu-utils (`make tools` does)")
    subprocess.run(args, check=True, capture_output=True, timeout=60)


@pytest.fixture
def export(tmp_path: Path) -> Iterator[str]:
    """A 16 MiB qcow2 with 3 MiB of 0x11, a bitmap b0, then 64 KiB of 0x22 at 8 MiB
    (what b0 says changed), served by qemu-nbd on a unix socket."""
    disk = tmp_path / "disk.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M")
    qemu("qemu-io", "-c", "write -P 0x11 0 3M", str(disk))
    qemu("qemu-img", "bitmap", "--add", str(disk), "b0")
    qemu("qemu-io", "-c", "write -P 0x22 8M 64k", str(disk))
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "qcow2", "-r", "-x", "vda", "-B", "b0", "-k", str(sock), str(disk)]
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, "qemu-nbd exited"
            assert time.monotonic() < deadline, "qemu-nbd did not listen"
            time.sleep(0.05)
        yield str(sock)
    finally:
        proc.terminate()
        proc.wait(30)


def test_reads_allocation_and_the_dirty_bitmap(export: str) -> None:
    ctx = "qemu:dirty-bitmap:b0"
    with NbdClient(export="vda", unix=export, contexts=["base:allocation", ctx]) as nbd:
        assert nbd.size == 16 * MiB
        assert nbd.read(0, 4096) == b"\x11" * 4096
        assert nbd.read(8 * MiB - 10, 20) == bytes(10) + b"\x22" * 10
        assert nbd.read(12 * MiB, 1 * MiB) == bytes(MiB)  # a hole reads as zeros
        allocated = [(o, n) for o, n, f in nbd.extents("base:allocation") if not f & 1]
        assert sum(n for _, n in allocated) == 3 * MiB + 64 * 1024
        extents = nbd.extents(ctx)
        assert sum(n for _, n, _ in extents) == nbd.size  # the runs cover the export
        assert [(o, n) for o, n, f in extents if f & DIRTY] == [(8 * MiB, 64 * 1024)]


def test_refuses_what_the_server_does_not_have(export: str) -> None:
    with pytest.raises(NbdProtocolError, match="refused"):
        NbdClient(export="nope", unix=export)
    with NbdClient(export="vda", unix=export) as nbd:
        with pytest.raises(NbdProtocolError, match="did not select"):
            nbd.extents("qemu:dirty-bitmap:b0")
        with pytest.raises(NbdProtocolError, match="outside the export"):
            nbd.read(16 * MiB - 1, 2)
