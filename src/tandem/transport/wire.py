"""Wire formats shared by the chunk endpoints of appliances and the clients that call them.

A chunk batch is a byte stream of frames: ``digest (32 bytes) | length u32 LE | blob``,
where blob is the pool's chunk-file encoding (compressed at the sender, verified by the
receiver before it is stored). A receiver may parse the stream as it arrives
(``FrameReader``), so it can verify the first frames while later ones are on the wire.

The batched read endpoints of a session (``POST .../subs``, ``POST .../blocks``) answer in
the same frames. A *subs frame* is ``chunk id | length | u64le(chunk length) || block
digests`` (``encode_subs``): with the length, the reader checks the list against the id
(``digest.object_id``) before it trusts a block digest of it. The limits a request must keep
are ``SUBS_PER_REQUEST`` and ``BLOCKS_PER_REQUEST``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from tandem.errors import InvalidInput
from tandem.storage.digest import DIGEST_SIZE, SUB_BLOCK, split_digests

_LEN = struct.Struct("<I")
_U64 = struct.Struct("<Q")
MAX_FRAME = 64 * 1024 * 1024

SUBS_PER_REQUEST = 1024
"""Chunks one batched read request may name (an answer of at most ~2 MiB of digests)."""
BLOCK_BYTES_PER_REQUEST = 32 * 1024 * 1024
"""Block bytes one ``POST .../blocks`` may ask for (counted as 64 KiB per block)."""
BLOCKS_PER_REQUEST = BLOCK_BYTES_PER_REQUEST // SUB_BLOCK


def encode_frames(items: Iterable[tuple[bytes, bytes]]) -> bytes:
    # One join over the parts: each blob is copied once, not once more per frame.
    parts: list[bytes] = []
    for d, blob in items:
        parts += (d, _LEN.pack(len(blob)), blob)
    return b"".join(parts)


def encode_frames_of_parts(items: Iterable[tuple[bytes, int, list[bytes]]]) -> bytes:
    """``encode_frames`` of blobs given as (digest, length, parts whose concatenation is the
    blob): the same bytes, each part copied once into the body."""
    out: list[bytes] = []
    for d, length, parts in items:
        out += (d, _LEN.pack(length))
        out += parts
    return b"".join(out)


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


class FrameReader:
    """Cuts a chunk batch arriving in pieces of any size into frames, in order.

    ``feed`` returns the frames a piece completes, each as its digest and the parts of its
    blob (views of the pieces: ``b"".join(parts)`` is the blob, the one copy of its bytes,
    which the caller can make off the event loop); ``close`` raises if the stream ended
    inside a frame.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.total = 0
        self._head = bytearray()  # the current frame's header, while incomplete
        self._parts: list[memoryview] = []  # the current frame's blob so far
        self._need = 0  # blob bytes still missing; 0 while reading a header
        self._digest = b""

    def feed(self, piece: bytes) -> list[tuple[bytes, list[memoryview]]]:
        self.total += len(piece)
        if self.total > self.max_bytes:
            raise InvalidInput(detail=f"chunk batch larger than {self.max_bytes} bytes")
        out: list[tuple[bytes, list[memoryview]]] = []
        view = memoryview(piece)
        pos = 0
        head = DIGEST_SIZE + _LEN.size
        while pos < len(view):
            if self._need == 0:
                take = min(head - len(self._head), len(view) - pos)
                self._head += view[pos : pos + take]
                pos += take
                if len(self._head) < head:
                    break
                (length,) = _LEN.unpack_from(self._head, DIGEST_SIZE)
                if length > MAX_FRAME:
                    raise InvalidInput(detail="chunk batch: frame length out of range")
                self._digest = bytes(self._head[:DIGEST_SIZE])
                self._head.clear()
                self._need = length
                if length == 0:
                    out.append((self._digest, []))
                continue
            take = min(self._need, len(view) - pos)
            self._parts.append(view[pos : pos + take])
            pos += take
            self._need -= take
            if self._need == 0:
                out.append((self._digest, self._parts))
                self._parts = []
        return out

    def close(self) -> None:
        if self._head or self._need:
            raise InvalidInput(detail="chunk batch: truncated frame")


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


def encode_subs(length: int, subs: list[bytes]) -> bytes:
    """The payload of a subs frame: a chunk's length and its block digests."""
    return _U64.pack(length) + b"".join(subs)


def decode_subs(payload: bytes) -> tuple[int, list[bytes]]:
    """(length, block digests) of a subs frame's payload; raises InvalidInput if malformed
    (the caller still has to check them against the chunk id)."""
    if len(payload) < _U64.size or (len(payload) - _U64.size) % DIGEST_SIZE:
        raise InvalidInput(detail=f"a block digest list of {len(payload)} bytes")
    (length,) = _U64.unpack_from(payload)
    return length, split_digests(payload[_U64.size :])
