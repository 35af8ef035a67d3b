"""Point-in-time sources on real file systems (loop-mounted btrfs, XFS and ext4)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tandem.agent import pit
from tandem.domain.consistency import ConsistencyMode, Cut
from tandem.errors import PointInTimeUnavailable, SourceChanged
from tandem.storage.manifest import TreeManifest
from tandem.storage.pool import ChunkPool
from tandem.storage.tree import capture_tree
from tandem.storage.volume import capture_volume
from tests.agent.loopfs import PairWriter, loop_mounts, torn

PAIRS = 64


@pytest.fixture
def mkfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    with loop_mounts(tmp_path) as make:
        yield make


def files_of(pool: ChunkPool, m: TreeManifest) -> dict[str, bytes]:
    return {
        e.path: b"".join(pool.get(d) if d else bytes(n) for d, n in e.chunks)
        for e in m.entries
        if e.type == "f"
    }


def capture_under_load(
    pool: ChunkPool,
    app: Path,
    mode: ConsistencyMode = ConsistencyMode.AUTO,
    pause: float = 0.0,
    size: int = 4096,
    writes_after_cut: bool = False,
) -> tuple[pit.PointInTime, dict[str, bytes], int]:
    """Capture ``app`` through its point in time while a PairWriter rewrites it; returns the
    cut, the captured files and how many rounds the writer wrote during the capture.

    ``writes_after_cut`` waits, before reading, until the writer finished a round after the
    cut was made: the capture then surely reads files the application rewrote since (only
    for cuts that let writes flow, not ``freeze``)."""
    app.mkdir(exist_ok=True)
    with PairWriter(app, PAIRS, pause=pause, size=size) as writer:
        start = writer.rounds
        with pit.point_in_time(str(app), "filesystem", mode) as cut:
            if writes_after_cut:
                at_cut = writer.rounds
                wait_until(lambda: writer.rounds > at_cut)
            _, m, _ = capture_tree(pool, cut.path, recheck=cut.recheck)
        during = writer.rounds - start
    return cut, files_of(pool, m), during


def wait_until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def leftovers(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(pit.WORK_PREFIX)]


def kept_copies(folder: Path) -> list[str]:
    """The cuts kept in ``folder``; anything else left there is the walk kept beside a tree's
    clones (``pit.KEPT_WALK``), never a walk without its copy."""
    names = leftovers(folder)
    copies = sorted(n for n in names if not n.endswith(pit.KEPT_WALK))
    walks = [n.removesuffix(pit.KEPT_WALK) for n in names if n.endswith(pit.KEPT_WALK)]
    assert set(walks) <= set(copies), names
    return copies


def _capture_kept(
    pool: ChunkPool, app: Path, base: tuple[bytes, TreeManifest] | None
) -> tuple[pit.PointInTime, bytes, TreeManifest, int]:
    """A capture as the agent makes it: from the image ``base`` and its kept cut, keeping
    this one for the next."""
    with pit.point_in_time(
        str(app), "filesystem", ConsistencyMode.AUTO, base=base[0].hex() if base else None
    ) as cut:
        mid, m, stats = capture_tree(
            pool,
            cut.path,
            base=base[1] if base else None,
            base_id=base[0] if base else None,
            identity=cut.identity,
            recheck=cut.recheck,
            previous=cut.previous,
        )
        cut.keep = mid.hex()
    return cut, mid, m, stats.bytes_read


def test_a_btrfs_subvolume_is_captured_from_a_snapshot_under_load(
    pool: ChunkPool, mkfs: Callable[[str], Path]
) -> None:
    fs = mkfs("btrfs")
    subprocess.run(
        ["btrfs", "subvolume", "create", str(fs / "app")], check=True, capture_output=True
    )
    for _ in range(3):
        cut, files, during = capture_under_load(
            pool, fs / "app", size=256 * 1024, writes_after_cut=True
        )
        assert cut.cut is Cut.SNAPSHOT_BTRFS and not cut.recheck
        assert during > 0 and torn(files, PAIRS) == []  # rewritten since the cut, not torn
    assert leftovers(fs) == []  # the snapshots were deleted


def test_a_tree_on_xfs_is_captured_from_reflink_clones_under_load(
    pool: ChunkPool, mkfs: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = mkfs("xfs")
    for _ in range(5):
        # Writes are held for the cut only: the writer goes on while the clones are read
        # (how short the hold is, is the consistency benchmark's figure, not a test's).
        cut, files, _ = capture_under_load(pool, fs / "app", size=64 * 1024, writes_after_cut=True)
        assert cut.cut is Cut.REFLINK and not cut.recheck
        assert cut.held_seconds is not None and cut.held_seconds >= 0
        assert torn(files, PAIRS) == []
    assert leftovers(fs) == []


def test_an_app_that_is_a_whole_xfs_mount_clones_inside_it_and_leaves_nothing(
    pool: ChunkPool, mkfs: Callable[[str], Path]
) -> None:
    fs = mkfs("xfs")
    (fs / "data").write_bytes(b"rows")
    with pit.point_in_time(str(fs), "filesystem", ConsistencyMode.AUTO) as cut:
        assert cut.cut is Cut.REFLINK
        _, m, _ = capture_tree(pool, cut.path, recheck=cut.recheck)
    assert sorted(e.path for e in m.entries) == ["data"]  # not the work folder itself
    assert leftovers(fs) == []


def test_a_tree_on_ext4_falls_back_to_checked_live_files_and_says_why(
    pool: ChunkPool, mkfs: Callable[[str], Path]
) -> None:
    fs = mkfs("ext4")
    (fs / "app").mkdir()
    (fs / "app" / "f").write_bytes(b"x")
    with pit.point_in_time(str(fs / "app"), "filesystem", ConsistencyMode.AUTO) as cut:
        assert cut.cut is Cut.CRASH_UNSAFE and cut.recheck and cut.path == str(fs / "app")
    assert "ext4" in cut.reason and "neither snapshot nor reflink" in cut.reason
    with (
        pytest.raises(PointInTimeUnavailable, match="ext4"),
        pit.point_in_time(str(fs / "app"), "filesystem", ConsistencyMode.SNAPSHOT),
    ):
        pass


def test_a_volume_file_on_xfs_is_captured_from_a_reflink_clone(
    pool: ChunkPool, mkfs: Callable[[str], Path]
) -> None:
    fs = mkfs("xfs")
    disk = fs / "disk.img"
    disk.write_bytes(b"A" * (8 << 20))
    with pit.point_in_time(str(disk), "volume", ConsistencyMode.AUTO) as cut:
        assert cut.cut is Cut.REFLINK
        with open(disk, "r+b") as fh:  # the app writes on after the cut
            fh.write(b"B" * (1 << 20))
        _, m, _ = capture_volume(pool, cut.path)
    chunk = m.chunks[0]
    assert chunk is not None and pool.get(chunk)[:4] == b"AAAA"
    assert leftovers(fs) == []


def test_freeze_holds_writes_for_the_capture_and_always_thaws(
    pool: ChunkPool, mkfs: Callable[[str], Path]
) -> None:
    fs = mkfs("ext4")
    (fs / "app").mkdir()
    (fs / "app" / "f").write_bytes(b"before")
    wrote = threading.Event()

    def write() -> None:
        (fs / "app" / "g").write_bytes(b"during")
        wrote.set()

    with (
        pytest.raises(RuntimeError, match="capture failed"),
        pit.point_in_time(str(fs / "app"), "filesystem", ConsistencyMode.FREEZE) as cut,
    ):
        assert cut.cut is Cut.FREEZE
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        assert not wrote.wait(0.3)  # held while frozen
        _, m, _ = capture_tree(pool, cut.path, recheck=cut.recheck)
        assert [e.path for e in m.entries] == ["f"]
        raise RuntimeError("capture failed")
    assert wrote.wait(10)  # thawed although the capture failed
    assert cut.held_seconds is not None and cut.held_seconds >= 0.3
    writer.join()


def test_the_root_file_system_is_never_frozen() -> None:
    with (
        pytest.raises(PointInTimeUnavailable, match="root file system"),
        pit.point_in_time("/etc", "filesystem", ConsistencyMode.FREEZE),
    ):
        pass


def test_a_freeze_that_outlives_the_watchdog_is_thawed_and_fails(
    pool: ChunkPool, mkfs: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = mkfs("ext4")
    (fs / "app").mkdir()
    monkeypatch.setattr(pit, "FREEZE_MAX", 0.2)
    with (
        pytest.raises(SourceChanged, match="longer than"),
        pit.point_in_time(str(fs / "app"), "filesystem", ConsistencyMode.FREEZE),
    ):
        # wait for the state: writable again, thawed by the watchdog
        done = threading.Event()

        def probe() -> None:
            (fs / "app" / "probe").write_bytes(b"")
            done.set()

        threading.Thread(target=probe).start()
        assert done.wait(10)


def test_a_recapture_from_reflink_clones_reads_only_what_changed(
    pool: ChunkPool, mkfs: Callable[[str], Path]
) -> None:
    """Clones are new inodes each time; the image records the live files' identity, so an
    unchanged file is not read again."""
    fs = mkfs("xfs")
    app = fs / "app"
    app.mkdir()
    for i in range(8):
        (app / f"f{i}").write_bytes(os.urandom(100_000))

    def cut_and_capture(
        base: TreeManifest | None, base_id: bytes | None
    ) -> tuple[bytes, TreeManifest, int]:
        with pit.point_in_time(str(app), "filesystem", ConsistencyMode.AUTO) as cut:
            assert cut.cut is Cut.REFLINK
            mid, m, stats = capture_tree(
                pool,
                cut.path,
                base=base,
                base_id=base_id,
                recheck=cut.recheck,
                identity=cut.identity,
            )
        return mid, m, stats.bytes_read

    first_id, first, read = cut_and_capture(None, None)
    assert read == 800_000
    _, _, read = cut_and_capture(first, first_id)
    assert read == 0
    (app / "f3").write_bytes(os.urandom(100_000))
    _, second, read = cut_and_capture(first, first_id)
    assert read == 100_000
    assert files_of(pool, second)["f3"] == (app / "f3").read_bytes()


def test_a_big_file_changed_after_cloning_is_read_at_the_cut_only_where_it_changed(
    pool: ChunkPool, mkfs: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While writes are held, a file written since it was cloned is read only where its
    extents no longer match its clone's: the hold does not grow with the file."""
    fs = mkfs("xfs")
    app = fs / "app"
    app.mkdir()
    big = app / "big"
    big.write_bytes(os.urandom(32 << 20))
    os.sync()
    new_block = os.urandom(8192)
    real_freeze = pit.freeze
    writes = [0]

    def write_then_freeze(mount: pit.Mount, path: str) -> None:
        if not writes[0]:  # after cloning, before the held check: a page rewritten
            writes[0] += 1
            fd = os.open(big, os.O_WRONLY)
            os.pwrite(fd, new_block, 16 << 20)
            os.close(fd)
        real_freeze(mount, path)

    monkeypatch.setattr(pit, "freeze", write_then_freeze)
    with pit.point_in_time(str(app), "filesystem", ConsistencyMode.AUTO) as cut:
        assert cut.cut is Cut.REFLINK
        _, m, _ = capture_tree(pool, cut.path, recheck=cut.recheck)
    assert writes[0] == 1
    assert 0 < cut.held_read <= 1 << 20  # the rewritten page, not 32 MiB
    assert cut.cut_at is not None and cut.cut_seconds is not None
    assert files_of(pool, m)["big"] == big.read_bytes()
    assert leftovers(fs) == []


