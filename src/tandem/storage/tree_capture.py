"""File trees, capture: a directory tree into a pool, read at the source.

File contents are cut by FastCDC (min 256 KiB, average 1 MiB, max 4 MiB), so an insertion
moves no chunk boundary but the ones next to it; a file of at most 256 KiB is one chunk. Holes
of sparse files become ``(None, length)`` items: never read, never stored. The manifest format
is in ``manifest.py``.

Capture invariants
- Entries are sorted by path (code-point order, which is UTF-8 byte order): a parent precedes
  its children, and the first path of a hard-link group (type "f") precedes the others ("h").
- The walk never follows symlinks (only the root may be one). Sockets, devices, names that are
  not UTF-8 and entries that vanish during the walk are left out and counted in
  ``meta["skipped"]`` (``{"count": n, "examples": [...]}``, present only when n > 0).
  ``meta["root"]`` holds the root directory's mode, uid, gid and mtime_ns.
- With ``base``, a regular file whose size, mtime, ctime and inode number equal its base
  entry's is not opened: its chunk list is the base's. The writer registers ``base_id`` so
  garbage collection keeps those chunks; without a registered base each reused chunk is
  touched (and the file read if one is missing). An entry the base describes unchanged is
  the base's TreeEntry object itself, so a re-capture costs no second copy of the tree:
  treat manifests as values and never mutate their entries.
- With ``previous`` (the kept point-in-time copy ``base`` was captured from, on the same
  file system), a large non-sparse file that changed is read only in the chunks that
  overlap ranges whose extents it no longer shares with its previous copy
  (``storage.extents``), cut again from the chunk boundary before them until a new boundary
  is an old one whose chunk is untouched: the chunk list is the one a full read makes (a
  content-defined boundary depends only on the bytes from its chunk's start). When the
  extent maps cannot tell (a flag they are not trusted with, another size) the file is read.
  A file new at its path is compared so with the base's file of its inode number whose path
  is gone, when there is one: a file renamed, then written in part (PostgreSQL recycles a
  WAL segment so) is read only where written. Shared extents mean the same bytes whichever
  file they are matched with: a reused inode number costs a whole read, never a wrong byte.
- A file is read between its lstat (the walk) and an fstat. If size, mtime, ctime or inode
  differ it is read once more against a fresh fstat; a second change fails the capture with
  SourceChanged. When the check below follows (``recheck``), the fstat is left out: that
  check compares every file with its walk-time lstat after all are read, which catches a
  change during the read as well (and saves a syscall per file of a tree of small ones).
  A file that vanishes before it is opened is left out; an unreadable one fails the
  capture with SourceUnreadable naming it.
- Never a torn success: once every file is read, every regular file of the manifest (read or
  reused from the base) is lstat'ed again and its size, mtime, ctime and inode compared with
  what it was read as. A file that changed after it was read is read again, after a short
  backoff, and the whole check repeats, at most ``RECHECK_ATTEMPTS`` times; a file still
  changing then fails the capture with SourceChanged, and nothing becomes visible. When the
  check passes, every file held its captured content at the moment the check began
  (consistent per file; files created or removed after the walk are not seen).
- New files (one link, not sparse, not in the base) are read while the walk goes on, when
  the check follows: files of one chunk in batches, larger ones a file a task. A file that
  vanished after it was read keeps the content it had until then. A capture from a
  point-in-time source (a snapshot, which cannot change) skips the check (``recheck``).
- Nothing becomes visible unless the capture succeeds: the manifest is committed last inside
  the writer context, and an exception discards the writer's pending chunks.
- Memory is bounded independently of file sizes: a worker holds at most one extent of
  ``WHOLE_READ_MAX`` bytes, and chunk data in flight is capped at ``INFLIGHT_BYTES``. Only the
  manifest (one entry per path) grows with the tree.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from pyfastcdc import FastCDC

from tandem.errors import (
    SourceChanged,
    SourceUnreadable,
)
from tandem.storage import extents
from tandem.storage.digest import hash_object
from tandem.storage.fileio import pipelined
from tandem.storage.manifest import (
    DIR,
    FIFO,
    FILE,
    HARDLINK,
    SYMLINK,
    TreeEntry,
    TreeManifest,
    gc_paused,
    store_manifest,
)
from tandem.storage.pool import ChunkPool, PoolWriter
from tandem.storage.volume import (
    CaptureStats,
    Progress,
    data_extents,
    default_workers,
)

CDC_MIN = 256 * 1024
CDC_AVG = 1024 * 1024
CDC_MAX = 4 * 1024 * 1024
WHOLE_READ_MAX = CDC_MAX  # extents up to this size are read with one pread, larger ones streamed
BATCH_FILES = 128  # small files per worker task: one task per file costs more than reading it
BATCH_BYTES = 4 * 1024 * 1024
INFLIGHT_BYTES = 64 * 1024 * 1024  # chunk data queued for or held by workers
MAX_SKIP_EXAMPLES = 20
RECHECK_ATTEMPTS = 4  # re-reads of files that changed after they were read, then it fails
INCREMENTAL_WINDOW = 4 * CDC_MAX  # bytes cut at once when a changed file is cut again
RECHECK_BACKOFF = 0.05  # seconds before the first re-read; doubled each time

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOATIME = getattr(os, "O_NOATIME", 0)
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _O_CLOEXEC
_FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE

_tls = threading.local()
T = TypeVar("T")


def _cdc() -> FastCDC:
    """This thread's chunker (pyfastcdc does not promise that one object is thread-safe)."""
    cdc: FastCDC | None = getattr(_tls, "cdc", None)
    if cdc is None:
        cdc = _tls.cdc = FastCDC(CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX)
    return cdc


