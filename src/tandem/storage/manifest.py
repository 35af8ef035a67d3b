"""Manifests: what an image is made of.

A manifest is stored in the pool as an object whose id is the BLAKE3-256 of its encoding:
msgpack, then zstd (the pool's chunk-file codec). Version 1 encodings::

    volume: {"format": 1, "kind": "volume", "size": N, "chunk_size": 4 MiB,
             "chunks": [digest | None, ...], "meta": {...}}
        chunks[i] covers bytes [i*chunk_size, min(size, (i+1)*chunk_size)); None is an
        all-zero extent that is not stored.

    tree:   {"format": 1, "kind": "tree", "entries": [entry, ...], "meta": {...}}
        entry = [path, type, mode, uid, gid, mtime_ns, size, target, chunks, ctime_ns, ino]
        path    POSIX path relative to the tree root ("" is never used; the root is implied)
        type    "f" file, "d" dir, "l" symlink, "h" hard link to the earlier file ``target``,
                "p" fifo
        chunks  [[digest | None, length], ...] for files; None is a hole (sparse zeros)

Entries are sorted by path so that parents precede children. Paths are checked when a
manifest is decoded (no absolute paths, no "." or ".." components, no NUL); restores check
again against the target (symlink escapes).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from tandem.errors import ManifestInvalid, UnsafePath
from tandem.storage.digest import DIGEST_SIZE

if TYPE_CHECKING:
    from tandem.storage.pool import ChunkPool, ChunkWriter

FORMAT = 1
VOLUME_CHUNK = 4 * 1024 * 1024

FILE = "f"
DIR = "d"
SYMLINK = "l"
HARDLINK = "h"
FIFO = "p"
ENTRY_TYPES = frozenset({FILE, DIR, SYMLINK, HARDLINK, FIFO})


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector around bulk work on manifests.

    Decoding, encoding or capturing a tree allocates one container per entry and keeps them
    all, which makes every generation-2 collection walk the whole manifest: a third of a
    re-capture's time on 50,000 files, and most of a 50,000-entry decode. Entries form no
    reference cycles, so nothing is left for the collector meanwhile; it is re-enabled
    only if it was enabled (and nested pauses leave it to the outermost).

    What the work allocated is then moved to the oldest generation in one step (freeze,
    unfreeze: a splice of lists, no traversal): left in the youngest, all of it would be
    walked by the first young collection after the pause, a few tenths of a second for a
    50,000-entry manifest, at the end of every capture and of every commit of one. Not in
    a process that froze its start-up heap (``freeze_heap``): unfreezing
    would hand those objects back to every full collection, the list routes' p99.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            if not _heap_frozen:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


_heap_frozen = False  # set by ``freeze_heap``; ``gc.get_freeze_count()`` walks the frozen


def freeze_heap() -> None:
    """Collect, then freeze every object alive now, for the life of the process: a
    daemon's start-up heap, which full collections then never walk again (see
    ``appliance.daemon.settle_heap``). ``gc_paused`` leaves it frozen from then on. The
    flag, not ``gc.get_freeze_count()``, tells it so: that count walks every frozen object
    (25 ms at the appliance's 180,000), once per manifest decoded, which was most of a
    collection's marking time (~25 ms a manifest at 10,000 images)."""
    global _heap_frozen
    gc.collect()
    gc.freeze()
    _heap_frozen = True


def check_relpath(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path, else raise UnsafePath."""
    if not path or "\x00" in path:
        raise UnsafePath(path=path, reason="empty or contains NUL")
    if path.startswith("/"):
        raise UnsafePath(path=path, reason="absolute path")
    # Fast path (one per entry of every manifest decoded): a path with no empty component
    # and no component starting with "." needs no split.
    if "//" in path or path.endswith("/") or "/." in "/" + path:
        parts = path.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise UnsafePath(path=path, reason="'.', '..' or empty component")
    return path


@dataclass
class VolumeManifest:
    size: int
    chunks: list[bytes | None]
    chunk_size: int = VOLUME_CHUNK
    meta: dict[str, Any] = field(default_factory=dict)

    kind = "volume"

    def chunk_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index`` in the volume."""
        off = index * self.chunk_size
        return off, min(self.chunk_size, self.size - off)

    def chunk_ids(self) -> set[bytes]:
        return {c for c in self.chunks if c is not None}


@dataclass(slots=True)
class TreeEntry:
    path: str
    type: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    target: str = ""
    chunks: list[tuple[bytes | None, int]] = field(default_factory=list)
    ctime_ns: int = 0
    ino: int = 0

    def to_wire(self) -> tuple[Any, ...]:
        # msgpack packs a tuple as an array, like a list: the chunk pairs go as they are
        # (no list per pair), and the encoding is the same bytes.
        return (
            self.path,
            self.type,
            self.mode,
            self.uid,
            self.gid,
            self.mtime_ns,
            self.size,
            self.target,
            self.chunks,
            self.ctime_ns,
            self.ino,
        )

    @classmethod
    def from_wire(cls, raw: Any) -> TreeEntry:
        if not isinstance(raw, list) or len(raw) != 11:
            raise ValueError("entry is not an 11-item list")
        path, typ, mode, uid, gid, mtime, size, target, chunks, ctime, ino = raw
        if typ not in ENTRY_TYPES:
            raise ValueError(f"unknown entry type {typ!r}")
        check_relpath(path)
        parsed: list[tuple[bytes | None, int]] = []
        for item in chunks:
            d, n = item
            if d is not None and (not isinstance(d, bytes) or len(d) != DIGEST_SIZE):
                raise ValueError("bad chunk digest")
            if not isinstance(n, int) or n < 0:
                raise ValueError("bad chunk length")
            parsed.append((d, n))
        for v in (mode, uid, gid, mtime, size, ctime, ino):
            if not isinstance(v, int):
                raise ValueError("non-integer metadata")
        if sum(n for _, n in parsed) != (size if typ == FILE else 0):
            raise ValueError(f"chunk lengths do not add up to the size of {path!r}")
        return cls(path, typ, mode, uid, gid, mtime, size, str(target), parsed, ctime, ino)


@dataclass
class TreeManifest:
    entries: list[TreeEntry]
    meta: dict[str, Any] = field(default_factory=dict)

    kind = "tree"

    def chunk_ids(self) -> set[bytes]:
        return {d for e in self.entries for d, _ in e.chunks if d is not None}

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries if e.type == FILE)


Manifest = VolumeManifest | TreeManifest


@gc_paused()
def encode_manifest(manifest: Manifest) -> bytes:
    """The msgpack encoding (the pool compresses it when storing)."""
    if isinstance(manifest, VolumeManifest):
        doc: dict[str, Any] = {
            "format": FORMAT,
            "kind": "volume",
            "size": manifest.size,
            "chunk_size": manifest.chunk_size,
            "chunks": manifest.chunks,
            "meta": manifest.meta,
        }
    else:
        doc = {
            "format": FORMAT,
            "kind": "tree",
            "entries": [e.to_wire() for e in manifest.entries],
            "meta": manifest.meta,
        }
    return msgpack.packb(doc, use_bin_type=True)  # type: ignore[no-any-return]


@gc_paused()
def decode_manifest(blob: bytes, digest: bytes = b"") -> Manifest:
    """Parse and validate a manifest encoding; raises ManifestInvalid (or UnsafePath)."""
    label = digest.hex() or "(unnamed)"
    try:
        doc = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError) as exc:
        raise ManifestInvalid(digest=label, reason=f"undecodable: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestInvalid(digest=label, reason="unknown format")
    meta = doc.get("meta") or {}
    try:
        if doc.get("kind") == "volume":
            size, chunk_size, chunks = doc["size"], doc["chunk_size"], doc["chunks"]
            if not isinstance(size, int) or size < 0 or not isinstance(chunk_size, int):
                raise ValueError("bad size")
            if chunk_size <= 0 or len(chunks) != -(-size // chunk_size):
                raise ValueError("chunk count does not match the size")
            for c in chunks:
                if c is not None and (not isinstance(c, bytes) or len(c) != DIGEST_SIZE):
                    raise ValueError("bad chunk digest")
            return VolumeManifest(size=size, chunks=list(chunks), chunk_size=chunk_size, meta=meta)
        if doc.get("kind") == "tree":
            entries = [TreeEntry.from_wire(e) for e in doc["entries"]]
            return TreeManifest(entries=entries, meta=meta)
    except UnsafePath:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestInvalid(digest=label, reason=str(exc)) from exc
    raise ManifestInvalid(digest=label, reason=f"unknown kind {doc.get('kind')!r}")


def volume_chunks(blob: bytes) -> list[bytes | None] | None:
    """The chunk ids of a volume manifest's encoding, in order; None for any other kind
    (a tree's entries are not read: its kind comes first) or a malformed one."""
    up = msgpack.Unpacker(raw=False, strict_map_key=False)
    up.feed(blob)
    try:
        for _ in range(up.read_map_header()):
            key = up.unpack()
            if key == "kind":
                if up.unpack() != "volume":
                    return None
            elif key == "chunks":
                chunks = up.unpack()
                if isinstance(chunks, list) and all(
                    c is None or (isinstance(c, bytes) and len(c) == DIGEST_SIZE) for c in chunks
                ):
                    return chunks
                return None
            else:
                up.skip()
    except (msgpack.UnpackException, ValueError):
        return None
    return None


@gc_paused()
def stored_chunk_ids(blob: bytes) -> set[bytes]:
    """The chunk ids named by the encoding of a manifest this pool stored (read back and
    verified against its id), without building its entries: a fraction of
    ``decode_manifest``'s time for a large tree. Never use it on a blob from the wire."""
    doc = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    if doc.get("kind") == "volume":
        return {c for c in doc["chunks"] if c is not None}
    return {d for e in doc["entries"] for d, _ in e[8] if d is not None}


def all_chunk_ids(manifests: Iterable[Manifest]) -> set[bytes]:
    out: set[bytes] = set()
    for m in manifests:
        out |= m.chunk_ids()
    return out


def load_manifest(pool: ChunkPool, digest: bytes) -> Manifest:
    """Read, verify and decode manifest ``digest`` from ``pool``."""
    return decode_manifest(pool.get_manifest_blob(digest), digest)


def store_manifest(writer: ChunkWriter, manifest: Manifest) -> bytes:
    """Commit ``manifest`` through ``writer`` after its chunks are durable; returns its id."""
    return writer.commit_manifest(encode_manifest(manifest))
