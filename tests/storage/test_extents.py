"""Extent maps of reflink clones on real file systems (loop-mounted XFS and btrfs)."""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tandem.storage import extents
from tandem.storage.pool import ChunkPool
from tandem.storage.tree import capture_tree
from tandem.storage.tree_capture import CDC_MAX
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


@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
def test_a_recapture_against_the_kept_previous_cut_reads_only_changed_chunks(
    pool: ChunkPool, mkfs: Callable[[str], Path], fstype: str
) -> None:
    """A block rewritten in the middle of a big file is captured, the rest of it is not
    read, and the manifest is the one a full read makes."""
    fs = mkfs(fstype)
    live = fs / "live"
    live.mkdir()
    (live / "big").write_bytes(os.urandom(24 * MiB))
    (live / "untouched").write_bytes(os.urandom(12 * MiB))

    def cut(name: str) -> Path:
        subprocess.run(["cp", "-a", "--reflink=always", str(live), str(fs / name)], check=True)
        return fs / name

    first = cut("first")
    first_id, base, stats = capture_tree(pool, first)
    assert stats.bytes_read == 36 * MiB
    block = os.urandom(8192)
    with open(live / "big", "r+b") as f:
        f.seek(11 * MiB + 12288)
        f.write(block)
    second = cut("second")
    _, m, stats = capture_tree(pool, second, base=base, base_id=first_id, previous=str(first))
    assert 0 < stats.bytes_read <= 3 * CDC_MAX  # the chunks around the block, not 36 MiB
    _, full, _ = capture_tree(pool, second)
    assert [(e.path, e.chunks) for e in m.entries] == [(e.path, e.chunks) for e in full.entries]
    big = next(e for e in m.entries if e.path == "big")
    data = b"".join(pool.get(d) for d, _ in big.chunks if d is not None)
    assert data == (live / "big").read_bytes()
    assert data[11 * MiB + 12288 : 11 * MiB + 20480] == block


def test_without_a_trustworthy_previous_cut_the_file_is_read_whole(
    pool: ChunkPool, tmp_path: Path
) -> None:
    """A previous cut that is not the base's file (another size) is not used."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "big").write_bytes(os.urandom(8 * MiB))
    base_id, base, _ = capture_tree(pool, tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "big").write_bytes(os.urandom(9 * MiB))
    _, _, stats = capture_tree(
        pool, tmp_path / "b", base=base, base_id=base_id, previous=str(tmp_path / "b")
    )
    assert stats.bytes_read == 9 * MiB


def test_changes_at_the_start_the_end_and_past_it_make_the_manifest_a_full_read_makes(
    pool: ChunkPool, mkfs: Callable[[str], Path]
) -> None:
    fs = mkfs("xfs")
    live = fs / "live"
    live.mkdir()
    (live / "big").write_bytes(os.urandom(20 * MiB))
    cuts = 0

    def cut() -> Path:
        nonlocal cuts
        cuts += 1
        dst = fs / f"cut{cuts}"
        subprocess.run(["cp", "-a", "--reflink=always", str(live), str(dst)], check=True)
        return dst

    previous = cut()
    base_id, base, _ = capture_tree(pool, previous)
    for change in ("start", "end", "grow", "shrink"):
        with open(live / "big", "r+b") as f:
            if change == "start":
                f.write(os.urandom(4096))
            elif change == "end":
                f.seek(-100, os.SEEK_END)
                f.write(os.urandom(100))
            elif change == "grow":
                f.seek(0, os.SEEK_END)
                f.write(os.urandom(3 * MiB + 17))
            else:
                f.truncate(15 * MiB + 5)
        now = cut()
        mid, m, stats = capture_tree(pool, now, base=base, base_id=base_id, previous=str(previous))
        _, full, _ = capture_tree(pool, now)
        assert [e.chunks for e in m.entries] == [e.chunks for e in full.entries], change
        assert stats.bytes_read < 15 * MiB, change
        previous, base_id, base = now, mid, m
