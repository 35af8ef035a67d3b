"""Pack files for small chunks (``tandem.storage.packs``): round trip, crash safety,
concurrent writers, garbage collection and verification."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tandem.errors import ChunkCorrupt, ChunkMissing
from tandem.storage import gc, packs
from tandem.storage.digest import hash_object
from tandem.storage.manifest import VOLUME_CHUNK, VolumeManifest, encode_manifest
from tandem.storage.pool import ChunkPool
from tandem.storage.transfer import encode_for_receiver

HOUR = 3600.0


@pytest.fixture
def pool(tmp_path: Path) -> ChunkPool:
    return ChunkPool.create(tmp_path / "pool", pack_below=packs.PACK_BELOW)


def small(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-{i}-".encode() * 300 + os.urandom(64) for i in range(n)]


def ids(payloads: list[bytes]) -> list[bytes]:
    return [hash_object(p)[0] for p in payloads]


def pack_files(pool: ChunkPool, suffix: str = ".pack") -> list[str]:
    return sorted(n for n in os.listdir(pool.packs_dir) if n.endswith(suffix))


def image(pool: ChunkPool, payloads: list[bytes]) -> bytes:
    with pool.writer() as w:
        digests: list[bytes | None] = [w.put(p).digest for p in payloads]
        return w.commit_manifest(
            encode_manifest(VolumeManifest(size=len(digests) * VOLUME_CHUNK, chunks=digests))
        )


def age(pool: ChunkPool, seconds: float = HOUR) -> None:
    """Make every pack, loose chunk and manifest old: only marks and touches keep them."""
    old = time.time() - seconds
    for name in os.listdir(pool.packs_dir):
        os.utime(pool.packs_dir / name, (old, old))
    for digest, _ in pool.iter_loose_chunks():
        os.utime(pool.chunk_path(digest), (old, old))
    for mid in pool.list_manifests():
        os.utime(pool.manifest_path(mid), (old, old))


def forget_indexes() -> None:
    """As a restarted process: no pool's pack index in memory."""
    packs._shared.clear()


def test_small_chunks_go_to_a_pack_and_read_back_verified(pool: ChunkPool) -> None:
    data = small("rt", 50)
    big = os.urandom(packs.PACK_BELOW + 1000)  # incompressible: stays a chunk file
    with pool.writer() as w:
        for p in [*data, big]:
            w.put(p)
        assert not pack_files(pool)  # nothing visible before the flush
    assert len(pack_files(pool)) == 1 and len(pack_files(pool, ".idx")) == 1
    assert pool.chunk_path(ids([big])[0]).exists()
    for d, p in zip(ids(data), data, strict=True):
        assert pool.has(d) and not pool.chunk_path(d).exists()
        assert pool.get(d) == p
        assert pool.read_blocks(d, [0]) == [p[:65536]]
        assert pool.stored_size(d) > 0
    assert pool.get(ids([big])[0]) == big
    assert len(list(pool.iter_chunks())) == 51
    assert not pool.has(b"\x01" * 32)
    with pytest.raises(ChunkMissing):
        pool.get(b"\x01" * 32)


def test_a_reopened_pool_in_another_process_reads_its_packs(pool: ChunkPool) -> None:
    data = small("restart", 20)
    mid = image(pool, data)
    code = (
        "import sys; from tandem.storage.pool import ChunkPool;"
        "from tandem.storage.manifest import load_manifest;"
        "p = ChunkPool(sys.argv[1]); m = bytes.fromhex(sys.argv[2]);"
        "ids = load_manifest(p, m).chunk_ids(); [p.get(d) for d in ids];"
        "r = p.verify({m: ids}); print(r.chunks, r.ok)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(pool.root), mid.hex()],
        check=True,
        capture_output=True,
        text=True,
    )
    assert out.stdout.split() == ["20", "True"]


def test_old_pools_with_chunk_files_keep_working(tmp_path: Path) -> None:
    """A pool written before packs (pool.json says nothing): its chunk files are read, and
    new small chunks go to packs beside them."""
    root = tmp_path / "old"
    loose = ChunkPool.create(root, pack_below=0)
    old = small("old", 5)
    image(loose, old)
    assert all(loose.chunk_path(d).exists() for d in ids(old))
    (root / "pool.json").write_text(json.dumps({"format": 2, "kind": "tandem-pool"}))
    (root / "packs").rmdir()  # as a pool from before packs
    forget_indexes()
    pool = ChunkPool(root)
    # Marked as the format with packs before any is written: an older tandem refuses it
    # rather than miss the packed chunks.
    assert json.loads((root / "pool.json").read_text())["format"] == 3
    new = small("new", 5)
    mid = image(pool, new)
    assert pack_files(pool) and not any(pool.chunk_path(d).exists() for d in ids(new))
    assert [pool.get(d) for d in ids(old + new)] == old + new
    assert pool.verify({mid: ids(new)}).ok


