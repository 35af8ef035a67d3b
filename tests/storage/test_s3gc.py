"""Garbage collection of a pool on an object store, by listing (``S3Pool.sweep_packs``
through ``storage.gc.collect``), against a real store (Swift with s3api, started by the
tests): dead packs deleted, mostly dead ones rewritten, orphans removed, and nothing a
writer relies on (a pack it reuses, a pack it sealed before the snapshot) ever collected;
a store answering 503 mid-collection fails it cleanly and the next run finishes it."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tandem.errors import ObjectStoreFailed
from tandem.storage import gc
from tandem.storage.digest import hash_object
from tandem.storage.manifest import TreeManifest, load_manifest
from tandem.storage.objstore import ObjectStore
from tandem.storage.packs import new_pack_id
from tandem.storage.s3pool import CONDEMNED, S3Pool
from tandem.storage.tree import capture_tree, restore_tree
from tests.s3server import S3Server
from tests.storage.test_gc_holds import a_base_and_a_changed_version, commit
from tests.storage.test_tree import listing

KiB = 1024


@pytest.fixture
def s3_pool(s3_store: ObjectStore, tmp_path: Path) -> S3Pool:
    pool = S3Pool.create_on(s3_store, tmp_path / "cache")
    pool.clock_slack = 1.0  # one server, one clock: what LastModified's whole seconds need
    return pool


def files(root: Path, names: dict[str, bytes]) -> Path:
    for name, data in names.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def settled(pool: S3Pool) -> None:
    """Wait until every object of the bucket is older than a collection's cut-off would
    be (the store's LastModified has whole seconds)."""
    newest = max(o.modified for o in pool.store.list())
    deadline = time.monotonic() + 30
    while time.time() - pool.clock_slack <= newest + 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def packs(store: ObjectStore) -> set[str]:
    return {o.key for o in store.list("packs/")}


def restores(pool: S3Pool, mid: bytes, src: Path, out: Path) -> None:
    fresh = S3Pool(pool.store, out.with_name(out.name + "-cache"))  # nothing cached
    manifest = load_manifest(fresh, mid)
    assert isinstance(manifest, TreeManifest)
    restore_tree(fresh, manifest, out)
    assert listing(out) == listing(src)
    assert fresh.verify({mid: manifest.chunk_ids()}).ok


@pytest.fixture
def three_images(s3_pool: S3Pool, tmp_path: Path) -> Iterator[dict[str, tuple[bytes, Path]]]:
    """``dead``: its own pack, no chunk shared; ``big``: ten 100 KiB files in one pack;
    ``small``: one of those files (its pack then mostly dead once ``big`` goes)."""
    shared = os.urandom(100 * KiB)
    big = files(
        tmp_path / "big", {f"f{i}": shared if i == 0 else os.urandom(100 * KiB) for i in range(10)}
    )
    out = {}
    for name, src in (
        ("dead", files(tmp_path / "dead", {"a": os.urandom(300 * KiB)})),
        ("big", big),
        ("small", files(tmp_path / "small", {"kept": shared})),
    ):
        mid, _, _ = capture_tree(s3_pool, src)
        out[name] = (mid, src)
    yield out


def test_dead_packs_go_mostly_dead_ones_are_rewritten_orphans_go(
    s3_pool: S3Pool, three_images: dict[str, tuple[bytes, Path]], tmp_path: Path
) -> None:
    store = s3_pool.store
    orphan = new_pack_id()
    store.put(f"packs/{orphan}.pack", b"TPK1 a writer died before its index")
    before = packs(store)
    settled(s3_pool)
    s3_pool.orphan_grace = 0.0
    small, _ = three_images["small"]

    run = gc.collect(s3_pool, lambda: [small])

    assert run.packs_deleted >= 1 and run.packs_rewritten == 1 and run.orphans_deleted == 1
    assert run.manifests_removed == 2 and run.bytes_freed > 1000 * KiB
    after = packs(store)
    assert f"packs/{orphan}.pack" not in after
    new = after - before
    assert len(new) == 2 and all(k[-4:] in ("pack", ".idx") for k in new)  # the rewrite
    assert {k.rsplit(".", 1)[0] for k in after if k.endswith(".pack")} == {
        k.rsplit(".", 1)[0] for k in after if k.endswith(".idx")
    }
    assert not list(store.list(CONDEMNED)) and not list(store.list("writers/"))
    assert s3_pool.list_manifests() == [small]
    restores(s3_pool, small, three_images["small"][1], tmp_path / "out")
    # Nothing left to do: a second run removes nothing.
    again = gc.collect(s3_pool, lambda: [small])
    assert (again.packs_deleted, again.packs_rewritten, again.chunks_removed) == (0, 0, 0)


def test_a_pack_a_writer_reuses_is_kept_whichever_comes_first(
    s3_pool: S3Pool, three_images: dict[str, tuple[bytes, Path]], tmp_path: Path
) -> None:
    """The two orders of the handshake: a writer that recorded its reuse before the
    collection condemned the pack keeps it; one that comes after finds it condemned and
    stores the chunks again."""
    dead, dead_src = three_images["dead"]
    chunks = sorted(load_manifest(s3_pool, dead).chunk_ids())
    settled(s3_pool)

    # Writer first: its touched/ record is read after the collection condemned the pack.
    copy = tmp_path / "copy"
    touched = threading.Event()

    def capture_during_sweep() -> None:
        def sweep_starts(step: gc.GcProgress) -> None:
            if step.phase == "packs" and not touched.is_set():
                # between the snapshot (which did not see this image) and the condemning
                restored, _, _ = capture_tree(s3_pool, dead_src)
                result["mid"] = restored
                touched.set()

        result["run"] = gc.collect(s3_pool, lambda: [], progress=sweep_starts)

    result: dict[str, object] = {}
    capture_during_sweep()
    run = result["run"]
    assert isinstance(run, gc.GcRun) and run.packs_spared >= 1
    mid = result["mid"]
    assert isinstance(mid, bytes)
    restores(s3_pool, mid, dead_src, copy)

    # Collection first: the pack condemned, a writer answers its chunks as absent.
    s3_pool.store.put(f"{CONDEMNED}another-run", json.dumps(s3_pool.packs.packs()).encode())
    try:
        with s3_pool.writer() as w:
            assert w.missing(chunks) == chunks
            assert not w.has(chunks[0])
    finally:
        s3_pool.store.delete(f"{CONDEMNED}another-run")


def test_what_an_open_writer_sealed_before_the_snapshot_is_kept(
    s3_pool: S3Pool, tmp_path: Path
) -> None:
    src = files(tmp_path / "src", {"a": os.urandom(200 * KiB), "b": os.urandom(50 * KiB)})
    with s3_pool.writer() as w:
        result = w.put(os.urandom(64 * KiB))
        w.flush()  # sealed: a pack no manifest names yet
        settled(s3_pool)
        run = gc.collect(s3_pool, lambda: [])  # the writer is registered: its start bounds
        assert run.chunks_removed == 0
        w.commit_manifest(b"names " + result.digest.hex().encode())
    assert s3_pool.get(result.digest)
    mid, _, _ = capture_tree(s3_pool, src)
    restores(s3_pool, mid, src, tmp_path / "out")


def test_captures_running_beside_collections_all_restore(
    s3_pool: S3Pool, three_images: dict[str, tuple[bytes, Path]], tmp_path: Path
) -> None:
    """Captures (some reusing the chunks of deleted images) in a thread while collections
    run back to back; every image kept restores exactly afterwards."""
    live = [three_images["small"][0]]
    sources = [three_images["dead"][1], three_images["big"][1]]
    done = threading.Event()
    made: list[tuple[bytes, Path]] = []
    failed: list[BaseException] = []
    recording = threading.Lock()

    def captures() -> None:
        try:
            for i in range(6):
                src = (
                    sources[i % 2]
                    if i < 4
                    else files(tmp_path / f"new{i}", {"x": os.urandom(150 * KiB)})
                )
                with recording:  # as Site.gc_lock: the image recorded before a snapshot
                    mid, _, _ = capture_tree(s3_pool, src)
                    made.append((mid, src))
                    live.append(mid)
        except BaseException as exc:
            failed.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=captures)
    thread.start()
    runs = 0
    while not done.is_set() or runs < 2:
        gc.collect(s3_pool, lambda: list(live), snapshot_lock=recording)
        runs += 1
    thread.join(60)
    assert not failed, failed
    gc.collect(s3_pool, lambda: list(live))
    for i, (mid, src) in enumerate(made):
        restores(s3_pool, mid, src, tmp_path / f"out{i}")


