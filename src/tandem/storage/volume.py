"""Volume images: capture and diff-restore of disk images and block devices.

A volume is cut into fixed, offset-aligned 4 MiB chunks (the last may be shorter). All-zero
chunks, and chunks inside holes of a sparse file, are recorded as zero extents and never
stored. Hashing and compression run in a thread pool: the BLAKE3 and zstd bindings release
the GIL, so every core works.

Capture is consistent or fails: the source's size and mtime are compared before and after;
a regular file that changed meanwhile fails the capture with SourceChanged and nothing of it
becomes visible. (A block device has no such signal: capture it from a snapshot.)

Diff-restore runs where the target is: each target chunk is hashed; only when it differs are
the chunk's 64 KiB sub-block digests fetched, and only differing sub-blocks are read from the
source and written. A new or empty target gets the non-zero chunks only (holes stay holes).

Restore from a known base: when the caller knows the target still holds image ``base``
(a regular file whose ``SourceStamp`` — device, inode, size, mtime — is what it was when
``base`` was captured or restored onto it), nothing of the target is read: the chunks in
which the two manifests differ are compared by their sub-block digests and only differing
64 KiB blocks are fetched (each verified against its digest) and written. The work is
proportional to the change, not to the volume, which keeps a failback's downtime flat. A
stamp is refused when the file's mtime is within ``RACY_NS`` of the moment it was taken (a
write in the same clock tick would not have moved it), and a restore *seals* the target by
setting its mtime a little in the past, so that any later write shows.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tandem.errors import (
    ChunkCorrupt,
    ChunkMissing,
    SourceChanged,
    SourceUnreadable,
    StorageError,
    TargetInvalid,
)
from tandem.storage import targets
from tandem.storage.digest import (
    SUB_BLOCK,
    hash_block,
    hash_bytes,
    hash_object,
    hash_sub_blocks,
    object_id,
)
from tandem.storage.manifest import VOLUME_CHUNK, VolumeManifest, store_manifest
from tandem.storage.pool import (
    ChunkPool,
    ChunkWriter,
    PutResult,
    WritablePool,
    delta_pays,
    start_writeback,
)

_T = TypeVar("_T")
_R = TypeVar("_R")

Progress = Callable[[int, int], None]
"""progress(done_bytes, total_bytes), called from the capturing thread."""

_ZERO = bytes(VOLUME_CHUNK)


def default_workers() -> int:
    return max(2, os.cpu_count() or 2)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True if every byte is zero. (memoryview comparison is slow in CPython: compare bytes.)"""
    if isinstance(data, memoryview):
        data = data.tobytes()
    if len(data) == VOLUME_CHUNK:
        return data == _ZERO
    return data == _ZERO[: len(data)]


_buffers = threading.local()
_PIECE = 1024 * 1024
_ZERO_DIGESTS: dict[int, bytes] = {}


def zero_digest(length: int) -> bytes:
    """Digest of ``length`` zero bytes: a chunk hashing to it is an all-zero extent."""
    digest = _ZERO_DIGESTS.get(length)
    if digest is None:
        digest = _ZERO_DIGESTS[length] = hash_bytes(_ZERO[:length])
    return digest