def test_verify_detects_a_flipped_byte_in_a_pack(pool: ChunkPool) -> None:
    data = small("flip", 10)
    image(pool, data)
    victim = ids(data)[4]
    loc = pool.packs.lookup(victim)
    assert loc is not None
    path = pool.packs.pack_path(loc[0])
    raw = bytearray(Path(path).read_bytes())
    raw[loc[1] + packs.REC.size + 100] ^= 0x01  # inside the chunk's bytes
    Path(path).write_bytes(bytes(raw))
    report = pool.verify()
    assert [b for b, _ in report.bad] == [victim.hex()] and report.chunks == 10
    with pytest.raises(ChunkCorrupt):
        pool.get(victim)
    assert pool.get(ids(data)[5]) == data[5]  # its neighbours still read


def test_an_index_file_that_does_not_check_out_hides_its_pack(
    pool: ChunkPool, caplog: pytest.LogCaptureFixture
) -> None:
    data = small("idx", 3)
    image(pool, data)
    idx = pool.packs_dir / pack_files(pool, ".idx")[0]
    raw = bytearray(idx.read_bytes())
    raw[10] ^= 0xFF
    idx.write_bytes(bytes(raw))
    forget_indexes()
    with caplog.at_level(logging.ERROR, logger="tandem.storage.packs"):
        reopened = ChunkPool(pool.root)
    assert "digest mismatch" in caplog.text
    assert not any(reopened.has(d) for d in ids(data))


