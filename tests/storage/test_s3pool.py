"""The chunk pool on an S3 object store (``storage.s3pool``) against a real store (Swift
with s3api, started by the tests): the capture and restore engines run on it unchanged,
everything lives in the bucket (a new cache directory restores the same bytes), images
travel between an S3 pool and a local pool with the replication encodings, and a store
that fails while a pack is sealed leaves nothing visible."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tandem.errors import ChunkMissing, ObjectStoreFailed, ObjectStoreUnreachable, StorageError
from tandem.storage.digest import SUB_BLOCK
from tandem.storage.manifest import TreeManifest, VolumeManifest, decode_manifest, load_manifest
from tandem.storage.objstore import ObjectStore, StoreUrl
from tandem.storage.pool import ChunkPool
from tandem.storage.s3pool import S3Pool
from tandem.storage.transfer import chunks_to_offer, encode_for_receiver, previous_at_same_offset
from tandem.storage.tree import capture_tree, restore_tree
from tandem.storage.volume import capture_volume, diff_volumes, restore_volume
from tandem.transport.server import free_port
from tests.s3server import S3Server
from tests.storage.test_tree import listing, make_sample
from tests.storage.test_volume import write_volume

MiB = 1024 * 1024


@pytest.fixture
def s3_pool(s3_store: ObjectStore, tmp_path: Path) -> S3Pool:
    return S3Pool.create_on(s3_store, tmp_path / "cache")


def test_a_tree_restores_exactly_from_the_bucket_alone(
    s3_pool: S3Pool, s3_store: ObjectStore, tmp_path: Path
) -> None:
    src, out, again = tmp_path / "src", tmp_path / "out", tmp_path / "again"
    make_sample(src)
    mid, manifest, stats = capture_tree(s3_pool, src)
    assert stats.bytes_read > 6 * MiB
    assert load_manifest(s3_pool, mid) == manifest
    restore_tree(s3_pool, manifest, out)
    assert listing(out) == listing(src)

    # Another process with an empty cache: everything it needs is in the bucket.
    fresh = S3Pool(s3_store, tmp_path / "other-cache")
    assert fresh.list_manifests() == [mid]
    stored = load_manifest(fresh, mid)
    assert isinstance(stored, TreeManifest)
    restore_tree(fresh, stored, again)
    assert listing(again) == listing(src)
    report = fresh.verify({mid: manifest.chunk_ids()})
    assert report.ok and report.chunks == len(manifest.chunk_ids())

    # Unchanged: nothing read, nothing stored.
    _, _, stats2 = capture_tree(fresh, src, base=manifest, base_id=mid)
    assert stats2.bytes_read == 0 and stats2.bytes_stored == 0

    keys = [o.key for o in s3_store.list()]
    assert "pool.json" in keys and f"manifests/{mid.hex()}" in keys
    packs = {k[: -len(".pack")] for k in keys if k.endswith(".pack")}
    assert packs and packs == {k[: -len(".idx")] for k in keys if k.endswith(".idx")}
    assert all(k == "pool.json" or k.startswith(("packs/", "manifests/")) for k in keys)


def test_small_files_restore_with_a_request_per_window_not_per_chunk(
    s3_pool: S3Pool, s3_store: ObjectStore, tmp_path: Path
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(400):
        path = src / f"d{i % 7}" / f"f{i}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(2048 + i))
    _, manifest, _ = capture_tree(s3_pool, src)
    fresh = S3Pool(s3_store, tmp_path / "fresh")  # nothing cached
    before = dict(s3_store.requests)
    restore_tree(fresh, manifest, out)
    assert listing(out) == listing(src)
    gets = s3_store.requests.get("get_object", 0) - before.get("get_object", 0)
    assert gets <= 4, gets  # ~1 MiB of small chunks in one pack: one window, not 400 GETs


def test_a_volume_and_a_small_change_restore_exactly(s3_pool: S3Pool, tmp_path: Path) -> None:
    src = tmp_path / "disk.img"
    first = write_volume(src, 12 * MiB + 777, seed=3)
    mid1, m1, stats1 = capture_volume(s3_pool, src)
    assert stats1.chunks == 4
    with open(src, "r+b") as fh:
        fh.seek(5 * MiB + 3)
        fh.write(b"changed!")
    second = src.read_bytes()
    mid2, m2, stats2 = capture_volume(s3_pool, src, base=m1, base_id=mid1)
    assert stats2.chunks_new == 1 and stats2.bytes_stored < 2 * SUB_BLOCK  # a delta
    assert diff_volumes(m1, m2, s3_pool) == [(5 * MiB, SUB_BLOCK)]

    out = tmp_path / "out.img"
    restore_volume(s3_pool, m1, out)
    assert out.read_bytes() == first
    rstats = restore_volume(s3_pool, m2, out, base=m1)
    assert out.read_bytes() == second
    assert rstats.bytes_written == SUB_BLOCK  # only the changed block
    assert sorted(s3_pool.list_manifests()) == sorted([mid1, mid2])


def send(source: ChunkPool, target: ChunkPool, mid: bytes, prev: bytes | None) -> int:
    """Replicate image ``mid`` as the replication job does: offer what the previous image
    lacks, send what the receiver says is missing in the smallest encoding, commit."""
    blob = source.get_manifest_blob(mid)
    new = decode_manifest(blob, mid)
    old = decode_manifest(source.get_manifest_blob(prev), prev) if prev else None
    at = previous_at_same_offset(new, old)
    sent = 0
    with target.writer([prev] if prev else []) as w:
        for digest in w.missing(chunks_to_offer(new, old)):
            encoded = encode_for_receiver(source, digest, w.has, at.get(digest))
            w.put_encoded(digest, encoded)
            sent += len(encoded)
        assert w.commit_manifest(blob) == mid
    return sent


def test_images_travel_between_an_s3_pool_and_a_local_pool(
    s3_pool: S3Pool, pool: ChunkPool, s3_server: S3Server, tmp_path: Path
) -> None:
    src = tmp_path / "disk.img"
    src.write_bytes(os.urandom(8 * MiB))
    mid1, m1, _ = capture_volume(s3_pool, src)
    with open(src, "r+b") as fh:
        fh.seek(MiB)
        fh.write(os.urandom(100))
    mid2, _, _ = capture_volume(s3_pool, src, base=m1, base_id=mid1)

    assert send(s3_pool, pool, mid1, None) > 4 * MiB  # S3 -> local
    assert send(s3_pool, pool, mid2, mid1) < 2 * SUB_BLOCK  # the change travels as a delta
    out = tmp_path / "from-local.img"
    image = load_manifest(pool, mid2)
    assert isinstance(image, VolumeManifest)
    restore_volume(pool, image, out)
    assert out.read_bytes() == src.read_bytes()

    url = StoreUrl(bucket=s3_pool.store.bucket, prefix="back", endpoint=s3_server.endpoint)
    store = ObjectStore(url, access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    back = S3Pool.create_on(store, tmp_path / "back-cache")
    send(pool, back, mid1, None)  # local -> S3
    send(pool, back, mid2, mid1)
    out2 = tmp_path / "from-s3.img"
    image = load_manifest(back, mid2)
    assert isinstance(image, VolumeManifest)
    restore_volume(back, image, out2)
    assert out2.read_bytes() == src.read_bytes()


def test_a_store_failing_at_the_seal_leaves_nothing_visible(
    s3_pool: S3Pool, s3_store: ObjectStore, tmp_path: Path
) -> None:
    dead = ObjectStore(
        StoreUrl(bucket=s3_store.bucket, prefix="pool", endpoint=f"http://127.0.0.1:{free_port()}"),
        access_key="a",
        secret_key="b",
        attempts=2,
        timeout=5,
    )
    data = os.urandom(3 * MiB)
    with pytest.raises(ObjectStoreUnreachable), s3_pool.writer() as w:
        result = w.put(data)
        assert w.has(result.digest)  # pending: answered from memory
        s3_pool.store = dead  # the store goes away before the seal
        try:
            w.commit_manifest(b"a manifest naming the chunk")
        finally:
            s3_pool.store = s3_store
    fresh = S3Pool(s3_store, tmp_path / "fresh-cache")
    assert not fresh.has(result.digest) and fresh.list_manifests() == []
    with pytest.raises(ChunkMissing):
        fresh.get(result.digest)


def test_a_store_answering_503_fails_the_capture_cleanly_after_its_retries(
    s3_server: S3Server, s3_store: ObjectStore, tmp_path: Path
) -> None:
    flaky = ObjectStore(
        s3_store.url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        attempts=3,
    )
    pool = S3Pool.create_on(flaky, tmp_path / "cache")
    src = tmp_path / "disk.img"
    src.write_bytes(os.urandom(6 * MiB))
    with s3_server.paused("object"), pytest.raises(ObjectStoreFailed) as caught:
        capture_volume(pool, src)  # every put answered 503 by the proxy
    assert "503" in caught.value.message or "ServiceUnavailable" in caught.value.message
    assert "after 3 attempt(s)" in caught.value.message  # retried, with backoff
    fresh = S3Pool(s3_store, tmp_path / "fresh")
    assert fresh.list_manifests() == []
    assert not [o for o in s3_store.list("packs/") if o.key.endswith(".idx")]
    # Back up: the capture runs again from the start and restores exactly.
    mid, manifest, _ = capture_volume(pool, src)
    out = tmp_path / "out.img"
    restore_volume(fresh, manifest, out)
    assert out.read_bytes() == src.read_bytes() and fresh.list_manifests() == [mid]


def test_a_bucket_without_a_pool_is_refused(s3_store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(StorageError) as caught:
        S3Pool(s3_store, tmp_path / "cache")
    assert (
        "create one (`tandem storage init DIR`, or `tandem appliance init DIR --pool"
        in caught.value.message
    )