def zero_block_digests(length: int) -> list[bytes]:
    """The block digests of ``length`` zero bytes (a chunk of an all-zero extent)."""
    zero = hash_block(_ZERO[:SUB_BLOCK])
    out = [zero] * (length // SUB_BLOCK)
    if length % SUB_BLOCK:
        out.append(hash_block(_ZERO[: length % SUB_BLOCK]))
    return out


def _read_and_hash(fd: int, length: int, off: int) -> tuple[memoryview, bytes, list[bytes]]:
    """Read a chunk into this thread's reusable buffer and hash it on the way.

    Reading 1 MiB at a time and hashing each 64 KiB block of it while it is still in the
    CPU cache makes an unchanged-volume scan run near ``cat`` speed; the buffer is reused so
    no 4 MiB allocation happens per chunk. Returns a view that is valid until the next
    call, the chunk's id and its block digests.
    """
    buf: bytearray | None = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(VOLUME_CHUNK)
    view = memoryview(buf)[:length]
    subs: list[bytes] = []
    done = 0
    while done < length:
        piece = view[done : done + _PIECE]
        got = 0
        while got < len(piece):  # whole pieces, so that blocks stay aligned
            n = os.preadv(fd, [piece[got:]], off + done + got)
            if n <= 0:
                break
            got += n
        subs.extend(hash_sub_blocks(piece[:got]))
        done += got
        if got < len(piece):
            break
    return view[:done], object_id(subs, done), subs


class ChunkSource(Protocol):
    """Where restore reads chunk data from: a local pool, or a remote one through its API.

    Whatever it returns is verified, and a restore relies on that: ``get`` returns the chunk
    ``digest`` names, ``sub_digests`` block digests checked against the id
    (``digest.object_id``), ``read_blocks`` blocks each checked against its block digest;
    anything else raises ChunkCorrupt. The ``_many`` forms do the same for many chunks, in
    order; a remote source answers them in a few requests, not one per chunk.
    """

    def sub_digests(self, digest: bytes) -> list[bytes]: ...

    def read_blocks(self, digest: bytes, indices: list[int]) -> list[bytes]: ...

    def sub_digests_many(self, digests: list[bytes]) -> list[list[bytes]]: ...

    def read_blocks_many(self, wants: list[tuple[bytes, list[int]]]) -> list[list[bytes]]: ...

    def get(self, digest: bytes) -> bytes: ...


@dataclass
class CaptureStats:
    bytes_total: int = 0  # logical size of the source
    bytes_read: int = 0  # bytes read from the source
    bytes_new: int = 0  # plaintext bytes of chunks the pool did not hold
    bytes_stored: int = 0  # bytes written into the pool (after compression)
    chunks: int = 0
    chunks_new: int = 0
    chunks_zero: int = 0
    seconds: float = 0.0
    rereads: int = 0  # times files that changed after they were read were read again

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RestoreStats:
    bytes_total: int = 0
    bytes_compared: int = 0  # target bytes read and hashed
    bytes_written: int = 0  # bytes written to the target
    bytes_fetched: int = 0  # bytes read from the chunk source
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _open_source(path: Path) -> tuple[int, os.stat_result, int]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise SourceUnreadable(path=str(path), reason=exc.strerror or str(exc)) from exc
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        size = st.st_size
    elif stat.S_ISBLK(st.st_mode):
        size = os.lseek(fd, 0, os.SEEK_END)
    else:
        os.close(fd)
        raise SourceUnreadable(path=str(path), reason="not a regular file or block device")
    return fd, st, size


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) byte ranges holding data; holes of a sparse file are left out."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end))
            pos = end
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data after pos
            return out
        return [(0, size)]  # SEEK_DATA unsupported: treat everything as data
    return out


