"""The pool's resumable mark-and-sweep collection (``tandem.storage.gc``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tandem.errors import Conflict, StorageError
from tandem.storage import gc
from tandem.storage.manifest import VOLUME_CHUNK, VolumeManifest, encode_manifest, load_manifest
from tandem.storage.pool import ChunkPool
from tests.poolfiles import age_pool

HOUR = 3600.0


@pytest.fixture
def pool(tmp_path: Path) -> ChunkPool:
    return ChunkPool.create(tmp_path / "pool")


def image(pool: ChunkPool, payloads: list[bytes], bases: list[bytes] | None = None) -> bytes:
    """Store ``payloads`` as chunks and a volume manifest naming them; its id."""
    with pool.writer(bases or []) as w:
        digests: list[bytes | None] = [w.put(p).digest for p in payloads]
        manifest = VolumeManifest(size=len(digests) * VOLUME_CHUNK, chunks=digests)
        return w.commit_manifest(encode_manifest(manifest))


def chunks_of(pool: ChunkPool, payloads: list[bytes]) -> list[bytes]:
    from tandem.storage.digest import hash_object

    return [hash_object(p)[0] for p in payloads]


def age(pool: ChunkPool, seconds: float = HOUR) -> None:
    """Make every chunk and manifest old: only marks (and touches) keep them now."""
    age_pool(pool, seconds)


def payloads(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-{i}-".encode() * 500 for i in range(n)]


def test_collect_removes_what_no_live_manifest_names(pool: ChunkPool) -> None:
    live_data, dead_data = payloads("live", 40), payloads("dead", 40)
    live = image(pool, live_data)
    dead = image(pool, dead_data + live_data[:5])  # shares five chunks with the live one
    age(pool)
    run = gc.collect(pool, lambda: [live])
    assert run.chunks_removed == 40 and run.chunks_kept == 40
    assert run.manifests_removed == 1 and not pool.has_manifest(dead)
    assert all(pool.has(d) for d in chunks_of(pool, live_data))
    assert not any(pool.has(d) for d in chunks_of(pool, dead_data))
    assert not gc.unfinished(pool)
    for d in chunks_of(pool, live_data):
        pool.get(d)  # still readable and verified


def test_a_stopped_collection_is_resumed_by_the_next(tmp_path: Path) -> None:
    # the fan-by-fan sweep of chunk files (a stopped sweep of packs: test_packs)
    pool = ChunkPool.create(tmp_path / "loose", pack_below=0)
    live_data, dead_data = payloads("live", 50), payloads("dead", 300)
    live = image(pool, live_data)
    image(pool, dead_data)
    age(pool)
    calls = {"fans": 0}

    def stop_midway() -> None:
        if calls["fans"] >= 100:
            raise KeyboardInterrupt("killed")

    def count(step: gc.GcProgress) -> None:
        if step.phase == "sweep":
            calls["fans"] = step.done

    with pytest.raises(KeyboardInterrupt):
        gc.collect(pool, lambda: [live], progress=count, check=stop_midway)
    assert gc.unfinished(pool)
    left = [d for d in chunks_of(pool, dead_data) if pool.has(d)]
    assert 0 < len(left) < len(dead_data)  # part done, part left

    run = gc.collect(pool, lambda: [live])
    assert run.resumed and run.resumed_at_fan == 100
    assert run.manifests_marked == 0  # the marks of the stopped run were kept
    assert run.chunks_removed == len(dead_data)  # counted over both runs
    assert not any(pool.has(d) for d in chunks_of(pool, dead_data))
    assert all(pool.has(d) for d in chunks_of(pool, live_data))
    assert not gc.unfinished(pool)


def test_a_resumed_collection_marks_images_added_meanwhile(pool: ChunkPool) -> None:
    first = image(pool, payloads("first", 30))
    age(pool)
    with pytest.raises(KeyboardInterrupt):
        gc.collect(pool, lambda: [first], check=_raise_on_call(2))  # stops while marking
    later_data = payloads("later", 30)
    later = image(pool, later_data)
    age(pool)  # even when old, a manifest live at the resume keeps its chunks
    gc.collect(pool, lambda: [first, later])
    assert all(pool.has(d) for d in chunks_of(pool, later_data))


def _raise_on_call(n: int) -> Callable[[], None]:
    calls = {"n": 0}

    def check() -> None:
        calls["n"] += 1
        if calls["n"] >= n:
            raise KeyboardInterrupt("killed")

    return check


def test_a_writer_running_during_the_sweep_keeps_what_it_writes_and_reuses(
    pool: ChunkPool,
) -> None:
    garbage = payloads("garbage", 20)
    image(pool, garbage)
    age(pool)
    started = threading.Event()
    go_on = threading.Event()

    def pause(step: gc.GcProgress) -> None:
        if step.phase == "sweep" and step.done == 1:
            started.set()
            assert go_on.wait(10)

    result: dict[str, gc.GcRun] = {}
    thread = threading.Thread(
        target=lambda: result.update(run=gc.collect(pool, lambda: [], progress=pause))
    )
    thread.start()
    assert started.wait(10)
    # A capture starting after the snapshot: it reuses garbage (a dedup hit touches it),
    # writes new chunks and commits its manifest, all while the sweep runs.
    fresh = payloads("fresh", 10)
    with pool.writer() as w:
        assert all(w.has(d) for d in chunks_of(pool, garbage))
        for p in fresh:
            w.put(p)
    go_on.set()
    thread.join(10)
    assert all(pool.has(d) for d in chunks_of(pool, garbage + fresh))


def test_the_base_of_an_active_writer_is_marked(pool: ChunkPool) -> None:
    """A writer may reuse its base's chunks without touching them: while it runs they stay,
    even if the base's image left the catalog."""
    base_data = payloads("base", 20)
    base = image(pool, base_data)
    age(pool)
    with pool.writer([base]):
        gc.collect(pool, lambda: [])
    assert all(pool.has(d) for d in chunks_of(pool, base_data))
    assert pool.has_manifest(base)


