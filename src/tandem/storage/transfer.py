"""Choosing how a chunk travels to a receiver that holds an earlier image.

DESIGN "Finding what to send": the receiver answers which chunks it lacks; for each, the
sender picks the smallest self-checking encoding the receiver can decode:

1. the chunk as stored, when it is a delta whose base the receiver holds;
2. a delta computed now against ``prev`` (the chunk at the same offset of the receiver's
   previous image) when at most half of its 64 KiB sub-blocks changed, each block XORed
   with its old version so a small write inside a block costs about its own size;
3. the whole chunk, compressed.

Every encoding carries the chunk's digest and sub-block digests; the receiver rebuilds and
verifies it before storing (``PoolWriter.put_encoded``), so a wrong choice fails loudly
rather than storing bad data.
"""

from __future__ import annotations

from collections.abc import Callable

from tandem.errors import ChunkCorrupt, ChunkMissing
from tandem.storage.manifest import Manifest, VolumeManifest
from tandem.storage.pool import CODEC_DELTA, ChunkPool, delta_pays, encode_delta, parse_header


def chunks_to_offer(new: Manifest, prev: Manifest | None) -> list[bytes]:
    """Chunk ids of ``new`` that ``prev`` does not name, in manifest order, no repeats.

    This is the local manifest diff: unchanged data costs no round trip at all.
    """
    known = prev.chunk_ids() if prev is not None else set()
    out: dict[bytes, None] = {}
    if isinstance(new, VolumeManifest):
        ids: list[bytes] = [c for c in new.chunks if c is not None]
    else:
        ids = [d for e in new.entries for d, _ in e.chunks if d is not None]
    for d in ids:
        if d not in known:
            out.setdefault(d, None)
    return list(out)


def previous_at_same_offset(new: Manifest, prev: Manifest | None) -> dict[bytes, bytes]:
    """For a volume: chunk id in ``new`` -> the chunk ``prev`` had at the same offset."""
    if not isinstance(new, VolumeManifest) or not isinstance(prev, VolumeManifest):
        return {}
    out: dict[bytes, bytes] = {}
    for i, c in enumerate(new.chunks):
        p = prev.chunks[i] if i < len(prev.chunks) else None
        if c is not None and p is not None and c != p:
            out.setdefault(c, p)
    return out


def encode_for_receiver(
    pool: ChunkPool,
    digest: bytes,
    receiver_has: Callable[[bytes], bool],
    prev: bytes | None = None,
) -> bytes:
    """The chunk-file bytes to send for ``digest`` (see the module docstring)."""
    stored = pool.get_stored(digest)
    info = parse_header(stored, digest, str(pool.root))
    if info.codec != CODEC_DELTA and prev is None:
        return stored  # self-contained already: read once, sent as it is
    if info.codec == CODEC_DELTA and info.base is not None and receiver_has(info.base):
        return stored
    if prev is not None and receiver_has(prev):
        try:
            prev_info = pool.info(prev)
        except (ChunkMissing, ChunkCorrupt):
            prev_info = None
        # A delta rebuilds a chunk of its base's length: same length, or send it whole.
        if prev_info is not None and prev_info.plain_len == info.plain_len:
            prev_subs = prev_info.subs
            changed = [
                j for j, (a, b) in enumerate(zip(info.subs, prev_subs, strict=True)) if a != b
            ]
            if delta_pays(len(changed), len(info.subs)):
                blocks = dict(zip(changed, pool.read_blocks(digest, changed), strict=True))
                old = dict(zip(changed, pool.read_blocks(prev, changed), strict=True))
                return encode_delta(prev, 0, info.plain_len, info.subs, blocks, old)
    return stored if info.codec != CODEC_DELTA else pool.get_raw(digest)