def test_an_unindexed_or_torn_pack_is_ignored_then_removed_on_open(
    pool: ChunkPool, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash between a pack's rename and its index's (or a torn pack): its chunks never
    became visible; a pool opened with no writer running removes it and says so."""
    kept = small("kept", 5)
    image(pool, kept)
    lost = small("lost", 5)
    w = pool.writer()
    for p in lost:
        w.put(p)
    assert w._pack is not None
    tmp_pack = w._pack.tmp
    w._pack.close()
    torn = pool.packs_dir / f"{packs.new_pack_id()}.pack"
    torn.write_bytes(tmp_pack.read_bytes()[:-100])  # as renamed, with a torn tail
    w._reg_fd, fd = -1, w._reg_fd
    os.close(fd)  # the writer's process dies: its registration lock goes with it
    assert not any(pool.has(d) for d in ids(lost))
    old = time.time() - HOUR
    os.utime(torn, (old, old))
    os.utime(tmp_pack, (old, old))
    forget_indexes()
    with caplog.at_level(logging.WARNING, logger="tandem.storage.packs"):
        reopened = ChunkPool(pool.root)
    assert "has no index" in caplog.text
    assert not torn.exists() and not tmp_pack.exists()
    assert not any(reopened.has(d) for d in ids(lost))
    assert [reopened.get(d) for d in ids(kept)] == kept
    assert reopened.verify().ok


_KILLED_WRITER = r"""
import os, sys
from pathlib import Path
from tandem.storage.pool import ChunkPool
from tandem.storage import pool as pool_mod

pool_mod.FLUSH_CHUNKS = 50
root, log = Path(sys.argv[1]), Path(sys.argv[2])
pool = ChunkPool(root)
w = pool.writer()
i = 0
with open(log, "a") as fh:
    while True:
        for _ in range(49):
            w.put(f"killed-{i}-".encode() * 200 + os.urandom(32))
            i += 1
        w.flush()
        fh.write(f"{i}\n")
        fh.flush()
"""


def test_a_writer_killed_mid_pack_leaves_no_half_chunk(pool: ChunkPool, tmp_path: Path) -> None:
    """kill -9 of a process writing packs: every chunk it had flushed reads back verified,
    nothing half written is visible, and the next open clears its leftovers."""
    log_file = tmp_path / "flushed"
    log_file.write_text("")
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(pool.root), str(log_file)])
    try:
        deadline = time.monotonic() + 120
        while len(log_file.read_text().split()) < 5:  # a few packs sealed, one being written
            assert child.poll() is None and time.monotonic() < deadline, "the writer died"
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    flushed = int(log_file.read_text().split()[-1])
    forget_indexes()
    reopened = ChunkPool(pool.root)
    report = reopened.verify()
    assert report.ok and report.chunks >= flushed
    for name in os.listdir(reopened.packs_dir):  # as if it died long ago
        os.utime(reopened.packs_dir / name, (time.time() - HOUR,) * 2)
    for name in os.listdir(reopened.tmp_dir):
        os.utime(reopened.tmp_dir / name, (time.time() - HOUR,) * 2)
    forget_indexes()
    again = ChunkPool(pool.root)
    assert len(pack_files(again)) == len(pack_files(again, ".idx"))
    assert not os.listdir(again.tmp_dir)
    assert again.verify().ok
    assert sum(1 for _ in again.iter_chunks()) == report.chunks


def test_concurrent_writers_in_threads_and_processes_never_corrupt_a_pack(
    pool: ChunkPool,
) -> None:
    shared_data = small("shared", 200)
    per_thread = {t: small(f"own{t}", 100) for t in range(4)}
    errors: list[BaseException] = []
    one_writer = pool.writer()  # one writer used by several threads too

    def work(t: int) -> None:
        try:
            with pool.writer() as w:
                for i, q in enumerate(shared_data):  # every thread writes these
                    w.put(per_thread[t][i // 2])
                    w.put(q)
                    one_writer.put(q)
                    if t == 0 and len(w._pending) % 37 == 0:
                        w.flush()
        except BaseException as exc:  # reported below
            errors.append(exc)

    code = (
        "import sys; from tandem.storage.pool import ChunkPool;"
        "p = ChunkPool(sys.argv[1]);"
        "w = p.writer();"
        "[w.put(f'proc-{i}-'.encode() * 300) for i in range(300)]; w.flush(); w.close()"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(pool.root)])
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    one_writer.flush()
    one_writer.close()
    assert child.wait(120) == 0
    assert not errors
    report = pool.verify()
    assert report.ok
    wanted = [*shared_data, *(p for ps in per_thread.values() for p in ps)]
    assert [pool.get(d) for d in ids(wanted)] == wanted
    proc = [f"proc-{i}-".encode() * 300 for i in range(300)]
    assert [pool.get(d) for d in ids(proc)] == proc
    assert report.chunks == len(wanted) + len(proc)


def test_gc_deletes_dead_packs_rewrites_sparse_ones_and_keeps_touched_ones(
    pool: ChunkPool,
) -> None:
    live_data, dead_data = small("live", 20), small("dead", 60)
    live = image(pool, live_data[:10])  # pack 1: all live
    image(pool, dead_data[:40])  # pack 2: all dead
    image(pool, live_data[10:] + dead_data[40:])  # pack 3, of a dead image...
    with pool.writer() as w:  # ...but a third of it is named by a live one
        chunks: list[bytes | None] = list(ids(live_data[10:]))
        live2 = w.commit_manifest(
            encode_manifest(VolumeManifest(size=len(chunks) * VOLUME_CHUNK, chunks=chunks))
        )
    assert len(pack_files(pool)) == 3
    age(pool)
    touched = small("touched", 10)
    image(pool, touched)  # pack 4, dead but new: a running capture may rely on it
    running = pool.writer()  # a capture that started before the collection...
    run = gc.collect(pool, lambda: [live, live2])
    assert run.packs_done == 4
    assert all(pool.has(d) for d in ids(live_data)) and all(pool.has(d) for d in ids(touched))
    assert not any(pool.has(d) for d in ids(dead_data))
    assert [pool.get(d) for d in ids(live_data)] == live_data
    assert run.chunks_removed == 60 and run.bytes_freed > 0
    assert len(pack_files(pool)) == 3  # pack 2 gone, pack 3's live third copied to a new one
    assert running.has(ids(touched)[0])  # ...and reuses a chunk: its pack is touched
    running.close()
    assert pool.verify({live: ids(live_data[:10]), live2: ids(live_data[10:])}).ok
    assert not gc.unfinished(pool)


def test_gc_under_a_running_writer_keeps_what_it_reuses(pool: ChunkPool) -> None:
    """A writer that reuses a chunk of a dead image while the collection runs: the touch
    lands before the pack's removal (the pack is kept) or after it (the writer is told the
    chunk is gone and stores it again); either way its manifest is whole."""
    dead = small("reused", 30)
    image(pool, dead)
    age(pool)
    seen: list[str] = []

    def during(step: gc.GcProgress) -> None:
        seen.append(step.phase)

    writer = pool.writer()  # started now: what it reuses is old, it must touch it
    stop = threading.Event()
    done: list[bytes] = []

    def capture() -> None:
        while not stop.is_set():
            for p in dead:
                writer.put(p)
        done.append(
            writer.commit_manifest(
                encode_manifest(
                    VolumeManifest(size=len(dead) * VOLUME_CHUNK, chunks=list(ids(dead)))
                )
            )
        )

    t = threading.Thread(target=capture)
    t.start()
    try:
        gc.collect(pool, lambda: [], progress=during)
    finally:
        stop.set()
        t.join()
    writer.close()
    assert "packs" in seen
    assert [pool.get(d) for d in ids(dead)] == dead
    assert pool.verify({done[0]: ids(dead)}).ok


def test_a_writers_batch_lookup_answers_what_is_missing_and_keeps_the_rest_from_gc(
    pool: ChunkPool,
) -> None:
    """``PoolWriter.missing`` (the session's ``/missing``): digests neither stored nor
    pending come back in order, once each; the stored ones it names (packed or loose) are
    touched, so a collection that runs while the writer is open keeps them, and the
    manifest that names them commits whole."""
    packed = small("old", 20)
    image(pool, packed)
    loose = os.urandom(packs.PACK_BELOW + 1024)  # incompressible: stored as its own file
    image(pool, [loose])
    age(pool)
    fresh = small("fresh", 3)
    with pool.writer() as w:
        w.put(fresh[0])  # pending in this writer
        absent = ids(fresh[1:])
        asked = [absent[0], *ids(packed), hash_object(loose)[0], ids(fresh)[0], absent[1]]
        assert w.missing(asked + asked) == absent
        assert w.missing(ids(packed)) == []  # answered from memory the second time
        gc.collect(pool, lambda: [])
        names = [*ids(packed), hash_object(loose)[0], ids(fresh)[0]]
        mid = w.commit_manifest(
            encode_manifest(VolumeManifest(size=len(names) * VOLUME_CHUNK, chunks=list(names)))
        )
    assert pool.verify({mid: names}).ok
    assert [pool.get(d) for d in ids(packed)] == packed


def test_a_batch_lookup_with_sizes_answers_the_same_and_keeps_the_rest_from_gc(
    pool: ChunkPool,
) -> None:
    """With the senders' encoding sizes (``/missing``'s ``sizes``) the answer is the same:
    packed and large loose chunks are held (and kept from GC), only absent ones come back;
    a small chunk is looked up in the pack index alone."""
    packed = small("old", 20)
    image(pool, packed)
    loose = os.urandom(packs.PACK_BELOW + 1024)
    image(pool, [loose])
    age(pool)
    fresh = small("fresh", 3)
    with pool.writer() as w:
        asked = [*ids(packed), hash_object(loose)[0], *ids(fresh)]
        sizes = [len(c) for c in packed] + [len(loose)] + [len(c) for c in fresh]
        assert w.missing(asked, sizes) == ids(fresh)
        for c in fresh:
            w.put(c)
        gc.collect(pool, lambda: [])
        names = [*ids(packed), hash_object(loose)[0], *ids(fresh)]
        mid = w.commit_manifest(
            encode_manifest(VolumeManifest(size=len(names) * VOLUME_CHUNK, chunks=list(names)))
        )
    assert pool.verify({mid: names}).ok
    with pool.writer() as w, pytest.raises(ValueError):
        w.missing(asked, sizes[:-1])


def test_a_killed_gc_resumes_its_pack_sweep(pool: ChunkPool) -> None:
    keep = small("keep", 5)
    live = image(pool, keep)
    for i in range(6):
        image(pool, small(f"dead{i}", 10))
    age(pool)
    calls = {"packs": 0}

    def stop_midway() -> None:
        if calls["packs"] >= 3:
            raise KeyboardInterrupt("killed")

    def count(step: gc.GcProgress) -> None:
        if step.phase == "packs":
            calls["packs"] += 1

    with pytest.raises(KeyboardInterrupt):
        gc.collect(pool, lambda: [live], progress=count, check=stop_midway)
    assert gc.unfinished(pool)
    run = gc.collect(pool, lambda: [live])
    assert run.resumed and run.packs_done == 4
    assert run.chunks_removed == 60
    assert len(pack_files(pool)) == 1
    assert [pool.get(d) for d in ids(keep)] == keep


def test_gc_killed_between_renaming_a_pack_and_removing_it(pool: ChunkPool) -> None:
    """A ``.gc`` pack left by a killed collection: removed when still dead, its index too."""
    data = small("doomed", 5)
    image(pool, data)
    age(pool)
    pack = pack_files(pool)[0]
    os.rename(pool.packs_dir / pack, pool.packs_dir / f"{pack}.gc")
    assert not any(pool.has(d) for d in ids(data))
    gc.collect(pool, lambda: [])
    assert set(os.listdir(pool.packs_dir)) <= {packs.JOURNAL}


def test_the_legacy_in_memory_gc_handles_packs(pool: ChunkPool) -> None:
    keep, drop = small("k", 10), small("d", 10)
    mid = image(pool, keep)
    image(pool, drop)
    age(pool)
    report = pool.gc({mid: ids(keep)})
    assert report.chunks_removed == 10 and report.chunks_kept == 10
    assert not any(pool.has(d) for d in ids(drop))
    assert [pool.get(d) for d in ids(keep)] == keep


def test_packed_chunks_replicate_by_id(pool: ChunkPool, tmp_path: Path) -> None:
    """The wire format does not change: a packed chunk is sent as its chunk-file bytes and
    the receiver (here a pool of chunk files) verifies and stores it."""
    data = small("wire", 10)
    image(pool, data)
    other = ChunkPool.create(tmp_path / "other", pack_below=0)
    with other.writer() as w:
        for d in ids(data):
            w.put_encoded(d, encode_for_receiver(pool, d, other.has))
    assert [other.get(d) for d in ids(data)] == data
    assert all(other.chunk_path(d).exists() for d in ids(data))


def test_a_pack_rewritten_while_a_writer_writes_and_readers_read(pool: ChunkPool) -> None:
    """GC rewrites a sparse pack while a capture writes new packs and readers read the
    pack's live chunks: no read fails, nothing the writer wrote is lost, and the live
    chunks end up in the new pack only."""
    live_data, dead_data = small("live", 10), small("dead", 30)
    image(pool, live_data + dead_data)  # one pack, a quarter live
    with pool.writer() as w:
        chunks: list[bytes | None] = list(ids(live_data))
        live = w.commit_manifest(
            encode_manifest(VolumeManifest(size=len(chunks) * VOLUME_CHUNK, chunks=chunks))
        )
    age(pool)
    old_pack = pack_files(pool)[0]
    stop = threading.Event()
    failures: list[BaseException] = []
    written: list[bytes] = []

    def read() -> None:
        while not stop.is_set():
            try:
                for d, p in zip(ids(live_data), live_data, strict=True):
                    assert pool.get(d) == p
            except BaseException as exc:  # reported below
                failures.append(exc)
                return

    def write() -> None:
        n = 0
        with pool.writer() as w:
            while not stop.is_set():
                written.append(w.put(f"new-{n}-".encode() * 300).digest)
                n += 1
                if n % 25 == 0:
                    w.flush()

    threads = [threading.Thread(target=read), threading.Thread(target=write)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while len(written) < 50:  # the writer is under way
            assert time.monotonic() < deadline
            time.sleep(0.01)
        run = gc.collect(pool, lambda: [live])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures
    assert run.chunks_removed == 30
    assert old_pack not in pack_files(pool)
    assert all(pool.packs.lookup(d) is not None for d in ids(live_data))
    assert [pool.get(d) for d in ids(live_data)] == live_data
    assert all(pool.has(d) for d in written)
    forget_indexes()
    assert ChunkPool(pool.root).verify({live: ids(live_data)}).ok


_KILLED_GC = r"""
import os, signal, sys
from tandem.storage import gc, pool as pool_mod

