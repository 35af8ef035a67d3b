"""The chunk pool: durability, verification, corruption, garbage collection, full disk."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from tandem.errors import ChunkCorrupt, ChunkMissing, PoolFull
from tandem.storage.digest import SUB_BLOCK, hash_bytes, hash_sub_blocks
from tandem.storage.pool import CODEC_RAW, CODEC_ZSTD, HEADER, ChunkPool, encode_chunk


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
    codec = lambda d: HEADER.unpack_from(pool.chunk_path(d).read_bytes())[1]  # noqa: E731
    assert codec(t.digest) == CODEC_ZSTD and t.stored < 10_000
    assert codec(n.digest) == CODEC_RAW


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
    path = pool.chunk_path(d)
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
    os.unlink(pool.chunk_path(d))
    report = pool.verify({b"m" * 32: [d]})
    assert report.missing == [((b"m" * 32).hex(), d.hex())]
    with pytest.raises(ChunkMissing):
        pool.get(d)


def test_gc_removes_only_unreferenced_old_chunks(pool: ChunkPool) -> None:
    with pool.writer() as w:
        keep = w.put(b"keep" * 1000).digest
        drop = w.put(b"drop" * 1000).digest
    old = os.stat(pool.chunk_path(drop)).st_mtime - 3600
    for d in (keep, drop):
        os.utime(pool.chunk_path(d), (old, old))
    report = pool.gc({b"m" * 32: [keep]})
    assert report.chunks_removed == 1
    assert pool.has(keep) and not pool.has(drop)


def test_gc_is_safe_while_a_writer_runs(pool: ChunkPool) -> None:
    """A chunk a running capture reuses (touches) or writes survives a concurrent GC."""
    with pool.writer() as w:
        reused = w.put(b"reused" * 1000).digest
    old = os.stat(pool.chunk_path(reused)).st_mtime - 3600
    os.utime(pool.chunk_path(reused), (old, old))
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
    """The header's 64 KiB digests are not covered by the chunk id: they are checked too,
    in the same decode (a raw chunk is hashed in place)."""
    data = os.urandom(3 * SUB_BLOCK + 7)
    if compressible:
        data = bytes(b % 4 + 97 for b in data)  # four letters: zstd keeps about a quarter
    digest = hash_bytes(data)
    subs = hash_sub_blocks(data)
    lying = encode_chunk(data, [subs[0], subs[2], subs[1], subs[3]])
    assert lying[4] == (CODEC_ZSTD if compressible else CODEC_RAW)
    with pool.writer() as w:
        with pytest.raises(ChunkCorrupt, match="sub-digests"):
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
