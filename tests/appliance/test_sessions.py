"""A session's batched read endpoints (``POST .../subs``, ``POST .../blocks``) and the
restore that uses them, against a real appliance served over HTTPS in-process.

What a user relies on: a failback's restore from a known base costs a few requests however
many chunks changed (its downtime does not grow with the volume), a lying or broken
appliance never gets a wrong byte written, and a bad request is told what to change.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tandem.errors import ChunkCorrupt, ChunkMissing
from tandem.storage import volume
from tandem.storage.digest import SUB_BLOCK, hash_block
from tandem.storage.manifest import VOLUME_CHUNK, VolumeManifest
from tandem.storage.pool import HEADER, ChunkPool
from tandem.storage.volume import capture_volume, restore_volume
from tandem.transport.chunks import RemoteChunkSource
from tandem.transport.client import ApiClient
from tandem.transport.wire import (
    BLOCKS_PER_REQUEST,
    SUBS_PER_REQUEST,
    decode_frames,
    encode_frames,
)
from tests.appliance.conftest import Api
from tests.poolfiles import chunk_file

Tamper = Callable[[str, bytes], bytes]


class Recording(ApiClient):
    """An ApiClient that records each request (method, last path part) and may alter the
    answers of the batched endpoints, to play a lying appliance."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, str]] = []
        self.tamper: Tamper | None = None

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        self.calls.append((method, path.rsplit("/", 1)[-1]))
        answer = super().request(method, path, **kwargs)
        if self.tamper is not None and isinstance(answer, bytes):
            return self.tamper(path.rsplit("/", 1)[-1], answer)
        return answer


@dataclass
class Reader:
    api: Api
    token: str
    session: str
    client: Recording

    @property
    def pool(self) -> ChunkPool:
        return self.api.appliance.site.pool

    def source(self) -> RemoteChunkSource:
        return RemoteChunkSource(self.client, self.session)

    def post(self, what: str, body: Any) -> tuple[int, str]:
        resp = self.api.client.post(
            f"/api/v1/sessions/{self.session}/{what}",
            headers={"Authorization": f"Bearer {self.token}"},
            json=body,
        )
        return resp.status_code, resp.json()["message"] if resp.status_code >= 400 else ""


@pytest.fixture
def reader(api: Api) -> Iterator[Reader]:
    site = api.appliance.site
    opened, token = site.sessions.open(job_id="job_test", write=False)
    with Recording(site.url, token, site.fingerprint) as client:
        yield Reader(api, token, opened.id, client)


# --- volumes: sparse files with a few 64 KiB blocks of data per 4 MiB chunk ---------------


def block_at(chunk: int, block: int) -> int:
    return chunk * VOLUME_CHUNK + block * SUB_BLOCK


def write_sparse(path: Path, n_chunks: int, blocks: dict[int, bytes]) -> None:
    with open(path, "wb") as fh:
        fh.truncate(n_chunks * VOLUME_CHUNK)
        for off, data in blocks.items():
            fh.seek(off)
            fh.write(data)