root, live = sys.argv[1], bytes.fromhex(sys.argv[2])
def die(*args: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # the new pack is durable, the old one renamed
pool_mod._remove_pack = die
gc.collect(pool_mod.ChunkPool(root), lambda: [live])
"""


def test_a_gc_killed_mid_rewrite_is_finished_by_the_next(pool: ChunkPool) -> None:
    """kill -9 of a collection after a sparse pack's live chunks were copied and the old
    pack renamed for removal: the next collection resumes, removes the old pack, and every
    live chunk reads back from the new one."""
    live_data, dead_data = small("live", 10), small("dead", 30)
    image(pool, live_data + dead_data)
    with pool.writer() as w:
        chunks: list[bytes | None] = list(ids(live_data))
        live = w.commit_manifest(
            encode_manifest(VolumeManifest(size=len(chunks) * VOLUME_CHUNK, chunks=chunks))
        )
    age(pool)
    old_pack = pack_files(pool)[0]
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_GC, str(pool.root), live.hex()], check=False
    )
    assert child.returncode == -signal.SIGKILL
    assert gc.unfinished(pool) and (pool.packs_dir / f"{old_pack}.gc").exists()
    forget_indexes()
    reopened = ChunkPool(pool.root)
    run = gc.collect(reopened, lambda: [live])
    assert run.resumed
    assert sorted(set(os.listdir(reopened.packs_dir)) - {packs.JOURNAL}) == sorted(
        f"{p}{ext}" for p in [n[:-5] for n in pack_files(reopened)] for ext in (".idx", ".pack")
    )
    assert old_pack not in pack_files(reopened)
    assert not any(reopened.has(d) for d in ids(dead_data))
    assert [reopened.get(d) for d in ids(live_data)] == live_data
    assert reopened.verify({live: ids(live_data)}).ok


def other_process_index(pool: ChunkPool) -> packs.PackIndex:
    """The pack index a second process on the same pool holds, after its start-up listing."""
    index = packs.PackIndex(pool.packs_dir)
    index.refresh(force=True)
    return index


def test_packs_sealed_or_removed_elsewhere_are_followed_without_listing_the_directory(
    pool: ChunkPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's view catches up from the journal alone: a capture's lookups cost
    what changed since, not a listing of every pack (20 ms a refresh at 10,000 packs)."""
    first = small("first", 5)
    image(pool, first)
    other = other_process_index(pool)
    later = small("later", 5)
    image(pool, later)
    dead = other.lookup(ids(first)[0])
    assert dead is not None and all(other.lookup(d) is None for d in ids(later))

    def no_listing(path: object) -> list[str]:
        raise AssertionError(f"{path} listed")

    monkeypatch.setattr(os, "listdir", no_listing)
    other.refresh()
    assert [other.lookup(d) for d in ids(later)] == [pool.packs.lookup(d) for d in ids(later)]
    monkeypatch.undo()
    age(pool)
    run = gc.collect(pool, lambda: [])  # every pack dead: removed, each journaled
    assert run.packs_deleted == 2
    monkeypatch.setattr(os, "listdir", no_listing)
    other.refresh()
    assert not any(other.lookup(d) for d in ids(first) + ids(later))


def test_a_chunk_held_by_two_packs_stays_readable_when_one_is_removed(pool: ChunkPool) -> None:
    """Two writers racing store the same chunk twice; a collection that removes the pack
    the index points at (here: one rewrite copied the live chunk) must not lose the other
    copy, or a later read reports a present chunk missing."""
    data = small("twice", 3)
    image(pool, data)
    with pool.writer() as w:  # a second copy in a newer pack, as a racing writer leaves
        for digest, payload in zip(ids(data), data, strict=True):
            w._write_pending(digest, pool.get_stored(digest))
            assert payload
    newer = pool.packs.lookup(ids(data)[0])
    assert newer is not None and len(pool.packs.packs()) == 2
    other = other_process_index(pool)
    os.rename(pool.packs.pack_path(newer[0]), pool.packs.pack_path(newer[0]) + ".gc")
    from tandem.storage.pool import _remove_pack

    _remove_pack(pool, newer[0])
    for index in (pool.packs, other):
        index.refresh()
        held = index.lookup(ids(data)[0])
        assert held is not None and held[0] != newer[0]
    assert [pool.get(d) for d in ids(data)] == data


def test_a_torn_or_compacted_journal_leaves_every_pack_findable(
    pool: ChunkPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal is a hint: a line torn by a crash is skipped (the lines after it still
    count), a compaction replaces it and the other processes list once and go on."""
    image(pool, small("a", 3))
    other = other_process_index(pool)
    with open(pool.packs.journal_path(), "ab") as fh:
        fh.write(b"+0123")  # a writer died mid-line
    b = small("b", 3)
    image(pool, b)
    other.refresh()
    assert all(other.lookup(d) is not None for d in ids(b))
    for _ in range(3):
        pool.packs.note(b"+", pool.packs.packs()[0])  # noise: a journal far longer than needed
    monkeypatch.setattr(packs, "COMPACT_SLACK", 0)
    assert pool.packs.compact()
    lines = Path(pool.packs.journal_path()).read_bytes().split()
    assert sorted(line[1:].decode() for line in lines) == pool.packs.packs()
    c = small("c", 3)
    image(pool, c)
    other.refresh()
    assert all(other.lookup(d) is not None for d in ids(b) + ids(c))