def test_a_store_answering_503_mid_collection_fails_it_cleanly(
    s3_server: S3Server,
    s3_pool: S3Pool,
    three_images: dict[str, tuple[bytes, Path]],
    tmp_path: Path,
) -> None:
    flaky = ObjectStore(
        s3_pool.store.url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        attempts=3,
    )
    pool = S3Pool(flaky, tmp_path / "flaky-cache")
    pool.clock_slack = s3_pool.clock_slack
    settled(pool)
    small = three_images["small"][0]
    before = packs(flaky)
    with ExitStack() as stack:

        def pause_at_sweep(step: gc.GcProgress) -> None:
            if step.phase == "packs" and step.done == step.total:
                stack.enter_context(s3_server.paused("object"))

        with pytest.raises(ObjectStoreFailed) as caught:
            gc.collect(pool, lambda: [small], progress=pause_at_sweep)
    assert "after 3 attempt(s)" in caught.value.message  # retried, with backoff
    assert packs(flaky) == before  # nothing deleted
    assert gc.unfinished(pool)
    for name, (mid, src) in three_images.items():
        restores(pool, mid, src, tmp_path / f"{name}-1")

    run = gc.collect(pool, lambda: [small])  # the store back: the next run finishes it
    assert run.resumed and run.packs_rewritten == 1 and run.packs_deleted >= 1
    assert not gc.unfinished(pool)
    restores(pool, small, three_images["small"][1], tmp_path / "small-2")