def same_file(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(VOLUME_CHUNK), fb.read(VOLUME_CHUNK)
            if x != y:
                return False
            if not x:
                return True


@dataclass
class Change:
    base: VolumeManifest
    image: VolumeManifest
    target: Path  # holds the base
    wanted: Path  # what the target must become
    changed_blocks: int  # data blocks to fetch
    zeroed_blocks: int


def make_change(pool: ChunkPool, tmp: Path, n: int) -> Change:
    """A base of ``n`` chunks and an image in which every chunk changed: chunk 0 was zero
    and got a block, the last became zero, the others got one block rewritten."""
    rng = random.Random(n)
    old = {block_at(i, j): rng.randbytes(SUB_BLOCK) for i in range(1, n) for j in (0, 10)}
    new = {k: v for k, v in old.items() if k < block_at(n - 1, 0)}
    new[block_at(0, 7)] = rng.randbytes(SUB_BLOCK)
    for i in range(1, n - 1):
        new[block_at(i, 3)] = rng.randbytes(SUB_BLOCK)
    src = tmp / "src.img"
    write_sparse(src, n, old)
    _, base, _ = capture_volume(pool, src)
    write_sparse(src, n, new)
    _, image, _ = capture_volume(pool, src)
    target = tmp / "target.img"
    write_sparse(target, n, old)
    return Change(base, image, target, src, n - 1, 2)


def test_a_restore_from_a_base_makes_a_few_requests_however_many_chunks_changed(
    reader: Reader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 48
    change = make_change(reader.pool, tmp_path, n)
    assert all(a != b for a, b in zip(change.base.chunks, change.image.chunks, strict=True))
    seen: list[int] = []
    source = reader.source()
    stats = restore_volume(
        source, change.image, change.target, base=change.base, progress=lambda d, _: seen.append(d)
    )
    assert same_file(change.target, change.wanted)
    # One request for the block digests of all 48 new and 47 old chunks, one for the blocks.
    assert sorted(reader.client.calls) == [("POST", "blocks"), ("POST", "subs")]
    assert stats.bytes_compared == 0
    assert stats.bytes_fetched == change.changed_blocks * SUB_BLOCK
    assert stats.bytes_written == (change.changed_blocks + change.zeroed_blocks) * SUB_BLOCK
    assert seen == sorted(seen) and seen[-1] == change.image.size

    # Smaller batches (as a larger change would need): requests grow with the batches.
    monkeypatch.setattr(volume, "BASE_WINDOW", 8)
    monkeypatch.setattr(volume, "BLOCK_BATCH", 8 * SUB_BLOCK)
    write_sparse(change.target, n, {})  # back to the base: rebuild it
    restore_volume(reader.pool, change.base, change.target)
    reader.client.calls.clear()
    restore_volume(source, change.image, change.target, base=change.base)
    assert same_file(change.target, change.wanted)
    kinds = [what for _, what in reader.client.calls]
    assert kinds.count("subs") == n // 8
    assert kinds.count("blocks") == -(-change.changed_blocks // 8)
    assert len(kinds) == n // 8 + -(-change.changed_blocks // 8)


def flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1 :]


def forge_block(raw: bytes) -> bytes:
    """Replace the last block of a blocks answer by another, with that block's digest."""
    frames = list(decode_frames(raw))
    fake = bytes(len(frames[-1][1]))
    frames[-1] = (hash_block(fake), fake)
    return encode_frames(frames)


def forge_subs(raw: bytes) -> bytes:
    """Replace a block digest of the first subs frame (as a server hiding a change would)."""
    head = 32 + 4 + 8
    return raw[:head] + hash_block(b"forged") + raw[head + 32 :]


LIES: dict[str, tuple[str, Callable[[bytes], bytes], str]] = {
    "subs: a digest flipped": ("subs", lambda raw: flip(raw, 32 + 4 + 8 + 5), "chunk id"),
    "subs: another length": ("subs", lambda raw: flip(raw, 32 + 4), "chunk id"),
    "subs: forged digest": ("subs", forge_subs, "chunk id"),
    "subs: one short": ("subs", lambda raw: raw[: -(32 + 4 + 8 + 64 * 32)], "incomplete"),
    "subs: truncated": ("subs", lambda raw: raw[:-1], "malformed"),
    "blocks: a byte flipped": ("blocks", lambda raw: flip(raw, len(raw) - 1), "its digest"),
    "blocks: forged block": ("blocks", forge_block, "not the one asked for"),
    "blocks: header forged": ("blocks", forge_subs, "chunk id"),
    "blocks: truncated": ("blocks", lambda raw: raw[:-10], "malformed"),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_a_lying_appliance_is_refused(reader: Reader, tmp_path: Path, lie: str) -> None:
    change = make_change(reader.pool, tmp_path, 4)
    endpoint, alter, says = LIES[lie]
    reader.client.tamper = lambda what, raw: alter(raw) if what == endpoint else raw
    with pytest.raises(ChunkCorrupt, match=says):
        restore_volume(reader.source(), change.image, change.target, base=change.base)


def test_the_single_chunk_reads_are_verified_too(reader: Reader, tmp_path: Path) -> None:
    change = make_change(reader.pool, tmp_path, 2)
    digest = change.base.chunks[1]
    assert digest is not None
    source = reader.source()
    subs = source.sub_digests(digest)
    assert subs == reader.pool.sub_digests(digest)
    assert source.read_blocks(digest, [3, 0]) == reader.pool.read_blocks(digest, [3, 0])
    reader.client.tamper = lambda what, raw: flip(raw, 50) if what == "subs" else raw
    with pytest.raises(ChunkCorrupt, match="chunk id"):
        source.sub_digests(digest)
    reader.client.tamper = lambda what, raw: flip(raw, len(raw) - 1)
    with pytest.raises(ChunkCorrupt, match="its digest"):
        source.read_blocks(digest, [3])


def test_a_corrupt_header_is_not_served(reader: Reader, tmp_path: Path) -> None:
    change = make_change(reader.pool, tmp_path, 2)
    digest = change.base.chunks[1]
    assert digest is not None
    path = chunk_file(reader.pool, digest)
    os.chmod(path, 0o600)
    blob = bytearray(path.read_bytes())
    blob[HEADER.size + 7] ^= 1  # in the first block digest
    path.write_bytes(bytes(blob))
    with pytest.raises(ChunkCorrupt, match="header does not match id"):
        reader.source().sub_digests_many([digest])
    with pytest.raises(ChunkCorrupt, match="header does not match id"):
        reader.source().read_blocks_many([(digest, [0])])


def test_large_asks_are_split_under_the_limits(reader: Reader, tmp_path: Path) -> None:
    change = make_change(reader.pool, tmp_path, 3)
    chunks = [c for c in change.image.chunks if c is not None]
    source = reader.source()
    digests = [chunks[k % len(chunks)] for k in range(SUBS_PER_REQUEST + 5)]
    assert source.sub_digests_many(digests) == reader.pool.sub_digests_many(digests)
    assert reader.client.calls == [("POST", "subs")] * 2
    reader.client.calls.clear()
    # 541 blocks: more than one request may carry; one chunk's list is spread over two.
    wants = [(chunks[k % len(chunks)], list(range(60))) for k in range(9)] + [(chunks[0], [5])]
    assert sum(len(js) for _, js in wants) > BLOCKS_PER_REQUEST
    assert source.read_blocks_many(wants) == reader.pool.read_blocks_many(wants)
    assert reader.client.calls == [("POST", "blocks")] * 2
    assert source.read_blocks_many([]) == [] and source.sub_digests_many([]) == []


def test_bad_batch_requests_are_4xx_saying_what_to_change(reader: Reader, tmp_path: Path) -> None:
    change = make_change(reader.pool, tmp_path, 2)
    cid = next(c for c in change.image.chunks if c is not None).hex()
    cases: list[tuple[str, Any, str]] = [
        ("subs", {"digests": [cid] * (SUBS_PER_REQUEST + 1)}, "at most 1024 chunks"),
        ("subs", {"digests": ["zz"]}, "not a hex digest"),
        ("subs", {"digests": ["ab" * 31]}, "64 hex digits"),
        ("subs", {"digests": [cid], "more": 1}, "more"),
        ("subs", {}, "digests"),
        ("missing", {"digests": [cid], "sizes": [1, 2]}, "2 sizes for 1 digests"),
        ("missing", {"digests": [cid], "sizes": [-1]}, "sizes"),
        ("missing", {"digests": [cid], "more": 1}, "more"),
        ("blocks", {"chunks": [{"digest": cid, "blocks": [64]}]}, "block index 64 out of range"),
        ("blocks", {"chunks": [{"digest": cid, "blocks": [-1]}]}, "block index -1 out of range"),
        ("blocks", {"chunks": [{"digest": cid, "blocks": ["x"]}]}, "blocks"),
        ("blocks", {"chunks": [{"digest": "12", "blocks": [0]}]}, "64 hex digits"),
        (
            "blocks",
            {"chunks": [{"digest": cid, "blocks": list(range(64))}] * 9},
            "at most 512 blocks (32 MiB) per request",
        ),
        (
            "blocks",
            {"chunks": [{"digest": cid, "blocks": []}] * (SUBS_PER_REQUEST + 1)},
            "at most 1024 chunks",
        ),
    ]
    for what, body, says in cases:
        status, message = reader.post(what, body)
        assert status == 422, (what, body, message)
        assert says in message, (what, body, message)
    resp = reader.api.client.post(f"/api/v1/sessions/{reader.session}/subs", json={"digests": []})
    assert resp.status_code == 401
    assert reader.post("subs", {"digests": []}) == (200, "")


def test_a_chunk_gone_is_missing_though_its_block_digests_are_remembered(
    reader: Reader, tmp_path: Path
) -> None:
    """The block digests the pool remembers never stand in for the chunk: once it is gone,
    an agent asking for them to send a delta is told it is missing (and sends the chunk
    whole), and a reader asking for its blocks fails instead of being served."""
    change = make_change(reader.pool, tmp_path, 2)
    digest = change.base.chunks[1]
    assert digest is not None
    source = reader.source()
    subs = source.sub_digests_many([digest])[0]  # now remembered
    chunk_file(reader.pool, digest).unlink()
    assert source.sub_digests_many([digest]) == [subs]  # what the id stands for
    resp = reader.api.client.get(
        f"/api/v1/sessions/{reader.session}/chunks/{digest.hex()}/subs",
        headers={"Authorization": f"Bearer {reader.token}"},
    )
    assert resp.json()["error"] == "ChunkMissing", resp.text
    with pytest.raises(ChunkMissing):
        source.read_blocks_many([(digest, [0])])
