"""Digests used by the data plane.

Every 64 KiB sub-block of an object (a chunk, a manifest) has a BLAKE3-256 *block digest*.
The object's identity is the BLAKE3-256 of its length and its block digests in order (a
two-level hash tree, like BLAKE3's own but with 64 KiB leaves we can see):

    id = BLAKE3(b"tandem/object\\0" || u64le(length) || block_0 || block_1 || ...)

Two things follow, and the data plane is built on them:

- A chunk header lists its block digests; whoever knows the chunk's id can check that list
  with one small hash (``object_id``) and then check any single 64 KiB block on its own. A
  restore or a delta can so read and verify a few blocks of a chunk without decoding the rest.
- The id of a chunk with a few blocks changed follows from the old block digests and the
  new blocks alone: a capture of a virtual copy hashes what was written, not 4 MiB per chunk.

Hashing data once yields both the id and the block digests (``hash_object``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import blake3

DIGEST_SIZE = 32
SUB_BLOCK = 64 * 1024
_DOMAIN = b"tandem/object\0"
_LENGTH = struct.Struct("<Q")


def hash_block(data: bytes | bytearray | memoryview) -> bytes:
    """The BLAKE3-256 of one 64 KiB sub-block (or a shorter last one)."""
    return blake3.blake3(data).digest()


def hash_sub_blocks(data: bytes | bytearray | memoryview) -> list[bytes]:
    """The block digest of each 64 KiB sub-block of ``data`` (the last may be shorter)."""
    view = memoryview(data)
    return [
        blake3.blake3(view[off : off + SUB_BLOCK]).digest()
        for off in range(0, len(view), SUB_BLOCK)
    ]


def object_id(subs: list[bytes], length: int) -> bytes:
    """The id of an object of ``length`` bytes whose block digests are ``subs``."""
    return blake3.blake3(b"".join([_DOMAIN, _LENGTH.pack(length), *subs])).digest()


_TABLES: dict[int, Callable[[bytes], tuple[bytes, ...]]] = {}
"""``struct`` unpackers of tables of up to a chunk's 64 digests, by count: one C call
where slicing costs a Python step per digest (every chunk header read goes through here:
captures, restores, replication, GC's marking)."""


def split_digests(table: bytes) -> list[bytes]:
    """The digests of ``table``, block digests laid end to end (as headers and frames
    carry them)."""
    n, rest = divmod(len(table), DIGEST_SIZE)
    if rest or n > 64:
        return [table[i : i + DIGEST_SIZE] for i in range(0, len(table), DIGEST_SIZE)]
    unpack = _TABLES.get(n)
    if unpack is None:
        unpack = _TABLES[n] = struct.Struct(f"{DIGEST_SIZE}s" * n).unpack
    return list(unpack(table))


def hash_object(data: bytes | bytearray | memoryview) -> tuple[bytes, list[bytes]]:
    """(id, block digests) of ``data``, in one pass over it."""
    if 0 < len(data) <= SUB_BLOCK:  # most chunks of a tree of small files: one block
        sub = blake3.blake3(data).digest()
        head = _DOMAIN + _LENGTH.pack(len(data))
        return blake3.blake3(head + sub).digest(), [sub]
    subs = hash_sub_blocks(data)
    return object_id(subs, len(data)), subs


def hash_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """The id of ``data`` as a chunk or manifest (see the module docstring)."""
    return hash_object(data)[0]


def to_hex(digest: bytes) -> str:
    return digest.hex()


def from_hex(text: str) -> bytes:
    """Parse a 64-hex-digit digest; raises ValueError on anything else."""
    raw = bytes.fromhex(text)
    if len(raw) != DIGEST_SIZE:
        raise ValueError(f"a digest has {DIGEST_SIZE * 2} hex digits, got {len(text)}")
    return raw