def test_an_unreadable_live_manifest_stops_the_collection(pool: ChunkPool) -> None:
    dead_data = payloads("dead", 20)
    image(pool, dead_data)
    age(pool)
    missing = b"\x01" * 32
    with pytest.raises(StorageError, match="garbage collection stopped"):
        gc.collect(pool, lambda: [missing])
    assert all(pool.has(d) for d in chunks_of(pool, dead_data))


def test_one_collection_at_a_time(pool: ChunkPool) -> None:
    image(pool, payloads("x", 5))
    inside = threading.Event()
    go_on = threading.Event()

    def pause(step: gc.GcProgress) -> None:
        if step.phase == "sweep" and step.done == 1:
            inside.set()
            go_on.wait(10)

    thread = threading.Thread(target=lambda: gc.collect(pool, lambda: [], progress=pause))
    thread.start()
    assert inside.wait(10)
    try:
        with pytest.raises(Conflict, match="already running"):
            gc.collect(pool, lambda: [])
    finally:
        go_on.set()
        thread.join(10)


def test_the_marks_of_a_sweep_are_held_one_fan_out_at_a_time(
    pool: ChunkPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory is bounded by one fan-out directory's marks, not the pool's."""
    live = image(pool, payloads("live", 512))
    sizes: list[int] = []
    real = gc._Refs.fan

    def spy(self: gc._Refs, fan: int) -> set[bytes]:
        got = real(self, fan)
        sizes.append(len(got))
        return got

    monkeypatch.setattr(gc._Refs, "fan", spy)
    gc.collect(pool, lambda: [live])
    assert len(sizes) == gc.FANS and sum(sizes) == 512
    assert max(sizes) < 20  # about 512/256 each


# A capture in another appliance process: it opened its writer an hour ago, wrote its
# chunks and its manifest, and now records its image in the catalog, then closes its writer.
_OTHER_PROCESS = r"""
import os, sys, time
from pathlib import Path
from tandem.storage import pool as pool_mod
from tandem.storage.manifest import VOLUME_CHUNK, VolumeManifest, encode_manifest

root, live, ready, go = (Path(a) for a in sys.argv[1:5])
pool = pool_mod.ChunkPool(root)
real_time = time.time
pool_mod.time.time = lambda: real_time() - 3600  # the writer started an hour ago
writer = pool.writer()
pool_mod.time.time = real_time
digests = [writer.put(f"other-{i}-".encode() * 500).digest for i in range(20)]
manifest = VolumeManifest(size=len(digests) * VOLUME_CHUNK, chunks=list(digests))
mid = writer.commit_manifest(encode_manifest(manifest))
old = real_time() - 3600
for entry in os.scandir(pool.packs_dir):
    os.utime(entry.path, (old, old))
os.utime(pool.manifest_path(mid), (old, old))
ready.write_text(mid.hex())
while not go.exists():
    time.sleep(0.01)
with open(live, "a") as fh:  # "the catalog": the image is recorded first...
    fh.write(mid.hex() + "\n")
writer.close()  # ...and only then the writer goes
"""


def test_snapshot_holds_against_a_capture_ending_in_another_process(
    pool: ChunkPool, tmp_path: Path
) -> None:
    """The writer of another process records its image and closes between the
    collection's two snapshot reads, with no lock shared between the processes: the
    collection lists writers first, so it reads the catalog after the image is in it."""
    import subprocess
    import sys

    live_file, ready, go = tmp_path / "live", tmp_path / "ready", tmp_path / "go"
    live_file.write_text("")
    child = subprocess.Popen(
        [sys.executable, "-c", _OTHER_PROCESS, str(pool.root), str(live_file), str(ready), str(go)]
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() or not ready.read_text():
            assert child.poll() is None and time.monotonic() < deadline, "the writer died"
            time.sleep(0.01)
        mid = bytes.fromhex(ready.read_text())
        listed = pool._active_writers

        def writers_after_the_capture_ended() -> list[dict[str, object]]:
            go.write_text("")  # the other process records its image and closes its writer
            assert child.wait(60) == 0
            return listed()

        pool._active_writers = writers_after_the_capture_ended  # type: ignore[method-assign]

        def live() -> list[bytes]:
            return [bytes.fromhex(line) for line in live_file.read_text().split()]

        gc.collect(pool, live)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0
    assert pool.has_manifest(mid)
    chunks = load_manifest(pool, mid).chunk_ids()
    assert len(chunks) == 20 and all(pool.has(d) for d in chunks)
    assert pool.verify({mid: chunks}).ok


def test_the_bases_of_packed_deltas_are_kept_down_the_chain(
    pool: ChunkPool, tmp_path: Path
) -> None:
    """A live image whose changed chunks are deltas (small: packed) over deltas over the
    chunks of images no longer live: the collection reads each delta's header to find its
    base, so the whole chain stays and the image restores byte for byte."""
    import random

    from tandem.storage.volume import capture_volume, restore_volume

    src = tmp_path / "disk.img"
    rng = random.Random(7)
    src.write_bytes(rng.randbytes(2 * VOLUME_CHUNK))
    mid, m, _ = capture_volume(pool, src)
    for k in (1, 5):  # two changes of one 64 KiB block: a delta, then a delta of it
        with open(src, "r+b") as fh:
            fh.seek(k * 65536)
            fh.write(rng.randbytes(65536))
        mid, m, _ = capture_volume(pool, src, base=m, base_id=mid)
    first = m.chunks[0]
    assert first is not None
    info = pool.info(first)
    assert info.base is not None and pool.packs.lookup(first) is not None  # a packed delta
    assert pool.info(info.base).base is not None  # ...whose base is a delta too
    age(pool)
    run = gc.collect(pool, lambda: [mid])
    assert run.chunks_removed == 0 and run.manifests_removed == 2
    assert pool.infos([first, b"\x02" * 32]).keys() == {first}  # an absent chunk left out
    out = tmp_path / "out.img"
    restore_volume(pool, m, out)
    assert out.read_bytes() == src.read_bytes()
