"""Volume capture, diff-restore and image diff."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.errors import ChunkCorrupt, SourceChanged, SourceUnreadable, TargetInvalid
from tandem.storage import volume
from tandem.storage.digest import SUB_BLOCK
from tandem.storage.manifest import VOLUME_CHUNK, VolumeManifest, load_manifest
from tandem.storage.pool import ChunkPool, start_writeback
from tandem.storage.volume import (
    capture_volume,
    diff_volumes,
    restore_volume,
    seal,
    stamp_of,
    unchanged_since,
)
from tests.poolfiles import chunk_file

MiB = 1024 * 1024


def write_volume(path: Path, size: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    data = bytearray()
    while len(data) < size:
        kind = rng.choice(["random", "text", "zero"])
        n = min(size - len(data), rng.choice([SUB_BLOCK, MiB, 3 * MiB]))
        if kind == "random":
            data += rng.randbytes(n)
        elif kind == "text":
            data += (b"tandem log line %d\n" % rng.randrange(1000)) * (n // 20) + b"." * (n % 20)
        else:
            data += bytes(n)
    path.write_bytes(bytes(data[:size]))
    return bytes(data[:size])


def test_capture_restore_byte_exact_onto_empty_target(pool: ChunkPool, tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    data = write_volume(src, 10 * MiB + 12345)
    mid, manifest, stats = capture_volume(pool, src)
    assert stats.bytes_total == len(data) and stats.chunks == 3
    assert load_manifest(pool, mid) == manifest
    out = tmp_path / "restored.img"
    rstats = restore_volume(pool, manifest, out)
    assert out.read_bytes() == data
    assert rstats.bytes_compared == 0  # a new target is not read


def test_zero_and_sparse_regions_are_extents(pool: ChunkPool, tmp_path: Path) -> None:
    src = tmp_path / "sparse.img"
    with open(src, "wb") as fh:
        fh.truncate(64 * MiB)
        fh.seek(20 * MiB)
        fh.write(b"x" * MiB)
    _, manifest, stats = capture_volume(pool, src)
    assert stats.chunks == 16 and stats.chunks_zero == 15
    assert stats.bytes_read == VOLUME_CHUNK  # holes are not read
    assert sum(1 for c in manifest.chunks if c is not None) == 1
    out = tmp_path / "out.img"
    restore_volume(pool, manifest, out)
    assert out.read_bytes() == src.read_bytes()
    assert os.stat(out).st_blocks * 512 < 2 * VOLUME_CHUNK  # holes stay holes


def test_recapture_of_unchanged_volume_stores_nothing(pool: ChunkPool, tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    write_volume(src, 12 * MiB)
    mid, m1, _ = capture_volume(pool, src)
    _, m2, stats = capture_volume(pool, src, base=m1, base_id=mid)
    assert m2.chunks == m1.chunks
    assert stats.bytes_stored == 0 and stats.chunks_new == 0


def test_small_change_stores_one_chunk_and_diff_is_64k(pool: ChunkPool, tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    write_volume(src, 16 * MiB, seed=7)
    mid, m1, _ = capture_volume(pool, src)
    with open(src, "r+b") as fh:
        fh.seek(5 * MiB + 3)
        fh.write(b"changed!")
    _, m2, stats = capture_volume(pool, src, base=m1, base_id=mid)
    assert stats.chunks_new == 1
    assert diff_volumes(m1, m2) == [(4 * MiB, 4 * MiB)]  # manifests alone: chunk granularity
    assert diff_volumes(m1, m2, pool) == [(5 * MiB, SUB_BLOCK)]  # with sub-block digests


def test_dirty_ranges_capture_reads_only_dirty_chunks(pool: ChunkPool, tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    write_volume(src, 16 * MiB, seed=3)
    mid, m1, _ = capture_volume(pool, src)
    with open(src, "r+b") as fh:
        fh.seek(9 * MiB)
        fh.write(os.urandom(1000))
    _, m2, stats = capture_volume(pool, src, base=m1, base_id=mid, dirty=[(9 * MiB, 1000)])
    assert stats.bytes_read == VOLUME_CHUNK
    out = tmp_path / "out.img"
    restore_volume(pool, m2, out)
    assert out.read_bytes() == src.read_bytes()


def test_diff_restore_writes_only_differing_blocks(pool: ChunkPool, tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    data = write_volume(src, 20 * MiB, seed=11)
    _, manifest, _ = capture_volume(pool, src)
    target = tmp_path / "target.img"
    target.write_bytes(data)
    damaged = 0
    with open(target, "r+b") as fh:
        for off in (0, 3 * MiB + 100, 11 * MiB, 19 * MiB + SUB_BLOCK - 1):
            fh.seek(off)
            fh.write(b"\xff\x00\xfe")
            damaged += 1
    stats = restore_volume(pool, manifest, target)
    assert target.read_bytes() == data
    # a write straddling a 64 KiB boundary dirties two blocks; never more than that
    assert SUB_BLOCK * damaged <= stats.bytes_written <= SUB_BLOCK * (damaged + 1)


def test_restore_resizes_regular_file_target(pool: ChunkPool, tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    data = write_volume(src, 5 * MiB)
    _, manifest, _ = capture_volume(pool, src)
    target = tmp_path / "target.img"
    target.write_bytes(os.urandom(9 * MiB))
    restore_volume(pool, manifest, target)
    assert target.read_bytes() == data


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    size=st.integers(min_value=0, max_value=9 * MiB),
    seed=st.integers(min_value=0, max_value=2**32),
    edits=st.lists(
        st.tuples(st.floats(0, 1), st.integers(1, 200_000), st.sampled_from([b"\x00", b"r"])),
        max_size=6,
    ),
)
def test_property_capture_edit_diff_restore(
    tmp_path_factory: pytest.TempPathFactory,
    size: int,
    seed: int,
    edits: list[tuple[float, int, bytes]],
) -> None:
    """Random volume → capture → random edits of a copy → diff-restore → byte-exact."""
    tmp = tmp_path_factory.mktemp("prop")
    pool = ChunkPool.create(tmp / "pool")
    src = tmp / "src.img"
    data = write_volume(src, size, seed=seed)
    mid, m1, _ = capture_volume(pool, src)
    target = tmp / "target.img"
    target.write_bytes(data)
    rng = random.Random(seed)
    with open(target, "r+b") as fh:
        for where, length, fill in edits:
            fh.seek(int(where * size))
            fh.write(bytes(length) if fill == b"\x00" else rng.randbytes(length))
    restore_volume(pool, m1, target)
    assert target.read_bytes() == data
    # and the edited source captured incrementally restores exactly too
    edited = tmp / "edited.img"
    edited.write_bytes(data)
    with open(edited, "r+b") as fh:
        for where, length, _ in edits:
            fh.seek(int(where * size))
            fh.write(rng.randbytes(length))
    _, m2, _ = capture_volume(pool, edited, base=m1, base_id=mid)
    restore_volume(pool, m2, target)
    assert target.read_bytes() == edited.read_bytes()


def test_missing_source_is_a_clear_error(pool: ChunkPool, tmp_path: Path) -> None:
    with pytest.raises(SourceUnreadable, match="No such file"):
        capture_volume(pool, tmp_path / "nope.img")
    assert list(pool.iter_chunks()) == []


def test_directory_source_is_refused(pool: ChunkPool, tmp_path: Path) -> None:
    with pytest.raises(SourceUnreadable, match="not a regular file or block device"):
        capture_volume(pool, tmp_path)


def test_source_changing_during_capture_fails_cleanly(pool: ChunkPool, tmp_path: Path) -> None:
    src = tmp_path / "busy.img"
    write_volume(src, 48 * MiB, seed=5)
    mid, m1, _ = capture_volume(pool, src)
    chunks_before = {d for d, _ in pool.iter_chunks()}
    stop = threading.Event()

    def scribble() -> None:
        with open(src, "r+b") as fh:
            while not stop.is_set():
                fh.seek(random.randrange(48 * MiB))
                fh.write(os.urandom(4096))
                fh.flush()
                time.sleep(0.001)

    t = threading.Thread(target=scribble)
    t.start()
    try:
        with pytest.raises(SourceChanged, match="changed while it was being captured"):
            for _ in range(20):  # the window is short; the writer keeps writing
                capture_volume(pool, src, base=m1, base_id=mid, workers=1)
    finally:
        stop.set()
        t.join()
    assert list(pool.tmp_dir.iterdir()) == []
    # every earlier image is intact
    out = tmp_path / "out.img"
    restore_volume(pool, m1, out)
    assert {d for d, _ in pool.iter_chunks()} >= chunks_before


def test_restore_refuses_a_corrupt_chunk(pool: ChunkPool, tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    write_volume(src, 6 * MiB, seed=2)
    _, manifest, _ = capture_volume(pool, src)
    victim = next(c for c in manifest.chunks if c is not None)
    path = chunk_file(pool, victim)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x55
    path.write_bytes(bytes(raw))
    with pytest.raises(ChunkCorrupt):
        restore_volume(pool, manifest, tmp_path / "out.img")


def test_restore_target_that_is_a_directory(pool: ChunkPool, tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    write_volume(src, MiB)
    _, manifest, _ = capture_volume(pool, src)
    with pytest.raises(TargetInvalid):
        restore_volume(pool, manifest, tmp_path)


def test_changed_chunk_is_stored_as_delta_over_its_previous_version(
    pool: ChunkPool, tmp_path: Path
) -> None:
    """64 KiB-run changes cost about their own size in the pool, not 4 MiB each."""
    src = tmp_path / "disk.img"
    rng = random.Random(4)
    src.write_bytes(rng.randbytes(32 * MiB))
    mid, m1, _ = capture_volume(pool, src)
    runs = sorted(rng.sample(range(32 * MiB // SUB_BLOCK), 20))
    with open(src, "r+b") as fh:
        for r in runs:
            fh.seek(r * SUB_BLOCK)
            fh.write(rng.randbytes(SUB_BLOCK))
    mid2, m2, stats = capture_volume(pool, src, base=m1, base_id=mid)
    changed = 20 * SUB_BLOCK
    assert stats.bytes_stored <= 1.1 * changed
    out = tmp_path / "out.img"
    restore_volume(pool, m2, out)
    assert out.read_bytes() == src.read_bytes()
    # the first image no longer named by anything: its chunks stay as delta bases
    report = pool.gc({mid2: m2.chunk_ids()})
    assert report.chunks_removed == 0
    assert pool.verify({mid2: m2.chunk_ids()}).ok
    restore_volume(pool, m2, out)
    assert out.read_bytes() == src.read_bytes()


def test_delta_chains_are_cut_at_max_depth(pool: ChunkPool, tmp_path: Path) -> None:
    from tandem.storage.pool import MAX_DELTA_DEPTH

    src = tmp_path / "disk.img"
    rng = random.Random(5)
    src.write_bytes(rng.randbytes(VOLUME_CHUNK))
    mid, m, _ = capture_volume(pool, src)
    for k in range(MAX_DELTA_DEPTH + 3):
        with open(src, "r+b") as fh:
            fh.seek(k * SUB_BLOCK)
            fh.write(rng.randbytes(100))
        mid, m, _ = capture_volume(pool, src, base=m, base_id=mid)
        digest = m.chunks[0]
        assert digest is not None
        assert pool.info(digest).depth <= MAX_DELTA_DEPTH
        assert pool.get(digest) == src.read_bytes()


def test_a_peer_sent_delta_is_verified_against_its_base(pool: ChunkPool, tmp_path: Path) -> None:
    """put_encoded accepts a delta only if base + blocks reproduce the digest."""
    from tandem.storage.digest import hash_bytes, hash_sub_blocks
    from tandem.storage.pool import encode_delta

    rng = random.Random(6)
    base = rng.randbytes(VOLUME_CHUNK)
    with pool.writer() as w:
        base_id = w.put(base).digest
    new = bytearray(base)
    new[SUB_BLOCK : 2 * SUB_BLOCK] = rng.randbytes(SUB_BLOCK)
    digest = hash_bytes(new)
    blob = encode_delta(
        base_id, 0, len(new), hash_sub_blocks(new), {1: bytes(new[SUB_BLOCK : 2 * SUB_BLOCK])}
    )
    with pool.writer() as w:
        with pytest.raises(ChunkCorrupt):
            w.put_encoded(hash_bytes(b"a lie"), blob)
        assert w.put_encoded(digest, blob).new
    assert pool.get(digest) == bytes(new)
    assert pool.info(digest).depth == 1
    # what is served to others is self-contained
    assert pool.info(digest).base == base_id
    other = ChunkPool.create(tmp_path / "other")
    with other.writer() as w:
        w.put_encoded(digest, pool.get_raw(digest))
    assert other.get(digest) == bytes(new)


def test_small_writes_inside_blocks_cost_about_their_size(pool: ChunkPool, tmp_path: Path) -> None:
    """A 4 KiB write into a 64 KiB block is stored XORed with the old block: ~4 KiB, not 64."""
    src = tmp_path / "disk.img"
    rng = random.Random(8)
    src.write_bytes(rng.randbytes(16 * MiB))
    mid, m1, _ = capture_volume(pool, src)
    offsets = rng.sample(range(16 * MiB // 4096), 40)
    with open(src, "r+b") as fh:
        for o in offsets:
            fh.seek(o * 4096)
            fh.write(rng.randbytes(4096))
    _, m2, stats = capture_volume(pool, src, base=m1, base_id=mid)
    assert stats.bytes_stored <= 1.3 * 40 * 4096
    out = tmp_path / "out.img"
    restore_volume(pool, m2, out)
    assert out.read_bytes() == src.read_bytes()


def test_restore_from_a_known_base_reads_nothing_of_the_target(
    pool: ChunkPool, tmp_path: Path
) -> None:
    src = tmp_path / "disk.img"
    old = write_volume(src, 21 * MiB, seed=5)
    _, base, _ = capture_volume(pool, src)
    new = bytearray(old)
    new[2 * MiB : 2 * MiB + 10] = b"x" * 10  # one block in a data chunk
    new[9 * MiB : 13 * MiB] = bytes(4 * MiB)  # a whole chunk (and a bit) zeroed
    new[-SUB_BLOCK:] = os.urandom(SUB_BLOCK)  # the short last chunk
    src.write_bytes(bytes(new))
    _, image, _ = capture_volume(pool, src)
    target = tmp_path / "target.img"
    target.write_bytes(old)
    stats = restore_volume(pool, image, target, base=base)
    assert target.read_bytes() == bytes(new)
    assert stats.bytes_compared == 0  # the target was not read
    assert stats.bytes_fetched < 6 * MiB  # the changed blocks, not the volume


class Counting:
    """A ChunkSource over a pool that counts the calls of each method."""

    def __init__(self, pool: ChunkPool) -> None:
        self.pool = pool
        self.calls: Counter[str] = Counter()

    def get(self, digest: bytes) -> bytes:
        self.calls["get"] += 1
        return self.pool.get(digest)

    def sub_digests(self, digest: bytes) -> list[bytes]:
        self.calls["sub_digests"] += 1
        return self.pool.sub_digests(digest)

    def read_blocks(self, digest: bytes, indices: list[int]) -> list[bytes]:
        self.calls["read_blocks"] += 1
        return self.pool.read_blocks(digest, indices)

    def sub_digests_many(self, digests: list[bytes]) -> list[list[bytes]]:
        self.calls["sub_digests_many"] += 1
        return self.pool.sub_digests_many(digests)

    def read_blocks_many(self, wants: list[tuple[bytes, list[int]]]) -> list[list[bytes]]:
        self.calls["read_blocks_many"] += 1
        return self.pool.read_blocks_many(wants)


def a_block_changed_in_every_chunk(
    pool: ChunkPool, tmp_path: Path
) -> tuple[VolumeManifest, VolumeManifest, Path, bytes]:
    """(base, image with one block changed in each of its 8 chunks, a target holding the
    base's bytes, the image's bytes)."""
    src = tmp_path / "disk.img"
    old = write_volume(src, 30 * MiB + 5, seed=8)
    _, base, _ = capture_volume(pool, src)
    new = bytearray(old)
    for off in range(MiB, len(new), VOLUME_CHUNK):  # a block in every chunk
        new[off : off + 3] = b"abc" if new[off : off + 3] != b"abc" else b"xyz"
    src.write_bytes(bytes(new))
    _, image, _ = capture_volume(pool, src)
    target = tmp_path / "target.img"
    target.write_bytes(old)
    return base, image, target, bytes(new)


def test_restore_from_a_base_asks_the_source_in_batches_not_per_chunk(
    pool: ChunkPool, tmp_path: Path
) -> None:
    base, image, target, new = a_block_changed_in_every_chunk(pool, tmp_path)
    assert all(a != b for a, b in zip(base.chunks, image.chunks, strict=True))
    source = Counting(pool)
    stats = restore_volume(source, image, target, base=base)
    assert target.read_bytes() == new
    assert source.calls == {"sub_digests_many": 1, "read_blocks_many": 1}
    assert stats.bytes_fetched == stats.bytes_written == len(image.chunks) * SUB_BLOCK


def test_a_restore_from_a_base_starts_the_disk_on_each_batch_before_its_final_sync(
    pool: ChunkPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failback's restore writes the changed blocks as they arrive: each batch is handed
    to the disk (``sync_file_range``) while the next one is fetched, so the final fsync
    waits for the last writes, not for all of them."""
    base, image, target, new = a_block_changed_in_every_chunk(pool, tmp_path)
    events: list[str] = []
    real_fsync = os.fsync

    def writeback(fd: int) -> None:
        events.append("writeback")
        start_writeback(fd)

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(volume, "BLOCK_BATCH", 2 * SUB_BLOCK)  # four batches of two blocks
    monkeypatch.setattr(volume, "start_writeback", writeback)
    monkeypatch.setattr(os, "fsync", fsync)
    restore_volume(pool, image, target, base=base)
    assert target.read_bytes() == new
    assert events == ["writeback"] * 4 + ["fsync"]


