"""Virtual copies: a writable overlay of 64 KiB blocks over an immutable volume image.

A virtual copy is presented at once, whatever its size: nothing is copied when it is made.
Reads of blocks never written come from the base image (a VolumeManifest read through the
pool, or zeros when there is no base); written blocks live in a sparse file beside a dirty
bitmap. Capturing the copy (``capture_overlay``) reads only the dirty blocks, so a syncback
moves what changed and nothing else.

A second bitmap says which blocks were written since the copy was last captured (or, before
any capture, since it was made): with it, a failback can tell that the DR copy still equals
the last syncback before it discards the copy, and refuse when it does not.

On-disk format, version 1 (one directory per overlay, given by the caller)::

    DIR/overlay.json    {"format": 1, "kind": "tandem-overlay", "size": N,
                         "block_size": 65536, "base": "<hex manifest id>" | null}
                        written last at creation: an overlay without it does not exist
    DIR/blocks          sparse file of exactly N bytes: a dirty block's current content at
                        the block's own offset; bytes of clean blocks are meaningless
    DIR/dirty.bitmap    ceil(ceil(N / 65536) / 8) bytes: bit i (byte i // 8, bit i % 8,
                        least significant first) is set iff block i is dirty
    DIR/dirty.bitmap.tmp  the next bitmap while flush() writes it (renamed over the old)
    DIR/since.bitmap    32 bytes, then a bitmap laid out like dirty.bitmap: the manifest id
                        of the reference image (the last committed capture; at creation the
                        base; 32 zero bytes for none), then bit i set iff block i may differ
                        from the reference. Missing (an overlay made before it existed): no
                        reference, and every dirty block may differ
    DIR/since.bitmap.tmp  the next one while it is written (renamed over the old)
    DIR/cut.blocks      scratch, only while a cut is held (``cut``): a sparse file of N
                        bytes holding, at each block's offset, the content at the cut of a
                        block dirty then and written since. Never fsynced, never read after
                        a restart: ``open`` and ``create`` delete a leftover one

Invariants
- The base (manifest and pool chunks) is never written: the overlay only reads it.
- A set bit means the whole block (not only the bytes written) is in ``blocks``: a partial
  write to a clean block first copies the block from the base (read-modify-write), then sets
  the bit. A clear bit means the block equals the base; readers never look at ``blocks``.
- Blocks are mutated under a per-block lock (striped), so concurrent writes to different
  bytes of one block never lose each other's data; reads take no block lock. A write to a
  block already dirty writes only its own bytes (the block is whole in ``blocks``).
- No write is fsynced on its own: ``flush()`` (NBD FLUSH, FUA) is the durability point.
- Base blocks are read through a ``ChunkCache`` (process-wide by default, bounded): a
  chunk is decoded once, each 64 KiB block verified against the chunk header's digests
  (the header checked against the chunk id) the first time it is served; a block that
  fails is never served and its chunk is dropped from the cache.
- ``flush()`` snapshots the bitmap, fdatasyncs ``blocks``, then makes ``dirty.bitmap``
  durable: bits only set since the last flush are written in place (then fdatasync), any
  cleared bit replaces the file atomically (temp file, fsync, rename, fsync directory). A
  durable set bit therefore always names durable block data, and a torn in-place update
  is a mix of two valid bitmaps; writes not yet flushed may be lost by a crash, as on a
  disk. ``since.bitmap`` likewise: in place while bits are only set under the same
  reference, replaced whole when the reference changes or bits are cleared.
- Zeroing whole blocks punches holes in ``blocks``; over an all-zero base extent it clears
  the bits instead, so zeroes written over zeros are not dirty.
- Every write and zeroing sets the blocks' "since" bits (even where it clears dirty bits).
  A capture is bracketed: ``begin_capture`` moves the since bits aside (pending) before the
  capture reads the blocks, ``commit_capture(id)`` drops them once the image is recorded and
  makes ``id`` the reference, ``abort_capture`` puts them back. Until the commit, the saved
  ``since.bitmap`` holds pending | since with the old reference, so a crash at any point
  leaves a superset of the truth: a clear bit with reference R always means "equals R".
- ``flush()`` writes ``since.bitmap`` before ``dirty.bitmap``: a crash between the two
  leaves since bits set for blocks still clean, which is only cautious.
- A cut (``cut``) is a point in time of the copy that a capture reads while the app goes on
  writing. It holds every block lock (in-flight writes drain, new ones wait), moves the
  since bits aside as ``begin_capture`` does, copies the dirty bitmap, and releases the
  locks: writes are held for that instant only (``OverlayCut.held_seconds``), not for the
  capture. From then until ``OverlayCut.release``, the first write (or zeroing) of a block
  dirty at the cut copies the block's cut content to ``cut.blocks`` and sets its "saved"
  bit, under the block's lock, before the block changes. A read of the cut takes a block
  from ``cut.blocks`` if saved, else from ``blocks`` if dirty at the cut, else from the
  base; a read from ``blocks`` is checked against the saved bits afterwards and redone
  from ``cut.blocks`` where a writer got there meanwhile (the copy is made before the bit
  is set, the bit before the block changes), so readers never take a block lock.
  Crash safety: acknowledged writes live in ``blocks`` and the bitmaps exactly as without a
  cut (the cut only adds copies); a crash while a cut is held loses the scratch file and
  the capture under way, which was not recorded: its since bits are still in the saved
  ``since.bitmap`` (pending | since, old reference), so the next capture takes them again.
  The pre-cut ``flush`` makes most of the cut durable before writes are held; the rest is
  made durable by ``commit_capture``'s flush before the capture becomes the reference.
- A frozen overlay (``freeze``) refuses writes: the check "nothing changed since the last
  capture" and the discarding of the copy that follows cannot be raced by a writer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from tandem.errors import (
    AlreadyExists,
    ChunkCorrupt,
    ChunkMissing,
    CopyFrozen,
    InvalidInput,
    OverlayDamaged,
    PoolFull,
    StorageError,
)
from tandem.storage.digest import SUB_BLOCK, hash_block, hash_object, object_id
from tandem.storage.manifest import (
    VOLUME_CHUNK,
    VolumeManifest,
    load_manifest,
    store_manifest,
)
from tandem.storage.pool import ChunkPool, ChunkWriter, PoolWriter, PutResult, WritablePool
from tandem.storage.volume import CaptureStats, Progress, default_workers, zero_digest

FORMAT = 1
KIND = "tandem-overlay"
BLOCK = SUB_BLOCK  # 64 KiB: the dirty-bitmap granularity, equal to the chunks' sub-blocks
META_FILE = "overlay.json"
BLOCKS_FILE = "blocks"
BITMAP_FILE = "dirty.bitmap"
SINCE_FILE = "since.bitmap"
CUT_FILE = "cut.blocks"
_NO_REFERENCE = bytes(32)
DEFAULT_CACHE_BYTES = 1024 * 1024 * 1024  # decoded base chunks kept, all readers together
READ_AHEAD = 64 * 1024 * 1024  # dirty bytes a capture asks the kernel for past what it read
_STRIPES = 64
_ZERO_PIECE = bytes(1024 * 1024)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_NONZERO = re.compile(rb"[^\x00]+")
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0x08)


class ChunkCache:
    """Decoded base chunks, shared by every reader in the process (thread-safe, LRU, at
    most ``max_bytes`` of plaintext).

    A chunk is decoded once (``ChunkPool.decode_lazily``: header checked against the id,
    plaintext not yet hashed) and each 64 KiB block is verified against its digest the
    first time it is served, so a 4 KiB read costs a dictionary look-up once its chunk is
    here, and never returns a byte that was not verified. Keyed by pool and chunk id: two
    copies of one image share their cached chunks. Concurrent readers of one chunk wait for
    a single decode rather than each decoding it.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < VOLUME_CHUNK:
            raise InvalidInput(detail=f"a chunk cache needs at least {VOLUME_CHUNK} bytes")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, bytes], _Decoded] = OrderedDict()
        self._bytes = 0
        self._loading: dict[tuple[str, bytes], Future[_Decoded]] = {}

    @property
    def bytes_cached(self) -> int:
        return self._bytes

    def read(self, pool: ChunkPool, digest: bytes, start: int, stop: int) -> memoryview:
        """Verified plaintext ``[start, stop)`` of chunk ``digest`` of ``pool``."""
        entry = self._entry(pool, digest)
        first, last = start // BLOCK, (stop - 1) // BLOCK
        want = ((1 << (last + 1)) - 1) ^ ((1 << first) - 1)
        if entry.verified & want != want:
            self._verify(pool, digest, entry, first, last)
        return entry.view[start:stop]

    def peek(self, pool: ChunkPool, digest: bytes, start: int, stop: int) -> memoryview | None:
        """``read`` if the chunk is decoded already (no waiting for I/O); None if not."""
        with self._lock:
            entry = self._entries.get((pool.chunks_dir.as_posix(), digest))
        if entry is None:
            return None
        first, last = start // BLOCK, (stop - 1) // BLOCK
        want = ((1 << (last + 1)) - 1) ^ ((1 << first) - 1)
        if entry.verified & want != want:
            self._verify(pool, digest, entry, first, last)
        return entry.view[start:stop]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _entry(self, pool: ChunkPool, digest: bytes) -> _Decoded:
        key = (pool.chunks_dir.as_posix(), digest)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            loading = self._loading.get(key)
            owner = loading is None
            if loading is None:
                loading = self._loading[key] = Future()
        if not owner:
            return loading.result()
        try:
            data, subs, verified = pool.decode_lazily(digest)
        except BaseException as exc:
            with self._lock:
                self._loading.pop(key, None)
            loading.set_exception(exc)
            raise
        entry = _Decoded(data, subs, (1 << len(subs)) - 1 if verified else 0)
        with self._lock:
            self._loading.pop(key, None)
            self._entries[key] = entry
            self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, old = self._entries.popitem(last=False)
                self._bytes -= len(old.data)
        loading.set_result(entry)
        return entry

    def _verify(
        self, pool: ChunkPool, digest: bytes, entry: _Decoded, first: int, last: int
    ) -> None:
        for j in range(first, last + 1):
            if entry.verified >> j & 1:
                continue
            if hash_block(entry.view[j * BLOCK : (j + 1) * BLOCK]) != entry.subs[j]:
                with self._lock:  # never served, and never kept: the next read decodes again
                    key = (pool.chunks_dir.as_posix(), digest)
                    if self._entries.get(key) is entry:
                        del self._entries[key]
                        self._bytes -= len(entry.data)
                raise ChunkCorrupt(digest=digest.hex(), pool=str(pool.root), reason=f"block {j}")
            with self._lock:
                entry.verified |= 1 << j