def _app_folder(fs: Path, fstype: str) -> Path:
    """``fs/app``: a subvolume on btrfs (snapshots), a folder elsewhere (clones)."""
    app = fs / "app"
    if fstype == "btrfs":
        subprocess.run(["btrfs", "subvolume", "create", str(app)], check=True, stdout=-3)
    else:
        app.mkdir()
    return app


@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
def test_a_kept_cut_makes_the_next_capture_read_only_changed_chunks(
    pool: ChunkPool, mkfs: Callable[[str], Path], fstype: str
) -> None:
    """A successful capture keeps its snapshot/clones (one per app, replaced each time);
    the next capture from that image reads a big file only where it was rewritten."""
    fs = mkfs(fstype)
    app = _app_folder(fs, fstype)
    (app / "big").write_bytes(os.urandom(24 << 20))

    cut, first_id, first, read = _capture_kept(pool, app, None)
    assert cut.previous is None and read == 24 << 20
    kept = kept_copies(fs)
    assert len(kept) == 1 and kept[0].startswith(pit.KEEP_PREFIX)
    with open(app / "big", "r+b") as f:
        f.seek(5 << 20)
        f.write(b"x" * 8192)
    cut, _, second, read = _capture_kept(pool, app, (first_id, first))
    assert cut.previous is not None and 0 < read <= 12 << 20
    assert files_of(pool, second)["big"] == (app / "big").read_bytes()
    wait_until(lambda: len(kept_copies(fs)) == 1)  # the first kept cut is removed, after
    with pit.point_in_time(str(app), "filesystem", ConsistencyMode.AUTO, base=first_id.hex()) as c:
        assert c.previous is None  # not the image the kept cut belongs to
    assert len(kept_copies(fs)) == 1


