"""Digests used by the data plane.

A chunk's identity is the BLAKE3-256 of its plaintext. Each chunk also carries the BLAKE3-256
digests of its 64 KiB sub-blocks, so transfer and restore can work at 64 KiB granularity.
"""

from __future__ import annotations

import blake3

DIGEST_SIZE = 32
SUB_BLOCK = 64 * 1024


def hash_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """BLAKE3-256 of ``data`` (the binding releases the GIL on large inputs)."""
    return blake3.blake3(data).digest()


def hash_sub_blocks(data: bytes | bytearray | memoryview) -> list[bytes]:
    """BLAKE3-256 of each 64 KiB sub-block of ``data`` (the last may be shorter)."""
    view = memoryview(data)
    return [
        blake3.blake3(view[off : off + SUB_BLOCK]).digest()
        for off in range(0, len(view), SUB_BLOCK)
    ]


def to_hex(digest: bytes) -> str:
    return digest.hex()


def from_hex(text: str) -> bytes:
    """Parse a 64-hex-digit digest; raises ValueError on anything else."""
    raw = bytes.fromhex(text)
    if len(raw) != DIGEST_SIZE:
        raise ValueError(f"a digest has {DIGEST_SIZE * 2} hex digits, got {len(text)}")
    return raw
