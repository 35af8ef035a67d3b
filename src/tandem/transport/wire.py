"""Wire formats shared by the chunk endpoints of appliances and the clients that call them.

A chunk batch is a byte stream of frames: ``digest (32 bytes) | length u32 LE | blob``,
where blob is the pool's chunk-file encoding (compressed at the sender, verified by the
receiver before it is stored).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from tandem.errors import InvalidInput
from tandem.storage.digest import DIGEST_SIZE

_LEN = struct.Struct("<I")
MAX_FRAME = 64 * 1024 * 1024


def encode_frames(items: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"".join(d + _LEN.pack(len(blob)) + blob for d, blob in items)


def decode_frames(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    view = memoryview(data)
    pos = 0
    head = DIGEST_SIZE + _LEN.size
    while pos < len(view):
        if len(view) - pos < head:
            raise InvalidInput(detail="chunk batch: truncated frame header")
        digest = bytes(view[pos : pos + DIGEST_SIZE])
        (length,) = _LEN.unpack_from(view, pos + DIGEST_SIZE)
        pos += head
        if length > MAX_FRAME or pos + length > len(view):
            raise InvalidInput(detail="chunk batch: frame length out of range")
        yield digest, bytes(view[pos : pos + length])
        pos += length


def encode_digests(digests: Iterable[bytes]) -> list[str]:
    return [d.hex() for d in digests]


def decode_digests(items: Iterable[str]) -> list[bytes]:
    out = []
    for text in items:
        try:
            raw = bytes.fromhex(text)
        except ValueError as exc:
            raise InvalidInput(detail=f"not a hex digest: {text[:80]!r}") from exc
        if len(raw) != DIGEST_SIZE:
            raise InvalidInput(detail=f"a digest has 64 hex digits: {text[:80]!r}")
        out.append(raw)
    return out