@pytest.mark.parametrize("beside_base", [0, 6], ids=["base-alone", "base-among-garbage"])
def test_a_dead_delta_kept_in_a_mostly_needed_pack_keeps_its_base(
    s3_pool: S3Pool, tmp_path: Path, beside_base: int
) -> None:
    """An image made of one delta chunk is deleted. The delta shares a pack with chunks a
    live image needs, so the pack is kept whole and the pool still answers ``has`` for it;
    its base (4 MiB), in a pack nothing else needs, must not go: a later capture of the
    same data reuses the delta by its hash, and its image would name a chunk that cannot be
    read. The base's pack is kept whole when the base is most of it, else rewritten with
    it; either way the next collection leaves it (no copy of it at every run)."""
    base, changed, _ = a_base_and_a_changed_version(1)
    rng = random.Random(2)
    with s3_pool.writer() as w:  # one pack: the base and ``beside_base`` MiB of garbage
        b = w.put(base).digest
        commit(w, [b, *(w.put(rng.randbytes(1024 * KiB)).digest for _ in range(beside_base))])
    d, subs = hash_object(changed)
    with s3_pool.writer() as w:  # one pack: the live chunks (~190 KiB) and the delta
        live_ids = [w.put(rng.randbytes(16 * KiB)).digest for _ in range(12)]
        w.put_delta(changed, d, subs, b, [1])
        live = commit(w, live_ids)
        commit(w, [d])
    assert s3_pool.info(d).base == b
    where_d, where_b = s3_pool.packs.lookup(d), s3_pool.packs.lookup(b)
    assert where_d is not None and where_b is not None and where_d[0] != where_b[0]
    settled(s3_pool)

    run = gc.collect(s3_pool, lambda: [live])  # the images of b and of d were deleted

    assert (run.packs_rewritten, run.packs_deleted) == ((1, 0) if beside_base else (0, 0))
    assert run.chunks_removed == beside_base
    fresh = S3Pool(s3_pool.store, tmp_path / "fresh-cache")
    assert fresh.has(d)  # kept with the pack the live image needs
    assert fresh.get(d) == changed  # and readable: its base stayed
    assert S3Pool(s3_pool.store, tmp_path / "again-cache").verify().ok
    settled(s3_pool)
    again = gc.collect(s3_pool, lambda: [live])
    assert (again.packs_deleted, again.packs_rewritten, again.chunks_removed) == (0, 0, 0)
