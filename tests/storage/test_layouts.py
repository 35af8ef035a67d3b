"""Per-image layout files (``storage.layouts``): a syncback's bases are read from them, not
from each base chunk's header, and nothing in them is taken on trust."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.storage import gc, layouts
from tandem.storage import pool as poolmod
from tandem.storage.digest import object_id
from tandem.storage.layouts import Layout, decode_record, decode_segment, encode_segment
from tandem.storage.manifest import VOLUME_CHUNK, VolumeManifest, load_manifest
from tandem.storage.overlay import BLOCK, Overlay, capture_overlay
from tandem.storage.pool import ChunkInfo, ChunkPool
from tandem.storage.transfer import encode_for_receiver
from tandem.storage.volume import capture_volume, restore_volume
from tests.poolfiles import age_pool

MiB = 1024 * 1024
CHUNKS = 7  # over four segments of two chunks


@pytest.fixture(autouse=True)
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layouts, "SEGMENT", 2)


def base_image(pool: ChunkPool, tmp_path: Path, seed: int = 1) -> tuple[bytes, VolumeManifest]:
    src = tmp_path / f"vol-{seed}.img"
    src.write_bytes(random.Random(seed).randbytes(CHUNKS * VOLUME_CHUNK - 5000))
    mid, manifest, _ = capture_volume(pool, src)
    return mid, manifest


def write_blocks(ov: Overlay, chunks: list[int], seed: int = 7) -> None:
    rng = random.Random(seed)
    for i in chunks:
        ov.write(i * VOLUME_CHUNK + 3 * BLOCK, rng.randbytes(BLOCK))


def spy_header_reads(pool: ChunkPool, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The chunks whose header ``pool`` reads from now on (``ChunkPool.info``)."""
    read: list[bytes] = []
    real = pool.info

    def info(digest: bytes) -> ChunkInfo:
        read.append(digest)
        return real(digest)

    monkeypatch.setattr(pool, "info", info)
    return read