@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
def test_a_big_file_renamed_then_written_in_part_is_read_only_where_written(
    pool: ChunkPool, mkfs: Callable[[str], Path], fstype: str
) -> None:
    """PostgreSQL recycles a WAL segment by renaming an old one to a future name and then
    writing into it: the re-capture finds the renamed file's previous cut by its inode and
    reads it only where it was written, not whole."""
    fs = mkfs(fstype)
    app = _app_folder(fs, fstype)
    (app / "pg_wal").mkdir()
    old = app / "pg_wal" / "000000010000000000000001"
    old.write_bytes(os.urandom(16 << 20))
    (app / "other").write_bytes(os.urandom(12 << 20))
    _, first_id, first, _ = _capture_kept(pool, app, None)
    new = app / "pg_wal" / "000000010000000000000005"
    old.rename(new)
    with open(new, "r+b") as f:
        f.write(b"w" * 8192)
    (app / "other").unlink()  # a new file, perhaps given the removed one's inode: read whole
    (app / "pg_wal" / "000000010000000000000006").write_bytes(os.urandom(12 << 20))
    cut, _, second, read = _capture_kept(pool, app, (first_id, first))
    assert cut.previous is not None
    assert _tree_of(pool, second) == _tree_at(app)
    assert (12 << 20) < read <= (12 << 20) + (8 << 20)  # the new file whole, the renamed one not