class _Decoded:
    __slots__ = ("data", "subs", "verified", "view")

    def __init__(self, data: bytes, subs: list[bytes], verified: int) -> None:
        self.data = data
        self.view = memoryview(data)
        self.subs = subs
        self.verified = verified  # bit j: block j was checked against subs[j]


SHARED_CACHE = ChunkCache()
"""The cache readers use unless given their own."""


class ImageReader:
    """Random-access reads of an immutable volume image (thread-safe), through a
    ``ChunkCache`` (the process's shared one by default)."""

    def __init__(
        self, pool: ChunkPool, manifest: VolumeManifest, cache: ChunkCache | None = None
    ) -> None:
        self.pool = pool
        self.manifest = manifest
        self.cache = cache if cache is not None else SHARED_CACHE

    @property
    def size(self) -> int:
        return self.manifest.size

    def chunk(self, index: int) -> bytes | None:
        """The plaintext of chunk ``index``; None for an all-zero extent."""
        digest = self.manifest.chunks[index]
        if digest is None:
            return None
        length = min(self.manifest.chunk_size, self.size - index * self.manifest.chunk_size)
        return bytes(self.cache.read(self.pool, digest, 0, length))

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; the range must lie inside the image."""
        _check_range(offset, length, self.size, "read")
        pieces = self.pieces(offset, length, wait=True)
        assert pieces is not None
        return bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        """``read``, if every chunk it needs is decoded already; None if not."""
        _check_range(offset, length, self.size, "read")
        pieces = self.pieces(offset, length, wait=False)
        if pieces is None:
            return None
        return bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """The range as runs (length, reads as zeros): the image's all-zero extents are
        zero runs, the rest data."""
        _check_range(offset, length, self.size, "extents")
        chunk_size = self.manifest.chunk_size
        runs: list[tuple[int, bool]] = []
        pos, end = offset, offset + length
        while pos < end:
            index = pos // chunk_size
            n = min(end, (index + 1) * chunk_size) - pos
            _add_run(runs, n, self.manifest.chunks[index] is None)
            pos += n
        return runs

    def pieces(self, offset: int, length: int, *, wait: bool) -> list[bytes | memoryview] | None:
        """The range as verified pieces, in order; without ``wait``, None if a chunk it
        needs would have to be read and decoded first."""
        chunk_size = self.manifest.chunk_size
        end = offset + length
        pos = offset
        out: list[bytes | memoryview] = []
        while pos < end:
            index = pos // chunk_size
            start = pos - index * chunk_size
            n = min(end - pos, chunk_size - start)
            digest = self.manifest.chunks[index]
            if digest is None:
                out.append(_zeros(n))
            elif wait:
                out.append(self.cache.read(self.pool, digest, start, start + n))
            else:
                piece = self.cache.peek(self.pool, digest, start, start + n)
                if piece is None:
                    return None
                out.append(piece)
            pos += n
        return out


def _add_run(runs: list[tuple[int, bool]], n: int, zero: bool) -> None:
    """Append a (length, zero) run, merged with the last one when alike."""
    if runs and runs[-1][1] == zero:
        runs[-1] = (runs[-1][0] + n, zero)
    else:
        runs.append((n, zero))


def _zeros(n: int) -> bytes:
    if n <= len(_ZERO_PIECE):
        return _ZERO_PIECE[:n]
    return bytes(n)


def _bitmap_len(size: int) -> int:
    """Bytes of the dirty bitmap of a volume of ``size`` bytes."""
    blocks = -(-size // BLOCK)
    return -(-blocks // 8)


def _check_range(offset: int, length: int, size: int, what: str) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise InvalidInput(
            detail=f"{what} of {length} bytes at offset {offset} is outside the volume "
            f"of {size} bytes"
        )


_fallocate: Any = None


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a byte range of a file (it then reads as zeros); False if unsupported."""
    global _fallocate
    if _fallocate is None:
        _fallocate = ctypes.CDLL(None, use_errno=True).fallocate
        _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    return bool(_fallocate(fd, mode, offset, length) == 0)


