"""A read-only view of a file-tree image: the inodes, directory listings and file bytes a
file system presents, read from the image's manifest and its chunks on demand.

``TreeView`` answers by inode number (what FUSE asks by); ``read`` fetches only the chunks
that overlap the range asked for, through a bounded in-memory ``ChunkCache`` whose fetcher
returns verified chunk bytes (``RemoteChunkSource.get`` checks every chunk against its id,
as every read of the pool does). Nothing here writes: the writable copy is a copy-on-write
layer above this view (``agent.fusemount``).

Invariants
- Inode numbers are the ones the image recorded (``TreeEntry.ino``) where they are usable:
  nonzero, not the root's (1), below 2**63 and not claimed by another entry; a hard link
  (``h``) shares its target's. Files then keep the identity a later capture compares
  against the base manifest (size, mtime, ctime, inode), so a capture of the presented
  copy reads only the files written since (``storage.tree._unchanged``). Other entries get
  numbers above ``SYNTHETIC_BASE``.
- A chunk whose bytes do not have the length the manifest says is refused (ChunkCorrupt),
  never served; the cache holds at most ``capacity`` bytes (one chunk larger than that is
  served and not kept).
"""

from __future__ import annotations

import bisect
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem.errors import ChunkCorrupt
from tandem.storage.manifest import DIR, FIFO, FILE, HARDLINK, SYMLINK, TreeEntry, TreeManifest

ROOT_INODE = 1
SYNTHETIC_BASE = 1 << 62
MAX_INODE = 1 << 63
DEFAULT_CACHE = 256 * 1024 * 1024

_TYPE_BITS = {FILE: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK, FIFO: stat.S_IFIFO}


@dataclass
class Node:
    """One inode of the view."""

    inode: int
    entry: TreeEntry
    nlink: int = 1
    children: dict[bytes, int] = field(default_factory=dict)  # for directories
    offsets: list[int] = field(default_factory=list)  # start of each chunk, for files

    @property
    def mode(self) -> int:
        return _TYPE_BITS[self.entry.type] | (self.entry.mode & 0o7777)

    @property
    def size(self) -> int:
        if self.entry.type == SYMLINK:
            return len(self.entry.target.encode("utf-8", "surrogateescape"))
        return self.entry.size if self.entry.type == FILE else 0

    @property
    def is_dir(self) -> bool:
        return self.entry.type == DIR


class ChunkCache:
    """Verified chunk bytes kept in memory, least recently used first out, at most
    ``capacity`` bytes. ``fetched`` counts the bytes the fetcher returned (what crossed
    the wire), ``hits`` the reads answered from the cache."""

    def __init__(self, fetch: Callable[[bytes], bytes], capacity: int = DEFAULT_CACHE) -> None:
        self._fetch = fetch
        self.capacity = capacity
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self._loading: dict[bytes, threading.Lock] = {}
        self.fetched = 0
        self.fetches = 0
        self.hits = 0

    def get(self, digest: bytes) -> bytes:
        with self._lock:
            data = self._items.get(digest)
            if data is not None:
                self._items.move_to_end(digest)
                self.hits += 1
                return data
            loading = self._loading.setdefault(digest, threading.Lock())
        with loading:  # one fetch of a chunk at a time; the others wait for it
            with self._lock:
                data = self._items.get(digest)
                if data is not None:
                    self.hits += 1
                    return data
            data = self._fetch(digest)
            with self._lock:
                self._loading.pop(digest, None)
                self.fetched += len(data)
                self.fetches += 1
                if len(data) <= self.capacity:
                    self._items[digest] = data
                    self._held += len(data)
                    while self._held > self.capacity:
                        _, old = self._items.popitem(last=False)
                        self._held -= len(old)
            return data

    @property
    def held(self) -> int:
        return self._held


class TreeView:
    """The inodes of a tree manifest; ``read`` serves file bytes through ``cache``."""

    def __init__(self, manifest: TreeManifest, cache: ChunkCache) -> None:
        self.cache = cache
        root_meta = manifest.meta.get("root") if isinstance(manifest.meta, dict) else None
        root = TreeEntry("", DIR, 0o755)
        if isinstance(root_meta, dict):
            for key in ("mode", "uid", "gid", "mtime_ns"):
                value = root_meta.get(key)
                if isinstance(value, int):
                    setattr(root, key, value & 0o7777 if key == "mode" else value)
            root.ctime_ns = root.mtime_ns
        self.nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, root)}
        self._by_path: dict[str, int] = {"": ROOT_INODE}
        claimed = self._usable_inodes(manifest.entries)
        synthetic = SYNTHETIC_BASE
        for e in manifest.entries:
            parent_path, _, name = e.path.rpartition("/")
            parent = self._by_path.get(parent_path)
            if parent is None or not self.nodes[parent].is_dir:
                continue  # decode_manifest sorts parents first; an orphan is not shown
            if e.type == HARDLINK:
                inode = self._by_path.get(e.target, 0)
                if inode == 0 or self.nodes[inode].entry.type != FILE:
                    continue
                self.nodes[inode].nlink += 1
            else:
                if e.path in claimed:
                    inode = e.ino
                else:
                    synthetic += 1
                    inode = synthetic
                node = Node(inode, e)
                if e.type == FILE:
                    pos, node.offsets = 0, []
                    for _, length in e.chunks:
                        node.offsets.append(pos)
                        pos += length
                self.nodes[inode] = node
            self._by_path[e.path] = inode
            self.nodes[parent].children[name.encode("utf-8", "surrogateescape")] = inode

    @staticmethod
    def _usable_inodes(entries: list[TreeEntry]) -> set[str]:
        """Paths whose recorded inode number the view can use as its own."""
        owners: dict[int, list[str]] = {}
        for e in entries:
            if e.type != HARDLINK and ROOT_INODE < e.ino < SYNTHETIC_BASE:
                owners.setdefault(e.ino, []).append(e.path)
        return {paths[0] for paths in owners.values() if len(paths) == 1}

    def node(self, inode: int) -> Node | None:
        return self.nodes.get(inode)

    def lookup(self, parent: int, name: bytes) -> Node | None:
        directory = self.nodes.get(parent)
        if directory is None:
            return None
        inode = directory.children.get(name)
        return self.nodes[inode] if inode is not None else None

    def listing(self, inode: int) -> list[tuple[bytes, Node]]:
        """A directory's entries, sorted by name (a stable order for readdir offsets)."""
        directory = self.nodes[inode]
        return [(name, self.nodes[i]) for name, i in sorted(directory.children.items())]

    def read(self, inode: int, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of file ``inode`` from ``offset`` (fewer at its end)."""
        node = self.nodes[inode]
        end = min(node.entry.size, offset + size)
        if offset >= end:
            return b""
        out = bytearray()
        k = bisect.bisect_right(node.offsets, offset) - 1
        pos = offset
        while pos < end:
            digest, length = node.entry.chunks[k]
            start = node.offsets[k]
            lo, hi = pos - start, min(length, end - start)
            if digest is None:
                out += bytes(hi - lo)
            else:
                data = self.cache.get(digest)
                if len(data) != length:
                    raise ChunkCorrupt(
                        digest=digest.hex(),
                        pool="(the image's manifest)",
                        reason=f"{len(data)} bytes where the manifest says {length}",
                    )
                out += data[lo:hi]
            pos = start + hi
            k += 1
        return bytes(out)
