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
    writers/<id>.json       a registered writer (GC: see below)
    touched/<id>-<n>        pack ids a writer reused (JSON list)
    gc/condemned/<run>      pack ids a running collection removes (JSON list)

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

Garbage collection, by listing (``storage.gc.collect`` marks; ``sweep_packs`` sweeps):
- The cut-off is the older of the snapshot and the oldest registered writer's start, less
  ``clock_slack`` (the store's LastModified against this host's clock). A pack whose index
  is newer than the cut-off is kept whole, as a local pack with a newer mtime.
- Older packs: no marked chunk -> deleted; marked bytes under REWRITE_BELOW -> its marked
  chunks copied into new packs (sealed first), then deleted; else kept. Deleting removes
  every index object first, then the packs. A pack object without an index older than
  ``orphan_grace`` (a writer died between the two puts) is deleted.
- Writers stand in for a local pool's mtimes: each registers (``writers/<id>.json``: its
  start and bases; renewed every LEASE_RENEW seconds of use, removed at close, dropped by
  a collection when older than WRITER_LEASE), and records the packs whose chunks it reuses
  (``touched/<id>-<n>``) *before* it lists ``gc/condemned/``; a collection puts the packs
  it will remove in ``gc/condemned/<run>`` *before* it reads the ``touched/`` records newer
  than its cut-off. With read-after-write consistent listings one of the two sees the
  other: the collection spares the pack, or the writer stores those chunks again.
- The local-only helpers ``chunk_path``/``touch_loose`` and the one-shot ``gc`` are not
  built: ``tandem storage gc`` on a store runs ``storage.gc.collect`` instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import threading
