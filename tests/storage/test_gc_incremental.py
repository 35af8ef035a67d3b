"""The incremental collection (``tandem.storage.gc``): reference counts kept up to date, a
sweep of only what died, and the same result as a full mark-and-sweep."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tandem.storage import gc
from tandem.storage.manifest import VOLUME_CHUNK, VolumeManifest, encode_manifest, load_manifest
from tandem.storage.pool import ChunkPool
from tests.poolfiles import age_pool
from tests.storage.test_gc import HOUR, chunks_of, image, payloads


@pytest.fixture(params=["packed", "loose"])
def pool(tmp_path: Path, request: pytest.FixtureRequest) -> ChunkPool:
    return ChunkPool.create(tmp_path / "pool", pack_below=0 if request.param == "loose" else None)


def age(pool: ChunkPool) -> None:
    age_pool(pool, HOUR)


def present(pool: ChunkPool, data: list[bytes]) -> list[bool]:
    pool.packs.refresh(force=True)
    return [pool.has(d) for d in chunks_of(pool, data)]


def whole(pool: ChunkPool, mids: list[bytes]) -> bool:
    """Every chunk of every one of ``mids`` reads back verified (deltas through their
    bases)."""
    pool.packs.refresh(force=True)
    for mid in mids:
        for d in load_manifest(pool, mid).chunk_ids():
            pool.get(d)
    return True


def test_after_the_first_full_run_a_collection_counts_only_what_changed(pool: ChunkPool) -> None:
    shared = payloads("shared", 10)
    first = image(pool, payloads("one", 30) + shared)
    second = image(pool, payloads("two", 30) + shared)
    age(pool)
    run = gc.collect(pool, lambda: [first, second])
    assert run.full and run.manifests_marked == 2 and run.chunks_removed == 0

    third_data = payloads("three", 20)
    third = image(pool, third_data + shared)
    age(pool)
    run = gc.collect(pool, lambda: [second, third])  # the first image was deleted
    assert not run.full
    assert run.manifests_marked == 1 and run.manifests_unmarked == 1  # not all three again
    assert run.chunks_dead == 30 and run.chunks_removed == 30
    assert run.manifests_removed == 1 and not pool.has_manifest(first)
    assert not any(present(pool, payloads("one", 30)))
    assert all(present(pool, payloads("two", 30) + shared + third_data))
    assert whole(pool, [second, third])

    run = gc.collect(pool, lambda: [second, third])  # nothing changed: nothing read
    assert not run.full and run.manifests_marked == run.manifests_unmarked == 0
    assert run.chunks_removed == 0 and run.packs_done == 0


def test_an_image_made_and_deleted_between_two_collections_is_swept(pool: ChunkPool) -> None:
    keep = image(pool, payloads("keep", 10))
    gc.collect(pool, lambda: [keep])
    brief_data = payloads("brief", 25) + payloads("keep", 3)
    brief = image(pool, brief_data)  # never live when a collection looked
    age(pool)
    run = gc.collect(pool, lambda: [keep])
    assert not run.full and run.manifests_marked == 0 and run.manifests_unmarked == 0
    assert run.chunks_removed == 25 and not pool.has_manifest(brief)
    assert not any(present(pool, payloads("brief", 25)))
    assert all(present(pool, payloads("keep", 10)))


def test_a_dead_chunk_a_running_writer_reuses_stays(pool: ChunkPool) -> None:
    data = payloads("reused", 15)
    old = image(pool, data)
    gc.collect(pool, lambda: [old])
    age(pool)
    with pool.writer() as w:  # a capture after the snapshot finds the chunks by hash
        assert all(w.has(d) for d in chunks_of(pool, data))
        gc.collect(pool, lambda: [])  # the image was deleted meanwhile
        assert all(present(pool, data))
        manifest = VolumeManifest(
            size=len(data) * VOLUME_CHUNK, chunks=list[bytes | None](chunks_of(pool, data))
        )
        new = w.commit_manifest(encode_manifest(manifest))
    age(pool)
    run = gc.collect(pool, lambda: [new])  # the new image needs them: no longer dead
    assert run.chunks_removed == 0 and all(present(pool, data))
    run = gc.collect(pool, lambda: [])
    assert run.chunks_removed == 15 and not any(present(pool, data))


def test_delta_bases_are_counted_down_the_chain(tmp_path: Path) -> None:
    """Deltas over deltas over the chunks of a deleted image: the bases stay while the
    image built on them lives, and go with it."""
    from tandem.storage.volume import capture_volume, restore_volume

    pool = ChunkPool.create(tmp_path / "pool")
    src = tmp_path / "disk.img"
    rng = random.Random(3)
    src.write_bytes(rng.randbytes(2 * VOLUME_CHUNK))
    mids = []
    mid, m, _ = capture_volume(pool, src)
    mids.append(mid)
    for k in (1, 5):
        with open(src, "r+b") as fh:
            fh.seek(k * 65536)
            fh.write(rng.randbytes(65536))
        mid, m, _ = capture_volume(pool, src, base=m, base_id=mid)
        mids.append(mid)
    gc.collect(pool, lambda: mids)
    age(pool)
    run = gc.collect(pool, lambda: [mids[-1]])
    assert not run.full and run.manifests_unmarked == 2 and run.chunks_removed == 0
    out = tmp_path / "out.img"
    restore_volume(pool, m, out)
    assert out.read_bytes() == src.read_bytes()
    run = gc.collect(pool, lambda: [])
    assert run.chunks_removed >= 4  # two chunks, and the deltas and bases under the first
    assert not pool.list_manifests()
    full = gc.collect(pool, lambda: [], full=True)
    assert full.chunks_removed == 0 and full.chunks_kept == 0


def test_a_mostly_needed_pack_is_parked_until_more_of_it_dies(tmp_path: Path) -> None:
    pool = ChunkPool.create(tmp_path / "pool")
    data = payloads("p", 10)
    together = image(pool, data)  # one pack of ten chunks
    firsts = [image(pool, data[: 10 - k]) for k in (1, 4, 6)]  # fewer and fewer
    gc.collect(pool, lambda: [together, *firsts])
    age(pool)
    run = gc.collect(pool, lambda: firsts)  # 9 of 10 still needed: kept, its dead one parked
    assert run.packs_done == 1 and run.chunks_removed == 0
    run = gc.collect(pool, lambda: firsts)
    assert run.packs_done == 0  # nothing more died in it: not looked at again
    run = gc.collect(pool, lambda: firsts[1:])  # 6 of 10: still kept
    assert run.packs_done == 1 and run.chunks_removed == 0
    run = gc.collect(pool, lambda: firsts[2:])  # 4 of 10: rewritten without the dead six
    assert run.packs_rewritten == 1 and run.chunks_removed == 6
    assert present(pool, data) == [True] * 4 + [False] * 6
    assert gc.collect(pool, lambda: firsts[2:], full=True).chunks_removed == 0


def test_a_wrong_count_makes_the_next_collection_full(pool: ChunkPool) -> None:
    one, two = image(pool, payloads("one", 5)), image(pool, payloads("two", 5))
    gc.collect(pool, lambda: [one, two])
    pool.manifest_path(one).write_bytes(b"not a manifest")
    age(pool)
    run = gc.collect(pool, lambda: [two])  # cannot count it down: its chunks stay for now
    assert not run.full and run.chunks_removed == 0
    run = gc.collect(pool, lambda: [two])
    assert run.full and run.chunks_removed == 5
    assert not gc.collect(pool, lambda: [two]).full


def test_full_collections_come_back_after_full_every(pool: ChunkPool) -> None:
    one = image(pool, payloads("one", 5))
    assert gc.collect(pool, lambda: [one], full_every=3600).full
    assert not gc.collect(pool, lambda: [one], full_every=3600).full
    assert gc.collect(pool, lambda: [one], full_every=0).full


def test_a_stopped_incremental_collection_is_carried_on(pool: ChunkPool) -> None:
    live = image(pool, payloads("live", 5))
    deleted = [image(pool, payloads(f"d{i}", 8)) for i in range(6)]
    gc.collect(pool, lambda: [live, *deleted])
    age(pool)
    steps = {"n": 0}

    def stop_at_the_third_manifest(step: gc.GcProgress) -> None:
        if step.phase == "unmark":
            steps["n"] = step.done

    def check() -> None:
        if steps["n"] >= 3:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        gc.collect(pool, lambda: [live], progress=stop_at_the_third_manifest, check=check)
    run = gc.collect(pool, lambda: [live])
    assert not run.full and 0 < run.manifests_unmarked < 6
    gone = [d for i in range(6) for d in payloads(f"d{i}", 8)]
    assert not any(present(pool, gone)) and all(present(pool, payloads("live", 5)))
    assert gc.collect(pool, lambda: [live], full=True).chunks_removed == 0


def test_incremental_collections_leave_what_a_full_one_would(tmp_path: Path) -> None:
    """Random captures sharing chunks and random deletions, an incremental collection after
    each round: every live image stays whole, and a full collection then finds nothing
    more to remove (at worst parked chunks of packs it keeps as well)."""
    from tandem.storage.volume import capture_volume

    rng = random.Random(11)
    pool = ChunkPool.create(tmp_path / "pool")
    disks = [tmp_path / f"disk{i}.img" for i in range(3)]
    for disk in disks:
        disk.write_bytes(rng.randbytes(3 * VOLUME_CHUNK))
    images: list[tuple[bytes, Path]] = []
    last: dict[Path, tuple[bytes, VolumeManifest]] = {}
    run = gc.GcRun()
    for _round in range(6):
        for disk in disks:
            with open(disk, "r+b") as fh:  # a few changed blocks: deltas over the last image
                for _ in range(rng.randint(1, 4)):
                    fh.seek(rng.randrange(3 * VOLUME_CHUNK // 65536) * 65536)
                    fh.write(rng.randbytes(65536))
            base = last.get(disk)
            if base is not None and base[0] not in {mid for mid, _ in images}:
                base = None  # a capture builds on the app's latest image while it lives
            mid, m, _ = capture_volume(
                pool, disk, base=base[1] if base else None, base_id=base[0] if base else None
            )
            last[disk] = (mid, m)
            images.append((mid, disk))
        rng.shuffle(images)
        images = images[: max(2, len(images) // 2)]
        live = [mid for mid, _ in images]
        age(pool)
        run = gc.collect(pool, lambda live=live: live)  # type: ignore[misc]
        assert whole(pool, live)
    assert not run.full
    full = gc.collect(pool, lambda: [mid for mid, _ in images], full=True)
    assert full.chunks_removed == 0 and full.manifests_removed == 0
    assert whole(pool, [mid for mid, _ in images])
