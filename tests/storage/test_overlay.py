"""Virtual copies: an overlay of written 64 KiB blocks over an immutable image."""

from __future__ import annotations

import os
import random
import threading
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tandem.errors import AlreadyExists, ChunkCorrupt, CopyFrozen, InvalidInput, StorageError
from tandem.storage import overlay as overlay_mod
from tandem.storage.digest import SUB_BLOCK, hash_bytes
from tandem.storage.manifest import VOLUME_CHUNK, VolumeManifest, load_manifest
from tandem.storage.overlay import BLOCK, ChunkCache, ImageReader, Overlay, capture_overlay
from tandem.storage.pool import ChunkPool
from tandem.storage.volume import capture_volume, restore_volume
from tests.poolfiles import chunk_file

MiB = 1024 * 1024


def make_base(
    pool: ChunkPool, tmp_path: Path, size: int, seed: int = 1
) -> tuple[bytes, VolumeManifest, bytes]:
    """A captured image: random chunks with an all-zero chunk and a short tail."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    if size > 2 * VOLUME_CHUNK:
        data[VOLUME_CHUNK : 2 * VOLUME_CHUNK] = bytes(VOLUME_CHUNK)  # a zero extent
    src = tmp_path / f"base-{uuid.uuid4().hex[:6]}.img"
    src.write_bytes(data)
    mid, manifest, _ = capture_volume(pool, src)
    src.unlink()
    return mid, manifest, bytes(data)


def pool_files(pool: ChunkPool) -> dict[str, bytes]:
    """Digest of every file in the pool's chunk, pack and manifest directories."""
    out = {}
    for sub in ("chunks", "packs", "manifests"):
        for path in sorted((pool.root / sub).rglob("*")):
            if path.is_file():
                out[str(path)] = hash_bytes(path.read_bytes())
    return out


def test_reads_equal_the_base_until_written(pool: ChunkPool, tmp_path: Path) -> None:
    mid, base, data = make_base(pool, tmp_path, 10 * MiB + 12345)
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        assert ov.size == len(data)
        assert ov.read(0, ov.size) == data
        rng = random.Random(2)
        for _ in range(50):
            off = rng.randrange(len(data))
            n = rng.randrange(min(len(data) - off, 3 * MiB) + 1)
            assert ov.read(off, n) == data[off : off + n]
        assert ov.dirty_ranges() == []


