"""Extent maps of reflink clones on real file systems (loop-mounted XFS and btrfs)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tandem.storage import extents
from tests.agent.loopfs import loop_mounts

FICLONE = 0x40049409
MiB = 1 << 20


@pytest.fixture
def mkfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    with loop_mounts(tmp_path) as make:
        yield make


def clone(src: Path, dst: Path) -> None:
    with open(src, "rb") as s, open(dst, "wb") as d:
        fcntl.ioctl(d.fileno(), FICLONE, s.fileno())


def ranges(new: Path, old: Path) -> list[tuple[int, int]] | None:
    with open(new, "rb") as n, open(old, "rb") as o:
        return extents.changed_ranges(
            n.fileno(), os.fstat(n.fileno()).st_size, o.fileno(), os.fstat(o.fileno()).st_size
        )


@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
def test_a_rewritten_block_is_the_only_range_that_differs_from_the_clone(
    mkfs: Callable[[str], Path], fstype: str
) -> None:
    fs = mkfs(fstype)
    live, kept = fs / "live", fs / "kept"
    live.write_bytes(os.urandom(16 * MiB))
    clone(live, kept)
    assert ranges(live, kept) == []  # every extent shared
    with open(live, "r+b") as f:  # a page rewritten in place, not yet written back
        f.seek(7 * MiB + 4096)
        f.write(os.urandom(4096))
    changed = ranges(live, kept)  # FIEMAP_FLAG_SYNC writes it back first
    assert changed
    assert all(s <= 7 * MiB + 4096 and 7 * MiB + 8192 <= e for s, e in changed[:1])
    assert sum(e - s for s, e in changed) <= MiB  # the page's extent, not the file


@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
def test_a_grown_or_unrelated_file_differs_where_it_must(
    mkfs: Callable[[str], Path], fstype: str
) -> None:
    fs = mkfs(fstype)
    live, kept, other = fs / "live", fs / "kept", fs / "other"
    live.write_bytes(os.urandom(2 * MiB))
    clone(live, kept)
    with open(live, "ab") as f:
        f.write(os.urandom(MiB))
    changed = ranges(live, kept)
    assert changed is not None and changed[-1][1] == 3 * MiB
    assert sum(e - s for s, e in changed) <= 2 * MiB  # not the first MiB at least
    other.write_bytes(live.read_bytes())  # same bytes, own extents: all of it differs
    assert ranges(other, live) == [(0, 3 * MiB)]
