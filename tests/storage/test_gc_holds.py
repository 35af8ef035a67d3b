"""The collection (``tandem.storage.gc``) never removes a chunk something still needs (a
delta's base while the delta is stored), and its counts do not drift from what a full
mark would make."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tandem.errors import StorageError
from tandem.storage import gc
from tandem.storage.digest import SUB_BLOCK, hash_object
from tandem.storage.manifest import VOLUME_CHUNK, VolumeManifest, encode_manifest
from tandem.storage.pool import ChunkPool, PoolWriter, encode_delta
from tests.poolfiles import age_pool
from tests.storage.test_gc import HOUR, chunks_of, image, payloads


def age(pool: ChunkPool) -> None:
    age_pool(pool, HOUR)


def commit(w: PoolWriter, chunks: list[bytes]) -> bytes:
    manifest = VolumeManifest(size=len(chunks) * VOLUME_CHUNK, chunks=list[bytes | None](chunks))
    return w.commit_manifest(encode_manifest(manifest))


def readable(pool: ChunkPool, digest: bytes) -> str:
    """'' when chunk ``digest`` reads back verified, else why not."""
    pool.packs.refresh(force=True)
    try:
        pool.get(digest)
    except StorageError as exc:
        return f"{type(exc).__name__}: {exc.message}"
    return ""


def a_base_and_a_changed_version(seed: int) -> tuple[bytes, bytes, bytes]:
    """A 4 MiB chunk (stored whole it is a file of its own: too large to pack), a version
    of it with one 64 KiB block changed (as a delta over the first it is small: packed),
    and that block."""
    rng = random.Random(seed)
    base = rng.randbytes(VOLUME_CHUNK)
    block = rng.randbytes(SUB_BLOCK)
    changed = base[:SUB_BLOCK] + block + base[2 * SUB_BLOCK :]
    return base, changed, block


# --- 1. a delta chunk left in place while its base is removed -------------------------


def _a_delta_parked_in_a_mostly_needed_pack(
    tmp_path: Path, *, full: bool = False
) -> tuple[ChunkPool, bytes, bytes]:
    """(pool, d, live): d is a delta over a 4 MiB chunk (a file of its own), packed with
    chunks image ``live`` needs; the image naming d was deleted and collected (full first,
    then incrementally)."""
    pool = ChunkPool.create(tmp_path / "pool")
    base, changed, _ = a_base_and_a_changed_version(1)
    with pool.writer() as w:
        b = w.put(base).digest
        commit(w, [b])
    d, subs = hash_object(changed)
    rng = random.Random(2)
    live_data = [rng.randbytes(16 * 1024) for _ in range(12)]  # ~190 KiB, incompressible
    with pool.writer() as w:  # one pack: the live chunks and the delta (~64 KiB)
        live_ids = [w.put(p).digest for p in live_data]
        w.put_delta(changed, d, subs, b, [1])
        live = commit(w, live_ids)
        doomed = commit(w, [d])
    assert pool.info(d).base == b and pool.packs.lookup(d) is not None
    assert pool.packs.lookup(b) is None
    gc.collect(pool, lambda: [live, doomed])  # the first, full one: b held through d
    age(pool)
    run = gc.collect(pool, lambda: [live], full=full)  # the image of d is deleted
    assert run.full == full
    return pool, d, live


@pytest.mark.parametrize("full", [False, True], ids=["incremental", "full"])
def test_a_dead_delta_left_in_a_mostly_needed_pack_keeps_its_base(
    tmp_path: Path, full: bool
) -> None:
    """An image made of one delta chunk is deleted. The delta sits in a pack that is
    mostly needed, so the sweep keeps it (parked); its base, a file of its own that
    nothing else needs, is removed. The pool now holds a chunk that cannot be read: a
    later capture finds it by hash (``has``), reuses it, and its image is broken."""
    pool, d, live = _a_delta_parked_in_a_mostly_needed_pack(tmp_path, full=full)
    assert pool.has(d)  # kept: its pack is mostly needed
    with pool.writer() as w:  # what a capture of the same data does: found, reused
        assert w.has(d)
        again = commit(w, [d])
    age(pool)
    gc.collect(pool, lambda: [live, again])
    assert readable(pool, d) == "", "a live image names an unreadable chunk"


def test_verify_after_a_collection_that_parked_a_delta(tmp_path: Path) -> None:
    """The same state seen by ``verify``: every stored chunk reads back."""
    pool, d, _ = _a_delta_parked_in_a_mostly_needed_pack(tmp_path)
    assert pool.verify().ok
    base = pool.info(d).base
    assert base is not None
    pool.chunk_path(base).unlink()  # lost by other means: reported, not raised
    report = pool.verify()
    assert report.bad == [(d.hex(), f"its delta base {base.hex()} is missing")]


def test_a_running_writer_reusing_a_dead_delta_keeps_its_base(tmp_path: Path) -> None:
    """A capture running during the collection finds a chunk of a deleted image by its
    hash and reuses it (``has`` touches it, so the sweep keeps it). That chunk is a delta:
    the sweep must not remove the base it is built on, which nothing touched."""
    pool = ChunkPool.create(tmp_path / "pool", pack_below=0)  # every chunk a file
    base, changed, _ = a_base_and_a_changed_version(3)
    with pool.writer() as w:
        b = w.put(base).digest
        commit(w, [b])
    d, subs = hash_object(changed)
    with pool.writer() as w:
        w.put_delta(changed, d, subs, b, [1])
        old = commit(w, [d])
    assert pool.info(d).base == b
    gc.collect(pool, lambda: [old])
    age(pool)
    with pool.writer() as w:  # a capture of the same data, under way
        assert w.has(d)
        run = gc.collect(pool, lambda: [])  # the old image was deleted meanwhile
        assert not run.full and pool.has(d)
        new = commit(w, [d])
    assert readable(pool, d) == "", f"the new image {new.hex()} names an unreadable chunk"


# --- 2. a count that names the wrong delta base -----------------------------------------


def test_a_second_copy_stored_as_a_delta_holds_its_base(tmp_path: Path) -> None:
    """A chunk is stored whole (a file: 4 MiB) and counted: no base. The same chunk then
    arrives as a delta (``put_encoded``; a chunk stored as a file is not seen by
    ``PoolWriter._has_cheaply``). Were it stored again (packed, which reads prefer), the
    chunk would need the delta's base while the count, made from the whole copy, says
    it needs none: the base's own image deleted, the base would go and every image naming
    the chunk would break. A delta is stored only when no copy is here."""
    pool = ChunkPool.create(tmp_path / "pool")
    base, changed, block = a_base_and_a_changed_version(5)
    with pool.writer() as w:
        b = w.put(base).digest
        base_image = commit(w, [b])
    with pool.writer() as w:
        d = w.put(changed).digest  # whole: no base
        first = commit(w, [d])
    assert pool.info(d).base is None and pool.packs.lookup(d) is None
    gc.collect(pool, lambda: [base_image, first])  # full: d counted with no base

    d2, subs = hash_object(changed)
    assert d2 == d
    delta = encode_delta(b, 0, len(changed), subs, {1: block})  # as an agent sends it
    with pool.writer() as w:
        assert w.put_encoded(d, delta).stored == 0  # not stored again
        second = commit(w, [d])
    pool.packs.refresh(force=True)
    assert pool.packs.lookup(d) is None and pool.info(d).base is None
    age(pool)
    assert not gc.collect(pool, lambda: [base_image, first, second]).full

    age(pool)
    run = gc.collect(pool, lambda: [first, second])  # the base's own image is deleted
    assert not run.full
    assert readable(pool, d) == "", "live images name a chunk whose delta base was removed"


# --- 3. a resumed full collection hands over counts of manifests it removed -------------


def test_a_resumed_full_collection_leaves_counts_the_next_run_can_use(tmp_path: Path) -> None:
    """A full collection is stopped after counting; an image it counted is deleted before
    it is resumed. The resumed run removes that image's manifest object (not kept any
    more) but keeps its count, and installs the counts: the next incremental run cannot
    read the manifest to count it down, keeps its chunks and falls back on yet another
    full collection."""
    pool = ChunkPool.create(tmp_path / "pool")
    keep = image(pool, payloads("keep", 5))
    gone = image(pool, payloads("gone", 5))
    age(pool)
    calls = {"n": 0}

    def stop_after_counting(step: gc.GcProgress) -> None:
        if step.phase == "sweep":
            calls["n"] += 1

    def check() -> None:
        if calls["n"] >= 1:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        gc.collect(pool, lambda: [keep, gone], progress=stop_after_counting, check=check)
    assert gc.unfinished(pool)
    resumed = gc.collect(pool, lambda: [keep])  # `gone` was deleted meanwhile
    assert resumed.full and resumed.resumed
    assert not pool.has_manifest(gone)

    run = gc.collect(pool, lambda: [keep])
    assert not run.full  # the counts were right: no full run needed again
    assert resumed.chunks_removed + run.chunks_removed == 5  # the deleted image's chunks go
    assert not any(pool.has(d) for d in chunks_of(pool, payloads("gone", 5)))
    assert all(pool.has(d) for d in chunks_of(pool, payloads("keep", 5)))
