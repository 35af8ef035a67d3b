"""The chunk pool: durability, verification, corruption, garbage collection, full disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.errors import ChunkCorrupt, ChunkMissing, PoolFull
from tandem.storage import pool as pool_module
from tandem.storage.digest import (
    SUB_BLOCK,
    hash_block,
    hash_bytes,
    hash_object,
    hash_sub_blocks,
    object_id,
    split_digests,
)
from tandem.storage.pool import CODEC_RAW, CODEC_ZSTD, HEADER, ChunkPool, Layouts, encode_chunk
from tests.poolfiles import chunk_file, chunk_files, drops_pages, resident_bytes


def test_put_get_roundtrip_and_dedup(pool: ChunkPool) -> None:
    data = b"hello tandem " * 10000
    with pool.writer() as w:
        first = w.put(data)
        again = w.put(data)
    assert first.new and not again.new
    assert first.digest == hash_bytes(data)
    assert pool.get(first.digest) == data
    assert pool.sub_digests(first.digest) == hash_sub_blocks(data)


def test_compressible_is_compressed_random_is_raw(pool: ChunkPool) -> None:
    text, noise = b"a" * 200_000, os.urandom(200_000)
    with pool.writer() as w:
        t, n = w.put(text), w.put(noise)
    codec = lambda d: HEADER.unpack_from(pool.get_stored(d))[1]  # noqa: E731
    assert codec(t.digest) == CODEC_ZSTD and t.stored < 10_000
    assert codec(n.digest) == CODEC_RAW


class _Counting:
    """A compressor that records the length of every input it is given."""

    def __init__(self, inner: object, sizes: list[int]) -> None:
        self.inner, self.sizes = inner, sizes

    def compress(self, data: bytes) -> bytes:
        self.sizes.append(len(data))
        packed: bytes = self.inner.compress(data)  # type: ignore[attr-defined]
        return packed


@pytest.mark.parametrize("text_at", [0, 1 << 20, 3 << 20])
def test_a_large_chunk_is_compressed_whole_only_if_part_of_it_compresses(
    pool: ChunkPool, monkeypatch: pytest.MonkeyPatch, text_at: int
) -> None:
    """Random data (media, encrypted or compressed files) is stored raw without being
    compressed whole; a chunk with compressible bytes at its start, middle or end is
    compressed."""
    size = 4 << 20
    noise = os.urandom(size)
    mixed = bytearray(noise)
    mixed[text_at : text_at + (1 << 20)] = b"tandem " * ((1 << 20) // 7) + b"x" * ((1 << 20) % 7)
    sizes: list[int] = []
    real = pool_module._compressor
    monkeypatch.setattr(pool_module, "_compressor", lambda: _Counting(real(), sizes))
    with pool.writer() as w:
        n = w.put(noise)
        assert size not in sizes  # probed, never compressed whole
        m = w.put(bytes(mixed))
    assert size in sizes
    codec = lambda d: HEADER.unpack_from(pool.get_stored(d))[1]  # noqa: E731
    assert codec(n.digest) == CODEC_RAW and pool.get(n.digest) == noise
    assert codec(m.digest) == CODEC_ZSTD and m.stored < size * 0.8
    assert pool.get(m.digest) == bytes(mixed)


@pytest.mark.parametrize(
    ("size", "probed"),
    [(64 << 10, [16 << 10]), (128 << 10, [16 << 10] * 2), (4 << 20, [16 << 10] * 4)],
)
def test_random_data_is_probed_on_a_quarter_of_it_at_most(
    pool: ChunkPool, monkeypatch: pytest.MonkeyPatch, size: int, probed: list[int]
) -> None:
    """A failback's deltas are 64 KiB or more of new blocks each: random ones cost a quarter
    of their bytes in probes (and a 4 MiB chunk its four probes), never a compression of
    all of them."""
    sizes: list[int] = []
    real = pool_module._compressor
    monkeypatch.setattr(pool_module, "_compressor", lambda: _Counting(real(), sizes))
    noise = os.urandom(size)
    with pool.writer() as w:
        put = w.put(noise)
    assert sizes == probed
    assert HEADER.unpack_from(pool.get_stored(put.digest))[1] == CODEC_RAW
    assert pool.get(put.digest) == noise


@pytest.fixture
def disk_pool(tmp_path: Path) -> Iterator[ChunkPool]:
    """A pool on a file system with a page cache of its own: ``tmp_path``, or a folder in
    /var/tmp when that is tmpfs (whose pages are the data)."""
    if drops_pages(tmp_path):
        yield ChunkPool.create(tmp_path / "pool")
        return
    folder = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        assert drops_pages(folder), f"neither {tmp_path} nor {folder} drops written pages"
        yield ChunkPool.create(folder / "pool")
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("cached", [True, False])
def test_bulk_ingest_leaves_the_page_cache_once_durable(disk_pool: ChunkPool, cached: bool) -> None:
    """A writer for bulk ingest (an agent's capture, a replica: ``cached=False``) drops
    what it made durable from the page cache, chunk files and packs alike; the default
    (a syncback, which a restore reads next) keeps it there."""
    big, small = os.urandom(1 << 20), [os.urandom(8192) for _ in range(32)]
    with disk_pool.writer(cached=cached) as w:
        loose = w.put(big).digest
        packed = [w.put(b).digest for b in small]
    files = chunk_files(disk_pool, [loose, *packed])
    assert len(files) == 2 and files[0] == disk_pool.chunk_path(loose)
    kept = [resident_bytes(f) for f in files]
    if cached:
        assert all(k > 0 for k in kept)
    else:
        assert kept == [0, 0]
    assert disk_pool.get(loose) == big and [disk_pool.get(d) for d in packed] == small


def test_pending_chunks_invisible_until_flush_and_discarded_on_error(pool: ChunkPool) -> None:
    data = os.urandom(1000)
    digest = hash_bytes(data)
    with pytest.raises(RuntimeError), pool.writer() as w:
        w.put(data)
        assert w.has(digest)  # the writer itself sees it
        assert not pool.has(digest)  # nobody else does before it is durable
        raise RuntimeError("capture failed")
    assert not pool.has(digest)
    assert list(pool.tmp_dir.iterdir()) == []


def test_manifest_commit_flushes_chunks_first(pool: ChunkPool) -> None:
    data = os.urandom(5000)
    with pool.writer() as w:
        r = w.put(data)
        mid = w.commit_manifest(b"manifest naming " + r.digest)
        assert pool.has(r.digest)
    assert pool.get_manifest_blob(mid).endswith(r.digest)


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_corrupt_chunk_is_reported_never_served(pool: ChunkPool, damage: str) -> None:
    data = os.urandom(300_000)
    with pool.writer() as w:
        d = w.put(data).digest
    path = chunk_file(pool, d)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-100] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(ChunkCorrupt, match=d.hex()):
        pool.get(d)
    report = pool.verify({b"m" * 32: [d]})
    assert not report.ok
    assert [h for h, _ in report.bad] == [d.hex()]


def test_verify_reports_missing_chunks(pool: ChunkPool) -> None:
    with pool.writer() as w:
        d = w.put(b"x" * 1000).digest
    os.unlink(chunk_file(pool, d))
    report = pool.verify({b"m" * 32: [d]})
    assert report.missing == [((b"m" * 32).hex(), d.hex())]
    with pytest.raises(ChunkMissing):
        pool.get(d)


def test_gc_removes_only_unreferenced_old_chunks(pool: ChunkPool) -> None:
    with pool.writer() as w:
        keep = w.put(b"keep" * 1000).digest
        drop = w.put(b"drop" * 1000).digest
    old = os.stat(chunk_file(pool, drop)).st_mtime - 3600
    for d in (keep, drop):
        os.utime(chunk_file(pool, d), (old, old))
    report = pool.gc({b"m" * 32: [keep]})
    assert report.chunks_removed == 1
    assert pool.has(keep) and not pool.has(drop)


def test_gc_is_safe_while_a_writer_runs(pool: ChunkPool) -> None:
    """A chunk a running capture reuses (touches) or writes survives a concurrent GC."""
    with pool.writer() as w:
        reused = w.put(b"reused" * 1000).digest
    old = os.stat(chunk_file(pool, reused)).st_mtime - 3600
    os.utime(chunk_file(pool, reused), (old, old))
    with pool.writer() as w:
        assert w.has(reused)  # dedup hit: touches the chunk
        fresh = w.put(b"fresh" * 1000).digest
        w.flush()
        report = pool.gc({})  # no image names either chunk yet
        assert report.chunks_removed == 0
        w.commit_manifest(reused + fresh)
    assert pool.has(reused) and pool.has(fresh)


def test_gc_keeps_base_manifests_of_active_writers(pool: ChunkPool) -> None:
    with pool.writer() as w:
        base = w.commit_manifest(b"base manifest")
    old = os.stat(pool.manifest_path(base)).st_mtime - 3600
    os.utime(pool.manifest_path(base), (old, old))
    with pool.writer([base]):
        pool.gc({})
        assert pool.has_manifest(base)
    pool.gc({})
    assert not pool.has_manifest(base)


def test_dead_writer_registration_is_ignored(pool: ChunkPool, tmp_path: Path) -> None:
    """A writer that died (its lock released) no longer holds GC back."""
    reg = pool.writers_dir / "dead.json"
    reg.write_text('{"started": 0, "bases": []}')
    assert pool._active_writers() == []
    assert not reg.exists()


def test_concurrent_puts_of_the_same_chunk(pool: ChunkPool) -> None:
    data = os.urandom(2 * SUB_BLOCK)
    results = []
    with pool.writer() as w:

        def put() -> None:
            results.append(w.put(data))

        threads = [threading.Thread(target=put) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert pool.get(hash_bytes(data)) == data
    assert len(list(pool.iter_chunks())) == 1


def test_put_encoded_verifies_what_a_peer_sent(pool: ChunkPool, tmp_path: Path) -> None:
    other = ChunkPool.create(tmp_path / "other")
    data = os.urandom(100_000)
    with other.writer() as w:
        d = w.put(data).digest
    blob = other.get_raw(d)
    with pool.writer() as w:
        assert w.put_encoded(d, blob).new
        forged = bytearray(blob)
        forged[-1] ^= 1
        with pytest.raises(ChunkCorrupt):
            w.put_encoded(hash_bytes(b"other"), bytes(forged))
    assert pool.get(d) == data


@pytest.mark.parametrize("compressible", [False, True], ids=["raw", "zstd"])
def test_put_encoded_checks_the_sub_block_digests(
    pool: ChunkPool, tmp_path: Path, compressible: bool
) -> None:
    """A header whose 64 KiB digests are not the chunk's is refused, in the same decode
    (a raw chunk is hashed in place)."""
    data = os.urandom(3 * SUB_BLOCK + 7)
    if compressible:
        data = bytes(b % 4 + 97 for b in data)  # four letters: zstd keeps about a quarter
    digest = hash_bytes(data)
    subs = hash_sub_blocks(data)
    lying = encode_chunk(data, [subs[0], subs[2], subs[1], subs[3]])
    assert lying[4] == (CODEC_ZSTD if compressible else CODEC_RAW)
    with pool.writer() as w:
        with pytest.raises(ChunkCorrupt, match="sub-block digests"):
            w.put_encoded(digest, lying)
        with pytest.raises(ChunkCorrupt, match="digest mismatch"):
            w.put_encoded(hash_bytes(b"else"), encode_chunk(data, subs))
        assert w.put_encoded(digest, encode_chunk(data, subs)).new
    assert pool.get(digest) == data
    assert pool.sub_digests(digest) == subs


def test_a_delta_is_never_built_on_a_base_of_another_length(pool: ChunkPool) -> None:
    """A delta rebuilds a chunk of its base's length: a chunk that grew or shrank inside
    its last sub-block (same number of sub-blocks) is stored whole, and reads back."""
    base = os.urandom(SUB_BLOCK + 1)
    grown = base + b"x"
    subs = hash_sub_blocks(grown)
    with pool.writer() as w:
        base_id = w.put(base).digest
    digest = hash_bytes(grown)
    with pool.writer() as w:
        w.put_delta(grown, digest, subs, base_id, [1])
    assert pool.info(digest).base is None
    assert pool.get(digest) == grown


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_fails_cleanly_and_keeps_earlier_data(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
    try:
        small = ChunkPool.create(mnt / "pool")
        with small.writer() as w:
            kept = w.put(b"k" * 1000).digest
        with pytest.raises(PoolFull, match="no space left"), small.writer() as w:
            for _ in range(20):
                w.put(os.urandom(1024 * 1024))
        assert small.get(kept) == b"k" * 1000
        assert list(small.tmp_dir.iterdir()) == []
        assert small.verify().ok
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_the_id_covers_the_block_digests_and_the_length() -> None:
    data = os.urandom(3 * SUB_BLOCK + 5)
    digest, subs = hash_object(data)
    assert digest == hash_bytes(data) == object_id(hash_sub_blocks(data), len(data))
    assert subs == [hash_block(data[i : i + SUB_BLOCK]) for i in range(0, len(data), SUB_BLOCK)]
    assert object_id([subs[1], subs[0], *subs[2:]], len(data)) != digest
    assert object_id(subs, len(data) + 1) != digest


def test_reading_a_delta_s_own_blocks_needs_nothing_of_its_base(pool: ChunkPool) -> None:
    """A plain delta (as a capture of a virtual copy stores it) serves its own blocks from
    its payload alone, each checked against the header, and the header against the id."""
    base = os.urandom(8 * SUB_BLOCK)
    block = os.urandom(SUB_BLOCK)
    new = base[: 3 * SUB_BLOCK] + block + base[4 * SUB_BLOCK :]
    digest, subs = hash_object(new)
    with pool.writer() as w:
        base_id = w.put(base).digest
    with pool.writer() as w:
        assert w.put_blocks(digest, subs, len(new), base_id, {3: block}) is not None
    kept = chunk_file(pool, base_id).read_bytes()
    chunk_file(pool, base_id).unlink()
    assert pool.read_blocks(digest, [3]) == [block]
    with pytest.raises(ChunkMissing):
        pool.read_blocks(digest, [0])  # not in the delta: from the base
    chunk_file(pool, base_id).write_bytes(kept)
    assert pool.read_blocks(digest, [3, 0]) == [block, base[:SUB_BLOCK]]
    assert pool.get(digest) == new
    forged = bytearray(chunk_file(pool, digest).read_bytes())
    forged[HEADER.size] ^= 1  # a block digest in the header
    chunk_file(pool, digest).write_bytes(bytes(forged))
    with pytest.raises(ChunkCorrupt, match="header"):
        pool.read_blocks(digest, [3])


def test_a_received_delta_is_verified_without_decoding_its_base(
    pool: ChunkPool, tmp_path: Path
) -> None:
    """A plain delta (as agents and syncbacks send them) is checked block by block; the
    base's data is not read when the writer keeps deltas as they came."""
    other = ChunkPool.create(tmp_path / "other")
    base = os.urandom(8 * SUB_BLOCK)
    with other.writer() as w:
        base_id = w.put(base).digest
    new = bytearray(base)
    new[2 * SUB_BLOCK : 3 * SUB_BLOCK] = os.urandom(SUB_BLOCK)
    digest, subs = hash_object(new)
    with other.writer() as w:
        w.put_blocks(
            digest, subs, len(new), base_id, {2: bytes(new[2 * SUB_BLOCK : 3 * SUB_BLOCK])}
        )
    blob = other.get_stored(digest)
    with pool.writer() as w:
        w.put_encoded(base_id, other.get_stored(base_id))
    path = chunk_file(pool, base_id)
    kept = path.read_bytes()
    spoiled = bytearray(kept)
    spoiled[-1] ^= 0xFF  # the base's data, not its header
    path.write_bytes(bytes(spoiled))
    with pool.writer(xor_deltas=False) as w:
        lying = bytearray(blob)
        lying[HEADER.size + 32 * 5] ^= 1  # block 5's digest: not the base's any more
        with pytest.raises(ChunkCorrupt):
            w.put_encoded(digest, bytes(lying))
        assert w.put_encoded(digest, blob).new
    path.write_bytes(kept)
    assert pool.get(digest) == bytes(new)


def header_reads(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The ids of the chunks whose header a pool reads from now on, in order."""
    reads: list[bytes] = []
    info = ChunkPool.info

    def counted(self: ChunkPool, digest: bytes) -> object:
        reads.append(digest)
        return info(self, digest)

    monkeypatch.setattr(ChunkPool, "info", counted)
    return reads


def test_block_digests_received_are_remembered_but_never_the_chunk(
    pool: ChunkPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failback's restore asks for the block digests of the chunks its final syncback has
    just stored, and of their bases: they come from memory, without a header read, each
    time as a list of its own. They never stand in for the chunk: once it is gone, reading
    its blocks fails."""
    dr = ChunkPool.create(tmp_path / "dr")
    base = os.urandom(4 * SUB_BLOCK)
    block = os.urandom(SUB_BLOCK)
    new = base[:SUB_BLOCK] + block + base[2 * SUB_BLOCK :]
    digest, subs = hash_object(new)
    for p in (pool, dr):
        with p.writer() as w:
            base_id = w.put(base).digest
    with dr.writer() as w:
        assert w.put_blocks(digest, subs, len(new), base_id, {1: block}) is not None
    with pool.writer([], xor_deltas=False) as w:  # as production stores a syncback
        assert w.put_encoded(digest, dr.get_stored(digest)).new
    reads = header_reads(monkeypatch)
    assert pool.layout(digest) == (len(new), subs)
    assert pool.layout(base_id) == (len(base), hash_sub_blocks(base))
    assert reads == []
    pool.layout(digest)[1][1] = subs[0]  # the caller's list, not the pool's
    assert pool.layout(digest)[1] == subs
    assert pool.read_blocks(digest, [1]) == [block]
    chunk_file(pool, digest).unlink()
    with pytest.raises(ChunkMissing):
        pool.read_blocks(digest, [1])


def test_the_remembered_block_digests_are_bounded(pool: ChunkPool) -> None:
    with pool.writer() as w:
        ids = [w.put(os.urandom(100)).digest for _ in range(5)]
    pool.layouts = Layouts(3)
    for d in ids:
        pool.checked_info(d)
    assert [pool.layouts.get(d) is not None for d in ids] == [False, False, True, True, True]
    pool.layout(ids[2])  # lately used: kept over the next oldest
    pool.checked_info(ids[0])
    assert [pool.layouts.get(d) is not None for d in ids] == [True, False, True, False, True]


def test_a_delta_reads_its_base_header_once_and_never_builds_on_a_base_gone_since(
    pool: ChunkPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A capture reads a base chunk's header for its block digests, then stores the delta
    on it without reading the header again; a base removed in between is not built on:
    the chunk is stored whole."""
    base = os.urandom(4 * SUB_BLOCK)
    block = os.urandom(SUB_BLOCK)
    new = base[:SUB_BLOCK] + block + base[2 * SUB_BLOCK :]
    digest, subs = hash_object(new)
    with pool.writer() as w:
        base_id = w.put(base).digest
    reads = header_reads(monkeypatch)
    with pool.writer() as w:
        assert w.sub_digests(base_id) == hash_sub_blocks(base)
        assert w.put_blocks(digest, subs, len(new), base_id, {1: block}) is not None
    assert reads == [base_id]
    monkeypatch.undo()
    assert pool.info(digest).base == base_id and pool.get(digest) == new

    other = new[: 3 * SUB_BLOCK] + os.urandom(SUB_BLOCK)
    other_id, other_subs = hash_object(other)
    changed = {3: other[-SUB_BLOCK:]}
    path = chunk_file(pool, digest)
    kept = path.read_bytes()
    with pool.writer() as w:
        assert w.sub_digests(digest) == subs
        path.unlink()
        assert w.put_blocks(other_id, other_subs, len(other), digest, changed) is None
    path.write_bytes(kept)
    with pool.writer() as w:
        assert w.sub_digests(digest) == subs
        path.unlink()
        assert w.put_delta(other, other_id, other_subs, digest, [3]).new
    assert pool.info(other_id).base is None and pool.get(other_id) == other


@pytest.mark.parametrize("length", [0, 32, 5 * 32, 64 * 32, 65 * 32, 200 * 32, 33, 64 * 32 + 7])
def test_a_digest_table_splits_into_its_32_byte_digests(length: int) -> None:
    """Headers carry up to 64 digests, frames and answers any number, a damaged one a
    ragged tail: each splits into its 32-byte pieces in order, the last one short."""
    table = os.urandom(length)
    pieces = split_digests(table)
    assert b"".join(pieces) == table
    assert all(len(p) == 32 for p in pieces[:-1]) and len(pieces) == -(-length // 32)