def _chunks_with_data(extents: Iterable[tuple[int, int]], n_chunks: int, chunk: int) -> list[bool]:
    has = [False] * n_chunks
    for start, end in extents:
        for i in range(start // chunk, min(n_chunks, (end - 1) // chunk + 1)):
            has[i] = True
    return has


def _bounded_map(
    executor: ThreadPoolExecutor, fn: Callable[[_T], _R], items: Iterable[_T], window: int
) -> Generator[_R, None, None]:
    """Like executor.map, in order, with at most ``window`` tasks in flight (flat memory);
    closing the generator cancels what has not started."""
    pending: deque[Future[_R]] = deque()
    try:
        for item in items:
            pending.append(executor.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


def capture_volume(
    pool: WritablePool,
    source: Path | str,
    *,
    base: VolumeManifest | None = None,
    base_id: bytes | None = None,
    dirty: Iterable[tuple[int, int]] | None = None,
    meta: dict[str, Any] | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> tuple[bytes, VolumeManifest, CaptureStats]:
    """Capture ``source`` into ``pool``; returns (manifest id, manifest, stats).

    With ``base`` (the previous image of the same volume) unchanged chunks are recognised by
    digest. With ``base`` and ``dirty`` ((offset, length) ranges known to have changed, e.g.
    from an overlay's dirty bitmap) only chunks touching a dirty range are read at all.
    """
    source = Path(source)
    t0 = time.monotonic()
    fd, st0, size = _open_source(source)
    chunk = VOLUME_CHUNK
    n = -(-size // chunk)
    stats = CaptureStats(bytes_total=size, chunks=n)
    try:
        with_data = _chunks_with_data(data_extents(fd, size), n, chunk)
        to_read = with_data
        if base is not None and dirty is not None:
            if base.size != size or base.chunk_size != chunk:
                raise StorageError(detail="dirty-range capture needs a base of the same size")
            touched = _chunks_with_data(((o, o + n_) for o, n_ in dirty), n, chunk)
            to_read = [w and t for w, t in zip(with_data, touched, strict=True)]
        bases = [base_id] if base_id else []
        with pool.writer(bases) as writer:
            work = _capture_worker(fd, size, writer, base, to_read, source, dirty)
            chunks: list[bytes | None] = []
            w = workers or default_workers()
            with ThreadPoolExecutor(w) as ex:
                for digest, outcome in _bounded_map(ex, work, range(n), 2 * w):
                    chunks.append(digest)
                    stats.bytes_read += outcome.read
                    stats.chunks_zero += outcome.zero
                    stats.chunks_new += outcome.new
                    stats.bytes_new += outcome.new_bytes
                    stats.bytes_stored += outcome.stored
                    if progress:
                        progress(min(len(chunks) * chunk, size), size)
            st1 = os.fstat(fd)
            if stat.S_ISREG(st1.st_mode) and (
                st1.st_size != st0.st_size or st1.st_mtime_ns != st0.st_mtime_ns
            ):
                raise SourceChanged(path=str(source), reason="size or mtime changed")
            manifest = VolumeManifest(size=size, chunks=chunks, chunk_size=chunk, meta=meta or {})
            mid = store_manifest(writer, manifest)
    finally:
        os.close(fd)
    stats.seconds = time.monotonic() - t0
    return mid, manifest, stats


@dataclass
class _Outcome:
    read: int = 0
    zero: int = 0
    new: int = 0
    new_bytes: int = 0
    stored: int = 0


def _capture_worker(
    fd: int,
    size: int,
    writer: ChunkWriter,
    base: VolumeManifest | None,
    to_read: list[bool],
    source: Path,
    dirty: Iterable[tuple[int, int]] | None,
) -> Callable[[int], tuple[bytes | None, _Outcome]]:
    chunk = VOLUME_CHUNK

    def work(i: int) -> tuple[bytes | None, _Outcome]:
        off = i * chunk
        length = min(chunk, size - off)
        if not to_read[i]:
            if base is not None and dirty is not None:
                return base.chunks[i], _Outcome()  # clean region of a tracked volume
            return None, _Outcome(zero=1)
        try:
            data, digest, subs = _read_and_hash(fd, length, off)
        except OSError as exc:
            raise SourceUnreadable(path=str(source), reason=exc.strerror or str(exc)) from exc
        if len(data) != length:
            raise SourceChanged(path=str(source), reason="it shrank during capture")
        if digest == zero_digest(length):
            return None, _Outcome(read=length, zero=1)
        base_chunk = base.chunks[i] if base is not None and i < len(base.chunks) else None
        if base_chunk == digest:
            return digest, _Outcome(read=length)  # held by the base, registered by the writer
        result = None
        same_length = base is not None and min(chunk, base.size - off) == length
        if base_chunk is not None and same_length and not writer.has(digest):
            # (a delta rebuilds a chunk of its base's length: a resized tail is stored whole)
            result = _put_as_delta(writer, data, digest, subs, base_chunk)
        if result is None:
            result = writer.put(data, digest, subs)
        if result.new:
            return digest, _Outcome(read=length, new=1, new_bytes=length, stored=result.stored)
        return digest, _Outcome(read=length)

    return work


def _put_as_delta(
    writer: ChunkWriter,
    data: bytes | bytearray | memoryview,
    digest: bytes,
    subs: list[bytes],
    base_chunk: bytes,
) -> PutResult | None:
    """Store a changed chunk as its changed 64 KiB sub-blocks over the previous version,
    when at most half of it changed; None when it should be stored whole."""
    try:
        base_subs = writer.sub_digests(base_chunk)
    except (ChunkMissing, ChunkCorrupt):
        return None
    if len(base_subs) != len(subs):
        return None
    changed = [j for j, (a, b) in enumerate(zip(subs, base_subs, strict=True)) if a != b]
    if not delta_pays(len(changed), len(subs)):
        return None
    return writer.put_delta(data, digest, subs, base_chunk, changed)


# --- restore --------------------------------------------------------------------------


def _open_target(path: Path, size: int) -> tuple[int, bool]:
    """Open (creating if missing) the restore target; returns (fd, known_all_zero).

    The file and every folder above it are opened without following a symlink
    (``targets.open_file``): a link swapped in for the volume or a parent is refused."""
    fd = targets.open_file(os.path.abspath(path), os.O_RDWR | os.O_CREAT, 0o600)
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        fresh = st.st_size == 0
        if st.st_size != size:
            os.ftruncate(fd, size)
        return fd, fresh
    if stat.S_ISBLK(st.st_mode):
        dev_size = os.lseek(fd, 0, os.SEEK_END)
        if dev_size < size:
            os.close(fd)
            raise TargetInvalid(
                path=str(path), reason=f"device holds {dev_size} bytes, the image {size}"
            )
        return fd, False
    os.close(fd)
    raise TargetInvalid(path=str(path), reason="not a regular file or block device")


REMOTE_WORKERS = 8
"""Threads of a restore from a known base through a remote source: each batch is a round
trip and little CPU, so more requests in flight hide the latency."""

BASE_WINDOW = 512
"""Changed chunks whose block digests a restore from a base asks for at once: their new and
old versions make at most 1024 digests, one request to an appliance."""

BLOCK_BATCH = 4 * 1024 * 1024
"""Block bytes a restore from a base asks for at once (one request to an appliance); with
REMOTE_WORKERS of them in flight, memory stays flat whatever the size of the change."""


def _where(source: ChunkSource) -> str:
    """How to name ``source`` in an error."""
    if isinstance(source, ChunkPool):
        return str(source.root)
    return str(getattr(source, "where", "the restore source"))


def _check_fit(source: ChunkSource, digest: bytes, subs: list[bytes], length: int) -> None:
    """Raise unless a chunk with block digests ``subs`` can fill a ``length``-byte range."""
    if len(subs) != -(-length // SUB_BLOCK):
        raise ChunkCorrupt(
            digest=digest.hex(),
            pool=_where(source),
            reason=f"{len(subs)} blocks where the image has room for {length} bytes",
        )


def _check_block(source: ChunkSource, digest: bytes, j: int, block: bytes, length: int) -> None:
    """Raise unless ``block`` (verified against its digest) has the length block ``j`` of a
    ``length``-byte range has: then the range is exactly the chunk."""
    if len(block) != min(SUB_BLOCK, length - j * SUB_BLOCK):
        raise ChunkCorrupt(
            digest=digest.hex(), pool=_where(source), reason=f"block {j} has {len(block)} bytes"
        )


@dataclass
class _Piece:
    """Blocks of one changed chunk a restore from a base writes: fetched from chunk ``new``,
    or zeros when ``new`` is None; ``done`` bytes of the image are restored once written."""

    off: int
    length: int
    new: bytes | None
    blocks: list[int]
    done: int


def _plan_window(
    source: ChunkSource, manifest: VolumeManifest, base: VolumeManifest, window: list[int]
) -> list[_Piece]:
    """The differing blocks of the changed chunks ``window``, from their block digests."""
    digests = list(
        dict.fromkeys(
            d for i in window for d in (base.chunks[i], manifest.chunks[i]) if d is not None
        )
    )
    subs = dict(zip(digests, source.sub_digests_many(digests), strict=True))
    pieces = []
    for i in window:
        off, length = manifest.chunk_range(i)
        old, new = base.chunks[i], manifest.chunks[i]
        zeros = zero_block_digests(length) if old is None or new is None else []
        want = subs[new] if new is not None else zeros
        have = subs[old] if old is not None else zeros
        for digest, those in ((new, want), (old, have)):
            if digest is not None:
                _check_fit(source, digest, those, length)
        differ = [j for j, (a, b) in enumerate(zip(want, have, strict=True)) if a != b]
        pieces.append(_Piece(off, length, new, differ, length))
    return pieces


def _batches(pieces: Iterable[_Piece], most: int) -> Generator[list[_Piece], None, None]:
    """Group pieces into batches of at most ``most`` blocks; a long piece is split (only its
    last part counts the chunk as done)."""
    batch: list[_Piece] = []
    count = 0
    for piece in pieces:
        pos = 0
        while True:
            take = piece.blocks[pos : pos + most - count]
            last = pos + len(take) >= len(piece.blocks)
            batch.append(_Piece(piece.off, piece.length, piece.new, take, piece.done * last))
            count += len(take)
            pos += len(take)
            if count >= most:
                yield batch
                batch, count = [], 0
            if last:
                break
    if batch:
        yield batch


def _restore_from_base(
    source: ChunkSource,
    manifest: VolumeManifest,
    base: VolumeManifest,
    fd: int,
    workers: int,
    stats: RestoreStats,
    progress: Progress | None,
) -> None:
    """Write the blocks in which ``manifest`` differs from ``base``, which ``fd`` holds.

    The changed chunks follow from the manifests; their block digests are asked for in
    windows of BASE_WINDOW chunks, the differing blocks in batches of BLOCK_BATCH bytes,
    ``workers`` batches in flight: a few requests per GiB of change, none per chunk.
    """
    changed = [
        i for i, (a, b) in enumerate(zip(base.chunks, manifest.chunks, strict=True)) if a != b
    ]
    done = manifest.size - sum(manifest.chunk_range(i)[1] for i in changed)
    if progress:
        progress(done, manifest.size)

    def plan(window: list[int]) -> list[_Piece]:
        return _plan_window(source, manifest, base, window)

    def write(batch: list[_Piece]) -> tuple[int, int, int]:
        """Write a batch; returns (bytes done, fetched, written)."""
        wants = [(p.new, p.blocks) for p in batch if p.new is not None and p.blocks]
        got = iter(source.read_blocks_many(wants) if wants else [])
        finished = fetched = written = 0
        for p in batch:
            finished += p.done
            if p.new is None:
                for j in p.blocks:
                    n = min(SUB_BLOCK, p.length - j * SUB_BLOCK)
                    os.pwrite(fd, _ZERO[:n], p.off + j * SUB_BLOCK)
                    written += n
            elif p.blocks:
                for j, block in zip(p.blocks, next(got), strict=True):
                    _check_block(source, p.new, j, block, p.length)
                    os.pwrite(fd, block, p.off + j * SUB_BLOCK)
                    fetched += len(block)
                    written += len(block)
        if written:
            # The disk starts on these blocks while the next batch arrives: the final
            # fsync then waits for the last ones, not for all of them at once.
            start_writeback(fd)
        return finished, fetched, written

    windows = [changed[k : k + BASE_WINDOW] for k in range(0, len(changed), BASE_WINDOW)]
    with ThreadPoolExecutor(2) as planner, ThreadPoolExecutor(workers) as fetcher:
        plans = _bounded_map(planner, plan, windows, 2)
        batches = _batches((p for pieces in plans for p in pieces), BLOCK_BATCH // SUB_BLOCK)
        results = _bounded_map(fetcher, write, batches, workers)
        try:
            for finished, fetched, written in results:
                done += finished
                stats.bytes_fetched += fetched
                stats.bytes_written += written
                if progress and finished:
                    progress(done, manifest.size)
        finally:
            # Cancel what is queued now, not when the generators are collected.
            results.close()
            batches.close()
            plans.close()


RACY_NS = 1_000_000_000
"""A stamp whose mtime is this close to the moment it was taken is not trusted."""


@dataclass(frozen=True)
class SourceStamp:
    """What a regular-file volume looked like when its content was known to be an image."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    """The inode's change time: no one can set it back (a tool that restores an mtime after
    rewriting a file, ``cp -p`` or ``touch -d``, still moves it)."""

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SourceStamp:
        """Raises KeyError, TypeError or ValueError for anything but a whole stamp (one
        recorded before ``ctime_ns`` was is not trusted: the caller reads the file)."""
        return cls(**{k: int(doc[k]) for k in ("dev", "ino", "size", "mtime_ns", "ctime_ns")})

    @classmethod
    def of(cls, st: os.stat_result) -> SourceStamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stamp_of(path: Path | str) -> SourceStamp | None:
    """The stamp of a regular file now, or ``None`` (not a regular file, or racy)."""
    taken = time.time_ns()
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_mtime_ns > taken - RACY_NS:
        return None
    return SourceStamp.of(st)


def seal(path: Path | str) -> SourceStamp | None:
    """Set a just-restored regular file's mtime a little in the past and return its stamp,
    so that the next restore can trust it (any later write moves the mtime)."""
    try:
        fd = targets.open_file(os.path.abspath(path), os.O_RDONLY)
    except TargetInvalid:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        os.utime(fd, ns=(st.st_atime_ns, time.time_ns() - 2 * RACY_NS))
        taken = time.time_ns()
        st = os.fstat(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if st.st_mtime_ns > taken - RACY_NS else SourceStamp.of(st)


def source_is_remote(source: ChunkSource) -> bool:
    """Whether reads from ``source`` cross a network (not a local pool)."""
    return not isinstance(source, ChunkPool)


def unchanged_since(path: Path | str, stamp: SourceStamp) -> bool:
    """Whether ``path`` is still the file ``stamp`` describes, untouched since."""
    return stamp_of(path) == stamp


def restore_volume(
    source: ChunkSource,
    manifest: VolumeManifest,
    target: Path | str,
    *,
    base: VolumeManifest | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> RestoreStats:
    """Make ``target`` equal to the image, writing only the 64 KiB blocks that differ.

    With ``base``, the caller vouches that ``target`` holds exactly that image (see
    ``unchanged_since``): only the chunks in which the manifests differ are worked on, in
    batches (``_restore_from_base``), and the target is not read.
    """
    target = Path(target)
    t0 = time.monotonic()
    fd, fresh = _open_target(target, manifest.size)
    stats = RestoreStats(bytes_total=manifest.size)
    if base is not None and (base.size, base.chunk_size) != (manifest.size, manifest.chunk_size):
        base = None  # a resize: compare the target itself

    def work(i: int) -> tuple[int, int, int, int]:
        """Restore chunk i; returns (length, compared, fetched, written)."""
        off, length = manifest.chunk_range(i)
        digest = manifest.chunks[i]
        if fresh:
            if digest is None:
                return length, 0, 0, 0
            data = source.get(digest)
            os.pwrite(fd, data, off)
            return length, 0, len(data), len(data)
        current = os.pread(fd, length, off)
        if digest is None:
            written = 0
            if not is_zero(current):
                view = memoryview(current)
                for j in range(0, length, SUB_BLOCK):
                    part = view[j : j + SUB_BLOCK]
                    if not is_zero(part):
                        os.pwrite(fd, _ZERO[: len(part)], off + j)
                        written += len(part)
            return length, length, 0, written
        now, have = hash_object(current)
        if now == digest:
            return length, length, 0, 0
        # The source checked ``want`` against the digest and checks each block against
        # ``want``: the blocks kept hash to ``want``, the ones written are verified, so the
        # chunk is exact without reading it back.
        want = source.sub_digests(digest)
        _check_fit(source, digest, want, length)
        differ = [j for j, (a, b) in enumerate(zip(want, have, strict=True)) if a != b]
        moved = 0
        for j, block in zip(differ, source.read_blocks(digest, differ), strict=True):
            _check_block(source, digest, j, block, length)
            os.pwrite(fd, block, off + j * SUB_BLOCK)
            moved += len(block)
        return length, length, moved, moved

    try:
        w = workers or default_workers()
        if base is not None and not fresh:
            if source_is_remote(source):
                w = max(w, REMOTE_WORKERS)  # waiting on round trips, not on the CPU
            _restore_from_base(source, manifest, base, fd, w, stats, progress)
        else:
            done = 0
            with ThreadPoolExecutor(w) as ex:
                for length, compared, fetched, written in _bounded_map(
                    ex, work, range(len(manifest.chunks)), 2 * w
                ):
                    done += length
                    stats.bytes_compared += compared
                    stats.bytes_fetched += fetched
                    stats.bytes_written += written
                    if progress:
                        progress(done, manifest.size)
        os.fsync(fd)
    finally:
        os.close(fd)
    stats.seconds = time.monotonic() - t0
    return stats


# --- image diff -----------------------------------------------------------------------


def diff_volumes(
    old: VolumeManifest, new: VolumeManifest, pool: ChunkPool | None = None
) -> list[tuple[int, int]]:
    """Byte ranges (offset, length) in which ``new`` differs from ``old``, merged.

    From the manifests alone the answer is at 4 MiB granularity; given the pool, changed
    chunks are refined to 64 KiB using the sub-block digests in the chunk headers.
    """
    ranges: list[tuple[int, int]] = []

    def add(off: int, length: int) -> None:
        if ranges and ranges[-1][0] + ranges[-1][1] == off:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
        else:
            ranges.append((off, length))

    for i in range(len(new.chunks)):
        off, length = new.chunk_range(i)
        a = old.chunks[i] if i < len(old.chunks) else None
        b = new.chunks[i]
        if a == b and not (i >= len(old.chunks) or off + length > old.size):
            continue
        if pool is not None and a is not None and b is not None:
            subs_a, subs_b = pool.sub_digests(a), pool.sub_digests(b)
            for j, sb in enumerate(subs_b):
                if j >= len(subs_a) or subs_a[j] != sb:
                    add(off + j * SUB_BLOCK, min(SUB_BLOCK, length - j * SUB_BLOCK))
            continue
        add(off, length)
    return ranges


__all__ = [
    "CaptureStats",
    "ChunkSource",
    "RestoreStats",
    "capture_volume",
    "data_extents",
    "diff_volumes",
    "restore_volume",
]