def test_writes_never_change_the_base(pool: ChunkPool, tmp_path: Path) -> None:
    mid, base, data = make_base(pool, tmp_path, 9 * MiB)
    before = pool_files(pool)
    digests = list(base.chunks)
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        ov.write(100, b"x" * 5000)
        ov.write(5 * MiB - 7, os.urandom(2 * MiB))
        ov.write_zeroes(0, 3 * MiB)
        ov.trim(8 * MiB, MiB)
        ov.flush()
        assert ov.read(100, 10) == bytes(10)
    assert pool_files(pool) == before
    assert load_manifest(pool, mid) == base and base.chunks == digests
    out = tmp_path / "base.img"
    restore_volume(pool, base, out)
    assert out.read_bytes() == data


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
@given(data=st.data())
def test_reads_are_base_plus_writes_under_random_operations(
    pool: ChunkPool, tmp_path: Path, data: st.DataObject
) -> None:
    """The overlay behaves like a plain file given the same writes, zeroes and trims,
    across flush, close and re-open."""
    with_base = data.draw(st.booleans(), label="with_base")
    size = data.draw(
        st.integers(1, 9 * MiB + 3 * BLOCK // 2) | st.sampled_from([9 * MiB, 8 * MiB + 1]),
        label="size",
    )
    if with_base:
        mid, base, content = make_base(pool, tmp_path, size, seed=size)
        model = bytearray(content)
    else:
        mid, base, model = None, None, bytearray(size)
    directory = tmp_path / f"ov-{uuid.uuid4().hex[:8]}"
    ov = Overlay.create(directory, pool, base, mid, None if with_base else size)
    try:
        # offsets clustered near block and chunk boundaries find the off-by-one errors
        near = st.sampled_from([0, 1, BLOCK - 1, BLOCK, VOLUME_CHUNK - 3, VOLUME_CHUNK, size])
        offset = st.one_of(st.integers(0, size), near).map(lambda o: min(o, size))
        ops = data.draw(
            st.lists(
                st.tuples(
                    st.sampled_from(["write", "zero", "trim", "read", "reopen"]),
                    offset,
                    st.one_of(
                        st.integers(0, 2 * BLOCK + 10),
                        st.sampled_from([BLOCK, 3 * BLOCK, VOLUME_CHUNK]),
                        st.integers(0, 5 * MiB),
                    ),
                ),
                max_size=16,
            ),
            label="ops",
        )
        rng = random.Random(size)
        for op, off, n in ops:
            n = min(n, size - off)
            if op == "write":
                chunk = rng.randbytes(n)
                ov.write(off, chunk)
                model[off : off + n] = chunk
            elif op in ("zero", "trim"):
                (ov.write_zeroes if op == "zero" else ov.trim)(off, n)
                model[off : off + n] = bytes(n)
            elif op == "read":
                assert ov.read(off, n) == model[off : off + n]
            else:
                ov.close()
                ov = Overlay.open(directory, pool)
        assert ov.read(0, size) == model
        # every byte that differs from the base lies inside a dirty range
        base_bytes = content if with_base else bytes(size)
        covered = bytearray(size)
        for off, n in ov.dirty_ranges():
            assert off % BLOCK == 0 and (n % BLOCK == 0 or off + n == size)
            covered[off : off + n] = b"\x01" * n
        for i in range(0, size, BLOCK):
            if model[i : i + BLOCK] != base_bytes[i : i + BLOCK]:
                assert covered[i]
    finally:
        ov.delete()
    assert not directory.exists()


def test_reopen_keeps_data_and_dirty_map(pool: ChunkPool, tmp_path: Path) -> None:
    mid, base, data = make_base(pool, tmp_path, 12 * MiB)
    directory = tmp_path / "ov"
    ov = Overlay.create(directory, pool, base, mid)
    ov.write(3 * BLOCK + 5, b"hello")
    ov.write(9 * MiB, b"y" * BLOCK * 2)
    ranges = ov.dirty_ranges()
    ov.close()
    ov.close()  # idempotent
    with Overlay.open(directory, pool) as again:
        assert again.dirty_ranges() == ranges == [(3 * BLOCK, BLOCK), (9 * MiB, 2 * BLOCK)]
        assert again.read(3 * BLOCK + 5, 5) == b"hello"
        assert again.read(3 * BLOCK, 5) == data[3 * BLOCK : 3 * BLOCK + 5]
        assert again.base_id == mid and again.base == base


def test_flushed_writes_survive_a_crash_unflushed_ones_read_as_base(
    pool: ChunkPool, tmp_path: Path
) -> None:
    mid, base, data = make_base(pool, tmp_path, 8 * MiB)
    directory = tmp_path / "ov"
    ov = Overlay.create(directory, pool, base, mid)
    ov.write(0, b"durable")
    ov.flush()
    ov.write(5 * MiB, b"not flushed")
    # a "crash": the first instance never closes; a new one opens the files as they are
    after = Overlay.open(directory, pool)
    try:
        assert after.read(0, 7) == b"durable"
        assert after.read(5 * MiB, 11) == data[5 * MiB : 5 * MiB + 11]  # block still clean
        assert after.dirty_ranges() == [(0, BLOCK)]
    finally:
        after.close()
        ov.close()


def test_flush_writes_set_bits_in_place_and_replaces_the_bitmap_to_clear_bits(
    pool: ChunkPool, tmp_path: Path
) -> None:
    with Overlay.create(tmp_path / "ov", pool, None, None, size=8 * MiB) as ov:
        bitmap = tmp_path / "ov" / "dirty.bitmap"
        ov.write(0, b"a")
        ov.flush()
        first = bitmap.stat()
        assert bitmap.read_bytes()[0] == 0b1
        ov.write(10, b"b")  # the same, already dirty block: nothing to write
        ov.flush()
        assert bitmap.stat().st_mtime_ns == first.st_mtime_ns
        ov.write(BLOCK, b"c")  # a bit set: written in place
        ov.flush()
        assert bitmap.stat().st_ino == first.st_ino
        assert bitmap.read_bytes()[0] == 0b11
        ov.write_zeroes(0, BLOCK)  # zeros over no base: the bit is cleared, the file replaced
        ov.flush()
        assert bitmap.stat().st_ino != first.st_ino
        assert bitmap.read_bytes()[0] == 0b10
    with Overlay.open(tmp_path / "ov", pool) as again:
        assert again.dirty_ranges() == [(BLOCK, BLOCK)]


def test_dirty_ranges_are_merged_and_zeroes_over_zeros_stay_clean(
    pool: ChunkPool, tmp_path: Path
) -> None:
    mid, base, _ = make_base(pool, tmp_path, 12 * MiB)  # chunk 1 is an all-zero extent
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        ov.write(BLOCK - 1, b"ab")  # straddles blocks 0 and 1
        ov.write(2 * BLOCK, b"c")  # adjacent: merged
        ov.write(10 * BLOCK, b"d")
        assert ov.dirty_ranges() == [(0, 3 * BLOCK), (10 * BLOCK, BLOCK)]
        ov.write(VOLUME_CHUNK + BLOCK, b"e" * BLOCK)
        ov.write_zeroes(VOLUME_CHUNK, VOLUME_CHUNK)  # over the zero extent: clean again
        ov.write_zeroes(11 * MiB, BLOCK)  # over data: dirty
        assert ov.dirty_ranges() == [(0, 3 * BLOCK), (10 * BLOCK, BLOCK), (11 * MiB, BLOCK)]
        assert ov.dirty_bytes() == 5 * BLOCK
        assert ov.read(VOLUME_CHUNK, VOLUME_CHUNK) == bytes(VOLUME_CHUNK)
        assert ov.read(11 * MiB, BLOCK) == bytes(BLOCK)


def test_zeroing_sets_and_clears_exactly_the_blocks_covered(
    pool: ChunkPool, tmp_path: Path
) -> None:
    mid, base, _ = make_base(pool, tmp_path, 12 * MiB)  # chunk 1 is an all-zero extent
    per_chunk = VOLUME_CHUNK // BLOCK
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        ov.write(VOLUME_CHUNK, b"e" * VOLUME_CHUNK)
        ov.write_zeroes(VOLUME_CHUNK + 3 * BLOCK, 18 * BLOCK)  # clean again: bits 3..20
        assert ov.dirty_ranges() == [
            (VOLUME_CHUNK, 3 * BLOCK),
            (VOLUME_CHUNK + 21 * BLOCK, (per_chunk - 21) * BLOCK),
        ]
        ov.write_zeroes(8 * MiB + 5 * BLOCK, 19 * BLOCK)  # over data: bits 5..23 set
        assert ov.dirty_ranges()[-1] == (8 * MiB + 5 * BLOCK, 19 * BLOCK)


def test_whole_blocks_zeroed_are_holes_in_the_block_file(pool: ChunkPool, tmp_path: Path) -> None:
    with Overlay.create(tmp_path / "ov", pool, None, None, size=64 * MiB) as ov:
        ov.write(0, os.urandom(16 * MiB))
        ov.flush()
        allocated = os.stat(tmp_path / "ov" / "blocks").st_blocks * 512
        ov.write_zeroes(0, 16 * MiB)
        ov.flush()
        assert os.stat(tmp_path / "ov" / "blocks").st_blocks * 512 < allocated // 8
        assert ov.dirty_ranges() == []  # zeros over a zero volume
        assert ov.read(0, 16 * MiB) == bytes(16 * MiB)


def test_bad_input_is_refused(pool: ChunkPool, tmp_path: Path) -> None:
    mid, base, _ = make_base(pool, tmp_path, 2 * MiB)
    with pytest.raises(InvalidInput):
        Overlay.create(tmp_path / "a", pool, base, None)
    with pytest.raises(InvalidInput):
        Overlay.create(tmp_path / "b", pool, base, mid, size=3 * MiB)
    with pytest.raises(InvalidInput):
        Overlay.create(tmp_path / "c", pool, None, None)
    ov = Overlay.create(tmp_path / "ov", pool, base, mid)
    with pytest.raises(AlreadyExists):
        Overlay.create(tmp_path / "ov", pool, base, mid)
    with pytest.raises(InvalidInput, match="outside the volume"):
        ov.read(2 * MiB - 1, 2)
    with pytest.raises(InvalidInput):
        ov.write(2 * MiB, b"x")
    with pytest.raises(InvalidInput):
        ov.write_zeroes(-1, 5)
    with pytest.raises(InvalidInput):
        ov.trim(0, 2 * MiB + 1)
    ov.close()
    with pytest.raises(StorageError, match="closed"):
        ov.read(0, 1)
    with pytest.raises(StorageError, match="cannot be opened: it has no"):
        Overlay.open(tmp_path / "nothing", pool)


def test_concurrent_partial_writes_to_one_block_keep_each_other(
    pool: ChunkPool, tmp_path: Path
) -> None:
    """Read-modify-write of clean blocks is per-block atomic: no write is lost."""
    mid, base, data = make_base(pool, tmp_path, 5 * MiB)
    model = bytearray(data)
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        pieces = [(b * BLOCK + k * 4096, os.urandom(4096)) for b in range(8) for k in range(16)]
        random.Random(5).shuffle(pieces)
        for off, piece in pieces:
            model[off : off + len(piece)] = piece

        def worker(part: list[tuple[int, bytes]]) -> None:
            for off, piece in part:
                ov.write(off, piece)
                ov.read(off, 8192 if off + 8192 <= ov.size else 1)

        threads = [threading.Thread(target=worker, args=(pieces[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert ov.read(0, ov.size) == model


def test_capture_reads_only_dirty_blocks_and_restores_equal(
    pool: ChunkPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mid, base, _ = make_base(pool, tmp_path, 32 * MiB + 100, seed=9)
    directory = tmp_path / "ov"
    ov = Overlay.create(directory, pool, base, mid)
    ov.write(5 * MiB + 3, b"changed!")  # one block of chunk 1 (a zero extent in the base)
    ov.write(20 * MiB - 10, os.urandom(20))  # straddles chunks 4 and 5: two blocks
    ov.write(32 * MiB + 50, b"tail")  # the short last chunk
    gets: list[bytes] = []
    real_get = pool.get

    def counting_get(digest: bytes) -> bytes:
        gets.append(digest)
        return real_get(digest)

    monkeypatch.setattr(pool, "get", counting_get)
    new_id, manifest, stats = capture_overlay(pool, ov, meta={"label": "syncback"})
    dirty = 3 * BLOCK + 100
    assert stats.bytes_read == dirty == ov.dirty_bytes()
    # only the base chunks under dirty blocks were read (chunk 1 is a zero extent)
    assert set(gets) <= {base.chunks[4], base.chunks[5], base.chunks[8]}
    pairs = zip(base.chunks, manifest.chunks, strict=True)
    changed = {i for i, (a, b) in enumerate(pairs) if a != b}
    assert changed == {1, 4, 5, 8}
    assert stats.chunks_new == 4
    # changed chunks are deltas over the base: about the size of the changed blocks
    assert stats.bytes_stored < 3 * BLOCK + 100 + 4 * 4096
    monkeypatch.undo()
    assert load_manifest(pool, new_id) == manifest and manifest.meta == {"label": "syncback"}
    out = tmp_path / "out.img"
    restore_volume(pool, manifest, out)
    assert out.read_bytes() == ov.read(0, ov.size)
    ov.close()


def test_a_capture_asks_the_kernel_for_its_dirty_blocks_a_bounded_way_ahead(
    pool: ChunkPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mid, base, _ = make_base(pool, tmp_path, 32 * MiB + 100, seed=9)
    ov = Overlay.create(tmp_path / "ov", pool, base, mid)
    for at in (5 * MiB, 5 * MiB + BLOCK, 9 * MiB, 20 * MiB - 10, 26 * MiB, 32 * MiB + 50):
        ov.write(at, os.urandom(20))
    monkeypatch.setattr(overlay_mod, "READ_AHEAD", BLOCK)
    lock = threading.Lock()
    asked: list[tuple[int, int]] = []
    read = [0]  # dirty bytes read from the block file so far
    ahead_of_reads: list[int] = []
    real_ahead, real_pread = ov.read_ahead, ov._pread

    def read_ahead(offset: int, length: int) -> None:
        with lock:
            ahead_of_reads.append(sum(n for _, n in asked) - read[0])
            asked.append((offset, length))
        real_ahead(offset, length)

    def pread(length: int, offset: int) -> bytes:
        with lock:
            read[0] += length
        return real_pread(length, offset)

    monkeypatch.setattr(ov, "read_ahead", read_ahead)
    monkeypatch.setattr(ov, "_pread", pread)
    _, manifest, _ = capture_overlay(pool, ov)
    # every dirty block asked for once, adjacent ones in one range, in the order read
    blocks = [5 * MiB // BLOCK, 9 * MiB // BLOCK, 20 * MiB // BLOCK - 1, 26 * MiB // BLOCK]
    assert asked == [(b * BLOCK, 2 * BLOCK if b in (5 * MiB // BLOCK, blocks[2]) else BLOCK)
                     for b in blocks] + [(32 * MiB, 100)]  # fmt: skip
    # never more than READ_AHEAD past what the capture had read
    assert max(ahead_of_reads) <= BLOCK
    out = tmp_path / "out.img"
    restore_volume(pool, manifest, out)
    assert out.read_bytes() == ov.read(0, ov.size)
    ov.close()


def test_capture_of_a_clean_overlay_is_the_base(pool: ChunkPool, tmp_path: Path) -> None:
    mid, base, _ = make_base(pool, tmp_path, 9 * MiB)
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        new_id, manifest, stats = capture_overlay(pool, ov)
    assert manifest.chunks == base.chunks and new_id == mid
    assert stats.bytes_read == 0 and stats.bytes_stored == 0


def test_capture_of_an_overlay_without_base(pool: ChunkPool, tmp_path: Path) -> None:
    with Overlay.create(tmp_path / "ov", pool, None, None, size=20 * MiB + 1) as ov:
        payload = os.urandom(3 * MiB)
        ov.write(7 * MiB, payload)
        ov.write(0, bytes(BLOCK))  # dirty, but zeros: stays a zero extent
        _, manifest, stats = capture_overlay(pool, ov)
        assert stats.bytes_read == ov.dirty_bytes()
        assert [c is None for c in manifest.chunks] == [True, False, False, True, True, True]
        out = tmp_path / "out.img"
        restore_volume(pool, manifest, out)
        assert out.read_bytes() == ov.read(0, ov.size)


def test_writes_rewriting_the_same_bytes_store_nothing(pool: ChunkPool, tmp_path: Path) -> None:
    mid, base, data = make_base(pool, tmp_path, 8 * MiB)
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        ov.write(MiB, data[MiB : 2 * MiB])
        assert ov.dirty_bytes() == MiB
        _, manifest, stats = capture_overlay(pool, ov)
    assert manifest.chunks == base.chunks and stats.bytes_stored == 0
    assert stats.bytes_read == MiB


def test_delete_removes_the_files(pool: ChunkPool, tmp_path: Path) -> None:
    ov = Overlay.create(tmp_path / "ov", pool, None, None, size=SUB_BLOCK * 3)
    ov.write(0, b"x")
    ov.delete()
    assert not (tmp_path / "ov").exists()


# --- changes since the last capture ------------------------------------------------------


def _capture(pool: ChunkPool, ov: Overlay) -> bytes:
    """A committed capture, as syncback makes one: begin, capture, commit."""
    ov.begin_capture()
    mid, _, _ = capture_overlay(pool, ov)
    ov.commit_capture(mid)
    return mid


def test_changes_since_capture_start_at_the_base_and_reset_at_a_commit(
    pool: ChunkPool, tmp_path: Path
) -> None:
    mid, base, _ = make_base(pool, tmp_path, 8 * MiB)
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        assert ov.reference == mid and ov.changed_since_capture() == []
        ov.write(3 * BLOCK + 1, b"a")
        ov.write(6 * MiB, b"b")
        assert ov.changed_since_capture() == [(3 * BLOCK, BLOCK), (6 * MiB, BLOCK)]
        ov.begin_capture()
        ov.write(7 * MiB, b"written while the capture runs")
        captured, _, _ = capture_overlay(pool, ov)
        # not yet recorded: the capture's blocks still count
        assert ov.reference == mid
        assert ov.changed_bytes_since_capture() == 3 * BLOCK
        ov.commit_capture(captured)
        assert ov.reference == captured
        assert ov.changed_since_capture() == [(7 * MiB, BLOCK)]  # only what came after
        assert ov.dirty_bytes() == 3 * BLOCK  # the dirty map is not what a capture resets
        assert _capture(pool, ov) == captured  # the capture read that write already
        assert ov.changed_since_capture() == []


def test_an_aborted_capture_leaves_its_blocks_changed(pool: ChunkPool, tmp_path: Path) -> None:
    mid, base, _ = make_base(pool, tmp_path, 8 * MiB)
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        ov.write(0, b"a")
        ov.begin_capture()
        ov.write(MiB, b"b")
        ov.abort_capture()
        assert ov.reference == mid
        assert ov.changed_since_capture() == [(0, BLOCK), (MiB, BLOCK)]
        ov.begin_capture()
        ov.begin_capture()  # one never ended is merged, not lost
        ov.write(2 * MiB, b"c")
        ov.abort_capture()
        assert ov.changed_bytes_since_capture() == 3 * BLOCK
        with pytest.raises(StorageError, match="no capture was begun"):
            ov.commit_capture(mid)


def test_zeroes_written_over_zeros_still_count_as_changed(pool: ChunkPool, tmp_path: Path) -> None:
    with Overlay.create(tmp_path / "ov", pool, None, None, size=8 * MiB) as ov:
        ov.write(0, b"x" * BLOCK)
        _capture(pool, ov)
        ov.write_zeroes(0, 2 * BLOCK)  # block 0 goes back to clean (zero base), yet changed
        assert ov.dirty_ranges() == []
        assert ov.changed_since_capture() == [(0, 2 * BLOCK)]


def test_a_crash_before_the_commit_keeps_the_old_reference_and_every_change(
    pool: ChunkPool, tmp_path: Path
) -> None:
    mid, base, _ = make_base(pool, tmp_path, 8 * MiB)
    directory = tmp_path / "ov"
    ov = Overlay.create(directory, pool, base, mid)
    try:
        ov.write(BLOCK, b"one")
        first = _capture(pool, ov)
        ov.write(5 * BLOCK, b"two")
        ov.flush()
        ov.begin_capture()
        second, _, _ = capture_overlay(pool, ov)
        # a "crash" here: the capture's row may exist, but its commit never happened
        after = Overlay.open(directory, pool)
        try:
            assert after.reference == first
            assert after.changed_since_capture() == [(5 * BLOCK, BLOCK)]
        finally:
            after.close()
        ov.commit_capture(second)  # durable when it returns: a crash now keeps it
        after = Overlay.open(directory, pool)
        try:
            assert after.reference == second and after.changed_since_capture() == []
        finally:
            after.close()
    finally:
        ov.close()


def test_an_overlay_made_before_the_since_map_counts_every_dirty_block(
    pool: ChunkPool, tmp_path: Path
) -> None:
    mid, base, _ = make_base(pool, tmp_path, 8 * MiB)
    directory = tmp_path / "ov"
    with Overlay.create(directory, pool, base, mid) as ov:
        ov.write(2 * MiB, b"old")
    (directory / "since.bitmap").unlink()
    with Overlay.open(directory, pool) as again:
        assert again.reference is None
        assert again.changed_since_capture() == again.dirty_ranges() == [(2 * MiB, BLOCK)]
    assert (directory / "since.bitmap").exists()  # written by the close's flush


def test_a_frozen_overlay_refuses_writes_until_thawed(pool: ChunkPool, tmp_path: Path) -> None:
    with Overlay.create(tmp_path / "ov", pool, None, None, size=MiB) as ov:
        ov.freeze()
        assert ov.frozen
        with pytest.raises(StorageError, match="takes no writes now"):
            ov.write(0, b"x")
        with pytest.raises(StorageError, match="takes no writes now"):
            ov.write_zeroes(0, BLOCK)
        assert ov.changed_since_capture() == [] and ov.read(0, 1) == b"\0"
        ov.thaw()
        ov.write(0, b"x")
        assert ov.read(0, 1) == b"x"


def test_revert_brings_back_the_captured_state_exactly(pool: ChunkPool, tmp_path: Path) -> None:
    mid, base, data = make_base(pool, tmp_path, 12 * MiB + 4096)
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        ov.write(MiB, os.urandom(3 * BLOCK))
        protective = _capture(pool, ov)
        expected = ov.read(0, ov.size)
        ov.write(MiB + 5, b"stray")  # a block the capture holds, changed again
        ov.write(9 * MiB, os.urandom(2 * MiB))  # blocks the capture does not hold
        ov.write_zeroes(0, MiB)
        ov.write(ov.size - 10, b"tail bytes")
        manifest = load_manifest(pool, protective)
        assert isinstance(manifest, VolumeManifest)
        ov.freeze()
        rewritten = ov.revert(manifest, protective)
        assert ov.frozen  # still held off: the caller decides when writes resume
        assert rewritten == MiB + BLOCK + 2 * MiB + 4096
        assert ov.read(0, ov.size) == expected
        assert ov.reference == protective and ov.changed_since_capture() == []
        assert expected[:MiB] == data[:MiB]


def test_a_capture_from_the_last_one_reads_only_what_changed_since(
    pool: ChunkPool, tmp_path: Path
) -> None:
    mid, base, _ = make_base(pool, tmp_path, 24 * MiB, seed=4)
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        for off in (0, 5 * MiB, 9 * MiB, 17 * MiB):  # written before the first syncback
            ov.write(off, os.urandom(BLOCK))
        ov.begin_capture()
        first_id, first, _ = capture_overlay(pool, ov, previous=base)
        ov.commit_capture(first_id)
        ov.write(9 * MiB + 7, b"one more write")  # the only change since
        ov.begin_capture()
        second_id, second, stats = capture_overlay(pool, ov, previous=first)
        ov.commit_capture(second_id)
        assert stats.bytes_read == BLOCK  # not the four blocks written since the failover
        pairs = zip(first.chunks, second.chunks, strict=True)
        changed = [i for i, (a, b) in enumerate(pairs) if a != b]
        assert changed == [2]
        out = tmp_path / "out.img"
        restore_volume(pool, second, out)
        assert out.read_bytes() == ov.read(0, ov.size)  # equal to a capture of everything


def test_a_capture_of_a_few_written_blocks_reads_no_byte_of_the_base(
    pool: ChunkPool, tmp_path: Path
) -> None:
    """Few blocks written in a chunk: the capture takes them and the base chunk's header
    only, so a base chunk whose data is unreadable does not matter to it (its id follows
    from the block digests). The image it makes reads back as the overlay did."""
    mid, base, _ = make_base(pool, tmp_path, 3 * VOLUME_CHUNK)
    first = base.chunks[0]
    assert first is not None
    path = chunk_file(pool, first)
    kept = path.read_bytes()
    info = pool.info(first)
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        ov.write(5 * BLOCK + 10, b"new bytes")
        ov.write(40 * BLOCK, os.urandom(2 * BLOCK))
        expected = ov.read(0, ov.size)
        spoiled = bytearray(kept)
        for at in range(info.payload_at, len(spoiled), 4096):
            spoiled[at] ^= 0xFF  # every block of the base chunk, header intact
        path.write_bytes(bytes(spoiled))
        image_id, image, stats = capture_overlay(pool, ov)
    path.write_bytes(kept)
    assert stats.bytes_read == 3 * BLOCK
    chunk = image.chunks[0]
    assert chunk is not None and chunk != first and pool.info(chunk).base == first
    out = tmp_path / "out.img"
    restore_volume(pool, load_manifest(pool, image_id), out)  # type: ignore[arg-type]
    assert out.read_bytes() == expected
    assert pool.verify().ok


# --- the base-block cache and the paths that must not wait -----------------------------


def counting_decodes(pool: ChunkPool, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The chunk ids the pool decodes for a cache from now on, in order."""
    calls: list[bytes] = []
    real = pool.decode_lazily

    def decode(digest: bytes) -> tuple[bytes, list[bytes], bool]:
        calls.append(digest)
        return real(digest)

    monkeypatch.setattr(pool, "decode_lazily", decode)
    return calls


def test_a_chunk_is_decoded_once_for_every_reader_and_the_cache_stays_bounded(
    pool: ChunkPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _mid, base, data = make_base(pool, tmp_path, 5 * VOLUME_CHUNK)
    decodes = counting_decodes(pool, monkeypatch)
    cache = ChunkCache(max_bytes=2 * VOLUME_CHUNK)
    first, second = ImageReader(pool, base, cache), ImageReader(pool, base, cache)
    assert first.read(100, 4096) == data[100:4196]
    assert second.read(VOLUME_CHUNK - 4096, 4096) == data[VOLUME_CHUNK - 4096 : VOLUME_CHUNK]
    assert decodes == [base.chunks[0]]  # two readers, one decode
    for index in (2, 3, 4):  # chunk 1 is all zeros: never decoded
        off = index * VOLUME_CHUNK + 7
        assert first.read(off, 10) == data[off : off + 10]
    assert cache.bytes_cached <= cache.max_bytes
    assert second.read(100, 4096) == data[100:4196]  # chunk 0 was evicted: decoded again
    assert decodes == [base.chunks[i] for i in (0, 2, 3, 4, 0)]


def test_compressed_chunks_are_served_from_the_cache_verified(
    pool: ChunkPool, tmp_path: Path
) -> None:
    text = (b"tandem keeps copies " * (3 * MiB // 20 + 1))[: 3 * MiB]
    src = tmp_path / "text.img"
    src.write_bytes(text)
    _mid, base, _ = capture_volume(pool, src)
    reader = ImageReader(pool, base, ChunkCache(VOLUME_CHUNK))
    assert reader.read(12345, 70000) == text[12345 : 12345 + 70000]
    assert reader.read(0, len(text)) == text


def test_a_corrupt_block_is_refused_and_never_kept_its_neighbours_are_served(
    pool: ChunkPool, tmp_path: Path
) -> None:
    _mid, base, data = make_base(pool, tmp_path, VOLUME_CHUNK)
    digest = base.chunks[0]
    assert digest is not None
    path = chunk_file(pool, digest)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF  # the last byte of block 63
    path.chmod(0o600)
    path.write_bytes(blob)
    cache = ChunkCache()
    reader = ImageReader(pool, base, cache)
    for _ in range(2):  # refused again: the bad chunk was dropped, not kept half-trusted
        with pytest.raises(ChunkCorrupt):
            reader.read(VOLUME_CHUNK - 10, 10)
        assert cache.bytes_cached == 0
    assert reader.read(0, 4096) == data[:4096]  # block 0 checks out on its own
    with pytest.raises(ChunkCorrupt):
        reader.read_nowait(VOLUME_CHUNK - BLOCK, BLOCK)


def test_read_nowait_answers_only_from_memory(pool: ChunkPool, tmp_path: Path) -> None:
    mid, base, data = make_base(pool, tmp_path, 3 * VOLUME_CHUNK)
    with Overlay.create(tmp_path / "ov", pool, base, mid, cache=ChunkCache()) as ov:
        assert ov.read_nowait(10, 4096) is None  # the chunk is not decoded yet
        assert ov.read(10, 4096) == data[10:4106]
        assert ov.read_nowait(10, 4096) == data[10:4106]
        assert ov.read_nowait(VOLUME_CHUNK, 4096) == bytes(4096)  # a zero extent: no I/O
        ov.write(3 * BLOCK + 5, b"written")
        got = ov.read_nowait(3 * BLOCK, 4096)  # the block file's page is cached now
        assert (
            got
            == data[3 * BLOCK : 3 * BLOCK + 5]
            + b"written"
            + data[3 * BLOCK + 12 : 3 * BLOCK + 4096]
        )


def test_try_write_writes_or_leaves_everything_as_it_was(pool: ChunkPool, tmp_path: Path) -> None:
    mid, base, data = make_base(pool, tmp_path, 3 * VOLUME_CHUNK)
    with Overlay.create(tmp_path / "ov", pool, base, mid, cache=ChunkCache()) as ov:
        # A partial write to a clean block needs its base block: not decoded, not written.
        assert ov.try_write(100, b"abc") is False
        assert ov.dirty_ranges() == [] and ov.read(100, 3) == data[100:103]
        assert ov.try_write(100, b"abc") is True  # (the read above decoded the chunk)
        assert ov.read(0, BLOCK) == data[:100] + b"abc" + data[103:BLOCK]
        assert ov.try_write(2 * VOLUME_CHUNK, bytes([7]) * BLOCK) is True  # a whole block
        # A block whose lock another writer holds: not now.
        lock = ov._stripes[0]
        with lock:
            assert ov.try_write(5, b"zz") is False
        assert ov.read(5, 2) == data[5:7]
        ov.freeze()
        with pytest.raises(CopyFrozen):
            ov.try_write(5, b"zz")
        ov.thaw()
        ov.flush()
    with Overlay.open(tmp_path / "ov", pool) as again:
        assert again.dirty_ranges() == [(0, BLOCK), (2 * VOLUME_CHUNK, BLOCK)]
        assert again.read(100, 3) == b"abc"


def test_extents_report_clean_zero_extents_as_zeros(pool: ChunkPool, tmp_path: Path) -> None:
    mid, base, _data = make_base(pool, tmp_path, 3 * VOLUME_CHUNK + 4096)
    chunk = VOLUME_CHUNK
    assert ImageReader(pool, base).extents(0, base.size) == [
        (chunk, False),
        (chunk, True),
        (chunk + 4096, False),
    ]
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        ov.write(chunk + 2 * BLOCK + 1, b"x")
        assert ov.extents(0, ov.size) == [
            (chunk, False),
            (2 * BLOCK, True),
            (BLOCK, False),
            (chunk - 3 * BLOCK, True),
            (chunk + 4096, False),
        ]
        assert ov.extents(chunk + 10, 20) == [(20, True)]
        ov.write_zeroes(chunk + 2 * BLOCK, BLOCK)  # zeros over zeros: clean again
        assert ov.extents(chunk, chunk) == [(chunk, True)]
        with pytest.raises(InvalidInput):
            ov.extents(ov.size - 1, 2)


def test_a_flush_with_nothing_new_to_make_durable_syncs_nothing(
    pool: ChunkPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        syncs.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with Overlay.create(tmp_path / "ov", pool, None, None, size=8 * MiB) as ov:
        ov.write(0, b"a")
        ov.flush()
        assert len(syncs) == 3  # the data, then since.bitmap and dirty.bitmap in place
        ov.flush()  # (as when flushes queue behind one another: the first covered them)
        assert len(syncs) == 3
        ov.write(10, b"b")  # a block already dirty: only the data is new
        ov.flush()
        assert len(syncs) == 4


# --- cuts: a point in time of a copy that keeps taking writes ---------------------------


def test_a_cut_is_the_copy_at_its_instant_whatever_is_written_after(
    pool: ChunkPool, tmp_path: Path
) -> None:
    mid, base, _ = make_base(pool, tmp_path, 12 * MiB + 1000)
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        ov.write(3 * BLOCK + 5, b"dirty before the cut")
        ov.write(VOLUME_CHUNK + 7, b"over the zero extent")
        ov.write(9 * MiB, os.urandom(3 * BLOCK))
        at_cut = ov.read(0, ov.size)
        cut = ov.cut()
        assert cut.held_seconds >= 0 and cut.reference == mid
        assert cut.dirty_bytes() == ov.dirty_bytes() == 5 * BLOCK
        # after the cut: rewrites of blocks dirty then, new blocks, zeroing, a partial tail
        ov.write(3 * BLOCK, os.urandom(2 * BLOCK))
        ov.write_zeroes(VOLUME_CHUNK, 2 * BLOCK)  # back to clean over zeros
        ov.write(9 * MiB + BLOCK + 9, b"again")
        ov.write(ov.size - 10, b"tail bytes")
        ov.write(20 * BLOCK, os.urandom(BLOCK))  # clean at the cut
        now = ov.read(0, ov.size)
        assert now != at_cut
        assert cut.read(0, cut.size) == at_cut
        for offset, length in ((3 * BLOCK + 1, BLOCK), (VOLUME_CHUNK - 3, 9), (ov.size - 4, 4)):
            assert cut.read(offset, length) == at_cut[offset : offset + length]
        captured, _, _ = capture_overlay(pool, cut)
        cut.release()
        assert not (ov.directory / "cut.blocks").exists()
        ov.commit_capture(captured)
        image = load_manifest(pool, captured)
        assert isinstance(image, VolumeManifest)
        assert ImageReader(pool, image).read(0, image.size) == at_cut
        assert ov.read(0, ov.size) == now  # the copy kept every write
        # what was written after the cut is what the next capture takes
        assert {o for o, _ in ov.changed_since_capture()} >= {3 * BLOCK, 20 * BLOCK}
        later = _capture(pool, ov)
        image = load_manifest(pool, later)
        assert isinstance(image, VolumeManifest)
        assert ImageReader(pool, image).read(0, image.size) == now
        with pytest.raises(StorageError, match="released"):
            cut.read(0, 1)


def test_a_capture_of_a_cut_under_a_busy_writer_is_one_instant(
    pool: ChunkPool, tmp_path: Path
) -> None:
    """A sequential writer: write k goes to slot k % SLOTS. The state after write K holds
    exactly K - SLOTS + 1 … K; a torn copy would hold a gap."""
    slots, stride = 64, 3 * BLOCK + 4096  # slots in many blocks and chunks
    size = slots * stride + BLOCK
    with Overlay.create(tmp_path / "ov", pool, None, None, size=size) as ov:
        acked = [0]
        stop = threading.Event()
        ready = threading.Event()

        def writer() -> None:
            k = 0
            while not stop.is_set():
                k += 1
                ov.write((k % slots) * stride, k.to_bytes(8, "big") * 512)
                acked[0] = k
                if k == 3 * slots:
                    ready.set()

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            assert ready.wait(60)
            before = acked[0]
            with ov.cut() as cut:
                captured, _, _ = capture_overlay(pool, cut)
            after = acked[0]
            ov.commit_capture(captured)
        finally:
            stop.set()
            thread.join()
        image = load_manifest(pool, captured)
        assert isinstance(image, VolumeManifest)
        reader = ImageReader(pool, image)
        values = []
        for i in range(slots):
            record = reader.read(i * stride, 4096)
            assert record == record[:8] * 512
            values.append(int.from_bytes(record[:8], "big"))
        top = max(values)
        assert sorted(values) == list(range(top - slots + 1, top + 1))
        assert before <= top <= after + 1


def test_a_crash_while_a_cut_is_held_loses_no_write_and_keeps_every_change(
    pool: ChunkPool, tmp_path: Path
) -> None:
    mid, base, _ = make_base(pool, tmp_path, 8 * MiB)
    directory = tmp_path / "ov"
    ov = Overlay.create(directory, pool, base, mid)
    try:
        ov.write(BLOCK, b"before")
        cut = ov.cut()
        ov.write(BLOCK, b"after!")
        ov.write(4 * BLOCK, b"new")
        ov.flush()
        assert (directory / "cut.blocks").exists()
        # a "crash" here: the scratch file goes, the writes and the changes stay
        after = Overlay.open(directory, pool)
        try:
            assert not (directory / "cut.blocks").exists()
            assert after.read(BLOCK, 6) == b"after!" and after.read(4 * BLOCK, 3) == b"new"
            assert after.reference == mid
            assert after.changed_since_capture() == [(BLOCK, BLOCK), (4 * BLOCK, BLOCK)]
        finally:
            after.close()
        cut.release()
        ov.abort_capture()
    finally:
        ov.close()


def test_a_second_cut_is_refused_and_try_write_leaves_copying_to_write(
    pool: ChunkPool, tmp_path: Path
) -> None:
    mid, base, _ = make_base(pool, tmp_path, 8 * MiB)
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        ov.write(0, b"x" * BLOCK)
        with ov.cut() as cut:
            with pytest.raises(StorageError, match="a cut is held"):
                ov.cut()
            assert ov.try_write(0, b"y") is False  # its cut content is copied first
            assert ov.read(0, 1) == b"x"
            ov.write(0, b"y")
            assert ov.try_write(1, b"z") is True  # copied already: nothing to wait for
            assert cut.read(0, 2) == b"xx" and ov.read(0, 2) == b"yz"
        ov.abort_capture()
        assert ov.cut().read(0, 2) == b"yz"