def _bit_runs(bitmap: bytes | bytearray, nbits: int) -> list[tuple[int, int]]:
    """Runs [start, end) of set bits; skips zero bytes and whole 0xff bytes quickly."""
    runs: list[tuple[int, int]] = []

    def add(start: int, end: int) -> None:
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))

    for match in _NONZERO.finditer(bitmap):
        for byte_index in range(match.start(), match.end()):
            value = bitmap[byte_index]
            base = byte_index * 8
            if value == 0xFF:
                add(base, base + 8)
                continue
            for bit in range(8):
                if value >> bit & 1:
                    add(base + bit, base + bit + 1)
    if runs and runs[-1][1] > nbits:
        runs[-1] = (runs[-1][0], nbits)
    return runs


def _or(a: bytes | bytearray, b: bytes | bytearray) -> bytearray:
    """Bitwise OR of two bitmaps of one length (as integers: fast for megabyte bitmaps)."""
    n = len(a)
    return bytearray(
        (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(n, "little")
    )


def _fill(bm: bytearray, first: int, last: int, value: bool) -> bool:
    """Set (or clear) bits [first, last) of ``bm``; whether any changed."""

    def one(b: int) -> None:
        if value:
            bm[b >> 3] |= 1 << (b & 7)
        else:
            bm[b >> 3] &= ~(1 << (b & 7)) & 0xFF

    before = bytes(bm[first >> 3 : (last + 7) >> 3])
    b = first
    while b < last and b & 7:
        one(b)
        b += 1
    whole_end = last & ~7  # whole bytes at once: a large trim stays cheap
    if b < whole_end:
        bm[b >> 3 : whole_end >> 3] = (b"\xff" if value else b"\x00") * ((whole_end - b) >> 3)
        b = whole_end
    while b < last:
        one(b)
        b += 1
    return bm[first >> 3 : (last + 7) >> 3] != before


class Overlay:
    """A writable virtual copy of a volume: base image + dirty 64 KiB blocks.

    Thread-safe: an NBD server may read and write it from several connections at once.
    Make one with ``Overlay.create``; re-open it with ``Overlay.open``.
    """

    def __init__(
        self,
        directory: Path,
        pool: ChunkPool,
        base: VolumeManifest | None,
        base_id: bytes | None,
        size: int,
        fd: int,
        bitmap: bytearray,
        cache: ChunkCache | None = None,
        since: bytearray | None = None,
        reference: bytes | None = None,
    ) -> None:
        self.directory = directory
        self.pool = pool
        self.base = base
        self.base_id = base_id
        self._size = size
        self._fd = fd
        self._bitmap = bitmap
        self._since = since if since is not None else bytearray(bitmap)
        self._pending: bytearray | None = None  # since bits of a capture under way
        self._reference = reference
        self._frozen = False
        self._cut: _CutState | None = None  # the cut a capture reads, while one is held
        self._blocks = -(-size // BLOCK)
        self._reader = ImageReader(pool, base, cache) if base is not None else None
        self._bits_lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._flush_lock = threading.Lock()
        self._generation = 0  # bumped on every bitmap change
        self._mutations = 0  # writes and zeroings completed (their bytes are in the file)
        self._synced = 0  # … of which the last fdatasync of the block file covered
        self._saved_generation = 0
        self._since_generation = 0  # bumped on every change of since bits or reference
        self._since_saved_generation = 0 if since is not None else -1
        self._dirty_file = _BitmapFile(directory / BITMAP_FILE, 0, bytes(bitmap))
        self._since_file = _BitmapFile(
            directory / SINCE_FILE,
            len(_NO_REFERENCE),
            self._since_blob() if since is not None else None,
        )
        self._closed = False

    # --- making and opening -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path | str,
        pool: ChunkPool,
        base: VolumeManifest | None,
        base_id: bytes | None,
        size: int | None = None,
        *,
        cache: ChunkCache | None = None,
    ) -> Overlay:
        """A new, clean virtual copy of ``base`` (or of ``size`` zero bytes) in ``directory``.

        Takes the same (short) time whatever the size: the block file is sparse.
        """
        directory = Path(directory)
        if base is not None:
            if base_id is None:
                raise InvalidInput(detail="an overlay over a base image needs the base's id")
            if base.chunk_size != VOLUME_CHUNK:
                raise InvalidInput(detail=f"a base with {base.chunk_size}-byte chunks")
            if size is not None and size != base.size:
                raise InvalidInput(
                    detail=f"size {size} differs from the base image's size {base.size}"
                )
            size = base.size
        elif base_id is not None:
            raise InvalidInput(detail="base_id given without its base manifest")
        if size is None or size < 0:
            raise InvalidInput(detail="an overlay without a base needs a size of 0 or more")
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / META_FILE).exists():
            raise AlreadyExists(what="overlay", name=str(directory))
        try:
            for leftover in (
                BLOCKS_FILE,
                BITMAP_FILE,
                BITMAP_FILE + ".tmp",
                SINCE_FILE,
                SINCE_FILE + ".tmp",
                META_FILE + ".tmp",
                CUT_FILE,
            ):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(directory / leftover)  # of a creation that did not finish
            fd = os.open(directory / BLOCKS_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, size)
                bitmap = bytearray(_bitmap_len(size))
                _write_durably(directory / BITMAP_FILE, bytes(bitmap))
                # The new copy equals its base: the base is the first reference.
                _write_durably(directory / SINCE_FILE, (base_id or _NO_REFERENCE) + bytes(bitmap))
                meta = {
                    "format": FORMAT,
                    "kind": KIND,
                    "size": size,
                    "block_size": BLOCK,
                    "base": base_id.hex() if base_id is not None else None,
                }
                os.fsync(fd)
                _write_durably(directory / META_FILE, json.dumps(meta).encode())
            except BaseException:
                os.close(fd)
                raise
        except OSError as exc:
            raise StorageError(detail=f"cannot create overlay in {directory}: {exc}") from exc
        return cls(
            directory,
            pool,
            base,
            base_id,
            size,
            fd,
            bitmap,
            cache,
            bytearray(bitmap),
            base_id,
        )

    @classmethod
    def open(
        cls, directory: Path | str, pool: ChunkPool, *, cache: ChunkCache | None = None
    ) -> Overlay:
        """Re-open an overlay (after a restart): its data and flushed dirty bitmap."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text())
        except FileNotFoundError as exc:
            raise OverlayDamaged(directory=directory, problem=f"it has no {META_FILE}") from exc
        except (OSError, ValueError) as exc:
            raise OverlayDamaged(
                directory=directory, problem=f"its {META_FILE} is unreadable"
            ) from exc
        if (
            not isinstance(meta, dict)
            or meta.get("format") != FORMAT
            or meta.get("kind") != KIND
            or meta.get("block_size") != BLOCK
            or not isinstance(meta.get("size"), int)
        ):
            raise OverlayDamaged(directory=directory, problem=f"its format is unknown ({meta})")
        size: int = meta["size"]
        base: VolumeManifest | None = None
        base_id: bytes | None = None
        if meta.get("base") is not None:
            base_id = bytes.fromhex(meta["base"])
            loaded = load_manifest(pool, base_id)
            if not isinstance(loaded, VolumeManifest) or loaded.size != size:
                raise OverlayDamaged(
                    directory=directory,
                    problem=f"its base {meta['base']} is not the image it names",
                )
            base = loaded
        bitmap = bytearray((directory / BITMAP_FILE).read_bytes())
        if len(bitmap) != _bitmap_len(size):
            raise OverlayDamaged(directory=directory, problem="its dirty bitmap has the wrong size")
        since: bytearray | None = None
        reference: bytes | None = None
        try:
            saved = (directory / SINCE_FILE).read_bytes()
        except FileNotFoundError:
            pass  # made before since.bitmap existed: every dirty block may have changed
        else:
            if len(saved) != len(_NO_REFERENCE) + len(bitmap):
                raise OverlayDamaged(
                    directory=directory, problem="its since bitmap has the wrong size"
                )
            head = saved[: len(_NO_REFERENCE)]
            reference = None if head == _NO_REFERENCE else head
            since = bytearray(saved[len(_NO_REFERENCE) :])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / CUT_FILE)  # the scratch of a cut held when it stopped
        fd = os.open(directory / BLOCKS_FILE, os.O_RDWR)
        if os.fstat(fd).st_size != size:
            os.close(fd)
            raise OverlayDamaged(directory=directory, problem="its block file has the wrong size")
        return cls(directory, pool, base, base_id, size, fd, bitmap, cache, since, reference)

    # --- the block-device interface ------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``: dirty blocks from the overlay, others from the base."""
        self._check_open()
        _check_range(offset, length, self._size, "read")
        data = self._read(offset, length, wait=True)
        assert data is not None
        return data

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        """``read``, if it can be answered without waiting for a disk: the base blocks it
        needs are decoded in the cache, the dirty ones in the page cache; None if not (then
        call ``read`` where blocking is fine)."""
        self._check_open()
        _check_range(offset, length, self._size, "read")
        return self._read(offset, length, wait=False)

    def _read(self, offset: int, length: int, *, wait: bool) -> bytes | None:
        if length == 0:
            return b""
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        with self._bits_lock:
            dirty = [self._bit(b) for b in range(first, last + 1)]
        pieces: list[bytes | memoryview] = []
        end = offset + length
        b = first
        while b <= last:
            run_end = b
            while run_end + 1 <= last and dirty[run_end + 1 - first] == dirty[b - first]:
                run_end += 1
            start = max(offset, b * BLOCK)
            stop = min(end, (run_end + 1) * BLOCK)
            if dirty[b - first]:
                piece = (
                    self._pread(stop - start, start)
                    if wait
                    else self._pread_nowait(stop - start, start)
                )
                if piece is None:
                    return None
                pieces.append(piece)
            elif self._reader is None:
                pieces.append(_zeros(stop - start))
            else:
                got = self._reader.pieces(start, stop - start, wait=wait)
                if got is None:
                    return None
                pieces.extend(got)
            b = run_end + 1
        return bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (never into the base)."""
        self._check_open()
        _check_range(offset, len(data), self._size, "write")
        if not data:
            return
        with self._locked(offset, len(data)):
            self._check_writable()
            self._write_locked(offset, data)

    def try_write(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """``write``, if it waits for nothing but the page cache: the blocks' locks are
        free and a clean edge block's base is decoded already; False (nothing written) if
        not, then call ``write`` where blocking is fine. For small writes on an event loop.
        """
        self._check_open()
        _check_range(offset, len(data), self._size, "write")
        if not data:
            return True
        end = offset + len(data)
        first, last = offset // BLOCK, (end - 1) // BLOCK
        if last - first >= _STRIPES:
            return False
        stripes = sorted({b % _STRIPES for b in range(first, last + 1)})
        held: list[threading.Lock] = []
        try:
            for st in stripes:
                lock = self._stripes[st]
                if not lock.acquire(blocking=False):
                    return False
                held.append(lock)
            self._check_writable()
            if self._cut is not None and self._cut.unsaved(first, last + 1):
                return False  # its cut content is copied first (disk I/O)
            for b, edge in ((first, offset), (last, end)):
                if edge % BLOCK and not self._bit(b) and self._reader is not None:
                    start = b * BLOCK
                    if (
                        self._reader.pieces(start, min(BLOCK, self._size - start), wait=False)
                        is None
                    ):
                        return False  # the base block must be read first
            self._write_locked(offset, data)
            return True
        finally:
            for lock in held:
                lock.release()

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros, deallocating whole blocks."""
        self._check_open()
        _check_range(offset, length, self._size, "write_zeroes")
        if length == 0:
            return
        end = offset + length
        full_first = -(-offset // BLOCK)
        full_last = end // BLOCK if end < self._size else self._blocks  # exclusive
        with self._locked(offset, length):
            self._check_writable()
            if full_first >= full_last:  # no whole block covered: an ordinary write of zeros
                self._write_locked(offset, _zeros(length))
                return
            head_end = full_first * BLOCK
            if offset < head_end:
                self._write_locked(offset, _zeros(head_end - offset))
            tail_start = min(full_last * BLOCK, self._size)
            if tail_start < end:
                self._write_locked(tail_start, _zeros(end - tail_start))
            self._zero_blocks(full_first, full_last)

    def trim(self, offset: int, length: int) -> None:
        """Discard a range; here the same as write_zeroes (the range then reads as zeros)."""
        self.write_zeroes(offset, length)

    def flush(self) -> None:
        """Make every completed write durable, with the dirty bitmap that names it."""
        self._check_open()
        with self._bits_lock:
            target = self._mutations  # the writes this flush must cover
        with self._flush_lock:
            with self._bits_lock:
                covered = self._mutations
                generation = self._generation
                snapshot = bytes(self._bitmap) if generation != self._saved_generation else None
                since_generation = self._since_generation
                since = (
                    self._since_blob() if since_generation != self._since_saved_generation else None
                )
            if self._synced >= target and since is None and snapshot is None:
                return  # a flush that began after our writes made them durable already
            try:
                # The data and since.bitmap (a cautious superset: no order between them) are
                # made durable side by side; then dirty.bitmap, whose set bits name both.
                beside: Future[None] | None = None
                if since is not None:
                    beside = Future()
                    threading.Thread(
                        target=_run_into, args=(beside, self._since_file.save, since)
                    ).start()
                try:
                    if self._synced < covered:  # (the bits in snapshot name no later write)
                        os.fdatasync(self._fd)
                finally:
                    if beside is not None:
                        beside.result()
                if snapshot is not None:
                    self._dirty_file.save(snapshot)
            except OSError as exc:
                raise StorageError(detail=f"overlay {self.directory}: flush: {exc}") from exc
            with self._bits_lock:
                self._synced = max(self._synced, covered)
                self._saved_generation = max(self._saved_generation, generation)
                self._since_saved_generation = max(self._since_saved_generation, since_generation)

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """The range as runs (length, reads as zeros), for NBD block status: a clean block
        over an all-zero extent of the base (or over no base) reads as zeros; anything
        else is reported as data (which is always a safe answer)."""
        self._check_open()
        _check_range(offset, length, self._size, "extents")
        runs: list[tuple[int, bool]] = []
        per_chunk = VOLUME_CHUNK // BLOCK
        pos, end = offset, offset + length
        with self._bits_lock:
            while pos < end:
                chunk = pos // VOLUME_CHUNK
                stop = min(end, (chunk + 1) * VOLUME_CHUNK)
                base_zero = self.base is None or self.base.chunks[chunk] is None
                group = self._bitmap[chunk * per_chunk // 8 : (chunk + 1) * per_chunk // 8]
                if not base_zero or not any(group):
                    _add_run(runs, stop - pos, base_zero)
                    pos = stop
                    continue
                while pos < stop:  # a zero extent with some blocks written: block by block
                    block = pos // BLOCK
                    n = min(stop, (block + 1) * BLOCK) - pos
                    _add_run(runs, n, not self._bit(block))
                    pos += n
        return runs

    def dirty_ranges(self) -> list[tuple[int, int]]:
        """(offset, length) ranges written since the overlay was made, merged, in order."""
        with self._bits_lock:
            snapshot = bytes(self._bitmap)
        return [
            (start * BLOCK, min(end * BLOCK, self._size) - start * BLOCK)
            for start, end in _bit_runs(snapshot, self._blocks)
        ]

    def dirty_bytes(self) -> int:
        return sum(n for _, n in self.dirty_ranges())

    # --- changes since the last capture -------------------------------------------------

    @property
    def reference(self) -> bytes | None:
        """The manifest id the copy is compared with: its last committed capture, or its
        base until one is committed (None: neither is known)."""
        with self._bits_lock:
            return self._reference

    def changed_since_capture(self) -> list[tuple[int, int]]:
        """(offset, length) ranges that may differ from ``reference``, merged, in order."""
        with self._bits_lock:
            snapshot = self._since_union()
        return [
            (start * BLOCK, min(end * BLOCK, self._size) - start * BLOCK)
            for start, end in _bit_runs(snapshot, self._blocks)
        ]

    def changed_bytes_since_capture(self) -> int:
        return sum(n for _, n in self.changed_since_capture())

    def begin_capture(self) -> None:
        """Start a capture: the blocks written so far are the ones it takes. Call it before
        ``capture_overlay`` reads the copy, then ``commit_capture`` or ``abort_capture``."""
        self._check_open()
        with self._bits_lock:
            self._begin_locked()

    def _begin_locked(self) -> None:
        """``begin_capture`` (caller holds the bits lock)."""
        if self._pending is None:
            self._pending = self._since
        else:  # a capture begun and never ended: it still counts as not taken
            self._pending = _or(self._pending, self._since)
        self._since = bytearray(len(self._bitmap))
        self._since_generation += 1

    def cut(self) -> OverlayCut:
        """Begin a capture (``begin_capture``) of the copy as it is at this instant, while
        writes go on: returns the cut to read (``capture_overlay`` takes it in place of the
        overlay); release it once read, then ``commit_capture`` or ``abort_capture``.
        Writes are held only while the cut is made (``OverlayCut.held_seconds``)."""
        self._check_open()
        self.flush()  # the data written so far durable, before writes are held
        path = self.directory / CUT_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, self._size)
        except OSError as exc:
            raise _translate(exc, self.directory) from exc
        try:
            t0 = time.monotonic()
            with contextlib.ExitStack() as stack:
                for lock in self._stripes:  # every write under way drains; new ones wait
                    stack.enter_context(lock)
                with self._bits_lock:
                    if self._cut is not None:
                        raise StorageError(detail=f"overlay {self.directory}: a cut is held")
                    self._begin_locked()
                    assert self._pending is not None
                    state = _CutState(fd, bytes(self._bitmap), bytearray(len(self._bitmap)))
                    pending, reference = bytes(self._pending), self._reference
                    self._cut = state
            held = time.monotonic() - t0
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        return OverlayCut(self, state, pending, reference, held)

    def _release_cut(self, state: _CutState) -> None:
        with self._bits_lock:
            if self._cut is state:
                self._cut = None
        with state.lock:  # a write copying a block into the scratch file finishes first
            if state.fd >= 0:
                os.close(state.fd)
                state.fd = -1
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / CUT_FILE)

    def _preserve(self, first: int, last: int) -> None:
        """Before blocks [first, last) change: copy the cut content of those dirty at the
        cut and not copied yet (caller holds their locks)."""
        state = self._cut
        if state is None:
            return
        with self._bits_lock:
            todo = state.unsaved(first, last)
        if not todo:
            return
        with state.lock:
            if state.fd < 0:
                return  # released meanwhile: nobody reads the cut any more
            for b in todo:
                start = b * BLOCK
                data = self._pread(min(BLOCK, self._size - start), start)
                try:
                    os.pwrite(state.fd, data, start)
                except OSError as exc:
                    raise _translate(exc, self.directory) from exc
                with self._bits_lock:
                    state.saved[b >> 3] |= 1 << (b & 7)

    def commit_capture(self, manifest_id: bytes) -> None:
        """The capture begun last is recorded as image ``manifest_id``: it becomes the
        reference, and only blocks written since it began still count as changed. Durable
        when this returns."""
        self._check_open()
        if len(manifest_id) != len(_NO_REFERENCE):
            raise InvalidInput(detail="a manifest id is 32 bytes")
        with self._bits_lock:
            if self._pending is None:
                raise StorageError(detail=f"overlay {self.directory}: no capture was begun")
            self._pending = None
            self._reference = manifest_id
            self._since_generation += 1
        self.flush()

    def abort_capture(self) -> None:
        """The capture begun last failed: what it would have taken counts as changed again."""
        with self._bits_lock:
            if self._pending is not None:
                self._since = _or(self._pending, self._since)
                self._pending = None
                self._since_generation += 1

    def revert(self, manifest: VolumeManifest, manifest_id: bytes) -> int:
        """Bring every block changed since the last capture back to ``manifest``'s content,
        which becomes the reference with nothing changed since; returns the bytes rewritten.

        Right when ``manifest`` was captured from this copy after (or as) its reference: the
        copy then equals it wherever no since bit is set. Writes are held off meanwhile
        (a frozen copy stays frozen); durable when this returns.
        """
        self._check_open()
        if manifest.size != self._size or manifest.chunk_size != VOLUME_CHUNK:
            raise InvalidInput(detail=f"a {manifest.size}-byte image cannot revert this copy")
        reader = ImageReader(self.pool, manifest)
        rewritten = 0
        with contextlib.ExitStack() as stack:
            for lock in self._stripes:
                stack.enter_context(lock)
            for offset, length in self.changed_since_capture():
                pos = offset
                while pos < offset + length:
                    n = min(VOLUME_CHUNK, offset + length - pos)
                    self._write_locked(pos, reader.read(pos, n))
                    pos += n
                rewritten += length
            self.flush()  # the reverted data first, then the bits saying it is the reference
            with self._bits_lock:
                self._since = bytearray(len(self._bitmap))
                self._pending = None
                self._reference = manifest_id
                self._since_generation += 1
            self.flush()
        return rewritten

    @property
    def frozen(self) -> bool:
        return self._frozen

    def freeze(self) -> None:
        """Refuse writes from now on (``CopyFrozen``); returns once writes under way are done."""
        with contextlib.ExitStack() as stack:
            for lock in self._stripes:
                stack.enter_context(lock)
            self._frozen = True

    def thaw(self) -> None:
        """Take writes again."""
        self._frozen = False

    def close(self) -> None:
        """Flush and release the file; idempotent."""
        if self._closed:
            return
        if self._cut is not None:
            self._release_cut(self._cut)
        try:
            self.flush()
        finally:
            self._closed = True
            os.close(self._fd)
            self._dirty_file.close()
            self._since_file.close()

    def delete(self) -> None:
        """Close and remove the overlay's files (and its directory when that is then empty)."""
        if self._cut is not None:
            self._release_cut(self._cut)
        if not self._closed:
            self._closed = True
            os.close(self._fd)
        self._dirty_file.close()
        self._since_file.close()
        for name in (
            META_FILE,
            BITMAP_FILE,
            BITMAP_FILE + ".tmp",
            SINCE_FILE,
            SINCE_FILE + ".tmp",
            BLOCKS_FILE,
            CUT_FILE,
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / name)
        with contextlib.suppress(OSError):
            self.directory.rmdir()

    def __enter__(self) -> Overlay:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        base = self.base_id.hex()[:12] if self.base_id else "zeros"
        return f"Overlay({str(self.directory)!r}, size={self._size}, base={base})"

    # --- internals ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(detail=f"overlay {self.directory} is closed")

    def _check_writable(self) -> None:
        if self._frozen:
            raise CopyFrozen(what=f"overlay {self.directory}")

    def _since_union(self) -> bytes:
        """pending | since (caller holds the bits lock)."""
        if self._pending is None:
            return bytes(self._since)
        return bytes(_or(self._pending, self._since))

    def _since_blob(self) -> bytes:
        """The content of since.bitmap (caller holds the bits lock)."""
        return (self._reference or _NO_REFERENCE) + self._since_union()

    def _bit(self, block: int) -> bool:
        return bool(self._bitmap[block >> 3] >> (block & 7) & 1)

    def _set_bits(self, first: int, last: int, value: bool) -> None:
        """Set (or clear) the dirty bits of blocks [first, last); set their since bits."""
        with self._bits_lock:
            self._mutations += 1
            if _fill(self._bitmap, first, last, value):
                self._generation += 1  # rewriting dirty blocks leaves nothing to save
            if _fill(self._since, first, last, True):
                self._since_generation += 1

    def bitmap_snapshot(self) -> bytes:
        """A copy of the in-memory dirty bitmap (format as in ``dirty.bitmap``)."""
        with self._bits_lock:
            return bytes(self._bitmap)

    def capture_bitmap(self) -> bytes | None:
        """The blocks the capture under way takes: those written since ``reference`` (None
        when no capture was begun)."""
        with self._bits_lock:
            return None if self._pending is None else bytes(self._pending)

    @contextlib.contextmanager
    def _locked(self, offset: int, length: int) -> Iterator[None]:
        """Hold the stripe locks of every block in the range (in order: no deadlock)."""
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        if last - first + 1 >= _STRIPES:
            stripes = list(range(_STRIPES))
        else:
            stripes = sorted({b % _STRIPES for b in range(first, last + 1)})
        with contextlib.ExitStack() as stack:
            for s in stripes:
                stack.enter_context(self._stripes[s])
            yield

    def _pread(self, length: int, offset: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise StorageError(detail=f"overlay {self.directory}: read: {exc}") from exc
        if len(data) != length:
            raise StorageError(detail=f"overlay {self.directory}: block file truncated")
        return data

    def read_ahead(self, offset: int, length: int) -> None:
        """Start reading a range of the block file into the page cache (``WILLNEED``):
        advice, so nothing is raised."""
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def _pread_nowait(self, length: int, offset: int) -> bytes | None:
        """``_pread`` if the bytes are in the page cache (RWF_NOWAIT); None if not."""
        buf = bytearray(length)
        try:
            got = os.preadv(self._fd, [buf], offset, _RWF_NOWAIT)
        except (BlockingIOError, OSError):
            return None  # (not cached, or not supported here: the blocking path says why)
        return bytes(buf) if got == length else None

    def _read_base(self, offset: int, length: int) -> bytes:
        if self._reader is None:
            return _zeros(length)
        return self._reader.read(offset, length)

    def _read_current(self, offset: int, length: int) -> bytes:
        """Current content of a range inside one block (caller holds its lock)."""
        if self._bit(offset // BLOCK):
            return self._pread(length, offset)
        return self._read_base(offset, length)

    def _write_locked(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write, completing partial first/last blocks from their current content."""
        end = offset + len(data)
        first, last = offset // BLOCK, (end - 1) // BLOCK
        span_start = first * BLOCK
        span_end = min((last + 1) * BLOCK, self._size)
        # A dirty edge block is whole in the file already: write just the bytes given. A
        # clean one is completed from the base first (its bit then names whole data).
        at = offset
        parts: list[bytes | bytearray | memoryview] = []
        if span_start < offset and not self._bit(first):
            parts.append(self._read_current(span_start, offset - span_start))
            at = span_start
        parts.append(data)
        if end < span_end and not self._bit(last):
            parts.append(self._read_current(end, span_end - end))
        buf = data if len(parts) == 1 else b"".join(parts)
        self._preserve(first, last + 1)
        try:
            written = os.pwrite(self._fd, buf, at)
            while written < len(buf):
                written += os.pwrite(self._fd, memoryview(buf)[written:], at + written)
        except OSError as exc:
            raise _translate(exc, self.directory) from exc
        self._set_bits(first, last + 1, True)

    def _zero_blocks(self, first: int, last: int) -> None:
        """Zero whole blocks [first, last) (caller holds their locks)."""
        start, end = first * BLOCK, min(last * BLOCK, self._size)
        self._preserve(first, last)
        if not _punch_hole(self._fd, start, end - start):
            try:
                pos = start
                while pos < end:
                    n = min(len(_ZERO_PIECE), end - pos)
                    os.pwrite(self._fd, _ZERO_PIECE[:n], pos)
                    pos += n
            except OSError as exc:
                raise _translate(exc, self.directory) from exc
        # Over an all-zero base extent a zeroed block equals the base: clean, not dirty.
        per_chunk = VOLUME_CHUNK // BLOCK
        b = first
        while b < last:
            chunk = b // per_chunk
            run_end = min(last, (chunk + 1) * per_chunk)
            base_zero = self.base is None or self.base.chunks[chunk] is None
            self._set_bits(b, run_end, not base_zero)
            b = run_end


class _CutState:
    """What a held cut keeps: the scratch file, the dirty bitmap at the cut, and which
    blocks' cut content was copied to the scratch file (``saved``, under the bits lock)."""

    __slots__ = ("dirty", "fd", "lock", "saved")

    def __init__(self, fd: int, dirty: bytes, saved: bytearray) -> None:
        self.fd = fd
        self.dirty = dirty
        self.saved = saved
        self.lock = threading.Lock()

    def unsaved(self, first: int, last: int) -> list[int]:
        """Blocks in [first, last) dirty at the cut whose content was not copied yet."""
        return [
            b
            for b in range(first, last)
            if self.dirty[b >> 3] >> (b & 7) & 1 and not self.saved[b >> 3] >> (b & 7) & 1
        ]


class OverlayCut:
    """A point in time of an overlay that keeps taking writes (``Overlay.cut``): what
    ``capture_overlay`` reads. Thread-safe; ``release`` it once read (or use ``with``)."""

    def __init__(
        self,
        overlay: Overlay,
        state: _CutState,
        pending: bytes,
        reference: bytes | None,
        held_seconds: float,
    ) -> None:
        self.overlay = overlay
        self._state = state
        self._pending = pending
        self.reference = reference
        self.held_seconds = held_seconds
        """How long writes were held to make the cut (including draining writes under way)."""

    @property
    def size(self) -> int:
        return self.overlay.size

    @property
    def base(self) -> VolumeManifest | None:
        return self.overlay.base

    @property
    def base_id(self) -> bytes | None:
        return self.overlay.base_id

    def bitmap_snapshot(self) -> bytes:
        """The dirty bitmap at the cut."""
        return self._state.dirty

    def capture_bitmap(self) -> bytes:
        """The blocks written between ``reference`` and the cut."""
        return self._pending

    def dirty_bytes(self) -> int:
        """Bytes written since the overlay was made, as of the cut."""
        size = self.overlay.size
        return sum(
            min(end * BLOCK, size) - start * BLOCK
            for start, end in _bit_runs(self._state.dirty, -(-size // BLOCK))
        )

    def read_ahead(self, offset: int, length: int) -> None:
        self.overlay.read_ahead(offset, length)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` as they were at the cut."""
        ov, state = self.overlay, self._state
        ov._check_open()
        if state.fd < 0:
            raise StorageError(detail=f"overlay {ov.directory}: the cut was released")
        _check_range(offset, length, ov.size, "read")
        if length == 0:
            return b""
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        out = bytearray(length)
        end = offset + length

        def span(b: int) -> tuple[int, int]:
            start, stop = max(offset, b * BLOCK), min(end, (b + 1) * BLOCK)
            return start, stop

        def bit(bm: bytes | bytearray, b: int) -> bool:
            return bool(bm[b >> 3] >> (b & 7) & 1)

        with ov._bits_lock:
            source = [
                2 if bit(state.saved, b) else 1 if bit(state.dirty, b) else 0
                for b in range(first, last + 1)
            ]
        live: list[int] = []
        b = first
        while b <= last:
            run_end = b
            while run_end < last and source[run_end + 1 - first] == source[b - first]:
                run_end += 1
            start, stop = span(b)[0], span(run_end)[1]
            kind = source[b - first]
            if kind == 2:
                data = _pread_fd(state.fd, stop - start, start, ov.directory)
            elif kind == 1:
                data = ov._pread(stop - start, start)
                live.extend(range(b, run_end + 1))
            else:
                data = ov._read_base(start, stop - start)
            out[start - offset : stop - offset] = data
            b = run_end + 1
        if live:
            # A writer may have changed a block after it was read: it copied the cut
            # content to the scratch file (and set the bit) before it did.
            with ov._bits_lock:
                moved = [b for b in live if bit(state.saved, b)]
            for b in moved:
                start, stop = span(b)
                out[start - offset : stop - offset] = _pread_fd(
                    state.fd, stop - start, start, ov.directory
                )
        return bytes(out)

    def release(self) -> None:
        """Stop keeping the cut (idempotent): writes no longer copy blocks aside."""
        self.overlay._release_cut(self._state)

    def __enter__(self) -> OverlayCut:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _pread_fd(fd: int, length: int, offset: int, directory: Path) -> bytes:
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:
        raise StorageError(detail=f"overlay {directory}: read of the cut: {exc}") from exc
    if len(data) != length:
        raise StorageError(detail=f"overlay {directory}: the cut's scratch file is truncated")
    return data


def _translate(exc: OSError, directory: Path) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return PoolFull(pool=str(directory), reason=exc.strerror or "ENOSPC")
    return StorageError(detail=f"overlay {directory}: write: {exc}")


def _run_into(future: Future[None], fn: Any, *args: Any) -> None:
    """Run ``fn(*args)`` and settle ``future`` with its outcome (in a thread of its own)."""
    try:
        fn(*args)
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(None)


class _BitmapFile:
    """A bitmap file (after a fixed header) kept durable at each flush.

    When the new content only *sets* bits (the header unchanged), the changed bytes are
    written in place and the file fdatasync'ed: any mix of old and new bytes a crash
    leaves is then a valid state (a set bit names data made durable before it, and a bit
    set early is only cautious). Anything else, a cleared bit or a new header, replaces
    the file atomically (temp file, fsync, rename, fsync directory).
    """

    def __init__(self, path: Path, header: int, saved: bytes | None) -> None:
        self.path = path
        self.header = header
        self.saved = saved  # the durable content (None: unknown, or no file yet)
        self._fd: int | None = None

    def save(self, blob: bytes) -> None:
        old = self.saved
        if old is None or len(old) != len(blob) or old[: self.header] != blob[: self.header]:
            self._replace(blob)
            return
        a = int.from_bytes(old[self.header :], "little")
        b = int.from_bytes(blob[self.header :], "little")
        if a & ~b:
            self._replace(blob)  # bits cleared: all at once or not at all
            return
        changed = a ^ b
        if not changed:
            return
        low = self.header + ((changed & -changed).bit_length() - 1) // 8
        high = self.header + (changed.bit_length() - 1) // 8 + 1
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR)
        view = memoryview(blob)[low:high]
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], low + done)
        os.fdatasync(self._fd)
        self.saved = blob

    def _replace(self, blob: bytes) -> None:
        self.close()
        _write_durably(self.path, blob)
        self.saved = blob

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# --- capture --------------------------------------------------------------------------


def capture_overlay(
    pool: WritablePool,
    overlay: Overlay | OverlayCut,
    *,
    previous: VolumeManifest | None = None,
    meta: dict[str, Any] | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    on_stored: Callable[[bytes, bytes], None] | None = None,
) -> tuple[bytes, VolumeManifest, CaptureStats]:
    """Capture the overlay's current content as a new image; returns (id, manifest, stats).

    Reads only the dirty blocks: a chunk without one keeps its base chunk id; a chunk with
    some is assembled (base + dirty blocks), hashed and stored, as a delta over the base
    chunk when at most half of its sub-blocks changed. ``stats.bytes_read`` counts the dirty
    bytes read; ``progress(done, total)`` counts dirty bytes too.

    To capture a copy that keeps taking writes (a catch-up syncback of a running app), give
    its cut (``Overlay.cut``, which begins the capture): the image is then the copy at that
    instant. An overlay given itself must not be written meanwhile (the image would be fuzzy,
    like a copy of a live disk); call ``begin_capture`` before. Either way, call
    ``commit_capture`` (or ``abort_capture``) once the image is recorded (or not), which
    keeps the overlay's "changed since the last capture" exact.

    ``previous``: the manifest of the overlay's ``reference`` (its last committed capture),
    with a capture begun. Then only the blocks written since that capture are read, and the
    other chunks keep their ids from it: a repeated syncback costs what changed since the
    last one, not everything written since the failover.

    ``on_stored(digest, chunk_file)``: told of each chunk the capture stores, from the
    worker that stored it, as soon as it is pending (``PoolWriter.on_stored``); a worker
    waits while it blocks. A syncback sends them home while the capture goes on.
    """
    t0 = time.monotonic()
    size = overlay.size
    n = -(-size // VOLUME_CHUNK)
    per_chunk = VOLUME_CHUNK // BLOCK
    since = overlay.capture_bitmap() if previous is not None else None
    base: VolumeManifest | None
    if since is not None and previous is not None and previous.size == size:
        bitmap, base = since, previous
    else:
        bitmap, base = overlay.bitmap_snapshot(), overlay.base
    chunks: list[bytes | None] = list(base.chunks) if base is not None else [None] * n
    stats = CaptureStats(bytes_total=size, chunks=n)

    def dirty_blocks(i: int) -> list[int]:
        group = bitmap[i * per_chunk // 8 : (i + 1) * per_chunk // 8]
        if not any(group):
            return []
        bits = int.from_bytes(group, "little")
        return [j for j in range(per_chunk) if bits >> j & 1]

    work_list = [(i, blocks) for i in range(n) if (blocks := dirty_blocks(i))]
    total_dirty = sum(_blocks_bytes(i, blocks, size) for i, blocks in work_list)
    bases = [b for b in (overlay.base_id, overlay.reference if since else None) if b]
    # The dirty blocks are scattered over the block file: the kernel is asked for them all
    # (a little ahead of the workers), not one random read per worker at a time.
    ahead = _ReadAhead(overlay.read_ahead, _dirty_ranges(work_list, size))
    with ahead, pool.writer(bases) as writer:
        if on_stored is not None:
            if not isinstance(writer, PoolWriter):
                raise TypeError("only a pool's own writer tells what it stores")
            writer.on_stored = on_stored
        # The bases' layouts of the dirty chunks are read while the first chunks are built.
        prefetch = getattr(writer, "prefetch_bases", None)
        if prefetch is not None:
            prefetch([chunks[i] for i, _ in work_list])

        def work(item: tuple[int, list[int]]) -> tuple[int, bytes | None, int, PutResult | None]:
            i, blocks = item
            off = i * VOLUME_CHUNK
            length = min(VOLUME_CHUNK, size - off)
            read = _blocks_bytes(i, blocks, size)
            base_chunk = chunks[i]
            if base_chunk is not None:
                quick = capture_blocks(writer, overlay.read, off, length, base_chunk, blocks)
                if quick is not None:
                    return i, *quick[:1], read, quick[1]
            data = overlay.read(off, length)
            digest, subs = hash_object(data)
            if digest == zero_digest(length):
                return i, None, read, None
            if digest == base_chunk:
                return i, digest, read, None  # rewritten with what was there
            return i, digest, read, store_chunk(writer, data, digest, subs, base_chunk, blocks)

        done = 0
        w = workers or default_workers()
        with ThreadPoolExecutor(w) as ex:
            for i, digest, read, result in ex.map(work, work_list):
                chunks[i] = digest
                stats.bytes_read += read
                if result is not None and result.new:
                    stats.chunks_new += 1
                    stats.bytes_new += min(VOLUME_CHUNK, size - i * VOLUME_CHUNK)
                    stats.bytes_stored += result.stored
                done += read
                ahead.consumed(read)
                if progress:
                    progress(done, total_dirty)
        stats.chunks_zero = sum(1 for c in chunks if c is None)
        manifest = VolumeManifest(size=size, chunks=chunks, meta=meta or {})
        mid = store_manifest(writer, manifest)
    stats.seconds = time.monotonic() - t0
    return mid, manifest, stats


def _dirty_ranges(work_list: list[tuple[int, list[int]]], size: int) -> list[tuple[int, int]]:
    """(offset, length) of each run of dirty blocks, in the order the chunks are read."""
    out: list[tuple[int, int]] = []
    per_chunk = VOLUME_CHUNK // BLOCK
    for i, blocks in work_list:
        for j in blocks:
            start = (i * per_chunk + j) * BLOCK
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + BLOCK)
            else:
                out.append((start, BLOCK))
    return [(off, min(length, size - off)) for off, length in out]


class _ReadAhead:
    """Asks ``advise(offset, length)`` for ``ranges`` in order from a thread of its own,
    at most ``READ_AHEAD`` bytes past what the caller has ``consumed``; stops when the
    ``with`` block ends."""

    def __init__(self, advise: Callable[[int, int], None], ranges: list[tuple[int, int]]) -> None:
        self._advise, self._ranges = advise, ranges
        self._cond = threading.Condition()
        self._asked = self._consumed = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="tandem-read-ahead", daemon=True)

    def __enter__(self) -> _ReadAhead:
        if self._ranges:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    def consumed(self, n: int) -> None:
        with self._cond:
            self._consumed += n
            self._cond.notify()

    def _run(self) -> None:
        for offset, length in self._ranges:
            with self._cond:
                while not self._stop and self._asked - self._consumed > READ_AHEAD:
                    self._cond.wait()
                if self._stop:
                    return
            self._advise(offset, length)
            with self._cond:
                self._asked += length


def _blocks_bytes(chunk: int, blocks: Iterable[int], size: int) -> int:
    per_chunk = VOLUME_CHUNK // BLOCK
    total = 0
    for j in blocks:
        start = (chunk * per_chunk + j) * BLOCK
        total += max(0, min(BLOCK, size - start))
    return total


def capture_blocks(
    writer: ChunkWriter,
    read: Callable[[int, int], bytes],
    off: int,
    length: int,
    base_chunk: bytes,
    dirty: list[int],
) -> tuple[bytes | None, PutResult | None] | None:
    """Capture a chunk from its ``dirty`` blocks alone, when few changed: their digests and
    the base chunk's header give the new id (``digest.object_id``), and the changed blocks
    are stored as a delta over the base chunk. Neither the base chunk nor the clean blocks
    are read: a capture costs what was written (``read(offset, length)`` gives the dirty
    bytes: an overlay's, or a VM disk's backup export). Returns (id or None for all zeros, what was
    stored), or None to capture the chunk whole."""
    try:
        base_subs = writer.sub_digests(base_chunk)
    except (ChunkMissing, ChunkCorrupt):
        return None
    if len(base_subs) != -(-length // BLOCK) or len(dirty) > len(base_subs) // 2:
        return None
    subs = list(base_subs)
    blocks: dict[int, bytes] = {}
    for start, end in _runs(dirty):
        pos, stop = off + start * BLOCK, min(off + end * BLOCK, off + length)
        data = memoryview(read(pos, stop - pos))
        for j in range(start, end):
            block = bytes(data[(j - start) * BLOCK : (j - start + 1) * BLOCK])
            subs[j] = hash_block(block)
            if subs[j] != base_subs[j]:
                blocks[j] = block
    digest = object_id(subs, length)
    if digest == zero_digest(length):
        return None, None
    if not blocks:
        return digest, None  # rewritten with what was there
    result = writer.put_blocks(digest, subs, length, base_chunk, blocks)
    return None if result is None else (digest, result)


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted indices as [start, end) runs of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for j in indices:
        if runs and runs[-1][1] == j:
            runs[-1] = (runs[-1][0], j + 1)
        else:
            runs.append((j, j + 1))
    return runs


def store_chunk(
    writer: ChunkWriter,
    data: bytes,
    digest: bytes,
    subs: list[bytes],
    base_chunk: bytes | None,
    dirty: list[int],
) -> PutResult:
    """Store a changed chunk: as its changed sub-blocks over ``base_chunk`` when at most
    half of them changed and the base chunk is there, else whole."""
    if base_chunk is not None and writer.has(base_chunk):
        changed = dirty
        with contextlib.suppress(ChunkMissing, ChunkCorrupt):
            base_subs = writer.sub_digests(base_chunk)
            if len(base_subs) == len(subs):  # refine: dirty blocks rewritten unchanged
                changed = [j for j in dirty if subs[j] != base_subs[j]]
        if changed and len(changed) <= len(subs) // 2:
            return writer.put_delta(data, digest, subs, base_chunk, changed)
    return writer.put(data, digest, subs)


__all__ = [
    "BLOCK",
    "ImageReader",
    "Overlay",
    "OverlayCut",
    "capture_blocks",
    "capture_overlay",
    "store_chunk",
]
