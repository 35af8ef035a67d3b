"""Resumable mark-and-sweep garbage collection of a chunk pool, with bounded memory.

A collection has two phases.

- **Snapshot**: the active writers are listed (the pool's ``writers/``), *then* the live manifest
  ids are read (the catalog's images); the cut-off time is the older of now (taken before both)
  and the oldest active writer's start, less ``pool.clock_slack``. Manifests that active writers
  build on count as live. Every writer records its image in the catalog before it unregisters, so
  a writer missing from the list has its image in the catalog read after, and one in the list
  keeps what it wrote by the cut-off: no lock is shared with writers, and the snapshot holds
  beside writers in other processes or hosts on the same pool (their clocks must agree within
  ``clock_slack``, as any mtime-based sweep needs). ``snapshot_lock``, if given, is held around it
  too (``Site.gc_lock``, which orders it in-process).
- **Mark**: each live manifest is read, one at a time, and the chunks it names (and every
  chunk a named delta chunk is built on) are added to the mark set. **Sweep**: each of the
  256 fan-out directories of ``chunks/`` is listed; a chunk is removed when it is not marked
  and its mtime is older than the cut-off (a writer touches every chunk it reuses, and
  writes new ones after it started, so nothing a running or later writer relies on is
  older). The rename to ``<hex>.gc`` and a second stat close the gap between the stat and
  the removal, as ``ChunkPool.gc`` does. Then each pack (``storage.packs``), one at a
  time in id order: a pack written or touched since the cut-off is kept whole; an older one
  is removed when none of its chunks is marked, rewritten (its marked chunks copied into a
  new, durable pack first) when its live bytes are under ``packs.REWRITE_BELOW``, kept
  otherwise; removal is the same rename to ``.gc`` and second stat. Last, manifest objects
  no live manifest id names and older than the cut-off are removed.

The mark set is a SQLite file beside the pool (``DIR/gc/marks.db``; not the catalog): a
table of 32-byte digests ``WITHOUT ROWID``, about 40-50 bytes of disk per marked chunk and a
bounded page cache, so a pool of 100M chunks needs a few GB of disk, not of memory. The
sweep loads the marks of one fan-out directory at a time into memory (1/256 of them, about
100 bytes each in a Python set). Per chunk the cost is: one insert and one header read (is it
a delta?) per distinct live chunk while marking, one ``stat`` and one set lookup per stored
chunk while sweeping; for packs, one index file read and one mark query per pack, and
the copying of the live bytes of the packs it rewrites. The pack index itself (chunk id ->
pack, offset, length) is held in memory by the pool (``storage.packs``), about 220 bytes
per packed chunk: that, not the mark set, bounds the pool's size today.

Resuming: the marks file records the manifests already marked, the cut-off, the next fan-out
directory to sweep and the last pack swept, committed after each directory and about once a
second while marking manifests and sweeping packs (``SAVE_EVERY``: a kill loses at most that
second's work, done again by the resumed run). A pack rewrite killed half way leaves a
second copy of some chunks in a new pack (complete and verified: the old pack is removed
only after the new one is durable); the resumed run finds the old pack's chunks newer
elsewhere and removes it. A run that finds it resumes: it takes a fresh snapshot (new images
are marked too, the cut-off only goes back), marks what is not marked yet, and sweeps from
where the killed run stopped. That is safe for the same reason the first run is: chunks
marked earlier are only kept longer.
One collection runs per pool at a time (an flock on ``DIR/gc/lock``; across hosts the
appliance also holds a catalog lock, ``operations.gc``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from tandem.errors import (
    LiveManifestUnreadable,
    PoolGcRunning,
    StorageError,
)
from tandem.storage.digest import DIGEST_SIZE
from tandem.storage.manifest import load_manifest
from tandem.storage.pool import ChunkPool
from tandem.storage.s3pool import S3Pool

log = logging.getLogger(__name__)

FANS = 256
BATCH = 4096  # digests per mark query
SAVE_EVERY = 1.0  # seconds of marking or pack sweeping committed at once (what a kill loses)
UNLINK_THREADS = 8


@dataclass
class GcProgress:
    phase: str  # "mark", "sweep" or "packs"
    done: int
    total: int


@dataclass
class GcRun:
    """What one collection did (a resumed one counts what its predecessors did too)."""

    chunks_kept: int = 0
    chunks_removed: int = 0
    bytes_freed: int = 0
    manifests_removed: int = 0
    manifests_marked: int = 0
    chunks_marked: int = 0
    resumed: bool = False
    resumed_at_fan: int = 0
    packs_done: int = 0
    packs_deleted: int = 0
    packs_rewritten: int = 0
    packs_spared: int = 0
    orphans_deleted: int = 0


def gc_dir(pool: ChunkPool) -> Path:
    return pool.root / "gc"


def marks_path(pool: ChunkPool) -> Path:
    return gc_dir(pool) / "marks.db"


def unfinished(pool: ChunkPool) -> bool:
    """Whether a collection was stopped before it finished (the next one resumes it)."""
    return marks_path(pool).exists()


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


class _Marks:
    """The on-disk mark set and the run's saved state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS marks (d BLOB PRIMARY KEY) WITHOUT ROWID")
        self.db.execute("CREATE TABLE IF NOT EXISTS done (m BLOB PRIMARY KEY) WITHOUT ROWID")
        self._since: float | None = None  # when the open transaction began

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

    def marked(self, digests: list[bytes]) -> set[bytes]:
        return set(digests) - set(self.unmarked(digests))

    def done(self, mid: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM done WHERE m = ?", (mid,)).fetchone() is not None

    def unmarked(self, digests: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for i in range(0, len(digests), BATCH):
            batch = digests[i : i + BATCH]
            marks = ",".join("?" * len(batch))
            found = {
                row[0]
                for row in self.db.execute(f"SELECT d FROM marks WHERE d IN ({marks})", batch)
            }
            out.extend(d for d in batch if d not in found)
        return out

    def fan(self, fan: int) -> set[bytes]:
        low = bytes([fan]) + b"\0" * (DIGEST_SIZE - 1)
        query = "SELECT d FROM marks WHERE d >= ? AND d < ?"
        if fan == FANS - 1:
            return {row[0] for row in self.db.execute("SELECT d FROM marks WHERE d >= ?", (low,))}
        high = bytes([fan + 1]) + b"\0" * (DIGEST_SIZE - 1)
        return {row[0] for row in self.db.execute(query, (low, high))}

    def close(self) -> None:
        self.db.close()


def collect(
    pool: ChunkPool,
    live: Callable[[], Iterable[bytes]],
    *,
    snapshot_lock: AbstractContextManager[object] | None = None,
    progress: Callable[[GcProgress], None] | None = None,
    check: Callable[[], None] | None = None,
) -> GcRun:
    """Collect ``pool``'s garbage: chunks and manifests no live manifest needs.

    ``live`` returns the ids of the live manifests; it is called inside ``snapshot_lock``.
    ``check`` is called between steps and may raise to stop the run (a cancellation); what
    was done stays done and the next run resumes. A live manifest that cannot be read stops
    the run with ``StorageError`` before anything is removed from then on.
    """
    with _exclusive(pool):
        marks = _Marks(marks_path(pool))
        try:
            run = _collect(pool, marks, live, snapshot_lock, progress, check)
        finally:
            marks.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{marks_path(pool)}{suffix}")
        return run


def _collect(
    pool: ChunkPool,
    marks: _Marks,
    live: Callable[[], Iterable[bytes]],
    snapshot_lock: AbstractContextManager[object] | None,
    progress: Callable[[GcProgress], None] | None,
    check: Callable[[], None] | None,
) -> GcRun:
    def report(phase: str, done: int, total: int) -> None:
        if progress is not None:
            progress(GcProgress(phase, done, total))

    check = check or (lambda: None)
    run = GcRun()
    started = marks.get("started", 0.0)
    run.resumed = started > 0
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
    cutoff = min(cutoff, marks.get("cutoff", cutoff))
    keep = manifests | {bytes.fromhex(b) for w in writers for b in w.get("bases", [])}
    marks.put(cutoff=cutoff, started=started or now)

    # --- mark -------------------------------------------------------------------------
    todo = sorted(m for m in keep if not marks.done(m))
    try:
        for i, mid in enumerate(todo):
            check()
            _mark(pool, marks, mid, mid in manifests, run)
            marks.save()
            report("mark", i + 1, len(todo))
    finally:
        marks.save(now=True)  # what was marked stays marked: a resumed run goes on from there

    if isinstance(pool, S3Pool):
        _sweep_listed(pool, marks, cutoff, run, report, check)
    else:
        _sweep_local(pool, marks, cutoff, run, report, check)

    for mid, modified in pool.manifest_times():
        if mid not in keep and modified < cutoff:
            pool.delete_manifest(mid)
            run.manifests_removed += 1
    return run


def _mark(pool: ChunkPool, marks: _Marks, mid: bytes, live: bool, run: GcRun) -> None:
    """Mark the chunks of manifest ``mid`` and every base of a delta among them, and the
    manifest done, in the open transaction; ``live``: a catalog image names it (else it is
    a writer's base, which may be gone: the writer will find out)."""
    try:
        chunk_ids = sorted(load_manifest(pool, mid).chunk_ids())
    except StorageError as exc:
        if not live:
            return
        raise LiveManifestUnreadable(manifest=mid.hex(), reason=exc.message) from exc
    marks.begin()
    new = marks.unmarked(chunk_ids)
    while new:
        marks.db.executemany("INSERT OR IGNORE INTO marks (d) VALUES (?)", [(d,) for d in new])
        run.chunks_marked += len(new)
        # a chunk missing or corrupt is left out: verify reports it; GC must not fail on it
        bases = {i.base for i in pool.infos(new).values() if i.base is not None}
        new = marks.unmarked(sorted(bases))
    marks.db.execute("INSERT OR IGNORE INTO done (m) VALUES (?)", (mid,))
    run.manifests_marked += 1


def _sweep_listed(
    pool: S3Pool,
    marks: _Marks,
    cutoff: float,
    run: GcRun,
    report: Callable[[str, int, int], None],
    check: Callable[[], None],
) -> None:
    """The packs of a pool on an object store, from one listing (``S3Pool.sweep_packs``);
    a run stopped midway does the whole listing again (what it removed is gone from it)."""
    done = pool.sweep_packs(
        marks.marked, cutoff, check=check, progress=lambda i, n: report("packs", i, n)
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
    marks: _Marks,
    cutoff: float,
    run: GcRun,
    report: Callable[[str, int, int], None],
    check: Callable[[], None],
) -> None:
    # --- sweep ------------------------------------------------------------------------
    first = int(marks.get("fan", 0))
    run.resumed_at_fan = first
    run.chunks_kept = int(marks.get("kept", 0))
    run.chunks_removed = int(marks.get("removed", 0))
    run.bytes_freed = int(marks.get("freed", 0))
    for fan in range(first, FANS):
        check()
        marked = marks.fan(fan)
        kept, removed, freed = _sweep_fan(pool, fan, marked, cutoff)
        run.chunks_kept += kept
        run.chunks_removed += removed
        run.bytes_freed += freed
        marks.put(
            fan=fan + 1, kept=run.chunks_kept, removed=run.chunks_removed, freed=run.bytes_freed
        )
        report("sweep", fan + 1, FANS)

    # --- packs: one at a time, in id order; the last one done is saved --------------------
    pool.packs.refresh(force=True)
    after = marks.get_text("pack")
    packs = [p for p in pool.packs.packs() if p > after]
    try:
        for i, pack_id in enumerate(packs):
            check()
            kept, removed, freed = pool.sweep_pack(pack_id, marks.marked, cutoff)
            if removed:
                run.packs_deleted += kept == 0
                run.packs_rewritten += kept > 0
            run.chunks_kept += kept
            run.chunks_removed += removed
            run.bytes_freed += freed
            run.packs_done += 1
            # A kill loses at most SAVE_EVERY of this: the resumed run sweeps those packs
            # again and finds them kept or gone.
            marks.begin()
            marks.put(kept=run.chunks_kept, removed=run.chunks_removed, freed=run.bytes_freed)
            marks.put_text("pack", pack_id)
            marks.save()
            report("packs", i + 1, len(packs))
    finally:
        marks.save(now=True)
    try:
        pool.packs.compact()
    except OSError as exc:  # only a hint: the collection's work is done all the same
        log.warning("pack journal of %s not compacted: %s", pool.root, exc)


def _sweep_fan(
    pool: ChunkPool, fan: int, marked: set[bytes], cutoff: float
) -> tuple[int, int, int]:
    kept = removed = freed = 0
    doomed_paths: list[str] = []
    try:
        entries = list(os.scandir(pool.chunks_dir / f"{fan:02x}"))
    except FileNotFoundError:
        return 0, 0, 0
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
            st = entry.stat()
        except FileNotFoundError:
            continue
        if st.st_mtime >= cutoff:
            kept += 1
            continue
        doomed = entry.path + ".gc"
        try:
            os.rename(entry.path, doomed)
        except FileNotFoundError:
            continue
        # A writer may have touched it between our stat and the rename: keep it then.
        if os.stat(doomed).st_mtime >= cutoff:
            os.rename(doomed, entry.path)
            kept += 1
            continue
        doomed_paths.append(doomed)
        removed += 1
        freed += st.st_size
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
