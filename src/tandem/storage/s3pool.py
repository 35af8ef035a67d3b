"""A chunk pool on an S3-compatible object store, behind ``ChunkPool``'s interface.

Capture, restore, transfer and replication use a pool through ``ChunkPool``'s reading
methods and ``PoolWriter``'s writing ones; ``S3Pool`` and ``S3PoolWriter`` keep those and
change only where the bytes live, so the engines run on it unchanged. The chunk codec,
verification, deltas and their checks are ``ChunkPool``'s and ``PoolWriter``'s own code.

Layout in the bucket (under the URL's prefix)::

    pool.json               {"format": 3, "kind": "tandem-pool", "store": "s3"}
    packs/<id>.pack         a pack object: the pack-file format of ``storage.packs``
    packs/<id>.idx          its index object, written after the pack (the commit point)
    manifests/<hex>         manifest objects (the chunk-file format, no sub-block digests)

and in the local cache directory (any directory of the appliance; rebuilt from the bucket
when lost)::

    CACHE/idx/<id>.idx      copies of the index objects read so far (immutable, so a copy
                            never goes stale; one of a pack that is gone is dropped)

Invariants
- Every chunk is packed, whatever its size: objects are written whole (a 4 MiB volume
  chunk is one record among those of its pack), and one object per chunk would cost a
  request per chunk. A writer gathers records in memory and seals a pack at PACK_TARGET
  (32 MiB), at FLUSH_CHUNKS records, or when asked (``flush``, ``commit_manifest``).
- Sealing puts the pack object, then its index object. A put is atomic in S3 (visible whole
  or not at all), so a chunk is present exactly when its index object is; a pack whose index
  was never written (the store failed, the process died) holds nothing visible.
- A manifest object is put after every chunk it names is sealed.
- Reads are range GETs, verified as a local pool's (the record names its id, the chunk its
  digest); a small record is read from a cached 4 MiB window of its pack (packs never
  change once sealed, so a window is never stale); an index object is checked against its
  trailing digest.
- Lookups of absent chunks list ``packs/`` again at most every REFRESH_EVERY seconds (a
  writer's ``missing`` lists once per batch; a read that misses lists at once): a chunk
  sealed by another process within that window is stored twice, which is harmless.

Not built yet (see the module's callers): garbage collection (``gc``, ``sweep_pack``; the
plan is GC by listing: the index objects give every packed chunk, writers register as
objects with their start time, packs older than the oldest writer and unmarked are deleted
or rewritten) and the local-only helpers ``chunk_path``/``touch_loose``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.errors import (
    ChunkCorrupt,
    ChunkMissing,
    NotAPool,
    NotBuiltForStore,
    ObjectMissing,
    StorageError,
)
from tandem.storage.digest import DIGEST_SIZE, hash_bytes
from tandem.storage.fileio import write_durably
from tandem.storage.objstore import ObjectStore
from tandem.storage.packs import (
    PACK_MAGIC,
    PACK_TARGET,
    REC,
    REC_MAGIC,
    PackIndex,
    encode_index,
    is_pack_id,
    new_pack_id,
    parse_index,
)
from tandem.storage.pool import (
    FLUSH_CHUNKS,
    POOL_FORMAT,
    READABLE_FORMATS,
    ChunkInfo,
    ChunkPool,
    GcReport,
    PoolWriter,
    decode_chunk,
    encode_chunk,
    parse_header,
)

log = logging.getLogger(__name__)

REFRESH_EVERY = 1.0  # seconds between listings of packs/ for lookups that miss
READ_WINDOW = 4 * 1024 * 1024  # bytes of a pack fetched at once for its small records
READ_WINDOWS = 16  # windows cached per pool object (64 MiB)
POOL_KEY = "pool.json"
PACKS = "packs/"
MANIFESTS = "manifests/"


def _not_built(what: str) -> StorageError:
    return NotBuiltForStore(what=what)


class S3PackIndex(PackIndex):
    """The pack index of one pool on a store: ``PackIndex``'s map, filled from the index
    objects under ``packs/`` (each read once, then from the local cache)."""

    def __init__(self, store: ObjectStore, cache_dir: Path) -> None:
        super().__init__(cache_dir)
        self.store = store
        self.where = str(store.url)
        self._last_listing = -float("inf")
        cache_dir.mkdir(parents=True, exist_ok=True)

    def pack_path(self, pack_id: str) -> str:
        """The pack's object key (not a file: see ``S3Pool._read_packed``)."""
        return f"{PACKS}{pack_id}.pack"

    def idx_path(self, pack_id: str) -> str:
        return f"{PACKS}{pack_id}.idx"

    def _cached(self, pack_id: str) -> Path:
        return self.dir / f"{pack_id}.idx"

    def refresh(self, force: bool = False) -> None:
        """Load new index objects and forget removed ones; at most every REFRESH_EVERY
        seconds unless ``force``."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_listing < REFRESH_EVERY:
                return
            names = {
                o.key[len(PACKS) : -len(".idx")]
                for o in self.store.list(PACKS)
                if o.key.endswith(".idx")
            }
            names = {n for n in names if is_pack_id(n)}
            for gone in set(self.by_pack) - names:
                self._drop(gone)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._cached(gone))
            for pack_id in sorted(names - set(self.by_pack)):
                try:
                    entries = self._load(pack_id)
                except ObjectMissing:
                    continue  # removed since the listing
                except ChunkCorrupt as exc:
                    log.error("pack %s in %s ignored: %s", pack_id, self.where, exc.message)
                    continue
                self._add(pack_id, entries)
            self._last_listing = now

    def _load(self, pack_id: str) -> list[tuple[bytes, int, int]]:
        cached = self._cached(pack_id)
        try:
            return parse_index(cached.read_bytes(), self.where)
        except (FileNotFoundError, ChunkCorrupt):
            pass
        blob = self.store.get(self.idx_path(pack_id))
        entries = parse_index(blob, self.where)
        write_durably(cached, blob)
        return entries

    def add(self, pack_id: str, entries: list[tuple[bytes, int, int]]) -> None:
        with contextlib.suppress(OSError):  # only a cache: the object is the truth
            write_durably(self._cached(pack_id), encode_index(entries))
        super().add(pack_id, entries)

    def entries(self, pack_id: str) -> list[tuple[bytes, int, int]]:
        try:
            return self._load(pack_id)
        except ObjectMissing as exc:
            raise FileNotFoundError(self.idx_path(pack_id)) from exc


class S3Pool(ChunkPool):
    """A chunk pool in a bucket of an object store (see the module's docstring).

    ``root`` is the local cache directory: error messages about chunks name the store's
    URL through ``where``."""

    collects_garbage = False  # not built yet: see the module's docstring

    def __init__(self, store: ObjectStore, cache_dir: Path | str) -> None:
        # ChunkPool.__init__ reads a local directory: everything it sets is set here.
        self.store = store
        self.where = str(store.url)
        self.root = Path(cache_dir)
        try:
            info = json.loads(store.get(POOL_KEY))
        except ObjectMissing as exc:
            raise NotAPool(path=self.where, problem="it has no pool.json") from exc
        except ValueError as exc:
            raise NotAPool(path=self.where, problem="its pool.json is not JSON") from exc
        if not isinstance(info, dict) or info.get("format") not in READABLE_FORMATS:
            raise NotAPool(path=self.where, problem=f"its pool.json is {info!r}")
        self.pack_below = 1 << 62  # every chunk is packed
        self.chunks_dir = self.root / "chunks"  # never written: a key for caches of chunks
        self.packs_dir = self.root / "idx"
        self.manifests_dir = self.root / "manifests"
        self.tmp_dir = self.root / "tmp"
        self.writers_dir = self.root / "writers"
        self.root.mkdir(parents=True, exist_ok=True)
        self.packs = _shared(store, self.packs_dir)
        self._windows: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._windows_lock = threading.Lock()
        self._chunks_prefix = f"{self.chunks_dir}/"
        self.packs.refresh(force=True)

    @classmethod
    def create_on(cls, store: ObjectStore, cache_dir: Path | str) -> S3Pool:
        """Create (or open, if the bucket holds one) a pool in ``store``."""
        if not store.exists(POOL_KEY):
            meta: dict[str, Any] = {"format": POOL_FORMAT, "kind": "tandem-pool", "store": "s3"}
            store.put(POOL_KEY, json.dumps(meta).encode())
        return cls(store, cache_dir)

    # --- presence -----------------------------------------------------------------------

    def has(self, digest: bytes) -> bool:
        if self.packs.lookup(digest) is not None:
            return True
        self.packs.refresh()
        return self.packs.lookup(digest) is not None

    def touch(self, digest: bytes) -> bool:
        # Objects have no mtime to refresh; until GC exists there is nothing to protect.
        return self.has(digest)

    def touch_loose(self, digest: bytes, chunks_fd: int | None = None) -> bool:
        return False

    def chunk_path(self, digest: bytes) -> Path:
        raise _not_built("a chunk file path")

    # --- reading ------------------------------------------------------------------------

    def _read_packed(self, digest: bytes) -> bytes | None:
        loc = self.packs.lookup(digest)
        if loc is None:
            return None
        pack_id, offset, length = loc
        try:
            blob = self._read_range(pack_id, offset, REC.size + length)
        except ObjectMissing:
            return None
        if len(blob) != REC.size + length:
            raise ChunkCorrupt(digest=digest.hex(), pool=self.where, reason="truncated record")
        magic, rec_digest, rec_len = REC.unpack_from(blob)
        if magic != REC_MAGIC or rec_digest != digest or rec_len != length:
            raise ChunkCorrupt(digest=digest.hex(), pool=self.where, reason="pack record header")
        return blob[REC.size :]

    def _read_range(self, pack_id: str, offset: int, size: int) -> bytes:
        """``size`` bytes of a pack from ``offset``: a small record from a cached window of
        the pack (READ_WINDOW bytes, one GET for the many small chunks a restore reads in
        pack order), a large one or one across two windows with a GET of its own."""
        key = self.packs.pack_path(pack_id)
        first, last = offset // READ_WINDOW, (offset + size - 1) // READ_WINDOW
        if size > READ_WINDOW // 4 or first != last:
            return self.store.get_range(key, offset, size)
        with self._windows_lock:
            window = self._windows.get((pack_id, first))
            if window is not None:
                self._windows.move_to_end((pack_id, first))
        if window is None:
            window = self.store.get_range(key, first * READ_WINDOW, READ_WINDOW)
            with self._windows_lock:
                self._windows[(pack_id, first)] = window
                while len(self._windows) > READ_WINDOWS:
                    self._windows.popitem(last=False)
        at = offset - first * READ_WINDOW
        return window[at : at + size]  # packs never change: a cached window is never stale

    def _read_file(self, digest: bytes) -> bytes:
        blob = self._read_packed(digest)
        if blob is not None:
            return blob
        self.packs.refresh(force=True)
        blob = self._read_packed(digest)
        if blob is None:
            raise ChunkMissing(digest=digest.hex(), pool=self.where)
        return blob

    def get(self, digest: bytes) -> bytes:
        return decode_chunk(self._read_file(digest), digest, self.where, self.get)

    def info(self, digest: bytes) -> ChunkInfo:
        return parse_header(self._read_file(digest), digest, self.where)

    def stored_size(self, digest: bytes) -> int:
        loc = self.packs.lookup(digest)
        if loc is None:
            raise ChunkMissing(digest=digest.hex(), pool=self.where)
        return loc[2]

    def iter_loose_chunks(self) -> Iterator[tuple[bytes, os.stat_result]]:
        return iter(())

    def iter_chunks(self) -> Iterator[tuple[bytes, os.stat_result]]:
        self.packs.refresh(force=True)
        for pack_id in self.packs.packs():
            try:
                entries = self.packs.entries(pack_id)
            except FileNotFoundError:
                continue
            for digest, _, length in entries:
                if (self.packs.lookup(digest) or ("",))[0] == pack_id:  # one copy each
                    yield (
                        digest,
                        os.stat_result((stat.S_IFREG | 0o444, 0, 0, 1, 0, 0, length, 0, 0, 0)),
                    )

    # --- manifests ----------------------------------------------------------------------

    def has_manifest(self, digest: bytes) -> bool:
        return self.store.exists(f"{MANIFESTS}{digest.hex()}")

    def get_manifest_blob(self, digest: bytes) -> bytes:
        try:
            blob = self.store.get(f"{MANIFESTS}{digest.hex()}")
        except ObjectMissing as exc:
            raise ChunkMissing(digest=digest.hex(), pool=self.where) from exc
        return decode_chunk(blob, digest, self.where)

    def list_manifests(self) -> list[bytes]:
        out = []
        for obj in self.store.list(MANIFESTS):
            name = obj.key[len(MANIFESTS) :]
            if len(name) == DIGEST_SIZE * 2:
                with contextlib.suppress(ValueError):
                    out.append(bytes.fromhex(name))
        return out

    def delete_manifest(self, digest: bytes) -> None:
        self.store.delete(f"{MANIFESTS}{digest.hex()}")

    # --- writing ------------------------------------------------------------------------

    def writer(self, bases: Iterable[bytes] = (), *, xor_deltas: bool = True) -> S3PoolWriter:
        return S3PoolWriter(self, list(bases), xor_deltas=xor_deltas)

    def _active_writers(self) -> list[dict[str, Any]]:
        return []

    def _clean_tmp(self) -> None:
        return

    # --- garbage collection: not yet ----------------------------------------------------

    def gc(self, live: Mapping[bytes, Iterable[bytes]], remove_manifests: bool = True) -> GcReport:
        raise _not_built("garbage collection")

    def sweep_pack(
        self, pack_id: str, marked: Callable[[list[bytes]], set[bytes]], cutoff: float
    ) -> tuple[int, int, int]:
        raise _not_built("garbage collection")


@dataclass
class _MemPack:
    """A pack being gathered in memory, put whole when sealed."""

    pack_id: str = field(default_factory=new_pack_id)
    buf: bytearray = field(default_factory=lambda: bytearray(PACK_MAGIC))
    entries: list[tuple[bytes, int, int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.buf)

    def append(self, digest: bytes, blob: bytes) -> None:
        offset = len(self.buf)
        self.buf += REC.pack(REC_MAGIC, digest, len(blob))
        self.buf += blob
        self.entries.append((digest, offset, len(blob)))


class S3PoolWriter(PoolWriter):
    """``PoolWriter`` into an ``S3Pool``: chunks are gathered into an in-memory pack and
    sealed as two objects (pack, then index); what was not sealed is never visible."""

    pool: S3Pool

    def __init__(self, pool: S3Pool, bases: list[bytes], *, xor_deltas: bool = True) -> None:
        # PoolWriter.__init__ registers a file in the local pool: set its state here.
        self.pool = pool
        self.bases = bases
        self.xor_deltas = xor_deltas
        self._lock = threading.Lock()
        self._pending: dict[bytes, tuple[Path | None, int]] = {}
        self._pending_bytes = 0
        self._held: set[bytes] = set()
        self._touched_packs: set[str] = set()
        self._chunks_fd = -1
        self._mem: _MemPack | None = None
        self._flush_lock = threading.Lock()
        self.started = time.time()
        self.chunks_written = 0
        self.bytes_written = 0
        self._failed: StorageError | None = None

    def close(self) -> None:
        return

    def missing(self, digests: Iterable[bytes], sizes: Iterable[int] | None = None) -> list[bytes]:
        """The digests, in order and without repeats, that neither the store nor this
        writer holds: one listing of new index objects per call, no request per digest
        (every chunk is packed here: the senders' ``sizes`` change nothing)."""
        with self._lock:
            todo = [
                d for d in dict.fromkeys(digests) if d not in self._pending and d not in self._held
            ]
        if not todo:
            return []
        packs = self.pool.packs
        if any(packs.lookup(d) is None for d in todo):
            packs.refresh(force=True)
        absent = [d for d in todo if packs.lookup(d) is None]
        held = [d for d in todo if packs.lookup(d) is not None]
        with self._lock:
            self._held.update(held)
        return absent

    def _write_pending(self, digest: bytes, blob: bytes) -> None:
        with self._lock:
            if digest in self._pending:  # another thread won the race
                return
            if self._mem is None:
                self._mem = _MemPack()
            self._mem.append(digest, blob)
            self._pending[digest] = (None, len(blob))
            self._pending_bytes += len(blob)
            self.chunks_written += 1
            self.bytes_written += len(blob)
            full = len(self._pending) >= FLUSH_CHUNKS or self._mem.size >= PACK_TARGET
        if full:
            self.flush()

    _write_packed = _write_pending

    def flush(self) -> None:
        """Seal what is pending: put the pack object, then its index object."""
        with self._flush_lock:
            if self._failed is not None:
                raise self._failed
            with self._lock:
                batch = dict(self._pending)
                mem, self._mem = self._mem, None
            if not batch or mem is None:
                return
            store = self.pool.store
            try:
                store.put(self.pool.packs.pack_path(mem.pack_id), mem.buf)
                store.put(self.pool.packs.idx_path(mem.pack_id), encode_index(mem.entries))
            except StorageError as exc:
                # Its chunks were answered as held: no manifest of this writer may be
                # committed now (a pack without its index object is invisible).
                self._failed = exc
                raise
            self.pool.packs.add(mem.pack_id, mem.entries)
            self._flushed(batch)

    def discard(self) -> None:
        with self._lock:
            self._mem = None
            self._pending.clear()
            self._pending_bytes = 0

    def commit_manifest(self, blob: bytes) -> bytes:
        """Seal every chunk, then put the manifest object; returns its id."""
        self.flush()
        digest = hash_bytes(blob)
        self.pool.store.put(f"{MANIFESTS}{digest.hex()}", encode_chunk(blob, []))
        return digest


_shared_indexes: dict[tuple[str, str], S3PackIndex] = {}
_shared_lock = threading.Lock()


def _shared(store: ObjectStore, cache_dir: Path) -> S3PackIndex:
    """One index per (pool, cache directory) in this process, as ``packs.shared``."""
    key = (str(store.url), os.path.realpath(cache_dir))
    with _shared_lock:
        index = _shared_indexes.get(key)
        if index is None:
            index = _shared_indexes[key] = S3PackIndex(store, cache_dir)
        return index
