"""Real file systems for the point-in-time tests: image files made with mkfs and loop-mounted.

Needs root and the mkfs tools (``.ci/run`` installs ``btrfs-progs xfsprogs``); a missing
tool fails the test naming the package, nothing is skipped silently.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

PACKAGE = {"btrfs": "btrfs-progs", "xfs": "xfsprogs", "ext4": "e2fsprogs"}
SIZE = "320M"


@contextlib.contextmanager
def loop_mounts(workdir: Path) -> Iterator[Callable[[str], Path]]:
    """``make(fstype)`` mounts a new file system of that type and returns its mount point;
    all are unmounted (thawed first) and removed on exit."""
    mounted: list[Path] = []

    def make(fstype: str) -> Path:
        tool = f"mkfs.{fstype}"
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install the Debian package {PACKAGE[fstype]}")
        if os.geteuid() != 0:
            pytest.fail("the point-in-time tests loop-mount file systems and need root")
        image = workdir / f"{fstype}-{len(mounted)}.img"
        subprocess.run(["truncate", "-s", SIZE, str(image)], check=True)
        made = subprocess.run([tool, "-q", str(image)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.fail(f"{tool} failed: {made.stderr.strip() or made.stdout.strip()}")
        point = workdir / f"{fstype}-{len(mounted)}"
        point.mkdir()
        subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True)
        mounted.append(point)
        return point

    try:
        yield make
    finally:
        for point in reversed(mounted):
            subprocess.run(["fsfreeze", "-u", str(point)], capture_output=True, check=False)
            if subprocess.run(["umount", str(point)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], check=False)  # busy: detach it


WRITER = r"""
import os, sys, time
root, pairs, pause, size = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
n = int(sys.argv[5])
while True:
    n += 1
    data = (b"%012d\n" % n).ljust(size, b".")
    for i in range(pairs):
        for side in "ab":
            # in place, one write (as a database page): never seen empty or half-made
            fd = os.open(f"{root}/pair{i:02d}.{side}", os.O_WRONLY | os.O_CREAT, 0o644)
            os.pwrite(fd, data, 0)
            os.close(fd)
    if pause:
        time.sleep(pause)
"""


class PairWriter:
    """A process that rewrites ``pairs`` pairs of files, ``a`` then ``b`` of each with the
    same counter, round after round (``pause`` seconds between rounds): at every instant,
    read in writing order, the counters never rise and differ by at most one (``torn``)."""

    def __init__(self, root: Path, pairs: int = 16, pause: float = 0.0, size: int = 4096):
        self.root, self.pairs, self.pause, self.size = root, pairs, pause, size
        data = (b"%012d\n" % 1).ljust(size, b".")
        for i in range(pairs):
            for side in ("a", "b"):
                (root / f"pair{i:02d}.{side}").write_bytes(data)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def rounds(self) -> int:
        """The counter of the round being written now."""
        return int((self.root / "pair00.a").read_bytes()[:12])

    def __enter__(self) -> PairWriter:
        argv = [str(self.root), str(self.pairs), str(self.pause), str(self.size), "1"]
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, *argv])
        start = self.rounds
        while self.rounds == start:  # wait for the state: the writer is writing
            assert self.proc.poll() is None, "the writer died"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


def torn(files: dict[str, bytes], pairs: int) -> list[str]:
    """What in ``files`` no instant of a ``PairWriter`` had: in writing order
    (pair00.a, pair00.b, pair01.a…) counters never rise and differ by at most one."""
    order = [f"pair{i:02d}.{side}" for i in range(pairs) for side in ("a", "b")]
    seen = [(name, int(files[name][:12])) for name in order]
    values = [n for _, n in seen]
    if max(values) - min(values) <= 1 and values == sorted(values, reverse=True):
        return []
    return [f"{name}={n}" for name, n in seen]
