"""The read-only view a FUSE copy serves: inodes from the manifest, byte ranges across chunks
and holes, a bounded cache, a wrong-length chunk refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tandem.errors import ChunkCorrupt
from tandem.storage import tree
from tandem.storage.manifest import DIR, FILE, TreeEntry, TreeManifest
from tandem.storage.pool import ChunkPool
from tandem.storage.treeview import ROOT_INODE, SYNTHETIC_BASE, ChunkCache, TreeView

MiB = 1024 * 1024


def test_a_captured_tree_reads_back_by_inode_with_its_recorded_identity(tmp_path: Path) -> None:
    pool = ChunkPool.create(tmp_path / "pool")
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    data = os.urandom(3 * MiB + 17)
    (src / "d" / "big").write_bytes(data)
    with open(src / "holes", "wb") as fh:
        fh.truncate(8 * MiB)
        fh.seek(5 * MiB)
        fh.write(b"x" * 100)
    os.symlink("d/big", src / "ln")
    os.link(src / "d" / "big", src / "d" / "again")
    _, manifest, _ = tree.capture_tree(pool, src)

    fetched: list[bytes] = []

    def fetch(digest: bytes) -> bytes:
        fetched.append(digest)
        return pool.get(digest)

    view = TreeView(manifest, ChunkCache(fetch, capacity=64 * MiB))
    d = view.lookup(ROOT_INODE, b"d")
    assert d is not None and d.is_dir
    big = view.lookup(d.inode, b"big")
    assert big is not None and big.inode == os.stat(src / "d" / "big").st_ino
    again = view.lookup(d.inode, b"again")
    assert again is big and big.nlink == 2
    assert [n for n, _ in view.listing(ROOT_INODE)] == [b"d", b"holes", b"ln"]
    ln = view.lookup(ROOT_INODE, b"ln")
    assert ln is not None and ln.size == len(b"d/big")

    assert view.read(big.inode, 0, len(data) + 10) == data
    assert view.read(big.inode, MiB - 5, 2 * MiB) == data[MiB - 5 : 3 * MiB - 5]
    assert view.read(big.inode, len(data), 10) == b""
    holes = view.lookup(ROOT_INODE, b"holes")
    assert holes is not None
    assert view.read(holes.inode, 5 * MiB - 4, 8) == b"\0" * 4 + b"xxxx"
    assert view.read(holes.inode, 0, 4096) == b"\0" * 4096
    n = len(fetched)
    view.read(big.inode, 0, len(data))
    assert len(fetched) == n  # served from the cache


def test_the_cache_stays_within_its_capacity() -> None:
    blobs = {bytes([i]) * 32: os.urandom(MiB) for i in range(10)}
    cache = ChunkCache(lambda d: blobs[d], capacity=3 * MiB)
    for digest in blobs:
        cache.get(digest)
    assert cache.held <= 3 * MiB and cache.fetched == 10 * MiB
    cache.get(bytes([9]) * 32)
    assert cache.hits == 1


def test_clashing_or_unusable_inode_numbers_get_numbers_of_their_own() -> None:
    entries = [
        TreeEntry("a", FILE, 0o644, ino=7),
        TreeEntry("b", FILE, 0o644, ino=7),
        TreeEntry("c", DIR, 0o755, ino=1),
        TreeEntry("c/e", FILE, 0o644, ino=9),
    ]
    view = TreeView(TreeManifest(entries), ChunkCache(lambda d: b""))
    inodes = {name: node.inode for name, node in view.listing(ROOT_INODE)}
    assert all(i > SYNTHETIC_BASE for i in inodes.values())
    c = view.lookup(ROOT_INODE, b"c")
    assert c is not None
    e = view.lookup(c.inode, b"e")
    assert e is not None and e.inode == 9


def test_a_chunk_of_the_wrong_length_is_never_served() -> None:
    digest = b"\1" * 32
    entry = TreeEntry("f", FILE, 0o644, size=10, chunks=[(digest, 10)], ino=5)
    view = TreeView(TreeManifest([entry]), ChunkCache(lambda d: b"short"))
    with pytest.raises(ChunkCorrupt):
        view.read(5, 0, 10)
