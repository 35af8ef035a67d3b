"""Choosing what crosses the wire: manifest diff and per-chunk encodings."""

from __future__ import annotations

import random
from pathlib import Path

from tandem.storage.digest import SUB_BLOCK
from tandem.storage.manifest import VolumeManifest
from tandem.storage.pool import CODEC_DELTA, ChunkPool, parse_header
from tandem.storage.transfer import chunks_to_offer, encode_for_receiver, previous_at_same_offset
from tandem.storage.volume import capture_volume

MiB = 1024 * 1024


def _two_captures(pool: ChunkPool, tmp_path: Path) -> tuple[VolumeManifest, VolumeManifest]:
    rng = random.Random(9)
    src = tmp_path / "disk.img"
    src.write_bytes(rng.randbytes(12 * MiB))
    mid, m1, _ = capture_volume(pool, src)
    with open(src, "r+b") as fh:
        fh.seek(5 * MiB)
        fh.write(rng.randbytes(SUB_BLOCK))
    _, m2, _ = capture_volume(pool, src, base=m1, base_id=mid)
    return m1, m2


def test_offer_only_what_the_previous_image_lacks(pool: ChunkPool, tmp_path: Path) -> None:
    m1, m2 = _two_captures(pool, tmp_path)
    assert chunks_to_offer(m2, None) == [c for c in m2.chunks if c is not None]
    assert chunks_to_offer(m2, m1) == [m2.chunks[1]]
    assert previous_at_same_offset(m2, m1) == {m2.chunks[1]: m1.chunks[1]}


def test_a_changed_chunk_travels_as_its_changed_blocks(pool: ChunkPool, tmp_path: Path) -> None:
    m1, m2 = _two_captures(pool, tmp_path)
    changed = m2.chunks[1]
    assert changed is not None
    receiver = ChunkPool.create(tmp_path / "receiver")
    with receiver.writer() as w:
        for c in m1.chunks:
            assert c is not None
            w.put_encoded(c, pool.get_raw(c))
    blob = encode_for_receiver(pool, changed, receiver.has, m1.chunks[1])
    assert len(blob) < 2 * SUB_BLOCK  # one 64 KiB block and headers, not 4 MiB
    assert parse_header(blob, changed, "test").codec == CODEC_DELTA
    with receiver.writer() as w:
        w.put_encoded(changed, blob)
    assert receiver.get(changed) == pool.get(changed)


def test_a_receiver_without_the_base_gets_the_whole_chunk(pool: ChunkPool, tmp_path: Path) -> None:
    _, m2 = _two_captures(pool, tmp_path)
    changed = m2.chunks[1]
    assert changed is not None
    blob = encode_for_receiver(pool, changed, lambda d: False, None)
    empty = ChunkPool.create(tmp_path / "empty")
    with empty.writer() as w:
        w.put_encoded(changed, blob)
    assert empty.get(changed) == pool.get(changed)


def test_a_chunk_of_another_length_travels_whole(pool: ChunkPool, tmp_path: Path) -> None:
    """A volume that grew inside its last 64 KiB block: same number of sub-blocks, but a
    delta over the old last chunk could not rebuild it, so it is sent whole."""
    rng = random.Random(4)
    src = tmp_path / "disk.img"
    src.write_bytes(rng.randbytes(4 * MiB + SUB_BLOCK + 1))
    mid, m1, _ = capture_volume(pool, src)
    with open(src, "ab") as fh:
        fh.write(b"x")
    _, m2, _ = capture_volume(pool, src, base=m1, base_id=mid)
    grown, old = m2.chunks[1], m1.chunks[1]
    assert grown is not None and old is not None and grown != old
    assert pool.get(grown) == src.read_bytes()[4 * MiB :]
    receiver = ChunkPool.create(tmp_path / "receiver")
    with receiver.writer() as w:
        w.put_encoded(old, pool.get_raw(old))
    blob = encode_for_receiver(pool, grown, receiver.has, old)
    assert parse_header(blob, grown, "test").codec != CODEC_DELTA
    with receiver.writer() as w:
        w.put_encoded(grown, blob)
    assert receiver.get(grown) == pool.get(grown)


def test_a_plain_delta_from_an_agent_is_kept_xored(pool: ChunkPool, tmp_path: Path) -> None:
    """An agent sends changed blocks whole (it lacks the old ones); the receiver re-encodes
    them XORed against its base, so a 4 KiB write is not stored or re-sent as 64 KiB."""
    import os

    from tandem.storage.digest import hash_bytes, hash_sub_blocks
    from tandem.storage.pool import encode_delta

    base = os.urandom(4 * MiB)
    with pool.writer() as w:
        base_id = w.put(base).digest
    new = bytearray(base)
    new[SUB_BLOCK + 100 : SUB_BLOCK + 4196] = os.urandom(4096)
    plain = encode_delta(
        base_id, 0, len(new), hash_sub_blocks(new), {1: bytes(new[SUB_BLOCK : 2 * SUB_BLOCK])}
    )
    assert len(plain) > SUB_BLOCK
    digest = hash_bytes(new)
    with pool.writer() as w:
        stored = w.put_encoded(digest, plain)
    assert stored.stored < 3 * 4096 + 4096  # headers and the 4 KiB, not 64 KiB
    assert pool.get(digest) == bytes(new)
