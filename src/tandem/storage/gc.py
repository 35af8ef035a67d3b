"""Garbage collection of a chunk pool: incremental by reference counts, with a resumable full
mark-and-sweep that rebuilds them; bounded memory either way.

**The counts** (``DIR/gc/refs.db``, SQLite beside the pool, not the catalog): a row per
chunk that is counted or stored and looked at (``refs``), its count being how many counted
manifests name it plus how many rows of delta chunks built on it there are; which manifests
are counted (``counted``); which chunks lost their last reference and wait for the sweep
(``dead``). A row holds its chunk's delta base for as long as the row exists, and a row
goes only when its chunk is gone from the pool: so no base goes while a chunk built on it
is stored (kept in a pack that is mostly needed, or touched by a capture that reuses it),
and a chain empties from its top down. A chunk is needed exactly when its count is above
zero: the mark set of a full collection whose live manifests are the counted ones, kept up
to date instead of made again. A writer stores a delta only where no copy of its chunk is
(``PoolWriter.put_encoded``), so the base a row names is the one its stored copy needs.

**A collection** takes a snapshot: the active writers are listed (the pool's ``writers/``),
*then* the live manifest ids are read (the catalog's images); the cut-off time is the older
of now (taken before both) and the oldest active writer's start, less ``pool.clock_slack``.
Manifests that active writers build on count as live (``keep``). Every writer records its
image in the catalog before it unregisters, so a writer missing from the list has its image
in the catalog read after, and one in the list keeps what it wrote by the cut-off: no lock is
shared with writers, and the snapshot holds beside writers in other processes or hosts on the
same pool (their clocks must agree within ``clock_slack``, as any mtime-based sweep needs).
``snapshot_lock``, if given, is held around it too (``Site.gc_lock``, which orders it
in-process). Then one of two runs:

- **Incremental** (the usual one; its cost follows what changed since the last collection):
  each kept manifest not counted yet is counted (+1 for every distinct chunk it names; a
  chunk given a row adds 1 to its delta base, and so on down the chain); each counted
  manifest no longer kept is counted down (a chunk reaching zero goes to ``dead``; its base
  is released when the chunk is removed, and may then die in turn: the sweep repeats while
  bases die). One transaction per step, so a kill never leaves a manifest half
  counted. A manifest object neither kept nor counted (an image made and deleted between
  two collections, a capture that failed) is read once and the chunks it names that no
  count holds become ``dead`` too. Then manifest objects no longer kept and older than the
  cut-off are removed, and only the dead chunks are swept: a chunk file with the rename to
  ``<hex>.gc`` and a second stat (a writer may touch it meanwhile), a pack through
  ``ChunkPool.sweep_pack`` (kept whole when written or touched since the cut-off, removed
  when nothing in it is needed, rewritten when what is needed is under
  ``packs.REWRITE_BELOW`` of it, kept otherwise: its dead chunks are then *parked*, and the
  pack is looked at again only when another of its chunks dies). A chunk touched since the
  cut-off stays dead and is looked at again next time.
- **Full** (the first collection of a pool, every ``full_every`` seconds, after a count was
  found wrong, or on request; always on an object store): the counts are made again from
  every kept manifest into ``DIR/gc/rebuild.db``, and every stored chunk no count holds is
  given a row (count 0, holding its base: one read of its header); each of the 256 fan-out
  directories of ``chunks/`` is listed and a chunk file no count holds and older than the
  cut-off removed (same rename and second stat); then each pack, one at a time in id
  order, as above; then manifest objects not kept and older than the cut-off (also renamed
  and stat'ed again: a writer may commit the same manifest meanwhile). At the end the new
  counts replace the old. This is what removes what nothing ever counted: chunks a failed
  capture wrote without a manifest, packs whose chunks no manifest names. (On an object
  store no row is given to uncounted chunks: a pack kept there may hold a delta whose base
  goes.)

A manifest removed takes its image's layout files (``storage.layouts``) with it; a full run
also removes layout folders whose manifest is gone, once older than the cut-off.

Either way a chunk is removed only when no kept manifest needs it and it is older than the
cut-off, so a collection is safe beside captures and replications. Memory is bounded: the
counts are on disk (about 60-80 bytes per chunk: a pool of 100M chunks needs a few GB of
disk); a full sweep holds the needed chunks of one fan-out directory at a time (1/256 of
them), an incremental one a batch of ``BATCH`` dead chunks. The pack index itself (chunk id
-> pack, offset, length) is held in memory by the pool (``storage.packs``), about 220 bytes
per packed chunk: that, not the counts, bounds the pool's size today.

Resuming: an incremental run is its steps, each committed (about once a second,
``SAVE_EVERY``); a killed one is carried on by the next from a fresh snapshot. A full run
records in ``rebuild.db`` the manifests already counted, the cut-off, the next fan-out
directory to sweep and the last pack swept; a run that finds it resumes it (a fresh snapshot:
new images are counted too, the cut-off only goes back). A pack rewrite killed half way
leaves a second copy of some chunks in a new pack (complete and verified: the old pack is
removed only after the new one is durable); the next sweep of the old pack finds them newer
elsewhere and removes it. One collection runs per pool at a time (an flock on
``DIR/gc/lock``; across hosts the appliance also holds a catalog lock, ``operations.gc``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.errors import (
    LiveManifestUnreadable,
    PoolGcRunning,
    StorageError,
)
from tandem.storage.digest import DIGEST_SIZE
from tandem.storage.fileio import fsync_dir
from tandem.storage.manifest import load_manifest
from tandem.storage.pool import MAX_DELTA_DEPTH, ChunkPool
from tandem.storage.s3pool import S3Pool

log = logging.getLogger(__name__)

FANS = 256
BATCH = 4096  # digests per query, dead chunks per sweep step
SAVE_EVERY = 1.0  # seconds of work committed at once (what a kill loses)
UNLINK_THREADS = 8
FULL_EVERY = 7 * 86_400.0
"""Default seconds between full collections (which remove what nothing ever counted)."""


@dataclass
class GcProgress:
    phase: str  # "mark", "unmark", "sweep" or "packs"
    done: int
    total: int


@dataclass
class GcRun:
    """What one collection did (a resumed full one counts what its predecessors did too)."""

    full: bool = True
    chunks_kept: int = 0
    chunks_removed: int = 0
    bytes_freed: int = 0
    manifests_removed: int = 0
    manifests_marked: int = 0
    manifests_unmarked: int = 0
    chunks_marked: int = 0
    chunks_dead: int = 0
    resumed: bool = False
    resumed_at_fan: int = 0
    packs_done: int = 0
    packs_deleted: int = 0
    packs_rewritten: int = 0
    packs_spared: int = 0
    orphans_deleted: int = 0


def gc_dir(pool: ChunkPool) -> Path:
    return pool.root / "gc"


def refs_path(pool: ChunkPool) -> Path:
    """The counts the incremental collection keeps up to date."""
    return gc_dir(pool) / "refs.db"


def rebuild_path(pool: ChunkPool) -> Path:
    """The counts a full collection is making (there while one is unfinished)."""
    return gc_dir(pool) / "rebuild.db"


def unfinished(pool: ChunkPool) -> bool:
    """Whether a full collection was stopped before it finished (the next one resumes it)."""
    return rebuild_path(pool).exists()


def _remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")


@contextlib.contextmanager
def _exclusive(pool: ChunkPool) -> Iterator[None]:
    gc_dir(pool).mkdir(exist_ok=True)
    fd = os.open(gc_dir(pool) / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise PoolGcRunning(pool=pool.root) from exc
        yield
    finally:
        os.close(fd)


class _Refs:
    """The counts of one pool (or the ones a full run is making), and a run's saved state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        for ddl in (
            "CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT)",
            # n: counted manifests naming d + counted delta chunks built on d
            "CREATE TABLE IF NOT EXISTS refs (d BLOB PRIMARY KEY, n INTEGER NOT NULL, base BLOB)"
            " WITHOUT ROWID",
            "CREATE TABLE IF NOT EXISTS counted (m BLOB PRIMARY KEY) WITHOUT ROWID",
            # pack: parked in that pack, which was kept as mostly needed
            "CREATE TABLE IF NOT EXISTS dead (d BLOB PRIMARY KEY, pack TEXT) WITHOUT ROWID",
            "CREATE INDEX IF NOT EXISTS dead_pack ON dead (pack)",
            # counted while missing or unreadable: its delta base is not known yet
            "CREATE TABLE IF NOT EXISTS unknown (d BLOB PRIMARY KEY) WITHOUT ROWID",
        ):
            self.db.execute(ddl)
        self._since: float | None = None  # when the open transaction began
        self.off = False  # a count was found wrong in this run
        self.died = 0  # chunks whose count reached zero in this run

    def begin(self) -> None:
        """Open a transaction unless one is open: steps are saved together by ``save``."""
        if self._since is None:
            self.db.execute("BEGIN")
            self._since = time.monotonic()

    def save(self, *, now: bool = False) -> None:
        """Commit the open transaction once it is ``SAVE_EVERY`` old (or ``now``): one
        commit a second, not one a manifest or a pack."""
        if self._since is not None and (now or time.monotonic() - self._since >= SAVE_EVERY):
            self.db.execute("COMMIT")
            self._since = None

    def get(self, key: str, default: float) -> float:
        row = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return default if row is None else float(row[0])

    def put(self, **values: float) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
            [(k, repr(v)) for k, v in values.items()],
        )

    def get_text(self, key: str) -> str:
        row = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return "" if row is None else str(row[0])

    def put_text(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))

    def wrong(self, why: str) -> None:
        """A count is off: this run removes nothing more, and the next one is full (it
        makes the counts again)."""
        log.warning(
            "chunk reference counts of %s are off (%s): the next collection is full",
            self.path.parent.parent,
            why,
        )
        self.put(rebuild=1.0)
        self.off = True

    def _select(self, query: str, digests: list[bytes]) -> Iterator[Any]:
        for i in range(0, len(digests), BATCH):
            batch = digests[i : i + BATCH]
            yield from self.db.execute(query.format(",".join("?" * len(batch))), batch)

    def rows(self, digests: list[bytes]) -> dict[bytes, tuple[int, bytes | None]]:
        query = "SELECT d, n, base FROM refs WHERE d IN ({})"
        return {d: (n, base) for d, n, base in self._select(query, digests)}

    def marked(self, digests: list[bytes]) -> set[bytes]:
        """The ones some counted manifest needs."""
        query = "SELECT d FROM refs WHERE n > 0 AND d IN ({})"
        return {row[0] for row in self._select(query, digests)}

    def done(self, mid: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM counted WHERE m = ?", (mid,)).fetchone() is not None

    def counted(self) -> set[bytes]:
        return {row[0] for row in self.db.execute("SELECT m FROM counted")}

    def fan(self, fan: int) -> set[bytes]:
        """The needed chunks of one fan-out directory."""
        low = bytes([fan]) + b"\0" * (DIGEST_SIZE - 1)
        high = b"\xff" * (DIGEST_SIZE + 1) if fan == FANS - 1 else bytes([fan + 1])
        query = "SELECT d FROM refs WHERE n > 0 AND d >= ? AND d < ?"
        return {row[0] for row in self.db.execute(query, (low, high))}

    def add(self, pool: ChunkPool, counts: Counter[bytes]) -> int:
        """Count ``counts`` up; a chunk that had no row gets one, which holds its delta base
        (counted up too, and so on down the chain); how many rows were made."""
        made = 0
        while counts:
            digests = sorted(counts)
            have = self.rows(digests)
            old = [d for d in digests if d in have]
            self.db.executemany(
                "UPDATE refs SET n = n + ? WHERE d = ?", [(counts[d], d) for d in old]
            )
            woke = [d for d in old if have[d][0] <= 0]
            self.db.executemany("DELETE FROM dead WHERE d = ?", [(d,) for d in woke])
            new = [d for d in digests if d not in have]
            counts = self._make(pool, new, counts)
            made += len(new)
        return made

    def _make(self, pool: ChunkPool, new: list[bytes], counts: Counter[bytes]) -> Counter[bytes]:
        """Rows for chunks that had none, ``counts`` each; the bases they hold."""
        if not new:
            return Counter()
        # a chunk missing or corrupt gets a row all the same (verify reports it); its base
        # is looked for again by every collection until it is readable
        infos = pool.infos(new)
        self.db.executemany(
            "INSERT INTO refs (d, n, base) VALUES (?, ?, ?)",
            [(d, counts[d], infos[d].base if d in infos else None) for d in new],
        )
        self.db.executemany(
            "INSERT OR IGNORE INTO unknown (d) VALUES (?)", [(d,) for d in new if d not in infos]
        )
        return Counter(b for d in new if d in infos and (b := infos[d].base) is not None)

    def sub(self, counts: Counter[bytes]) -> int:
        """Count ``counts`` down; those reaching zero become dead (their rows, and the
        holds on their bases, stay until the chunk is gone: ``forget``); how many died."""
        digests = sorted(counts)
        have = self.rows(digests)
        if len(have) < len(digests):
            self.wrong("a counted chunk has no count")
        if any(have[d][0] < counts[d] for d in have):
            self.wrong("a count went below zero")
        self.db.executemany(
            "UPDATE refs SET n = max(n - ?, 0) WHERE d = ?", [(counts[d], d) for d in have]
        )
        died = [d for d in have if 0 < have[d][0] <= counts[d]]
        self.db.executemany(
            "INSERT OR REPLACE INTO dead (d, pack) VALUES (?, NULL)", [(d,) for d in died]
        )
        self.died += len(died)
        return len(died)

    def doubt(self, pool: ChunkPool, digests: Iterable[bytes]) -> int:
        """Stored chunks that may be garbage (named by a manifest nothing counted, or not
        needed by a full run's counts): those no count holds become dead; one without a
        row gets one (count 0), which holds its base while the chunk is stored. How many."""
        todo = sorted(set(digests))
        have = self.rows(todo)
        zero = [d for d in todo if d not in have or have[d][0] <= 0]
        self.db.executemany(
            "INSERT OR IGNORE INTO dead (d, pack) VALUES (?, NULL)", [(d,) for d in zero]
        )
        absent = [d for d in zero if d not in have]
        self.add(pool, self._make(pool, absent, Counter({d: 0 for d in absent})))
        return len(zero)

    def resolve_unknown(self, pool: ChunkPool) -> None:
        """Chunks given a row while unreadable that are readable now: their bases held."""
        unknown = [row[0] for row in self.db.execute("SELECT d FROM unknown")]
        if not unknown:
            return
        infos = pool.infos(unknown)
        have = self.rows(sorted(infos))
        self.begin()
        bases: Counter[bytes] = Counter()
        for d, info in infos.items():
            self.db.execute("DELETE FROM unknown WHERE d = ?", (d,))
            if d in have and info.base is not None:
                self.db.execute("UPDATE refs SET base = ? WHERE d = ?", (info.base, d))
                bases[info.base] += 1
        self.add(pool, bases)
        self.save(now=True)

    def forget(self, digests: list[bytes]) -> None:
        """Chunks the pool no longer holds: their rows go, and the holds on their bases
        (a base no longer held is dead: a later sweep takes it)."""
        have = self.rows(sorted(digests))
        gone = [d for d in digests if d in have and have[d][0] <= 0]
        args = [(d,) for d in digests]
        self.db.executemany("DELETE FROM dead WHERE d = ?", args)
        self.db.executemany("DELETE FROM refs WHERE d = ? AND n <= 0", args)
        self.db.executemany("DELETE FROM unknown WHERE d = ?", args)
        bases = Counter(b for d in gone if (b := have[d][1]) is not None)
        if bases:
            self.sub(bases)

    def close(self) -> None:
        self.db.close()


def collect(
    pool: ChunkPool,
    live: Callable[[], Iterable[bytes]],
    *,
    snapshot_lock: AbstractContextManager[object] | None = None,
    progress: Callable[[GcProgress], None] | None = None,
    check: Callable[[], None] | None = None,
    full: bool = False,
    full_every: float = FULL_EVERY,
) -> GcRun:
    """Collect ``pool``'s garbage: chunks and manifests no live manifest needs.

    ``live`` returns the ids of the live manifests; it is called inside ``snapshot_lock``.
    ``check`` is called between steps and may raise to stop the run (a cancellation); what
    was done stays done and the next run carries on. A live manifest that cannot be read
    stops the run with ``StorageError`` before anything is removed from then on. The run is
    full when ``full``, when none finished in the last ``full_every`` seconds, when a full
    one is unfinished or the counts were found wrong; incremental otherwise (module doc).
    """
    report, check = _reporter(progress), check or (lambda: None)
    with _exclusive(pool):
        _remove_db(gc_dir(pool) / "marks.db")  # an unfinished run of the format before counts
        if full or isinstance(pool, S3Pool) or _full_due(pool, full_every):
            return _full(pool, _snapshot(pool, live, snapshot_lock), report, check)
        refs = _Refs(refs_path(pool))
        try:
            return _incremental(pool, refs, _snapshot(pool, live, snapshot_lock), report, check)
        finally:
            refs.close()


def _open(path: Path) -> _Refs:
    """The counts at ``path``; made anew when the file is not a database (the collection
    that finds it so is full, and makes them again)."""
    try:
        return _Refs(path)
    except sqlite3.DatabaseError as exc:
        log.warning("%s unreadable (%s): made again by a full collection", path, exc)
        _remove_db(path)
        return _Refs(path)


def _full_due(pool: ChunkPool, full_every: float) -> bool:
    if unfinished(pool) or not refs_path(pool).exists():
        return True
    try:
        refs = _Refs(refs_path(pool))
    except sqlite3.DatabaseError as exc:
        log.warning("%s unreadable (%s): made again by a full collection", refs_path(pool), exc)
        return True
    try:
        return bool(refs.get("rebuild", 0.0)) or time.time() - refs.get("full_at", 0.0) > full_every
    finally:
        refs.close()


def _reporter(
    progress: Callable[[GcProgress], None] | None,
) -> Callable[[str, int, int], None]:
    def report(phase: str, done: int, total: int) -> None:
        if progress is not None:
            progress(GcProgress(phase, done, total))

    return report


@dataclass
class _Snapshot:
    manifests: set[bytes]  # the catalog's
    keep: set[bytes]  # and the bases of active writers
    cutoff: float
    now: float


def _snapshot(
    pool: ChunkPool,
    live: Callable[[], Iterable[bytes]],
    snapshot_lock: AbstractContextManager[object] | None,
) -> _Snapshot:
    with snapshot_lock or nullcontext():
        # Writers first, then the catalog: a writer that closed before we listed them
        # recorded its image before it closed, so the catalog read after shows it; one that
        # was open is listed and its start bounds the cut-off. This order needs no lock
        # shared with the writers, so it holds across processes (several appliance
        # processes on one pool).
        now = time.time()
        writers = pool._active_writers()
        manifests = set(live())
    cutoff = min([now, *(float(w.get("started", now)) for w in writers)]) - pool.clock_slack
    keep = manifests | {bytes.fromhex(b) for w in writers for b in w.get("bases", [])}
    return _Snapshot(manifests, keep, cutoff, now)


def _count(pool: ChunkPool, refs: _Refs, mid: bytes, live: bool, run: GcRun) -> None:
    """Count manifest ``mid`` (its chunks and their delta bases) in the open transaction;
    ``live``: a catalog image names it (else it is a writer's base, which may be gone: the
    writer will find out)."""
    try:
        chunk_ids = load_manifest(pool, mid).chunk_ids()
    except StorageError as exc:
        if not live:
            return
        raise LiveManifestUnreadable(manifest=mid.hex(), reason=exc.message) from exc
    refs.begin()
    run.chunks_marked += refs.add(pool, Counter(chunk_ids))
    refs.db.execute("INSERT OR IGNORE INTO counted (m) VALUES (?)", (mid,))
    run.manifests_marked += 1


def _count_all(
    pool: ChunkPool,
    refs: _Refs,
    todo: list[bytes],
    snap: _Snapshot,
    run: GcRun,
    report: Callable[[str, int, int], None],
    check: Callable[[], None],
) -> None:
    """Count the manifests ``todo``, saving about once a second (``SAVE_EVERY``)."""
    pool.packs.refresh()  # a chunk's header is read from the copy the pool reads
    try:
        for i, mid in enumerate(todo):
            check()
            _count(pool, refs, mid, mid in snap.manifests, run)
            refs.save()
            report("mark", i + 1, len(todo))
    finally:
        refs.save(now=True)  # what was counted stays counted: a later run goes on from there


def _uncount(pool: ChunkPool, refs: _Refs, mid: bytes, run: GcRun) -> None:
    """Count manifest ``mid`` down (it is no longer kept), in the open transaction."""
    refs.begin()
    try:
        chunk_ids = load_manifest(pool, mid).chunk_ids()
    except StorageError as exc:
        refs.wrong(f"manifest {mid.hex()} unreadable: {exc.message}")  # its chunks stay counted
    else:
        run.chunks_dead += refs.sub(Counter(chunk_ids))
    refs.db.execute("DELETE FROM counted WHERE m = ?", (mid,))
    run.manifests_unmarked += 1


def _full(
    pool: ChunkPool,
    snap: _Snapshot,
    report: Callable[[str, int, int], None],
    check: Callable[[], None],
) -> GcRun:
    refs = _open(rebuild_path(pool))
    try:
        run = _collect_full(pool, refs, snap, report, check)
        if not isinstance(pool, S3Pool):
            refs.put(full_at=time.time())
            refs.db.execute("PRAGMA journal_mode=DELETE")  # one file to rename, nothing beside
    finally:
        refs.close()
    if isinstance(pool, S3Pool):  # no incremental collection on a store: nothing to keep
        _remove_db(rebuild_path(pool))
        return run
    # The new counts replace the old: the old go first (a kill in between leaves only the
    # new ones, unfinished, which the next run finishes and installs).
    _remove_db(refs_path(pool))
    os.replace(rebuild_path(pool), refs_path(pool))
    fsync_dir(gc_dir(pool))
    return run


def _collect_full(
    pool: ChunkPool,
    refs: _Refs,
    snap: _Snapshot,
    report: Callable[[str, int, int], None],
    check: Callable[[], None],
) -> GcRun:
    run = GcRun(full=True)
    started = refs.get("started", 0.0)
    run.resumed = started > 0
    cutoff = min(snap.cutoff, refs.get("cutoff", snap.cutoff))
    refs.put(cutoff=cutoff, started=started or snap.now)

    _count_all(
        pool, refs, sorted(m for m in snap.keep if not refs.done(m)), snap, run, report, check
    )
    # A resumed run: what the stopped one counted and is no longer kept is counted down,
    # as an incremental run would (its manifest object is about to go).
    _uncount_all(pool, refs, sorted(refs.counted() - snap.keep), run, report, check)
    if refs.off:
        return run
    if isinstance(pool, S3Pool):
        _sweep_listed(pool, refs, cutoff, run, report, check)
    else:
        if not refs.get("doubted", 0.0):
            _doubt_stored(pool, refs, check)
        if refs.off:
            return run
        _sweep_local(pool, refs, cutoff, run, report, check)

    for mid, modified in pool.manifest_times():
        if mid not in snap.keep and modified < cutoff:
            run.manifests_removed += _remove_manifest(pool, mid, cutoff)
    if not isinstance(pool, S3Pool):
        _remove_stray_layouts(pool, snap.keep, cutoff)
    return run


def _remove_stray_layouts(pool: ChunkPool, keep: set[bytes], cutoff: float) -> None:
    """Remove the layout folders of images whose manifest is gone (a removal killed
    between the two), once older than the cut-off (a writer may be saving one)."""
    for mid in pool.image_layouts.folders():
        if mid in keep or pool.has_manifest(mid):
            continue
        with contextlib.suppress(FileNotFoundError):
            if os.stat(pool.image_layouts.folder(mid)).st_mtime < cutoff:
                pool.image_layouts.remove(mid)


def _doubt_stored(pool: ChunkPool, refs: _Refs, check: Callable[[], None]) -> None:
    """Give every stored chunk no count holds a row (count 0) holding its delta base, so
    that no base goes while a chunk built on it stays (in a pack kept whole, or touched by
    a writer since the cut-off)."""

    def stored() -> Iterator[bytes]:
        for fan in range(FANS):
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(pool.chunks_dir / f"{fan:02x}"):
                    if len(entry.name) == DIGEST_SIZE * 2:
                        yield bytes.fromhex(entry.name)
        pool.packs.refresh(force=True)
        for pack_id in pool.packs.packs():
            with contextlib.suppress(FileNotFoundError, StorageError):
                yield from (d for d, _, _ in pool.packs.entries(pack_id))

    batch: list[bytes] = []
    for digest in stored():
        batch.append(digest)
        if len(batch) >= BATCH:
            check()
            refs.begin()
            refs.doubt(pool, batch)  # those a count holds are left as they are
            refs.save()
            batch = []
    refs.begin()
    refs.doubt(pool, batch)
    refs.put(doubted=1.0)
    refs.save(now=True)


def _uncount_all(
    pool: ChunkPool,
    refs: _Refs,
    todo: list[bytes],
    run: GcRun,
    report: Callable[[str, int, int], None],
    check: Callable[[], None],
) -> None:
    try:
        for i, mid in enumerate(todo):
            check()
            _uncount(pool, refs, mid, run)
            refs.save()
            report("unmark", i + 1, len(todo))
    finally:
        refs.save(now=True)


def _remove_manifest(pool: ChunkPool, mid: bytes, cutoff: float) -> int:
    """Remove manifest object ``mid`` unless written since ``cutoff``; 1 if removed. On a
    local pool the rename and second stat close the gap in which a writer may commit the
    same manifest again (as for chunk files)."""
    if isinstance(pool, S3Pool):
        pool.delete_manifest(mid)
        return 1
    path = str(pool.manifest_path(mid))
    try:
        doomed = _doom(path, os.stat(path), cutoff)
    except FileNotFoundError:
        return 0
    if doomed is None or not doomed[0]:
        return 0
    _unlink(doomed[0])
    pool.image_layouts.remove(mid)
    return 1


def _incremental(
    pool: ChunkPool,
    refs: _Refs,
    snap: _Snapshot,
    report: Callable[[str, int, int], None],
    check: Callable[[], None],
) -> GcRun:
    run = GcRun(full=False)
    counted = refs.counted()
    _count_all(pool, refs, sorted(snap.keep - counted), snap, run, report, check)
    refs.resolve_unknown(pool)
    gone = sorted(counted - snap.keep)
    _uncount_all(pool, refs, gone, run, report, check)
    # Manifests nothing counted: an image made and deleted since the last collection,
    # a capture that failed after its manifest. Their chunks no count holds are dead.
    strays = []
    for mid in pool.list_manifests():
        if mid in snap.keep or mid in counted:
            continue
        with contextlib.suppress(FileNotFoundError):
            if os.stat(pool.manifest_path(mid)).st_mtime < snap.cutoff:
                strays.append(mid)
    try:
        for mid in strays:
            check()
            refs.begin()
            try:
                chunk_ids = load_manifest(pool, mid).chunk_ids()
            except StorageError as exc:
                refs.wrong(f"manifest {mid.hex()} unreadable: {exc.message}")
            else:
                run.chunks_dead += refs.doubt(pool, chunk_ids)
            refs.save()
    finally:
        refs.save(now=True)
    if refs.off:  # nothing removed on counts found wrong: the next (full) run makes them again
        return run
    for mid in [*gone, *strays]:
        run.manifests_removed += _remove_manifest(pool, mid, snap.cutoff)
    _sweep_dead(pool, refs, snap.cutoff, run, report, check)
    return run


def _sweep_dead(
    pool: ChunkPool,
    refs: _Refs,
    cutoff: float,
    run: GcRun,
    report: Callable[[str, int, int], None],
    check: Callable[[], None],
) -> None:
    """Sweep the dead chunks that are not parked: chunk files one by one, packs after.
    A chunk removed releases its base, which may die in turn: passes are repeated while
    bases die (at most the depth of a delta chain, plus one)."""
    pool.packs.refresh(force=True)  # a missed journal line must not make a chunk look gone
    swept = False
    for _ in range(MAX_DELTA_DEPTH + 2):
        died = refs.died
        swept |= _sweep_dead_pass(pool, refs, cutoff, run, report, check)
        if refs.died == died:
            break
    if swept:
        _compact(pool)


def _sweep_dead_pass(
    pool: ChunkPool,
    refs: _Refs,
    cutoff: float,
    run: GcRun,
    report: Callable[[str, int, int], None],
    check: Callable[[], None],
) -> bool:
    """One pass of ``_sweep_dead``; whether it swept a pack."""
    db = refs.db
    db.execute("CREATE TEMP TABLE IF NOT EXISTS placed (pack TEXT, d BLOB)")
    db.execute("DELETE FROM placed")
    total = db.execute("SELECT count(*) FROM dead WHERE pack IS NULL").fetchone()[0]
    last, done = b"", 0
    packs: list[tuple[str]] = []
    try:
        while True:
            check()
            rows = db.execute(
                "SELECT dead.d, refs.n FROM dead LEFT JOIN refs ON refs.d = dead.d"
                " WHERE dead.pack IS NULL AND dead.d > ? ORDER BY dead.d LIMIT ?",
                (last, BATCH),
            ).fetchall()
            if not rows:
                break
            last = rows[-1][0]
            refs.begin()
            needed = [d for d, n in rows if n is not None and n > 0]
            db.executemany("DELETE FROM dead WHERE d = ?", [(d,) for d in needed])
            placed: list[tuple[str, bytes]] = []
            gone: list[bytes] = []
            doomed: list[str] = []
            for d, n in rows:
                if n is not None and n > 0:
                    continue
                loc = pool.packs.lookup(d)
                if loc is not None:
                    placed.append((loc[0], d))
                    continue
                outcome = _sweep_loose(pool, d, cutoff)
                if outcome is None:
                    run.chunks_kept += 1
                    continue
                gone.append(d)
                if outcome[0]:
                    doomed.append(outcome[0])
                    run.chunks_removed += 1
                    run.bytes_freed += outcome[1]
            if doomed:
                list(_unlinker().map(_unlink, doomed))
            refs.forget(gone)
            db.executemany("INSERT INTO placed (pack, d) VALUES (?, ?)", placed)
            refs.save(now=True)
            done += len(rows)
            report("sweep", done, total)

        packs = db.execute("SELECT pack FROM placed GROUP BY pack ORDER BY pack").fetchall()
        for i, (pack_id,) in enumerate(packs):
            check()
            _sweep_dead_pack(pool, refs, pack_id, cutoff, run)
            report("packs", i + 1, len(packs))
    finally:
        refs.save(now=True)
    return bool(packs)


def _sweep_dead_pack(pool: ChunkPool, refs: _Refs, pack_id: str, cutoff: float, run: GcRun) -> None:
    """A pack holding dead chunks: swept as a whole (its needed chunks are kept), then its
    dead chunks forgotten if it went, parked in it if it was kept as mostly needed."""
    db = refs.db
    path = pool.packs.pack_path(pack_id)
    kept, removed, freed = pool.sweep_pack(pack_id, refs.marked, cutoff)
    run.chunks_kept += kept
    run.chunks_removed += removed
    run.bytes_freed += freed
    run.packs_done += 1
    ours = [row[0] for row in db.execute("SELECT d FROM placed WHERE pack = ?", (pack_id,))]
    refs.begin()
    if removed or not os.path.exists(path):
        if removed:
            run.packs_deleted += kept == 0
            run.packs_rewritten += kept > 0
        parked = [row[0] for row in db.execute("SELECT d FROM dead WHERE pack = ?", (pack_id,))]
        gone = []
        for d in ours + parked:
            if pool.packs.lookup(d) is None and not os.path.exists(pool._chunk_file(d)):
                gone.append(d)
            else:  # another copy (a rewrite killed half way): its pack is swept next time
                db.execute("UPDATE dead SET pack = NULL WHERE d = ?", (d,))
        refs.forget(gone)
    else:
        # Kept: every chunk in it gets a row holding its base (one a failed capture left
        # has none yet), and if it was kept as mostly needed, not as written or touched
        # since the cut-off, its dead chunks wait until another of its chunks dies.
        with contextlib.suppress(FileNotFoundError, StorageError):
            entries = [d for d, _, _ in pool.packs.entries(pack_id)]
            refs.doubt(pool, set(entries) - set(refs.rows(sorted(entries))))
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_mtime < cutoff:
                db.executemany("UPDATE dead SET pack = ? WHERE d = ?", [(pack_id, d) for d in ours])
    refs.save(now=True)


def _sweep_loose(pool: ChunkPool, digest: bytes, cutoff: float) -> tuple[str, int] | None:
    """A dead chunk not in a pack: (the ``.gc`` path to unlink, its size) when it goes,
    ("", 0) when it is not there, None when a writer wrote or touched it since ``cutoff``."""
    path = pool._chunk_file(digest)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        with contextlib.suppress(FileNotFoundError):
            _finish_doomed(path + ".gc", cutoff)  # left by a killed run
        return None if os.path.exists(path) else ("", 0)
    return _doom(path, st, cutoff)


def _doom(path: str, st: os.stat_result, cutoff: float) -> tuple[str, int] | None:
    """Rename an unneeded chunk or manifest file to ``.gc`` unless a writer wrote or
    touched it since ``cutoff``; (the renamed path, its size), or None when it stays."""
    if st.st_mtime >= cutoff:
        return None
    doomed = path + ".gc"
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return ("", 0)
    # A writer may have touched it between our stat and the rename: keep it then.
    if os.stat(doomed).st_mtime >= cutoff:
        os.rename(doomed, path)
        return None
    return doomed, st.st_size


def _sweep_listed(
    pool: S3Pool,
    refs: _Refs,
    cutoff: float,
    run: GcRun,
    report: Callable[[str, int, int], None],
    check: Callable[[], None],
) -> None:
    """The packs of a pool on an object store, from one listing (``S3Pool.sweep_packs``);
    a run stopped midway does the whole listing again (what it removed is gone from it)."""
    done = pool.sweep_packs(
        refs.marked, cutoff, check=check, progress=lambda i, n: report("packs", i, n)
    )
    run.chunks_kept += done.chunks_kept
    run.chunks_removed += done.chunks_removed
    run.bytes_freed += done.bytes_freed
    run.packs_deleted = done.packs_deleted
    run.packs_rewritten = done.packs_rewritten
    run.packs_spared = done.packs_spared
    run.orphans_deleted = done.orphans_deleted
    run.packs_done = done.packs_deleted + done.packs_rewritten


def _sweep_local(
    pool: ChunkPool,
    refs: _Refs,
    cutoff: float,
    run: GcRun,
    report: Callable[[str, int, int], None],
    check: Callable[[], None],
) -> None:
    # --- sweep ------------------------------------------------------------------------
    first = int(refs.get("fan", 0))
    run.resumed_at_fan = first
    run.chunks_kept = int(refs.get("kept", 0))
    run.chunks_removed = int(refs.get("removed", 0))
    run.bytes_freed = int(refs.get("freed", 0))
    for fan in range(first, FANS):
        check()
        marked = refs.fan(fan)
        kept, swept, freed = _sweep_fan(pool, fan, marked, cutoff)
        run.chunks_kept += kept
        run.chunks_removed += len(swept)
        run.bytes_freed += freed
        refs.begin()
        refs.forget(swept)  # what they held (their bases) is released
        refs.put(
            fan=fan + 1, kept=run.chunks_kept, removed=run.chunks_removed, freed=run.bytes_freed
        )
        refs.save(now=True)
        report("sweep", fan + 1, FANS)

    # --- packs: one at a time, in id order; the last one done is saved --------------------
    pool.packs.refresh(force=True)
    after = refs.get_text("pack")
    packs = [p for p in pool.packs.packs() if p > after]
    try:
        for i, pack_id in enumerate(packs):
            check()
            try:
                entries = [d for d, _, _ in pool.packs.entries(pack_id)]
            except (FileNotFoundError, StorageError):
                entries = []
            kept, removed, freed = pool.sweep_pack(pack_id, refs.marked, cutoff)
            refs.begin()
            if removed:
                run.packs_deleted += kept == 0
                run.packs_rewritten += kept > 0
                refs.forget(
                    [
                        d
                        for d in entries
                        if pool.packs.lookup(d) is None and not os.path.exists(pool._chunk_file(d))
                    ]
                )
            run.chunks_kept += kept
            run.chunks_removed += removed
            run.bytes_freed += freed
            run.packs_done += 1
            # A kill loses at most SAVE_EVERY of this: the resumed run sweeps those packs
            # again and finds them kept or gone.
            refs.put(kept=run.chunks_kept, removed=run.chunks_removed, freed=run.bytes_freed)
            refs.put_text("pack", pack_id)
            refs.save()
            report("packs", i + 1, len(packs))
    finally:
        refs.save(now=True)
    _compact(pool)


def _compact(pool: ChunkPool) -> None:
    try:
        pool.packs.compact()
    except OSError as exc:  # only a hint: the collection's work is done all the same
        log.warning("pack journal of %s not compacted: %s", pool.root, exc)


def _sweep_fan(
    pool: ChunkPool, fan: int, marked: set[bytes], cutoff: float
) -> tuple[int, list[bytes], int]:
    """Sweep one fan-out directory of chunk files: (kept, the removed, bytes freed)."""
    kept = freed = 0
    removed: list[bytes] = []
    doomed_paths: list[str] = []
    try:
        entries = list(os.scandir(pool.chunks_dir / f"{fan:02x}"))
    except FileNotFoundError:
        return 0, [], 0
    for entry in entries:
        if len(entry.name) != DIGEST_SIZE * 2:
            if entry.name.endswith(".gc"):  # left by a run killed between rename and unlink
                with contextlib.suppress(FileNotFoundError):
                    _finish_doomed(entry.path, cutoff)
            continue
        digest = bytes.fromhex(entry.name)
        if digest in marked:
            kept += 1
            continue
        try:
            outcome = _doom(entry.path, entry.stat(), cutoff)
        except FileNotFoundError:
            continue
        if outcome is None:
            kept += 1
        elif outcome[0]:
            doomed_paths.append(outcome[0])
            removed.append(digest)
            freed += outcome[1]
    # Unlinking is most of a sweep's time on journaling file systems, and it waits on the
    # disk, not the CPU: several at once.
    if doomed_paths:
        list(_unlinker().map(_unlink, doomed_paths))
    return kept, removed, freed


_pool: ThreadPoolExecutor | None = None


def _unlinker() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(UNLINK_THREADS, thread_name_prefix="tandem-gc-unlink")
    return _pool


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _finish_doomed(path: str, cutoff: float) -> None:
    """A ``.gc`` file a killed run left: put it back if the chunk came back into use (a
    writer rewrote or touched it), else remove it."""
    final = path[: -len(".gc")]
    if os.path.exists(final) or os.stat(path).st_mtime < cutoff:
        os.unlink(path)
    else:
        os.rename(path, final)