def test_a_chunk_that_does_not_fit_its_range_is_refused(pool: ChunkPool, tmp_path: Path) -> None:
    """A manifest naming a chunk of another length (a damaged or forged image) fails the
    restore, with or without a base, instead of leaving stale bytes behind."""
    src = tmp_path / "disk.img"
    data = write_volume(src, 8 * MiB, seed=9)
    _, base, _ = capture_volume(pool, src)
    with pool.writer() as writer:
        shorter = writer.put(os.urandom(VOLUME_CHUNK - 1)).digest  # same block count
        half = writer.put(os.urandom(VOLUME_CHUNK // 2)).digest
    for bad in (shorter, half):
        image = VolumeManifest(size=base.size, chunks=[base.chunks[0], bad])
        for known in (base, None):
            target = tmp_path / "target.img"
            target.write_bytes(data)
            with pytest.raises(ChunkCorrupt, match=r"blocks where the image|block 63 has"):
                restore_volume(pool, image, target, base=known)


def test_a_stamp_sees_any_later_write_and_refuses_a_racy_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"a" * SUB_BLOCK)
    assert stamp_of(path) is None  # just written: a write in the same tick could hide
    sealed = seal(path)
    assert sealed is not None and unchanged_since(path, sealed)
    with open(path, "r+b") as fh:
        fh.write(b"b")
    assert not unchanged_since(path, sealed)
    assert stamp_of(tmp_path) is None  # not a regular file