import time
import uuid
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
    WriterLapsed,
)
from tandem.storage.digest import DIGEST_SIZE, hash_bytes
from tandem.storage.fileio import write_durably
from tandem.storage.layouts import BaseLayouts, Layout, StoredLayouts
from tandem.storage.objstore import ObjectInfo, ObjectStore
from tandem.storage.packs import (
    PACK_MAGIC,
    PACK_TARGET,
    REC,
    REC_MAGIC,
    REWRITE_BELOW,
    PackIndex,
    encode_index,
    is_pack_id,
    new_pack_id,
    parse_index,
)
from tandem.storage.pool import (
    DELTA_HEAD,
    FLUSH_CHUNKS,
    HEADER,
    LAYOUTS_KEPT,
    POOL_FORMAT,
    READABLE_FORMATS,
    ChunkInfo,
    ChunkPool,
    GcReport,
    Layouts,
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
WRITERS = "writers/"
TOUCHED = "touched/"
CONDEMNED = "gc/condemned/"  # one object per running collection: the packs it removes
WRITER_LEASE = 6 * 3600.0  # seconds a writer's registration counts without being renewed
LEASE_RENEW = 600.0  # a writer renews its registration when it is older than this
ORPHAN_GRACE = 3600.0  # seconds before a pack without an index object is removed
HEAD_SIZE = HEADER.size + 64 * DIGEST_SIZE + DELTA_HEAD.size  # as ChunkPool.info reads
CLOCK_SLACK = 30.0  # seconds of the cut-off for the store's clock against the appliance's


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
                self._load_pack(pack_id)
            self._last_listing = now

    def _load_pack(self, pack_id: str) -> None:
        try:
            entries = self._load(pack_id)
        except ObjectMissing:
            return  # removed since the listing
        except ChunkCorrupt as exc:
            log.error("pack %s in %s ignored: %s", pack_id, self.where, exc.message)
            return
        self._add(pack_id, entries)

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

    def drop(self, pack_id: str) -> None:
        """Forget a pack that was removed, and its cached index."""
        super().drop(pack_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._cached(pack_id))

    def entries(self, pack_id: str) -> list[tuple[bytes, int, int]]:
        try:
            return self._load(pack_id)
        except ObjectMissing as exc:
            raise FileNotFoundError(self.idx_path(pack_id)) from exc


class S3Pool(ChunkPool):
    """A chunk pool in a bucket of an object store (see the module's docstring).

    ``root`` is the local cache directory: error messages about chunks name the store's
    URL through ``where``."""

    clock_slack = CLOCK_SLACK
    orphan_grace = ORPHAN_GRACE

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
        self.layouts = Layouts(LAYOUTS_KEPT)
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
        # Objects have no mtime to refresh: writers record what they reuse under
        # ``touched/`` (``S3PoolWriter._use_packs``); the pool alone protects nothing.
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
        try:
            return self._read_record(digest, *loc)
        except ObjectMissing:
            return None

    def _read_record(
        self, digest: bytes, pack_id: str, offset: int, length: int, head: int | None = None
    ) -> bytes:
        """The chunk-file bytes of ``digest`` in ``pack_id`` (only the first ``head`` of
        them if given); ``ObjectMissing`` when the pack is gone."""
        want = length if head is None else min(head, length)
        key = self.packs.pack_path(pack_id)
        if length > READ_WINDOW // 4:  # a large record: never a whole window for its head
            blob = self.store.get_range(key, offset, REC.size + want)
        else:
            blob = self._read_range(pack_id, offset, REC.size + want)
        if len(blob) != REC.size + want:
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

    def infos(self, digests: Iterable[bytes]) -> dict[bytes, ChunkInfo]:
        """``info`` of each (its ranged reads go through the pack's cached window); a chunk
        missing or corrupt is left out."""
        out: dict[bytes, ChunkInfo] = {}
        for digest in digests:
            with contextlib.suppress(ChunkMissing, ChunkCorrupt):
                out[digest] = self.info(digest)
        return out

    def info(self, digest: bytes) -> ChunkInfo:
        """The chunk's header, from a range read of its head (GC's marking reads one per
        live chunk: a large chunk's bytes are not fetched)."""
        for attempt in (0, 1):
            loc = self.packs.lookup(digest)
            if loc is not None:
                try:
                    head = self._read_record(digest, *loc, head=HEAD_SIZE)
                except ObjectMissing:
                    head = None
                if head is not None:
                    return parse_header(head, digest, self.where)
            if attempt == 0:
                self.packs.refresh(force=True)  # rewritten or written since: look again
        raise ChunkMissing(digest=digest.hex(), pool=self.where)

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

    def writer(
        self, bases: Iterable[bytes] = (), *, xor_deltas: bool = True, cached: bool = True
    ) -> S3PoolWriter:
        """``ChunkPool.writer``; ``cached`` does not apply (packs go to the object store)."""
        return S3PoolWriter(self, list(bases), xor_deltas=xor_deltas)

    def _active_writers(self) -> list[dict[str, Any]]:
        """Registrations of writers (``writers/``) renewed within WRITER_LEASE; older ones
        (a process that died) are removed."""
        active = []
        stale_before = time.time() - WRITER_LEASE
        for obj in self.store.list(WRITERS):
            if obj.modified < stale_before:
                self.store.delete(obj.key)
                log.warning("writer registration %s in %s lapsed: removed", obj.key, self.where)
                continue
            try:
                info = json.loads(self.store.get(obj.key))
            except ObjectMissing:
                continue  # closed since the listing
            except ValueError:
                log.error("writer registration %s in %s unreadable", obj.key, self.where)
                info = {}
            if not isinstance(info, dict):
                info = {}
            # Unreadable: its start is unknown, so it bounds the cut-off by its object's age.
            info.setdefault("started", obj.modified - LEASE_RENEW)
            active.append(info)
        return active

    def _clean_tmp(self) -> None:
        return

    # --- garbage collection by listing --------------------------------------------------

    def gc(self, live: Mapping[bytes, Iterable[bytes]], remove_manifests: bool = True) -> GcReport:
        raise _not_built("The one-shot collection (`tandem storage gc`; use `tandem gc`)")

    def sweep_pack(
        self, pack_id: str, marked: Callable[[list[bytes]], set[bytes]], cutoff: float
    ) -> tuple[int, int, int]:
        raise _not_built("Sweeping one pack (`sweep_packs` sweeps them all)")

    def manifest_times(self) -> Iterator[tuple[bytes, float]]:
        for obj in self.store.list(MANIFESTS):
            name = obj.key[len(MANIFESTS) :]
            if len(name) == DIGEST_SIZE * 2:
                with contextlib.suppress(ValueError):
                    yield bytes.fromhex(name), obj.modified

    def sweep_packs(
        self,
        marked: Callable[[list[bytes]], set[bytes]],
        cutoff: float,
        *,
        check: Callable[[], None] = lambda: None,
        progress: Callable[[int, int], None] = lambda done, total: None,
    ) -> PackSweep:
        """Collect the packs of the bucket (see the module's docstring, "Garbage
        collection"): delete those with no ``marked`` chunk, rewrite those mostly dead,
        delete orphan packs older than ORPHAN_GRACE."""
        out = PackSweep()
        self.packs.refresh(force=True)
        idx_time: dict[str, float] = {}
        pack_objs: dict[str, ObjectInfo] = {}
        for obj in self.store.list(PACKS):
            name, _, ext = obj.key[len(PACKS) :].rpartition(".")
            if not is_pack_id(name):
                continue
            if ext == "idx":
                idx_time[name] = obj.modified
            elif ext == "pack":
                pack_objs[name] = obj
        # --- decide, one pack at a time (its index from the local cache) -----------------
        cands: dict[str, list[tuple[bytes, int, int]]] = {}  # pack to go -> what it keeps
        stays: list[tuple[bytes, str, int, int]] = []  # dead chunks in packs kept whole
        ids = sorted(idx_time)
        for i, pack_id in enumerate(ids):
            check()
            progress(i + 1, len(ids))
            modified = max(idx_time[pack_id], getattr(pack_objs.get(pack_id), "modified", 0))
            try:
                entries = self.packs.entries(pack_id)
            except FileNotFoundError:
                continue  # removed since the listing
            except ChunkCorrupt as exc:
                log.error("pack %s of %s kept, unreadable index: %s", pack_id, self.where, exc)
                continue
            live = marked([d for d, _, _ in entries])
            total = sum(n for _, _, n in entries) or 1
            live_bytes = sum(n for d, _, n in entries if d in live)
            if modified >= cutoff or (live and live_bytes >= REWRITE_BELOW * total):
                out.chunks_kept += len(entries)
                stays += [(d, pack_id, o, n) for d, o, n in entries if d not in live]
                continue
            cands[pack_id] = [e for e in entries if e[0] in live]
        for pack_id in self._hold_bases(stays, cands, check):
            out.chunks_kept += len(self.packs.entries(pack_id))
            del cands[pack_id]
        drop, rewrite, counts, freed = self._decide(cands, pack_objs)
        orphans = [
            p
            for p, obj in pack_objs.items()
            if p not in idx_time and obj.modified < time.time() - self.orphan_grace
        ]
        doomed = drop | set(rewrite)
        condemned_key = f"{CONDEMNED}{uuid.uuid4().hex}"
        try:
            if doomed:
                # --- condemn, then see what writers touched: one of the two sees the other
                self.store.put(condemned_key, json.dumps(sorted(doomed)).encode())
                spared = self._touched_since(cutoff) & doomed
                if spared:  # kept whole: their dead chunks stay, and hold their bases
                    stays = []
                    for pack_id in spared:
                        out.packs_spared += 1
                        keep = {d for d, _, _ in cands.pop(pack_id)}
                        entries = self.packs.entries(pack_id)
                        out.chunks_kept += len(entries)
                        stays += [(d, pack_id, o, n) for d, o, n in entries if d not in keep]
                    for pack_id in self._hold_bases(stays, cands, check):
                        out.chunks_kept += len(self.packs.entries(pack_id))
                        del cands[pack_id]
                    drop, rewrite, counts, freed = self._decide(cands, pack_objs)
                    doomed = drop | set(rewrite)
            # --- rewrite: the live chunks into new packs, committed before anything goes
            if rewrite:
                self._copy_live(rewrite, doomed, check)
            # --- delete: every index object first, then the packs
            if doomed:
                self.store.delete_many(self.packs.idx_path(p) for p in sorted(doomed))
                for pack_id in doomed:
                    self.packs.drop(pack_id)
                self.store.delete_many(self.packs.pack_path(p) for p in sorted(doomed))
            for pack_id in doomed:
                kept, removed = counts[pack_id]
                out.chunks_kept += kept
                out.chunks_removed += removed
                out.bytes_freed += freed[pack_id]
            out.packs_deleted = len(drop)
            out.packs_rewritten = len(rewrite)
            if orphans:
                self.store.delete_many(self.packs.pack_path(p) for p in sorted(orphans))
                out.orphans_deleted = len(orphans)
                out.bytes_freed += sum(pack_objs[p].size for p in orphans)
        finally:
            if doomed:
                with contextlib.suppress(StorageError):  # left: writers only store more
                    self.store.delete(condemned_key)
        self.store.delete_many(o.key for o in list(self.store.list(TOUCHED)) if o.modified < cutoff)
        self.packs.refresh(force=True)
        return out

    def _decide(
        self, cands: dict[str, list[tuple[bytes, int, int]]], pack_objs: dict[str, ObjectInfo]
    ) -> tuple[
        set[str],
        dict[str, list[tuple[bytes, int, int]]],
        dict[str, tuple[int, int]],
        dict[str, int],
    ]:
        """Packs to drop (nothing to keep) and to rewrite (the records to copy), with each
        one's (chunks kept, chunks removed) and bytes freed."""
        drop: set[str] = set()
        rewrite: dict[str, list[tuple[bytes, int, int]]] = {}
        counts: dict[str, tuple[int, int]] = {}
        freed: dict[str, int] = {}
        for pack_id, keep in cands.items():
            size = pack_objs[pack_id].size if pack_id in pack_objs else 0
            counts[pack_id] = (len(keep), len(self.packs.entries(pack_id)) - len(keep))
            freed[pack_id] = max(0, size - sum(n for _, _, n in keep))
            if keep:
                rewrite[pack_id] = keep
            else:
                drop.add(pack_id)
        return drop, rewrite, counts, freed

    def _hold_bases(
        self,
        stays: list[tuple[bytes, str, int, int]],
        cands: dict[str, list[tuple[bytes, int, int]]],
        check: Callable[[], None],
    ) -> set[str]:
        """A dead chunk that stays (in a pack kept whole) is still found by ``has``: a later
        capture may reuse it. If it is a delta, its base must stay too. A base in a pack
        about to go joins what that pack keeps (``cands``: copied by its rewrite), and so
        on down the delta chain; a pack then mostly kept is kept whole (returned), and its
        other dead chunks stay in turn. Only the headers of the staying dead chunks are
        read (one window of their pack each). Deciding with the bases held, a pack whose
        chunks are kept only as bases is kept by the next collection too, not copied again."""

        def bases_of(records: list[tuple[bytes, str, int, int]]) -> set[bytes]:
            found: set[bytes] = set()
            for digest, pack_id, offset, length in records:
                check()
                try:
                    head = self._read_record(digest, pack_id, offset, length, head=HEAD_SIZE)
                    base = parse_header(head, digest, self.where).base
                except (ObjectMissing, ChunkCorrupt):
                    continue  # verify reports it; nothing here can be read to hold
                if base is not None:
                    found.add(base)
            return found

        whole: set[str] = set()
        held: set[bytes] = set()
        todo = stays if cands else []
        while todo:
            need = bases_of(todo) - held
            held |= need
            todo = []
            for pack_id in sorted(set(cands) - whole) if need else []:
                kept = {d for d, _, _ in cands[pack_id]}
                entries = self.packs.entries(pack_id)
                got = [e for e in entries if e[0] in need and e[0] not in kept]
                if not got:
                    continue
                cands[pack_id] += got
                todo += [(d, pack_id, o, n) for d, o, n in got]
                total = sum(n for _, _, n in entries) or 1
                if sum(n for _, _, n in cands[pack_id]) >= REWRITE_BELOW * total:
                    whole.add(pack_id)  # mostly kept: kept whole, its other chunks stay
                    kept |= {d for d, _, _ in got}
                    todo += [(d, pack_id, o, n) for d, o, n in entries if d not in kept]
        return whole

    def condemned(self) -> set[str]:
        """The packs running collections are removing (``gc/condemned/``): usually one
        listing that finds nothing."""
        packs: set[str] = set()
        for obj in self.store.list(CONDEMNED):
            try:
                names = json.loads(self.store.get(obj.key))
            except ObjectMissing:
                continue  # that collection finished
            except ValueError:
                names = None
            if not isinstance(names, list):
                # unreadable: trust no pack (their chunks are stored again, harmlessly)
                return set(self.packs.packs())
            packs.update(n for n in names if isinstance(n, str))
        return packs

    def _touched_since(self, cutoff: float) -> set[str]:
        """The packs writers touched (``touched/``) since ``cutoff``."""
        packs: set[str] = set()
        for obj in self.store.list(TOUCHED):
            if obj.modified < cutoff:
                continue
            try:
                names = json.loads(self.store.get(obj.key))
            except ObjectMissing:
                continue
            except ValueError:
                names = []
            if isinstance(names, list):
                packs.update(n for n in names if isinstance(n, str))
        return packs

    def _copy_live(
        self,
        rewrite: dict[str, list[tuple[bytes, int, int]]],
        doomed: set[str],
        check: Callable[[], None],
    ) -> None:
        """Copy the live chunks of the packs in ``rewrite`` into new packs (sealed, index
        objects written) unless a copy in a pack that stays exists (a rewrite killed half
        way left one)."""
        elsewhere: dict[bytes, set[str]] = {}
        wanted = {d for entries in rewrite.values() for d, _, _ in entries}
        for pack_id in self.packs.packs():
            if pack_id in doomed:
                continue
            for digest in self.packs.by_pack.get(pack_id, []):
                if digest in wanted:
                    elsewhere.setdefault(digest, set()).add(pack_id)
        copied: set[bytes] = set()
        with self.writer() as w:
            for pack_id, entries in sorted(rewrite.items()):
                check()
                for digest, offset, length in entries:
                    if digest in copied or digest in elsewhere:
                        continue
                    w._write_pending(digest, self._read_record(digest, pack_id, offset, length))
                    copied.add(digest)
            w.flush()


@dataclass
class PackSweep:
    """What ``S3Pool.sweep_packs`` did."""

    chunks_kept: int = 0
    chunks_removed: int = 0
    bytes_freed: int = 0
    packs_deleted: int = 0
    packs_rewritten: int = 0
    packs_spared: int = 0  # doomed, but a writer touched it meanwhile
    orphans_deleted: int = 0


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
    sealed as two objects (pack, then index); what was not sealed is never visible.

    For GC it registers under ``writers/`` (its start and bases; renewed every
    LEASE_RENEW seconds it is used, removed at ``close``) and records the packs whose
    chunks it reuses under ``touched/``, then reads ``gc/condemned/``: a chunk of a pack a
    collection condemned is answered absent (and stored again)."""

    pool: S3Pool

    def __init__(self, pool: S3Pool, bases: list[bytes], *, xor_deltas: bool = True) -> None:
        # PoolWriter.__init__ registers a file in the local pool: set its state here.
        self.pool = pool
        self.bases = bases
        self.xor_deltas = xor_deltas
        self.cached = True  # packs go to the object store, not through a page cache here
        self._lock = threading.Lock()
        self._pending: dict[bytes, tuple[Path | None, int]] = {}
        self._pending_bytes = 0
        self._held: set[bytes] = set()
        self._touched_packs: set[str] = set()  # pack ids recorded under touched/
        self._bases_read: OrderedDict[bytes, Layout] = OrderedDict()
        self._stored = StoredLayouts(None, 0, 0)  # no layout files here: nothing kept
        self._base_layouts = BaseLayouts(None, [])  # no layout files on an object store
        self._touches = 0
        self._chunks_fd = -1
        self._mem: _MemPack | None = None
        self._flush_lock = threading.Lock()
        self.started = time.time()
        self.chunks_written = 0
        self.bytes_written = 0
        self._failed: StorageError | None = None
        self._id = uuid.uuid4().hex
        self._reg_key = f"{WRITERS}{self._id}.json"
        self._renewed = -float("inf")
        self._open = True
        self._renew(force=True)

    def _renew(self, force: bool = False) -> None:
        """Put the registration again when it is older than LEASE_RENEW; a writer silent
        for longer than WRITER_LEASE may have lost what it relied on to a collection."""
        now = time.monotonic()
        if not force and now - self._renewed < LEASE_RENEW:
            return
        if not force and now - self._renewed > WRITER_LEASE - LEASE_RENEW:
            raise WriterLapsed(pool=self.pool.where, seconds=int(now - self._renewed))
        doc = {"started": self.started, "bases": [b.hex() for b in self.bases]}
        self.pool.store.put(self._reg_key, json.dumps(doc).encode())
        self._renewed = now

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        try:
            self.pool.store.delete(self._reg_key)
        except StorageError as exc:  # it lapses by itself: GC only keeps more until then
            log.warning("writer registration %s not removed: %s", self._reg_key, exc.message)

    def _use_packs(self, pack_ids: set[str]) -> set[str]:
        """Record that this writer reuses chunks of ``pack_ids``; returns those a running
        collection condemned (their chunks must be stored again). The record is put before
        ``gc/condemned/`` is read, and a collection puts its object there before it reads
        the records: one of the two sees the other."""
        new = pack_ids - self._touched_packs
        if not new:
            return set()
        self._renew()
        with self._lock:
            self._touches += 1
            key = f"{TOUCHED}{self._id}-{self._touches}"
        store = self.pool.store
        store.put(key, json.dumps(sorted(new)).encode())
        bad = new & self.pool.condemned()
        with self._lock:
            self._touched_packs.update(new - bad)
        return bad

    def has(self, digest: bytes) -> bool:
        """Present in the store (its pack recorded as touched) or pending here."""
        with self._lock:
            if digest in self._pending or digest in self._held:
                return True
        packs = self.pool.packs
        loc = packs.lookup(digest)
        if loc is None:
            packs.refresh()
            loc = packs.lookup(digest)
        if loc is None or self._use_packs({loc[0]}):
            return False
        with self._lock:
            self._held.add(digest)
        return True

    def missing(self, digests: Iterable[bytes], sizes: Iterable[int] | None = None) -> list[bytes]:
        """The digests, in order and without repeats, that neither the store nor this
        writer holds: one listing of new index objects per call, no request per digest
        (every chunk is packed here: the senders' ``sizes`` change nothing), and one
        ``touched/`` record and listing of ``gc/condemned/`` when it reuses packs it did
        not reuse before."""
        with self._lock:
            todo = [
                d for d in dict.fromkeys(digests) if d not in self._pending and d not in self._held
            ]
        if not todo:
            return []
        packs = self.pool.packs
        if any(packs.lookup(d) is None for d in todo):
            packs.refresh(force=True)
        where = {d: packs.lookup(d) for d in todo}
        condemned = self._use_packs({loc[0] for loc in where.values() if loc is not None})
        absent = [d for d, loc in where.items() if loc is None or loc[0] in condemned]
        held = [d for d, loc in where.items() if loc is not None and loc[0] not in condemned]
        with self._lock:
            self._held.update(held)
        return absent

    def _add_pending(self, digest: bytes, blob: bytes) -> bool:
        with self._lock:
            if digest in self._pending:  # another thread won the race
                return False
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
        return True

    _write_packed = _add_pending

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
                self._renew()
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