def test_a_kept_cut_inside_a_whole_mount_app_is_not_captured(
    pool: ChunkPool, mkfs: Callable[[str], Path]
) -> None:
    fs = mkfs("xfs")
    (fs / "data").write_bytes(b"rows")
    with pit.point_in_time(str(fs), "filesystem", ConsistencyMode.AUTO) as cut:
        mid, m, _ = capture_tree(pool, cut.path, recheck=cut.recheck)
        cut.keep = mid.hex()
    assert len(kept_copies(fs)) == 1
    with pit.point_in_time(str(fs), "filesystem", ConsistencyMode.AUTO, base=mid.hex()) as cut:
        assert cut.previous is not None
        _, m, _ = capture_tree(pool, cut.path, recheck=cut.recheck)
    assert sorted(e.path for e in m.entries) == ["data"]


def test_a_kept_cut_is_dropped_when_the_app_is_no_longer_cut_from_clones(
    pool: ChunkPool, mkfs: Callable[[str], Path]
) -> None:
    """A whole-mount app switched to freeze: its kept clones are removed before the cut,
    never captured as its data."""
    fs = mkfs("xfs")
    (fs / "data").write_bytes(b"rows")
    with pit.point_in_time(str(fs), "filesystem", ConsistencyMode.AUTO) as cut:
        mid, _, _ = capture_tree(pool, cut.path, recheck=cut.recheck)
        cut.keep = mid.hex()
    assert len(kept_copies(fs)) == 1
    with pit.point_in_time(str(fs), "filesystem", ConsistencyMode.FREEZE) as cut:
        assert cut.cut is Cut.FREEZE
        _, m, _ = capture_tree(pool, cut.path, recheck=cut.recheck)
    assert sorted(e.path for e in m.entries) == ["data"]
    assert leftovers(fs) == []