@pytest.fixture
def header_reads(pool: ChunkPool, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    yield spy_header_reads(pool, monkeypatch)


def expected_image(tmp_path: Path, ov: Overlay) -> VolumeManifest:
    """The same bytes captured whole into a pool of their own."""
    flat = tmp_path / "flat.img"
    flat.write_bytes(ov.read(0, ov.size))
    _, manifest, _ = capture_volume(ChunkPool.create(tmp_path / "ref-pool"), flat)
    return manifest


def test_a_capture_writes_its_images_layouts_and_a_recapture_links_what_it_shares(
    pool: ChunkPool, tmp_path: Path
) -> None:
    mid, base = base_image(pool, tmp_path)
    store = pool.image_layouts
    for n in range(4):
        records = decode_segment(store.segment_path(mid, n).read_bytes())
        ids = base.chunks[2 * n : 2 * n + 2]
        assert [object_id(r.subs, r.plain_len) for r in records if r] == ids
    src = tmp_path / "vol-1.img"
    with open(src, "r+b") as fh:
        fh.seek(4 * VOLUME_CHUNK + 100)
        fh.write(b"changed")
    mid2, second, _ = capture_volume(pool, src, base=base, base_id=mid)
    assert [i for i in range(CHUNKS) if second.chunks[i] != base.chunks[i]] == [4]
    for n in (0, 1, 3):  # the same chunks: the same file
        assert os.path.samefile(store.segment_path(mid, n), store.segment_path(mid2, n))
    records = decode_segment(store.segment_path(mid2, 2).read_bytes())
    assert [object_id(r.subs, r.plain_len) for r in records if r] == second.chunks[4:6]


def layout_ids(pool: ChunkPool, mid: bytes) -> list[bytes | None]:
    """The chunk each record of image ``mid``'s layout files names (None: unknown)."""
    out: list[bytes | None] = []
    for n in range(-(-CHUNKS // layouts.SEGMENT)):
        path = pool.image_layouts.segment_path(mid, n)
        if not path.exists():  # nothing known of its chunks: no file
            out += [None] * min(layouts.SEGMENT, CHUNKS - n * layouts.SEGMENT)
            continue
        records = decode_segment(path.read_bytes())
        out += [object_id(r.subs, r.plain_len) if r else None for r in records]
    return out


def test_an_image_of_more_chunks_than_a_writer_keeps_in_memory_gets_every_layout(
    pool: ChunkPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A first capture of a large volume: the writer keeps 2 records in memory, the rest
    # in its spill file, so the image's files still know every chunk.
    monkeypatch.setattr(poolmod, "STORED_LAYOUTS_KEPT", 2)
    mid, base = base_image(pool, tmp_path)
    assert layout_ids(pool, mid) == base.chunks


def test_layouts_past_what_a_writer_may_spill_are_unknown_and_the_image_is_whole(
    pool: ChunkPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(poolmod, "STORED_LAYOUTS_KEPT", 2)
    monkeypatch.setattr(poolmod, "STORED_LAYOUTS_SPILLED", 1)
    mid, base = base_image(pool, tmp_path)
    ids = layout_ids(pool, mid)
    assert len([d for d in ids if d is not None]) == 3  # two in memory, one spilled
    assert all(d in (None, c) for d, c in zip(ids, base.chunks, strict=True))
    out = tmp_path / "out.img"
    restore_volume(pool, load_manifest(pool, mid), out)  # type: ignore[arg-type]
    assert out.read_bytes() == (tmp_path / "vol-1.img").read_bytes()


def test_a_syncback_reads_its_bases_layouts_from_the_layout_files_not_the_chunks(
    pool: ChunkPool, tmp_path: Path, header_reads: list[bytes]
) -> None:
    mid, base = base_image(pool, tmp_path)
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        write_blocks(ov, [0, 3, 6])
        header_reads.clear()
        new_id, manifest, stats = capture_overlay(pool, ov)
        assert not set(header_reads) & set(base.chunks)
        assert stats.chunks_new == 3
        assert manifest.chunks == expected_image(tmp_path, ov).chunks
        out = tmp_path / "out.img"
        restored = load_manifest(pool, new_id)
        assert isinstance(restored, VolumeManifest)
        restore_volume(pool, restored, out)
        assert out.read_bytes() == ov.read(0, ov.size)


def test_a_layout_record_that_does_not_name_its_chunk_is_never_used(
    pool: ChunkPool, tmp_path: Path, header_reads: list[bytes]
) -> None:
    mid, base = base_image(pool, tmp_path)
    store = pool.image_layouts
    for n in range(4):  # well-formed records, each for a chunk it does not describe
        path = store.segment_path(mid, n)
        forged = [
            Layout(r.plain_len, [bytes(32)] * len(r.subs), r.depth) if r else None
            for r in decode_segment(path.read_bytes())
        ]
        path.unlink()  # (linked into no other image here)
        path.write_bytes(encode_segment(forged))
    (store.segment_path(mid, 3)).write_bytes(b"TLY1 torn")
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        write_blocks(ov, [0, 3, 6])
        header_reads.clear()
        _, manifest, _ = capture_overlay(pool, ov)
        assert {base.chunks[i] for i in (0, 3, 6)} <= set(header_reads)  # read as before
        assert manifest.chunks == expected_image(tmp_path, ov).chunks


def test_a_received_delta_is_checked_against_its_bases_layout_files(
    pool: ChunkPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Production receiving a syncback: each delta is verified against its base without
    reading the base's header."""
    mid, base = base_image(pool, tmp_path)
    dr = ChunkPool.create(tmp_path / "dr")
    dr_mid, _ = base_image(dr, tmp_path)
    assert dr_mid == mid
    with Overlay.create(tmp_path / "ov", dr, base, mid) as ov:
        write_blocks(ov, [1, 5])
        _, syncback, _ = capture_overlay(dr, ov)
    sent = {
        d: encode_for_receiver(dr, d, lambda b: b in base.chunks)
        for d in syncback.chunks
        if d not in base.chunks and d is not None
    }
    reads = spy_header_reads(pool, monkeypatch)
    with pool.writer([mid], xor_deltas=False) as w:
        for d, blob in sent.items():
            assert w.put_encoded(d, blob).new
    assert not reads
    out = tmp_path / "out.img"
    restore_volume(pool, syncback, out)
    assert out.read_bytes() == restore_bytes(dr, syncback, tmp_path)


def restore_bytes(pool: ChunkPool, manifest: VolumeManifest, tmp_path: Path) -> bytes:
    out = tmp_path / "ref.img"
    restore_volume(pool, manifest, out)
    return out.read_bytes()


def test_an_images_layouts_go_with_it_and_what_it_shared_stays(
    pool: ChunkPool, tmp_path: Path
) -> None:
    mid, base = base_image(pool, tmp_path)
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        write_blocks(ov, [4])
        mid2, _, _ = capture_overlay(pool, ov)
    store = pool.image_layouts
    assert os.path.samefile(store.segment_path(mid, 0), store.segment_path(mid2, 0))
    age_pool(pool, 3600)
    gc.collect(pool, lambda: [mid2])
    assert not store.folder(mid).exists()
    records = [decode_record(r) for r in store.read_segment(mid2, 0)]
    assert [object_id(r.subs, r.plain_len) for r in records if r] == base.chunks[0:2]


def test_a_restore_session_answers_block_digests_from_its_images_layout_files(
    pool: ChunkPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restore of a syncback asks production for the layouts of the chunks in which two
    images differ: they come from those images' layout files, and only of the images the
    session may read."""
    from tandem.operations.sessions import SessionRegistry

    mid, base = base_image(pool, tmp_path)
    _, foreign = base_image(pool, tmp_path, seed=2)
    fresh = ChunkPool(pool.root)  # nothing remembered in memory
    reads = spy_header_reads(fresh, monkeypatch)
    registry = SessionRegistry(fresh)
    session, _ = registry.open(job_id="restore", write=False, readable=[mid])
    for d in base.chunks:
        assert d is not None
        length, subs = registry.layout(session, d)
        assert object_id(subs, length) == d
    assert not reads
    elsewhere = foreign.chunks[0]
    assert elsewhere is not None
    registry.layout(session, elsewhere)  # (another image: read from its chunk)
    assert reads == [elsewhere]


def test_a_base_segment_is_read_once_however_many_threads_ask(
    pool: ChunkPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A syncback's receipt reads its base's layouts ahead while chunks arrive; the two
    store threads and the reading ahead never read one file twice, and the bases' last
    image is the one read for a chunk they share."""
    import threading

    from tandem.storage.layouts import BaseLayouts

    mid, base = base_image(pool, tmp_path)
    with Overlay.create(tmp_path / "ov", pool, base, mid) as ov:
        write_blocks(ov, [2])
        mid2, second, _ = capture_overlay(pool, ov)
    store = pool.image_layouts
    reads: list[tuple[bytes, int]] = []
    real = store.read_segment

    def counted(m: bytes, n: int) -> list[bytes]:
        reads.append((m, n))
        return real(m, n)

    monkeypatch.setattr(store, "read_segment", counted)
    for ahead in (False, True):
        reads.clear()
        bases = BaseLayouts(store, [(mid, base.chunks), (mid2, second.chunks)])
        if ahead:
            bases.prefetch()
        got: list[list[Layout | None]] = []

        def ask(bases: BaseLayouts = bases, got: list[list[Layout | None]] = got) -> None:
            got.append([bases.get(d) for d in second.chunks if d])

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wanted = [d for d in second.chunks if d]
        for mine in got:
            assert [object_id(g.subs, g.plain_len) for g in mine if g] == wanted
        assert len(got) == 4
        assert len(set(reads)) == len(reads)  # each file once
        if not ahead:  # every chunk is the second image's: only its files are read
            assert sorted(reads) == [(mid2, n) for n in range(4)]


def test_an_image_whose_layouts_cannot_be_kept_is_committed_all_the_same(
    pool: ChunkPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*_: object, **__: object) -> None:
        raise RuntimeError("no layouts today")

    monkeypatch.setattr(pool.image_layouts, "save", fail)
    mid, manifest = base_image(pool, tmp_path)
    assert not pool.image_layouts.folder(mid).exists()
    out = tmp_path / "out.img"
    restore_volume(pool, manifest, out)
    assert out.read_bytes() == (tmp_path / "vol-1.img").read_bytes()


def test_a_layouts_folder_left_half_made_is_cleared_when_the_pool_opens(pool: ChunkPool) -> None:
    half = pool.tmp_dir / "layouts-0123.abcd"
    half.mkdir()
    (half / "000000").write_bytes(b"TLY1")
    os.utime(half, (1, 1))
    ChunkPool(pool.root)  # a process starting with no writer running
    assert not half.exists()
