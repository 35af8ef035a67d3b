"""The receiving side of replication: fencing by writer epoch, order, idempotence, and
chunk batches verified as they arrive."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tandem.catalog import queries as q
from tandem.domain.consistency import Cut
from tandem.domain.ids import new_image_id
from tandem.domain.images import ImageKind
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppKind
from tandem.errors import ChunkCorrupt, Conflict, InvalidInput, StaleEpoch
from tandem.operations import apps, capture, replicate
from tandem.storage.pool import ChunkPool
from tandem.storage.tree import capture_tree
from tandem.transport.peer import ImageOffer, Location, MirroredApp, Opened, ReplicationOpen
from tandem.transport.wire import encode_frames
from tests.appliance.conftest import Booted, booted
from tests.catalog.conftest import catalog_url
from tests.operations.two_sites import TEMPLATE, two_sites
from tests.poolfiles import chunk_files, drops_pages, resident_bytes

__all__ = ["booted", "catalog_url"]

APP = MirroredApp(id="app_webwebwebweb", name="web", kind=AppKind.FILESYSTEM)
SHOWN = Location(host="h1", path="/srv/web")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _image(booted: Booted, tmp_path: Path, n: int) -> ImageOffer:
    src = tmp_path / f"src{n}"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(1000))
    mid, manifest, _ = capture_tree(booted.appliance.site.pool, src)
    return ImageOffer(
        id=new_image_id(),
        created=T0 + timedelta(minutes=n),
        label=None,
        size=manifest.size,
        manifest=mid.hex(),
    )


def _open(site: Any, image: ImageOffer, epoch: int = 1) -> Opened:
    body = ReplicationOpen(app=APP, image=image, epoch=epoch, production=SHOWN)
    return replicate.open_replication(site, peer="prod", body=body)


def _receive(booted: Booted, image: ImageOffer, epoch: int = 1) -> Any:
    """Open, 'send' (the chunks are already in this pool), commit."""
    site = booted.appliance.site
    opened = _open(site, image, epoch)
    if opened.status == "present":
        return opened
    session = site.sessions.get(str(opened.session), str(opened.token))
    site.sessions.commit(session, site.pool.get_manifest_blob(bytes.fromhex(image.manifest)))
    return replicate.commit_replication(
        site, peer="prod", sid=str(opened.session), token=str(opened.token)
    )


def test_replicas_arrive_with_the_snapshot_identity(booted: Booted, tmp_path: Path) -> None:
    first, second = _image(booted, tmp_path, 1), _image(booted, tmp_path, 2)
    assert _receive(booted, first).id == first.id
    replica = _receive(booted, second)
    assert replica.kind is ImageKind.REPLICA
    assert replica.source_image_id == second.id and replica.parent_id == first.id
    assert _receive(booted, second).status == "present"  # idempotent re-send
    held = replicate.replicas_held(booted.appliance.site, peer="prod", app="web")
    assert held.images == [second.id, first.id]


def test_a_replayed_older_image_is_refused(booted: Booted, tmp_path: Path) -> None:
    older, newer = _image(booted, tmp_path, 1), _image(booted, tmp_path, 2)
    _receive(booted, newer)
    with pytest.raises(Conflict, match="replayed or out-of-order"):
        _receive(booted, older)


def test_a_stale_writer_epoch_is_refused(booted: Booted, tmp_path: Path) -> None:
    """After a failover here raised the epoch, production may not overwrite the DR copy."""
    _receive(booted, _image(booted, tmp_path, 1))
    with booted.appliance.catalog.begin() as session:
        q.set_writer_epoch(session, name="web", epoch=2)
    with pytest.raises(StaleEpoch, match="carries writer epoch 1"):
        _receive(booted, _image(booted, tmp_path, 2), epoch=1)
    assert _receive(booted, _image(booted, tmp_path, 3), epoch=2).epoch == 2


def test_commit_without_the_manifest_is_refused(booted: Booted, tmp_path: Path) -> None:
    site = booted.appliance.site
    image = _image(booted, tmp_path, 1)
    opened = _open(site, image)
    with pytest.raises(InvalidInput, match="was not received"):
        replicate.commit_replication(
            site, peer="prod", sid=str(opened.session), token=str(opened.token)
        )
    assert replicate.replicas_held(site, peer="prod", app="web").images == []


def test_an_app_of_this_site_is_not_overwritten_by_a_peer(booted: Booted, tmp_path: Path) -> None:
    from tests.appliance.conftest import seed_app

    seed_app(booted.appliance, "web")
    with pytest.raises(Conflict, match="not a mirror of 'prod'"):
        _receive(booted, _image(booted, tmp_path, 1))


def _frames(tmp_path: Path, n: int) -> list[tuple[bytes, bytes]]:
    """``n`` chunk files made in another pool (half compressible), as a sender sends them."""
    other = ChunkPool.create(tmp_path / "sender")
    out = []
    with other.writer() as w:
        for i in range(n):
            data = os.urandom(300_000 + i)
            if i % 2:
                data = bytes(b % 4 + 97 for b in data)
            out.append(w.put(data).digest)
    return [(d, other.get_stored(d)) for d in out]


async def _pieces(body: bytes, seed: int) -> AsyncIterator[bytes]:
    rng = random.Random(seed)
    pos = 0
    while pos < len(body):
        step = rng.choice([1, 100, 4096, 65536, 300_000])
        yield body[pos : pos + step]
        pos += step


def test_a_chunk_batch_is_verified_and_stored_as_it_arrives(booted: Booted, tmp_path: Path) -> None:
    registry = booted.appliance.site.sessions
    frames = _frames(tmp_path, 6)
    body = encode_frames(frames)
    session, _ = registry.open(job_id="test", write=True)
    try:
        stored = asyncio.run(registry.receive_stream(session, _pieces(body, 1), len(body)))
        assert stored == len(frames)
        assert session.chunks_received == len(frames)
        assert session.bytes_received == sum(len(b) for _, b in frames)
        assert registry.missing(session, [d for d, _ in frames]) == []
    finally:
        registry.close(session)


def test_a_received_replica_leaves_the_page_cache_once_stored(
    booted: Booted, tmp_path: Path
) -> None:
    """A replica is bulk ingest: its chunks, once durable, leave the page cache."""
    site = booted.appliance.site
    if not drops_pages(site.pool.tmp_dir):
        pytest.skip("the pool is on tmpfs, whose pages are the data")
    frames = _frames(tmp_path, 6)
    opened = _open(site, _image(booted, tmp_path, 1))
    session = site.sessions.get(str(opened.session), str(opened.token))
    try:
        body = encode_frames(frames)
        asyncio.run(site.sessions.receive_stream(session, _pieces(body, 2), len(body)))
        assert session.writer is not None
        session.writer.flush()
        files = chunk_files(site.pool, [d for d, _ in frames])
        assert {f.suffix for f in files} == {"", ".pack"}  # chunk files and a pack
        assert [resident_bytes(f) for f in files] == [0] * len(files)
    finally:
        site.sessions.close(session)


def test_a_bad_frame_fails_the_batch_after_the_good_ones_before_it(
    booted: Booted, tmp_path: Path
) -> None:
    registry = booted.appliance.site.sessions
    frames = _frames(tmp_path, 5)
    lie = (frames[2][0], frames[3][1])  # chunk 3's bytes under chunk 2's id
    body = encode_frames([*frames[:2], lie, *frames[3:]])
    session, _ = registry.open(job_id="test", write=True)
    try:
        with pytest.raises(ChunkCorrupt):
            asyncio.run(registry.receive_stream(session, _pieces(body, 2), len(body)))
        # The good frames before it are kept (a re-send skips them), the bad one is not;
        # good frames after it may be stored too (verified on their own, each).
        missing = registry.missing(session, [d for d, _ in frames])
        assert frames[2][0] in missing
        assert not {d for d, _ in frames[:2]} & set(missing)
        with pytest.raises(InvalidInput, match="truncated"):
            asyncio.run(registry.receive_stream(session, _pieces(body[:-5], 3), len(body)))
    finally:
        registry.close(session)


def test_a_replica_keeps_how_its_snapshot_was_cut(booted: Booted, tmp_path: Path) -> None:
    offer = _image(booted, tmp_path, 1).model_copy(update={"consistency": Cut.REFLINK})
    replica = _receive(booted, offer)
    assert replica.consistency == "reflink"


def test_a_mirrored_capture_carries_its_consistency_to_the_peer(tmp_path: Path) -> None:
    with two_sites(tmp_path) as sites:
        data = sites.root / "ledger"
        data.mkdir()
        (data / "rows.txt").write_text("one\n")
        prod = sites.prod.site
        apps.add_app(prod, name="ledger", host="host1", kind=AppKind.FILESYSTEM, path=str(data))
        apps.protect_app(prod, name="ledger", template=TEMPLATE, actor="t")
        done = sites.run(sites.prod, capture.submit_capture(prod, app="ledger", actor="t"))
        assert done.status is JobStatus.SUCCEEDED, done.message
        assert done.result is not None, done.message
        mirror = sites.prod.runner.wait(done.result["mirror_job"], timeout=60)
        assert mirror.status is JobStatus.SUCCEEDED, mirror.message
        with sites.prod.catalog.read() as session:
            snapshot = q.get_image(session, image_id=done.image or "")
        with sites.dr.catalog.read() as session:
            (replica,) = q.list_images(session, app="ledger")
        assert snapshot.consistency == "crash-unsafe"  # live files: no point-in-time source
        assert (replica.kind, replica.consistency) == (ImageKind.REPLICA, snapshot.consistency)