def test_a_file_made_and_removed_while_the_tree_was_cloned_is_not_in_the_image(
    pool: ChunkPool, mkfs: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A temporary file that appears after the walk before the cloning, is cloned, and is
    gone before the held check was never in the tree at the cut: it is in neither walk,
    only in the clones, and it must not be in the image (at the top or in a folder)."""
    fs = mkfs("xfs")
    app = fs / "app"
    (app / "sub").mkdir(parents=True)
    (app / "kept").write_bytes(b"k")
    real_walk, real_cp = pit._lstat_tree, pit._cp
    walks = [0]

    def walk_then_make(root: str, exclude: str | None) -> dict[str, tuple[int, ...]]:
        found = real_walk(root, exclude)
        walks[0] += 1
        if walks[0] == 1:  # the walk before the cloning
            (app / "tmp.top").write_bytes(b"t")
            (app / "sub" / "tmp.sub").write_bytes(b"t")
        return found

    def clone_then_remove(
        sources: list[str], dest: str, path: str, *, keep_existing: bool = False
    ) -> None:
        real_cp(sources, dest, path, keep_existing=keep_existing)
        if walks[0] == 1:
            (app / "tmp.top").unlink()
            (app / "sub" / "tmp.sub").unlink()

    monkeypatch.setattr(pit, "_lstat_tree", walk_then_make)
    monkeypatch.setattr(pit, "_cp", clone_then_remove)
    with pit.point_in_time(str(app), "filesystem", ConsistencyMode.AUTO) as cut:
        assert cut.cut is Cut.REFLINK
        _, m, _ = capture_tree(pool, cut.path, recheck=cut.recheck)
    assert sorted(e.path for e in m.entries) == ["kept", "sub"]


@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
def test_a_big_file_is_cloned_a_piece_at_a_time_and_the_cut_is_still_one_instant(
    pool: ChunkPool, mkfs: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, fstype: str
) -> None:
    """A clone locks its file until every extent is remapped (hundreds of ms for a table
    rewritten since the last capture): a big file is cloned a piece at a time, so a write
    waits for one piece. A write landing in a piece already cloned, while the next pieces
    are cloned, is in the image: the held check reads it at the cut."""
    monkeypatch.setattr(pit, "BIG_FILE", 8 << 20)
    monkeypatch.setattr(pit, "CLONE_PIECE", 1 << 20)
    fs = mkfs(fstype)
    app = fs / "app"
    (app / "base").mkdir(parents=True)
    os.chmod(app / "base", 0o711)
    big = app / "base" / "table"
    big.write_bytes(os.urandom((10 << 20) + 4096 * 3))  # the last piece is not a whole one
    (app / "small").write_bytes(b"small")
    os.sync()
    pieces: list[tuple[int, int]] = []
    real_piece = pit._clone_piece
    new_page = os.urandom(8192)

    def piece_then_write(dfd: int, sfd: int, offset: int, length: int) -> None:
        real_piece(dfd, sfd, offset, length)
        pieces.append((offset, length))
        if len(pieces) == 3:  # pieces 0-2 cloned: the app rewrites a page of piece 1
            fd = os.open(big, os.O_WRONLY)
            os.pwrite(fd, new_page, (1 << 20) + 8192)
            os.close(fd)

    monkeypatch.setattr(pit, "_clone_piece", piece_then_write)
    with pit.point_in_time(str(app), "filesystem", ConsistencyMode.AUTO) as cut:
        assert cut.cut is Cut.REFLINK
        assert stat.S_IMODE(os.stat(Path(cut.path) / "base").st_mode) == 0o711
        _, m, _ = capture_tree(pool, cut.path, recheck=cut.recheck)
    size = big.stat().st_size
    assert [o for o, _ in pieces] == list(range(0, size, 1 << 20))
    assert all(n == 1 << 20 for _, n in pieces[:-1]) and pieces[-1][1] == 0  # the last: to EOF
    assert 0 < cut.held_read <= 1 << 20  # the rewritten page, read at the cut
    files = files_of(pool, m)
    assert files["base/table"] == big.read_bytes()
    assert files["base/table"][(1 << 20) + 8192 : (1 << 20) + 16384] == new_page
    assert files["small"] == b"small"
    assert leftovers(fs) == []


@pytest.mark.parametrize("mode", [ConsistencyMode.AUTO, ConsistencyMode.FREEZE])
def test_writes_are_held_from_when_the_freeze_begins(
    mkfs: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, mode: ConsistencyMode
) -> None:
    """A freeze holds writes while the file system writes back what it must (on XFS, the
    metadata of the clones just made: most of the hold); the hold reported counts it."""
    fs = mkfs("xfs")
    (fs / "app").mkdir()
    (fs / "app" / "f").write_bytes(b"data")
    real = pit.freeze

    def slow_to_freeze(mount: pit.Mount, path: str) -> None:
        real(mount, path)
        time.sleep(0.3)  # as a file system still writing back when writes are held

    monkeypatch.setattr(pit, "freeze", slow_to_freeze)
    with pit.point_in_time(str(fs / "app"), "filesystem", mode) as cut:
        assert cut.cut is (Cut.REFLINK if mode is ConsistencyMode.AUTO else Cut.FREEZE)
    assert cut.held_seconds is not None and cut.held_seconds >= 0.3


def _tree_of(pool: ChunkPool, m: TreeManifest) -> dict[str, tuple[str, int, str | bytes]]:
    """Each path of the image: its type, permission bits and content (a symlink's target)."""
    files = files_of(pool, m)
    return {
        e.path: (e.type, stat.S_IMODE(e.mode), e.target or files.get(e.path, b""))
        for e in m.entries
    }


def _tree_at(root: Path) -> dict[str, tuple[str, int, str | bytes]]:
    """The same for a live tree."""
    out: dict[str, tuple[str, int, str | bytes]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = p.relative_to(root).as_posix()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("l", stat.S_IMODE(st.st_mode), os.readlink(p))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("d", stat.S_IMODE(st.st_mode), b"")
        else:
            out[rel] = ("f", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


def _no_whole_clone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make cloning the whole tree (its big files, then ``cp -a`` of the rest) fail; a
    changed folder or symlink is still cloned with ``cp``."""
    real_cp = pit._cp

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the whole tree was cloned again")

    def cp(sources: list[str], dest: str, path: str, *, keep_existing: bool = False) -> None:
        if keep_existing:
            refuse()
        real_cp(sources, dest, path)

    monkeypatch.setattr(pit, "_clone_big_files", refuse)
    monkeypatch.setattr(pit, "_cp", cp)


def test_a_recapture_clones_only_what_changed_into_the_kept_copy(
    pool: ChunkPool, mkfs: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clones kept from the last cut become the next cut's copy: only entries changed
    since are cloned again (new, rewritten, removed, renamed, chmod'ed, a folder made or
    removed), and the image is the live tree, with the big file read only where written."""
    fs = mkfs("xfs")
    app = fs / "app"
    for d in ("a", "a/deep", "gone", "stay"):
        (app / d).mkdir(parents=True)
    for i in range(20):
        (app / "a" / f"f{i}").write_bytes(os.urandom(3000))
    (app / "a" / "deep" / "x").write_bytes(b"deep")
    (app / "gone" / "y").write_bytes(b"y")
    (app / "stay" / "old-name").write_bytes(b"renamed")
    (app / "mode").write_bytes(b"m")
    (app / "link").symlink_to("a/f1")
    (app / "big").write_bytes(os.urandom(16 << 20))
    first_cut, first_id, first, _ = _capture_kept(pool, app, None)
    assert first_cut.cut is Cut.REFLINK and "the last cut's clones" not in first_cut.reason

    (app / "a" / "f3").write_bytes(os.urandom(3000))
    (app / "a" / "f4").unlink()
    (app / "a" / "new").write_bytes(b"new")
    subprocess.run(["rm", "-r", str(app / "gone")], check=True)
    (app / "made" / "sub").mkdir(parents=True)
    (app / "made" / "sub" / "z").write_bytes(b"z")
    (app / "stay" / "old-name").rename(app / "stay" / "new-name")
    (app / "mode").chmod(0o600)
    (app / "link").unlink()
    (app / "link").symlink_to("a/f2")
    with open(app / "big", "r+b") as f:
        f.seek(3 << 20)
        f.write(b"w" * 4096)
    _no_whole_clone(monkeypatch)
    cut, mid, second, read = _capture_kept(pool, app, (first_id, first))
    assert "the last cut's clones" in cut.reason
    assert _tree_of(pool, second) == _tree_at(app)
    assert read < 8 << 20  # the big file where it was written (a chunk or two), not 16 MiB
    wait_until(lambda: len(kept_copies(fs)) == 1)  # the clones set aside are removed

    # Unchanged since: the copy kept again is reused as it is.
    cut, _, third, read = _capture_kept(pool, app, (mid, second))
    assert "the last cut's clones" in cut.reason
    assert _tree_of(pool, third) == _tree_at(app) and read == 0


@pytest.mark.parametrize("change", ["remove", "add", "rewrite"])
def test_a_kept_copy_changed_after_it_was_kept_is_not_reused(
    pool: ChunkPool, mkfs: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """The kept copy stands for the live tree only as long as nothing changed it: a file
    removed from it, added to it or rewritten in it since makes the next cut clone the whole
    tree (the app's own clean-up of a mount it owns could do any of it)."""
    fs = mkfs("xfs")
    app = fs / "app"
    (app / "sub").mkdir(parents=True)
    for name in ("a", "sub/b", "c"):
        (app / name).write_bytes(name.encode() * 1000)
    _, first_id, first, _ = _capture_kept(pool, app, None)
    (kept,) = kept_copies(fs)
    if change == "remove":
        (fs / kept / "sub" / "b").unlink()
    elif change == "add":
        (fs / kept / "stray").write_bytes(b"not the app's")
    else:
        (fs / kept / "c").write_bytes(b"C" * 1000)  # another mtime, same size
    cut, _, second, _ = _capture_kept(pool, app, (first_id, first))
    assert "the last cut's clones" not in cut.reason
    assert _tree_of(pool, second) == _tree_at(app)


def test_a_changed_file_with_several_links_makes_the_cut_clone_the_tree(
    pool: ChunkPool, mkfs: Callable[[str], Path]
) -> None:
    """Cloning one name of a hard-linked file alone would split the group in the copy:
    ``cp -a`` clones the tree with its links instead."""
    fs = mkfs("xfs")
    app = fs / "app"
    app.mkdir()
    (app / "one").write_bytes(b"linked")
    os.link(app / "one", app / "two")
    (app / "other").write_bytes(b"o")
    _, first_id, first, _ = _capture_kept(pool, app, None)
    (app / "one").write_bytes(b"rewritten through one name")
    cut, _, second, _ = _capture_kept(pool, app, (first_id, first))
    assert "the last cut's clones" not in cut.reason
    types = {e.path: e.type for e in second.entries}
    assert sorted(types[p] for p in ("one", "two")) == ["f", "h"]
    assert files_of(pool, second)["one"] == b"rewritten through one name"


def test_an_entry_changed_within_a_clock_tick_of_the_kept_walk_is_cloned_again(
    mkfs: Callable[[str], Path],
) -> None:
    """A file written in the same clock tick as the walk that kept its stamp can be written
    again without its ctime moving: the next cut does not trust that stamp."""
    fs = mkfs("xfs")
    app = fs / "app"
    app.mkdir()
    (app / "old").write_bytes(b"o")
    time.sleep(2 * pit.RACY_NS / 1e9)  # the two stamps more than the window apart
    (app / "recent").write_bytes(b"r")
    work = fs / ".tandem-pit-test"
    subprocess.run(["cp", "-a", "--reflink=always", f"{app}/.", str(work)], check=True)
    walk = pit._lstat_tree(str(app), None)
    recent_ctime = walk["recent"][3]
    base = "ab" * 32
    later = max(key[3] for key in walk.values()) + 10**9  # a walk a second after every change
    assert pit._replace_kept(str(fs), str(app), str(work), base, pit._rmtree, (walk, later))
    reuse = pit._reuse_kept(str(fs), str(app), base, pit._lstat_tree(str(app), None))
    assert reuse is not None and reuse[1] == []  # every stamp trusted
    kept = reuse[0]
    assert pit._replace_kept(
        str(fs), str(app), kept, base, pit._rmtree, (walk, recent_ctime + pit.RACY_NS // 2)
    )
    reuse = pit._reuse_kept(str(fs), str(app), base, pit._lstat_tree(str(app), None))
    assert reuse is not None and reuse[1] == ["recent"]


def _rounds_past(writer: PairWriter, rounds: int) -> bool:
    return writer.rounds > rounds


def test_cuts_from_the_kept_clones_are_never_torn_under_load(
    pool: ChunkPool, mkfs: Callable[[str], Path]
) -> None:
    """Capture after capture from the image before and its kept clones while a writer
    rewrites pairs of files that must always agree: each cut reuses the kept copy, and no
    image holds a pair from two different rounds."""
    fs = mkfs("xfs")
    app = fs / "app"
    app.mkdir()
    base: tuple[bytes, TreeManifest] | None = None
    with PairWriter(app, PAIRS, size=16 * 1024) as writer:
        wait_until(lambda: writer.rounds > 0)
        for i in range(5):
            before = writer.rounds
            cut, mid, m, _ = _capture_kept(pool, app, base)
            assert cut.cut is Cut.REFLINK
            assert ("the last cut's clones" in cut.reason) == (i > 0)
            assert torn(files_of(pool, m), PAIRS) == []
            base = (mid, m)
            wait_until(partial(_rounds_past, writer, before + 1))  # rewritten in between


def _spoil(doc: dict[str, Any], how: str) -> str:
    """The kept walk ``doc`` spoiled ``how``, as the file's new text."""
    if how == "text":
        return "not json"
    if how == "short-entry":
        doc["entries"]["a"] = []
    elif how == "text-in-entry":
        doc["entries"]["a"][0] = str(doc["entries"]["a"][0])
    elif how == "walked-as-text":
        doc["walked_ns"] = str(doc["walked_ns"])
    else:
        del doc["kept_ctime_ns"]
    return json.dumps(doc)


@pytest.mark.parametrize(
    "how", ["text", "short-entry", "text-in-entry", "walked-as-text", "no-ctime"]
)
def test_a_kept_walk_not_of_its_shape_makes_the_cut_clone_the_tree(
    pool: ChunkPool, mkfs: Callable[[str], Path], how: str
) -> None:
    """The walk beside kept clones is a file on the host, beside the app's data: one that
    does not read back as the agent wrote it is not used, and the capture still succeeds."""
    fs = mkfs("xfs")
    app = fs / "app"
    app.mkdir()
    (app / "a").write_bytes(b"a" * 1000)
    _, first_id, first, _ = _capture_kept(pool, app, None)
    (kept,) = kept_copies(fs)
    walk = fs / (kept + pit.KEPT_WALK)
    walk.write_text(_spoil(json.loads(walk.read_text()), how))
    (app / "a").write_bytes(b"b" * 1000)
    cut, _, second, _ = _capture_kept(pool, app, (first_id, first))
    assert "the last cut's clones" not in cut.reason
    assert _tree_of(pool, second) == _tree_at(app)