def _identity(value: T) -> T:
    return value


# --- capture ------------------------------------------------------------------------------


class _Changed(Exception):
    """Internal: the file changed under the reader; read it again or fail."""


@dataclass
class _Cost:
    read: int = 0
    new: int = 0
    new_bytes: int = 0
    stored: int = 0


@dataclass
class _FileResult:
    index: int
    chunks: list[tuple[bytes | None, int]] | None  # None: the file vanished
    fresh: os.stat_result | None  # the stat the content matches, when it was read twice
    cost: _Cost


@dataclass
class _ChunkResult:
    digest: bytes | None
    length: int
    cost: _Cost


@dataclass
class _StreamEnd:
    index: int
    fresh: os.stat_result | None
    vanished: bool = False


@dataclass
class _StreamRestart:
    index: int


_Result = list[_FileResult] | _ChunkResult | _StreamEnd | _StreamRestart


@dataclass
class _Skipped:
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, path: str, reason: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_SKIP_EXAMPLES:
            # backslashreplace: the example must survive msgpack even for undecodable names
            shown = path.encode("utf-8", "backslashreplace").decode("utf-8")
            self.examples.append(f"{shown} ({reason})")


def _utf8_ok(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # surrogate-escaped bytes: the manifest cannot carry them
        return False
    return True


def _looks_sparse(st: os.stat_result) -> bool:
    # Allocated blocks short of the size: worth asking SEEK_DATA (costs syscalls otherwise).
    return st.st_blocks * 512 < st.st_size


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _entry_key(e: TreeEntry) -> tuple[int, int, int, int]:
    return e.size, e.mtime_ns, e.ctime_ns, e.ino


def _refresh(e: TreeEntry, st: os.stat_result) -> None:
    e.mode = stat.S_IMODE(st.st_mode)
    e.uid, e.gid = st.st_uid, st.st_gid
    e.mtime_ns, e.size, e.ctime_ns, e.ino = st.st_mtime_ns, st.st_size, st.st_ctime_ns, st.st_ino


def _source_error(path: str, exc: OSError) -> Exception:
    if exc.errno == errno.ELOOP:  # opened with O_NOFOLLOW: it became a symlink
        return SourceChanged(path=path, reason="it was replaced by a symlink")
    return SourceUnreadable(path=path, reason=exc.strerror or str(exc))


def _unchanged(b: TreeEntry, st: os.stat_result, ctime_ns: int, ino: int) -> bool:
    """Whether base entry ``b`` still describes what ``st`` (an lstat) found.

    ctime and inode number catch what mtime alone misses: a file written and then given its
    old mtime back, or replaced by another with the same size and mtime.
    """
    return (
        b.mtime_ns == st.st_mtime_ns
        and b.ctime_ns == ctime_ns
        and b.ino == ino
        and b.mode == stat.S_IMODE(st.st_mode)
        and b.uid == st.st_uid
        and b.gid == st.st_gid
    )


def _walk(
    root: str,
    skipped: _Skipped,
    base: dict[str, TreeEntry],
    chunks_present: Callable[[TreeEntry], bool],
    identity: Mapping[str, tuple[int, int]] | None = None,
    on_new: Callable[[TreeEntry], None] | None = None,
    leave_out: Callable[[str], bool] | None = None,
) -> tuple[list[TreeEntry], dict[str, int], set[str]]:
    """lstat everything under ``root``: (unsorted entries, st_dev of multiply-linked files,
    paths of files that look sparse). A path ``leave_out`` names is not part of the tree
    (nor, for a folder, anything in it).

    ``on_new(entry)`` is called, as the walk goes on, for each regular file that is not
    empty, ``base`` does not name, has one link and is not sparse: the caller may read it at
    once (``capture_tree`` does).

    An entry that ``base`` describes unchanged is the base's TreeEntry object itself (chunks
    included, for a file whose chunks are present): no copy of an unchanged tree is built.
    """
    entries: list[TreeEntry] = []
    link_dev: dict[str, int] = {}
    sparse: set[str] = set()
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        abs_dir = f"{root}/{rel_dir}" if rel_dir else root
        prefix = f"{rel_dir}/" if rel_dir else ""
        try:
            it = os.scandir(abs_dir)
        except FileNotFoundError as exc:
            if not rel_dir:
                raise SourceUnreadable(path=root, reason="it does not exist") from exc
            skipped.add(rel_dir, "vanished")
            continue
        except OSError as exc:
            raise SourceUnreadable(path=abs_dir, reason=exc.strerror or str(exc)) from exc
        try:
            with it:
                for de in it:
                    rel = prefix + de.name
                    if not _utf8_ok(de.name):
                        skipped.add(rel, "name is not UTF-8")
                        continue
                    if leave_out is not None and leave_out(rel):
                        continue
                    try:
                        st = de.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        skipped.add(rel, "vanished")
                        continue
                    mode = st.st_mode
                    ctime_ns, ino = st.st_ctime_ns, st.st_ino
                    if identity is not None:
                        ctime_ns, ino = identity.get(rel, (ctime_ns, ino))
                    b = base.get(rel)
                    if b is not None and _unchanged(b, st, ctime_ns, ino):
                        if stat.S_ISREG(mode):
                            # Linked files get their own entry: their type is decided later.
                            same = (
                                b.type == FILE
                                and st.st_nlink == 1
                                and b.size == st.st_size
                                and chunks_present(b)
                            )
                        elif stat.S_ISDIR(mode):
                            same = b.type == DIR
                        elif stat.S_ISLNK(mode):
                            same = b.type == SYMLINK  # a new target means a new inode
                        else:
                            same = b.type == FIFO and stat.S_ISFIFO(mode)
                        if same:
                            entries.append(b)
                            if b.type == DIR:
                                stack.append(rel)
                            continue
                    size = 0
                    target = ""
                    if stat.S_ISREG(mode):
                        typ = FILE
                        size = st.st_size
                        if st.st_nlink > 1:
                            link_dev[rel] = st.st_dev
                        if _looks_sparse(st):
                            sparse.add(rel)
                    elif stat.S_ISDIR(mode):
                        typ = DIR
                        stack.append(rel)
                    elif stat.S_ISLNK(mode):
                        typ = SYMLINK
                        try:
                            target = os.readlink(f"{root}/{rel}")
                        except FileNotFoundError:
                            skipped.add(rel, "vanished")
                            continue
                        if not _utf8_ok(target):
                            skipped.add(rel, "symlink target is not UTF-8")
                            continue
                    elif stat.S_ISFIFO(mode):
                        typ = FIFO
                    else:
                        skipped.add(rel, "socket" if stat.S_ISSOCK(mode) else "device")
                        continue
                    entry = TreeEntry(
                        rel,
                        typ,
                        stat.S_IMODE(mode),
                        st.st_uid,
                        st.st_gid,
                        st.st_mtime_ns,
                        size,
                        target,
                        [],
                        ctime_ns,
                        ino,
                    )
                    entries.append(entry)
                    if (
                        on_new is not None
                        and typ == FILE
                        and size > 0
                        and b is None
                        and st.st_nlink == 1
                        and rel not in sparse
                    ):
                        on_new(entry)
        except OSError as exc:
            raise SourceUnreadable(path=abs_dir, reason=exc.strerror or str(exc)) from exc
    return entries, link_dev, sparse


def _pread_exact(fd: int, length: int, offset: int, path: str) -> bytes:
    try:
        data = os.pread(fd, length, offset)
        if len(data) < length:
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(fd, length - got, offset + got)
                if not more:
                    raise _Changed
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
    except OSError as exc:
        raise SourceUnreadable(path=path, reason=exc.strerror or str(exc)) from exc
    return data


class _RangeReader:
    """A ``readinto`` stream over bytes [start, end) of a file, for ``FastCDC.cut_stream``."""

    def __init__(self, fd: int, start: int, end: int, path: str) -> None:
        self.fd, self.pos, self.end, self.path = fd, start, end, path

    def readinto(self, buf: memoryview) -> int:
        want = min(len(buf), self.end - self.pos)
        if want <= 0:
            return 0
        try:
            got = os.preadv(self.fd, [buf[:want]], self.pos)
        except OSError as exc:
            raise SourceUnreadable(path=self.path, reason=exc.strerror or str(exc)) from exc
        self.pos += got
        return got


def _pieces(
    fd: int, size: int, sparse: bool, path: str
) -> Iterator[tuple[bytes | memoryview | None, int]]:
    """The file's content as (chunk data, length) in order; (None, length) for a hole.

    A yielded view is valid only until the next item. Raises _Changed if the file is
    shorter than ``size``.
    """
    extents = data_extents(fd, size) if sparse else [(0, size)]
    pos = 0
    for start, end in extents:
        start, end = min(start, size), min(end, size)  # the file may have grown meanwhile
        if start >= end:
            continue
        if start > pos:
            yield None, start - pos
        if end - start <= WHOLE_READ_MAX:
            data = _pread_exact(fd, end - start, start, path)
            if len(data) <= CDC_MIN:
                # bytes, not a view of them: stored raw (incompressible), they are not copied
                yield data, len(data)
            else:
                for c in _cdc().cut_buf(data):
                    yield c.data, c.length
        else:
            reader = _RangeReader(fd, start, end, path)
            for c in _cdc().cut_stream(reader):
                yield c.data, c.length
            if reader.pos != end:
                raise _Changed
        pos = end
    if pos < size:
        yield None, size - pos


class _Capture:
    """One capture: the walk's entries, the writer, and the read jobs."""

    def __init__(
        self,
        writer: PoolWriter,
        root: str,
        entries: list[TreeEntry],
        sparse: set[str],
        on_read: Callable[[str], None] | None = None,
        copy: bool = False,
    ):
        self.writer = writer
        self.root = root
        self.entries = entries
        self.sparse = sparse
        self.on_read = on_read
        # A copy (reflink clones) records the live files' identity: compare it with itself.
        self.copy = copy
        self.torn_ok = False
        self.checked_later = False
        """Every file is compared with its walk-time lstat after all are read (``_settle``):
        a read need not fstat the file after it."""
        self.previous: str | None = None
        self.plans: dict[int, tuple[str, list[tuple[bytes, int]]]] = {}
        """Large files whose previous cut ``previous`` holds: its path there (a renamed
        file's old one) and its base chunks."""
        # O_NOATIME keeps reads from dirtying inodes; only the owner or root may ask for it.
        self.open_flags = os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC
        if os.geteuid() == 0:
            self.open_flags |= _O_NOATIME

    def store(self, data: bytes | memoryview, cost: _Cost) -> bytes:
        digest, subs = hash_object(data)
        result = self.writer.put(data, digest, subs)
        cost.read += len(data)
        if result.new:
            cost.new += 1
            cost.new_bytes += len(data)
            cost.stored += result.stored
        return digest

    def _open(self, path: str) -> int | None:
        try:
            return os.open(path, self.open_flags)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _source_error(path, exc) from exc

    def _ref(self, e: TreeEntry, fd: int) -> tuple[int, int, int, int]:
        """What the open file must still be after reading: the walk's lstat, or (a copy)
        the copy's own."""
        return _stat_key(os.fstat(fd)) if self.copy else _entry_key(e)

    def capture_file(self, index: int) -> _FileResult:
        """Read, cut and store one file in the calling thread (a worker)."""
        e = self.entries[index]
        path = f"{self.root}/{e.path}"
        cost = _Cost()
        for attempt in range(2):
            fd = self._open(path)
            if fd is None:
                return _FileResult(index, None, None, cost)
            try:
                fresh = None
                if attempt:
                    fresh = os.fstat(fd)
                    if not stat.S_ISREG(fresh.st_mode):
                        raise SourceChanged(path=path, reason="it is no longer a regular file")
                ref = _stat_key(fresh) if fresh else self._ref(e, fd)
                sparse = _looks_sparse(fresh) if fresh else e.path in self.sparse
                chunks: list[tuple[bytes | None, int]] = []
                try:
                    for data, n in _pieces(fd, ref[0], sparse, path):
                        chunks.append((None if data is None else self.store(data, cost), n))
                    after = None if self.checked_later and not attempt else os.fstat(fd)
                except _Changed:
                    continue
            finally:
                os.close(fd)
            if self.torn_ok or after is None or _stat_key(after) == ref:
                if self.on_read is not None:
                    self.on_read(e.path)
                return _FileResult(index, chunks, fresh, cost)
        raise SourceChanged(path=path, reason="its size or times changed while it was read, twice")

    def capture_batch(self, indices: list[int]) -> list[_FileResult]:
        return [self.capture_file(i) for i in indices]

    def capture_new(self, batch: list[TreeEntry]) -> _Cost:
        """Read new files the walk just found (``_walk``'s ``on_new``), in a worker while the
        walk goes on: the first attempt of ``capture_file`` when the after-read check
        follows (``checked_later``). Each file read whole gets its chunk list here (the walk
        hands an entry over and does not touch it again until this task is done); one whose
        read came up short, or that vanished, keeps none, and the general path reads it
        again after the walk. A large file is streamed (``_pieces``): the worker holds one
        extent of it at a time. Returns the batch's cost, one for all its files (per-file
        results cost the walk's thread a loop over them)."""
        cost = _Cost()
        store = self.store
        for e in batch:
            path = f"{self.root}/{e.path}"
            fd = self._open(path)
            if fd is None:
                continue
            try:
                chunks = [
                    (None if data is None else store(data, cost), n)
                    for data, n in _pieces(fd, e.size, False, path)
                ]
            except _Changed:
                continue
            finally:
                os.close(fd)
            e.chunks = chunks
            if self.on_read is not None:
                self.on_read(e.path)
        return cost

    def store_chunk(self, data: bytes) -> _ChunkResult:
        cost = _Cost()
        return _ChunkResult(self.store(data, cost), len(data), cost)

    def stream_jobs(self, index: int) -> Iterator[tuple[Callable[[], _Result], int]]:
        """Jobs for a large file: this thread reads and cuts, workers hash and compress.

        Ends with a _StreamEnd marker; a _StreamRestart marker tells the consumer to drop the
        chunks of an attempt during which the file changed.
        """
        e = self.entries[index]
        path = f"{self.root}/{e.path}"
        for attempt in range(2):
            fd = self._open(path)
            if fd is None:
                yield partial(_identity, _StreamEnd(index, None, vanished=True)), 0
                return
            try:
                fresh = None
                if attempt:
                    fresh = os.fstat(fd)
                    if not stat.S_ISREG(fresh.st_mode):
                        raise SourceChanged(path=path, reason="it is no longer a regular file")
                ref = _stat_key(fresh) if fresh else self._ref(e, fd)
                sparse = _looks_sparse(fresh) if fresh else e.path in self.sparse
                try:
                    for data, n in _pieces(fd, ref[0], sparse, path):
                        if data is None:
                            yield partial(_identity, _ChunkResult(None, n, _Cost())), 0
                        else:
                            yield partial(self.store_chunk, bytes(data)), n
                    same = self.torn_ok or _stat_key(os.fstat(fd)) == ref
                except _Changed:
                    same = False
            finally:
                os.close(fd)
            if same:
                if self.on_read is not None:
                    self.on_read(e.path)
                yield partial(_identity, _StreamEnd(index, fresh)), 0
                return
            yield partial(_identity, _StreamRestart(index)), 0
        raise SourceChanged(path=path, reason="its size or times changed while it was read, twice")

    def incremental_jobs(self, index: int) -> Iterator[tuple[Callable[[], _Result], int]]:
        """Jobs for a large file of a point-in-time source whose previous cut is kept: only
        chunks that overlap ranges whose extents differ from the previous cut's file
        (``storage.extents``) are read and cut again, from the chunk boundary before them
        until the new boundaries meet an old one whose chunk is untouched; the other chunks
        are the base's. Content-defined boundaries depend only on the bytes from the chunk's
        start, so the chunk list is the one a full read makes. When the extent maps cannot
        tell, the file is read whole (``stream_jobs``)."""
        e = self.entries[index]
        was, old = self.plans[index]
        path = f"{self.root}/{e.path}"
        fd = self._open(path)
        if fd is None:
            yield from self.stream_jobs(index)
            return
        try:
            ref = os.fstat(fd)
            size = ref.st_size
            changed = _changed_against(fd, size, f"{self.previous}/{was}", old)
            if changed is None:
                os.close(fd)
                fd = -1
                yield from self.stream_jobs(index)
                return
            starts = [0]
            for _, n in old:
                starts.append(starts[-1] + n)
            try:
                yield from self._recut(fd, path, size, old, starts, changed)
            except _Changed as exc:
                raise SourceChanged(
                    path=path, reason="it shrank in a point-in-time source"
                ) from exc
            if _stat_key(os.fstat(fd)) != _stat_key(ref):
                raise SourceChanged(path=path, reason="it changed in a point-in-time source")
        finally:
            if fd >= 0:
                os.close(fd)
        if self.on_read is not None:
            self.on_read(e.path)
        yield partial(_identity, _StreamEnd(index, None)), 0

    def _recut(
        self,
        fd: int,
        path: str,
        size: int,
        old: list[tuple[bytes, int]],
        starts: list[int],
        changed: list[tuple[int, int]],
    ) -> Iterator[tuple[Callable[[], _Result], int]]:
        """The chunk jobs of ``incremental_jobs``: old chunks where untouched, cut again
        where not."""
        old_size = starts[-1]
        at = {b: i for i, b in enumerate(starts[:-1])}

        def clean(i: int) -> bool:
            lo, hi = starts[i], starts[i + 1]
            if hi > size or (i == len(old) - 1 and size != old_size):
                return False  # its end was the old end of file
            return not any(s < hi and lo < t for s, t in changed)

        pos = 0
        while pos < size:
            i = at.get(pos)
            if i is not None and clean(i):
                digest, n = old[i]
                yield partial(_identity, _ChunkResult(digest, n, _Cost())), 0
                pos += n
                continue
            # Cut again from this boundary until a new boundary is an old one again.
            synced = False
            while not synced and pos < size:
                end = min(size, pos + INCREMENTAL_WINDOW)
                data = _pread_exact(fd, end - pos, pos, path)
                cuts = list(_cdc().cut_buf(data))
                for c in cuts if end == size else cuts[:-1]:
                    yield partial(self.store_chunk, bytes(c.data)), c.length
                    pos += c.length
                    j = at.get(pos)
                    if j is not None and clean(j):
                        synced = True
                        break

    def jobs(self, todo: list[int]) -> Iterator[tuple[Callable[[], _Result], int]]:
        batch: list[int] = []
        batch_bytes = 0
        for i in todo:
            e = self.entries[i]
            if e.size <= WHOLE_READ_MAX:
                batch.append(i)
                batch_bytes += e.size
                if len(batch) >= BATCH_FILES or batch_bytes >= BATCH_BYTES:
                    yield partial(self.capture_batch, batch), batch_bytes
                    batch, batch_bytes = [], 0
            else:
                if batch:
                    yield partial(self.capture_batch, batch), batch_bytes
                    batch, batch_bytes = [], 0
                if i in self.plans:
                    yield from self.incremental_jobs(i)
                else:
                    yield from self.stream_jobs(i)
        if batch:
            yield partial(self.capture_batch, batch), batch_bytes


@gc_paused()
def capture_tree(
    pool: ChunkPool,
    root: Path | str,
    *,
    base: TreeManifest | None = None,
    base_id: bytes | None = None,
    meta: dict[str, Any] | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    recheck: bool = True,
    on_read: Callable[[str], None] | None = None,
    identity: Mapping[str, tuple[int, int]] | None = None,
    torn_ok: bool = False,
    previous: str | None = None,
    leave_out: Callable[[str], bool] | None = None,
) -> tuple[bytes, TreeManifest, CaptureStats]:
    """Capture the tree under ``root`` into ``pool``; returns (manifest id, manifest, stats).

    With ``base`` (the previous image of the same tree, stored as ``base_id``) unchanged files
    are not read at all. Raises SourceUnreadable (root or a file cannot be read) or
    SourceChanged (a file kept changing while, or after, it was read); nothing is visible
    then. ``recheck`` (on unless ``root`` is a snapshot that cannot change) verifies that no
    file changed after it was read (see the module's invariants). ``on_read(path)`` is
    called, from a worker, once a file's content has been read: a test seam. ``identity``
    maps paths to the (ctime_ns, inode) recorded for them when ``root`` is a copy of the
    live tree (reflink clones, ``agent.pit``): the next capture then recognises unchanged
    files by the live files' identity, not by the copy's. ``torn_ok`` takes each file as
    read even if it changed meanwhile (its first walk-time size bytes): only for a source
    that repairs itself, a PostgreSQL data directory inside a base backup, whose WAL
    replay rewrites every page changed since the backup started. ``previous`` is the
    point-in-time source that ``base`` was captured from, kept (a btrfs snapshot or reflink
    clones on the same file system as ``root``, itself a point in time): a large file that
    changed is then read only where its extents left the previous one's (see
    ``_Capture.incremental_jobs``). ``leave_out(path)``: paths (relative to ``root``) that are
    not part of the image, nor anything under them (a database's WAL in a base image whose
    WAL is kept apart).
    """
    t0 = time.monotonic()
    root_s = os.fspath(root)
    try:
        root_st = os.stat(root_s)
    except OSError as exc:
        raise SourceUnreadable(path=root_s, reason=exc.strerror or str(exc)) from exc
    if not stat.S_ISDIR(root_st.st_mode):
        raise SourceUnreadable(path=root_s, reason="it is not a directory")

    bases = [base_id] if base_id is not None else []
    registered = base_id is not None and pool.has_manifest(base_id)
    base_index = {b.path: b for b in base.entries} if base else {}
    skipped = _Skipped()
    stats = CaptureStats()
    w = workers or default_workers()
    with pool.writer(bases) as writer, ThreadPoolExecutor(w) as ex:

        def chunks_present(b: TreeEntry) -> bool:
            # Chunks of a registered base are kept by GC; others must be touched (and there).
            return registered or all(d is None or writer.has(d) for d, _ in b.chunks)

        def account(cost: _Cost) -> None:
            stats.bytes_read += cost.read
            stats.chunks_new += cost.new
            stats.bytes_new += cost.new_bytes
            stats.bytes_stored += cost.stored

        cap = _Capture(writer, root_s, [], set(), on_read, copy=identity is not None)
        cap.torn_ok = torn_ok
        cap.checked_later = recheck and not torn_ok and identity is None

        # New files are read while the walk goes on (the after-read check covers them like
        # any other): the walk no longer precedes every read. Files of one chunk go to the
        # workers BATCH_FILES at a time, larger ones one a task (each streamed by its worker,
        # no longer by this thread after the walk, while the workers only hash).
        early: deque[Future[_Cost]] = deque()
        batch: list[TreeEntry] = []

        def settle_early(keep: int) -> None:
            while len(early) > keep:
                account(early.popleft().result())

        def on_new(e: TreeEntry) -> None:
            nonlocal batch
            if e.size > CDC_MIN:
                early.append(ex.submit(cap.capture_new, [e]))
            else:
                batch.append(e)
                if len(batch) < BATCH_FILES:
                    return
                early.append(ex.submit(cap.capture_new, batch))
                batch = []
            settle_early(4 * w)  # flat memory: the walk waits for the oldest task

        entries, link_dev, sparse = _walk(
            root_s,
            skipped,
            base_index,
            chunks_present,
            identity,
            on_new if cap.checked_later else None,
            leave_out,
        )
        if batch:
            early.append(ex.submit(cap.capture_new, batch))
        settle_early(0)
        entries.sort(key=lambda e: e.path)
        cap.entries, cap.sparse = entries, sparse

        # The first path of a hard-link group (in manifest order) carries the content.
        first_of: dict[tuple[int, int], str] = {}
        for e in entries:
            if e.type == FILE and e.path in link_dev:
                head = first_of.setdefault((link_dev[e.path], e.ino), e.path)
                if head != e.path:
                    e.type, e.target = HARDLINK, head

        todo: list[int] = []
        done = 0
        for i, e in enumerate(entries):
            if e.type != FILE or e.chunks or not e.size:
                done += e.size if e.type == FILE else 0
                continue  # reused from the base, or empty (its lstat is the snapshot)
            b = base_index.get(e.path)
            if (
                b is not None  # a linked file that did not change keeps its chunks too
                and b.type == FILE
                and (b.size, b.mtime_ns, b.ctime_ns, b.ino)
                == (e.size, e.mtime_ns, e.ctime_ns, e.ino)
                and chunks_present(b)
            ):
                e.chunks = b.chunks
                done += e.size
                continue
            todo.append(i)
        total = sum(e.size for e in entries if e.type == FILE)
        if progress:
            progress(done, total)

        if previous is not None and base is not None:
            cap.previous = previous
            gone: dict[int, TreeEntry] | None = None  # base files by inode, path gone
            for i in todo:
                e = entries[i]
                b = base_index.get(e.path)
                if b is None and e.size > WHOLE_READ_MAX and e.ino:
                    if gone is None:
                        here = {x.path for x in entries}
                        gone = {
                            x.ino: x for x in base.entries if x.type == FILE and x.path not in here
                        }
                    b = gone.get(e.ino)
                if (
                    e.size > WHOLE_READ_MAX
                    and e.path not in sparse
                    and b is not None
                    and b.type == FILE
                    and b.chunks
                    and all(d is not None for d, _ in b.chunks)
                    and chunks_present(b)
                ):
                    cap.plans[i] = (b.path, [(d, n) for d, n in b.chunks if d is not None])
        vanished: set[int] = set()
        streamed: list[tuple[bytes | None, int]] = []

        def finish(
            index: int,
            chunks: list[tuple[bytes | None, int]] | None,
            fresh: os.stat_result | None,
        ) -> None:
            nonlocal done
            if chunks is None:
                vanished.add(index)
                return
            e = entries[index]
            if fresh is not None:
                _refresh(e, fresh)
            e.chunks = chunks
            done += e.size
            if progress:
                progress(done, max(total, done))

        for res in pipelined(ex, cap.jobs(todo), 4 * w, INFLIGHT_BYTES):
            if isinstance(res, list):
                for fr in res:
                    account(fr.cost)
                    finish(fr.index, fr.chunks, fr.fresh)
            elif isinstance(res, _ChunkResult):
                account(res.cost)
                streamed.append((res.digest, res.length))
            elif isinstance(res, _StreamRestart):
                streamed = []
            else:
                finish(res.index, None if res.vanished else streamed, res.fresh)
                streamed = []

        if vanished:
            entries = _drop_vanished(cap, entries, vanished, skipped, account)
        if recheck:
            cap.entries = entries
            stats.rereads = _settle(cap, account)

        out_meta = dict(meta or {})
        out_meta["root"] = {
            "mode": stat.S_IMODE(root_st.st_mode),
            "uid": root_st.st_uid,
            "gid": root_st.st_gid,
            "mtime_ns": root_st.st_mtime_ns,
        }
        if skipped.count:
            out_meta["skipped"] = {"count": skipped.count, "examples": skipped.examples}
        manifest = TreeManifest(entries=entries, meta=out_meta)
        mid = store_manifest(writer, manifest)

    stats.bytes_total = manifest.size
    for e in entries:
        for d, _ in e.chunks:
            if d is None:
                stats.chunks_zero += 1
            else:
                stats.chunks += 1
    stats.seconds = time.monotonic() - t0
    return mid, manifest, stats


def _changed_against(
    fd: int, size: int, previous: str, old: list[tuple[bytes, int]]
) -> list[tuple[int, int]] | None:
    """The ranges of the open file that may differ from ``previous``, the same file in the
    previous cut, which its base chunks ``old`` describe; None when that cannot be told."""
    try:
        pfd = os.open(previous, os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC)
    except OSError:
        return None
    try:
        pst = os.fstat(pfd)
        if not stat.S_ISREG(pst.st_mode) or pst.st_size != sum(n for _, n in old):
            return None
        return extents.changed_ranges(fd, size, pfd, pst.st_size, sync=True)
    finally:
        os.close(pfd)


def _drop_vanished(
    cap: _Capture,
    entries: list[TreeEntry],
    vanished: set[int],
    skipped: _Skipped,
    account: Callable[[_Cost], None],
) -> list[TreeEntry]:
    """Leave out files that vanished before they were read. A hard link to one of them still
    names the data: the first such link becomes the group's file, read now, and the group's
    other links point to it."""
    drop = set(vanished)
    heir: dict[str, str | None] = {entries[i].path: None for i in vanished}
    for i, e in enumerate(entries):
        if e.type != HARDLINK or e.target not in heir:
            continue
        new_head = heir[e.target]
        if new_head is not None:
            e.target = new_head
            continue
        old_head = e.target
        e.type, e.target = FILE, ""
        res = cap.capture_file(i)
        account(res.cost)
        if res.chunks is None:  # gone too: the group's next link takes over
            drop.add(i)
            continue
        if res.fresh is not None:
            _refresh(e, res.fresh)
        e.chunks = res.chunks
        heir[old_head] = e.path
    for i in sorted(drop):
        skipped.add(entries[i].path, "vanished")
    return [e for i, e in enumerate(entries) if i not in drop]


def _changed_since_read(root: str, entries: list[TreeEntry]) -> list[int]:
    """Indices of the regular files whose lstat now differs from what they were read as."""
    changed = []
    for i, e in enumerate(entries):
        if e.type != FILE:
            continue
        path = f"{root}/{e.path}"
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue  # removed after it was read: what was read was its last content
        except OSError as exc:
            raise SourceUnreadable(path=path, reason=exc.strerror or str(exc)) from exc
        if not stat.S_ISREG(st.st_mode) or _stat_key(st) != _entry_key(e):
            changed.append(i)
    return changed


def _settle(cap: _Capture, account: Callable[[_Cost], None]) -> int:
    """Re-read files that changed after they were read until a full check finds none
    changed; returns how many re-reads it took. Raises SourceChanged after
    ``RECHECK_ATTEMPTS`` re-reads that did not settle."""
    entries = cap.entries
    rereads = 0
    delay = RECHECK_BACKOFF
    while True:
        changed = _changed_since_read(cap.root, entries)
        if not changed:
            return rereads
        if rereads >= RECHECK_ATTEMPTS:
            first = f"{cap.root}/{entries[changed[0]].path}"
            more = f" and {len(changed) - 1} other file(s)" if len(changed) > 1 else ""
            raise SourceChanged(
                path=first,
                reason=f"it{more} changed after being read, {rereads + 1} times in a row; "
                "a capture of live files is never taken torn. Give the app a point-in-time "
                "source (a btrfs subvolume, or a file system that reflinks) or freeze/thaw "
                "hooks",
            )
        rereads += 1
        time.sleep(delay)  # let a burst of writes end before reading again
        delay *= 2
        for i in changed:
            old = entries[i]
            try:
                st = os.lstat(f"{cap.root}/{old.path}")
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                raise SourceChanged(
                    path=f"{cap.root}/{old.path}", reason="it was replaced after it was read"
                )
            # A new entry: the old one may be the base manifest's own object (a value).
            e = TreeEntry(old.path, FILE, 0, 0, 0, 0, 0, "", [], 0, 0)
            _refresh(e, st)
            entries[i] = e
            if _looks_sparse(st):
                cap.sparse.add(e.path)
            res = cap.capture_file(i)
            account(res.cost)
            if res.chunks is None:  # removed meanwhile: keep what was read before
                entries[i] = old
                continue
            if res.fresh is not None:
                _refresh(e, res.fresh)
            e.chunks = res.chunks


__all__ = ["capture_tree"]
