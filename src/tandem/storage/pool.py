"""Chunk pool: content-addressed, compressed, verified chunks in a local directory.

Invariants
- A chunk file exists under ``chunks/`` only once its bytes are durable (written to
  ``tmp/``, synced, then renamed); a packed chunk is found only once its pack and the pack's
  index file are durable (``storage.packs``: chunk files under ``pack_below`` bytes, 256 KiB
  unless pool.json says otherwise, are appended to one pack per writer; a pool written
  before packs is read as it is, and its new small chunks go to packs beside its files).
  "Present" therefore means durable; every read verifies
  what it returns against the chunk's id and a bad chunk raises, it is never served. The id
  covers the header's 64 KiB block digests (``digest.object_id``), so a read of a few
  blocks checks the header with one small hash and each block with its own digest: it
  decodes only what it returns (a delta's own blocks; its base only for the others).
- A manifest is written after every chunk it names is durable (``PoolWriter.commit_manifest``).
- Garbage collection is safe while writers run: a writer registers itself in ``writers/``
  (a file it holds an flock on) with its start time and the manifests it builds on; GC keeps
  every chunk named by a live or base manifest and every chunk touched or written since the
  oldest active writer started. A writer that reuses a chunk it did not write touches it
  (a packed chunk: its pack, which GC then keeps whole).

On-disk format, version 3 (version 1 had plain BLAKE3-256 ids; version 2 had no packs, and
a version-2 pool opened by this code is marked version 3 before a pack can be written, so an
older tandem refuses it as a format it does not know rather than miss its packed chunks)::

    DIR/pool.json             {"format": 3, "kind": "tandem-pool"[, "pack_below": bytes]}
    DIR/chunks/ab/<hex>       chunk files, fanned out by the first byte of the digest
    DIR/packs/<id>.pack|.idx  small chunk files, appended; the index names each (packs.py)
    DIR/manifests/<hex>       manifest objects (same file format, no sub-block digests)
    DIR/tmp/                  temporary files; those of dead writers removed when it opens
    DIR/writers/<id>          one per active writer: JSON {"started": t, "bases": [hex...]}

    chunk file = b"TCK1" | codec u8 (0 raw, 1 zstd, 2 delta) | delta depth u8 | n_sub u16
                 | plain_len u32 | n_sub * 32-byte sub-block digests
                 | [delta: base id 32 | mask of the blocks it holds u64 | inner codec u8]
                 | payload (a delta's: its blocks in order, XORed with the base's when
                   the inner codec has DELTA_XOR)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import zstandard

from tandem.errors import ChunkCorrupt, ChunkMissing, InvalidInput, NotAPool, PoolFull, StorageError
from tandem.storage.digest import (
    DIGEST_SIZE,
    SUB_BLOCK,
    hash_block,
    hash_bytes,
    hash_object,
    object_id,
    split_digests,
)
from tandem.storage.fileio import fsync_dir, write_durably
from tandem.storage.layouts import (
    BaseLayouts,
    ImageLayouts,
    Layout,
    StoredLayouts,
    decode_record,
    encode_record,
)
from tandem.storage.manifest import volume_chunks
from tandem.storage.packs import (
    HEAD_BYTES,
    PACK_BELOW,
    PACK_TARGET,
    REWRITE_BELOW,
    OpenPack,
    encode_index,
    read_record,
    read_record_head,
    remove_orphans,
    shared,
)

log = logging.getLogger(__name__)

MAGIC = b"TCK1"
HEADER = struct.Struct("<4sBBHI")
CODEC_RAW = 0
CODEC_ZSTD = 1
CODEC_DELTA = 2
TMP_SLACK = 2.0  # seconds: clock granularity between a tmp file's mtime and time.time()
DELTA_HEAD = struct.Struct("<32sQB")  # base digest, mask of replaced sub-blocks, inner codec
assert HEADER.size + 64 * DIGEST_SIZE + DELTA_HEAD.size <= HEAD_BYTES  # infos reads that much
MAX_DELTA_DEPTH = 8  # longer chains are cut by storing the chunk whole
DELTA_XOR = 0x80  # inner-codec flag: blocks are stored XORed with the base's blocks
ZSTD_LEVEL = 1
MIN_SAVING = 0.05  # store raw when compression saves less than this fraction
POOL_FORMAT = 3
READABLE_FORMATS = (2, 3)
LAYOUTS_KEPT = 4096
"""Chunks whose checked length and block digests a pool keeps in memory (about 2 KB
each, 9 MB in all): a failback's final syncback reads the header of every chunk it
touches when it is received, and its restore asks for those block digests moments later."""
BASES_READ_KEPT = 256
"""Base chunk headers a writer keeps between a delta's ``sub_digests`` and its store:
more than the chunks its callers' threads have in hand at once."""
STORED_LAYOUTS_KEPT = 8192  # layouts of chunks a writer stored kept in memory (~17 MiB)
STORED_LAYOUTS_SPILLED = 1 << 19
"""Older layouts a writer keeps in a file of its own until its images' layout files are
written: a first capture of up to 2 TiB of distinct 4 MiB chunks gets complete files."""
FLUSH_CHUNKS = 2048  # pending chunks before a writer makes them durable
FLUSH_BYTES = 512 * 1024 * 1024
DEFAULT_PACK_BELOW = PACK_BELOW  # for pools whose pool.json does not say

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    comp = getattr(_local, "comp", None)
    if comp is None:
        comp = _local.comp = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "dec", None)
    if dec is None:
        dec = _local.dec = zstandard.ZstdDecompressor()
    return dec


def encode_chunk(data: bytes | bytearray | memoryview, subs: list[bytes]) -> bytes:
    """The chunk-file bytes for ``data``: compressed when that saves at least 5%."""
    return b"".join(encode_chunk_parts(data, subs))


def encode_chunk_parts(data: bytes | bytearray | memoryview, subs: list[bytes]) -> list[bytes]:
    """``encode_chunk`` as the parts whose concatenation it is (header, block digests,
    payload): a sender that frames many chunks into one body copies each byte once, in
    its own join, not once here and once there."""
    codec, payload = _pack(data)
    return [HEADER.pack(MAGIC, codec, 0, len(subs), len(data)), *subs, payload]


PROBE = 16 * 1024
PROBES = 4
"""A payload of at least ``4 * PROBE`` bytes is first probed: pieces of ``PROBE`` bytes
spread over it (first and last included), one for every ``4 * PROBE`` bytes up to
``PROBES``, are compressed alone, and when none saves ``MIN_SAVING`` it is stored raw
without being compressed whole. Random, encrypted or already compressed data then costs
~0.04 ms a 4 MiB chunk instead of ~2 ms, and a quarter of a small delta's blocks rather than
all of them (a failback's deltas cost in proportion to their bytes, not their number); a
payload compressible only between the probes is stored raw (larger, never wrong)."""


def _pack(data: bytes | bytearray | memoryview) -> tuple[int, bytes]:
    if len(data) >= 4 * PROBE and not _probes_compress(data):
        return CODEC_RAW, bytes(data)
    packed = _compressor().compress(data)
    if len(packed) <= len(data) * (1 - MIN_SAVING):
        return CODEC_ZSTD, packed
    return CODEC_RAW, bytes(data)


def _probes_compress(data: bytes | bytearray | memoryview) -> bool:
    view, comp = memoryview(data), _compressor()
    probes = min(PROBES, len(view) // (4 * PROBE))
    step = (len(view) - PROBE) // (probes - 1) if probes > 1 else 0
    for k in range(probes):
        piece = view[k * step : k * step + PROBE]
        if len(comp.compress(piece)) <= PROBE * (1 - MIN_SAVING):
            return True
    return False


def delta_pays(changed: int, blocks: int) -> bool:
    """Whether a chunk of ``blocks`` sub-blocks, ``changed`` of them different from its
    previous version, is stored and sent as a delta over it (at most half changed) rather
    than whole. The one rule every writer of deltas follows."""
    return changed <= blocks // 2


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def encode_delta(
    base: bytes,
    base_depth: int,
    plain_len: int,
    subs: list[bytes],
    changed: dict[int, bytes],
    base_blocks: dict[int, bytes] | None = None,
) -> bytes:
    """A delta chunk file: the sub-blocks ``changed`` (index -> bytes) over chunk ``base``.

    With ``base_blocks`` (the same sub-blocks of the base), each block is stored XORed with
    its old version: a 4 KiB write into a 64 KiB block then compresses to about 4 KiB.
    """
    mask = 0
    for j in changed:
        mask |= 1 << j
    order = sorted(changed)
    if base_blocks is not None:
        raw = b"".join(_xor(changed[j], base_blocks[j]) for j in order)
    else:
        raw = b"".join(changed[j] for j in order)
    inner, payload = _pack(raw)
    if base_blocks is not None:
        inner |= DELTA_XOR
    head = HEADER.pack(MAGIC, CODEC_DELTA, base_depth + 1, len(subs), plain_len)
    return b"".join([head, *subs, DELTA_HEAD.pack(base, mask, inner), payload])


@dataclass
class ChunkInfo:
    """What a chunk file's header says."""

    codec: int
    depth: int  # delta chain length: 0 for a self-contained chunk
    plain_len: int
    subs: list[bytes]
    base: bytes | None  # the chunk a delta applies to
    payload_at: int


class Layouts:
    """The length and block digests of chunks lately read or stored, by id, each checked
    against its id (``check_header``): what the id stands for, so true whatever encodes
    the chunk (whole or a delta, in a pack or a file of its own). Never evidence that a
    chunk is stored: a reader of blocks reads the chunk itself. Safe from several
    threads; the least lately used go first."""

    def __init__(self, most: int) -> None:
        self._most = most
        self._kept: OrderedDict[bytes, tuple[int, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: bytes) -> tuple[int, list[bytes]] | None:
        with self._lock:
            got = self._kept.get(digest)
            if got is None:
                return None
            self._kept.move_to_end(digest)
        length, table = got
        return length, split_digests(table)

    def put(self, digest: bytes, info: ChunkInfo) -> None:
        """Keep ``info``'s length and block digests; ``info`` checked against ``digest``."""
        with self._lock:
            self._kept[digest] = (info.plain_len, b"".join(info.subs))
            self._kept.move_to_end(digest)
            if len(self._kept) > self._most:
                self._kept.popitem(last=False)


def _layout(info: ChunkInfo) -> Layout:
    return Layout(info.plain_len, info.subs, info.depth)


def parse_header(blob: bytes | memoryview, digest: bytes, where: str) -> ChunkInfo:
    def bad(reason: str) -> ChunkCorrupt:
        return ChunkCorrupt(digest=digest.hex(), pool=where, reason=reason)

    if len(blob) < HEADER.size:
        raise bad("truncated header")
    magic, codec, depth, n_sub, plain_len = HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise bad("bad magic")
    pos = HEADER.size + n_sub * DIGEST_SIZE
    if len(blob) < pos:
        raise bad("truncated header")
    table = bytes(blob[HEADER.size : pos])
    subs = split_digests(table)
    base = None
    if codec == CODEC_DELTA:
        if len(blob) < pos + DELTA_HEAD.size:
            raise bad("truncated delta header")
        base = bytes(DELTA_HEAD.unpack_from(blob, pos)[0])
        pos += DELTA_HEAD.size
    elif codec not in (CODEC_RAW, CODEC_ZSTD):
        raise bad(f"unknown codec {codec}")
    return ChunkInfo(codec, depth if codec == CODEC_DELTA else 0, plain_len, subs, base, pos)


def _unpack(codec: int, payload: memoryview, size: int) -> bytes:
    if codec == CODEC_ZSTD:
        return _decompressor().decompress(payload, max_output_size=size)
    if codec == CODEC_RAW:
        return bytes(payload)
    raise zstandard.ZstdError(f"unknown codec {codec}")


def decode_chunk(
    blob: bytes, digest: bytes, where: str, base_of: Callable[[bytes], bytes] | None = None
) -> bytes:
    """Plaintext of a chunk file, verified against ``digest``.

    A delta chunk needs ``base_of`` (digest -> verified plaintext of its base chunk).
    """
    info = parse_header(blob, digest, where)
    return bytes(_verified_plaintext(blob, info, digest, where, base_of))


def _verified_plaintext(
    blob: bytes,
    info: ChunkInfo,
    digest: bytes,
    where: str,
    base_of: Callable[[bytes], bytes] | None,
) -> bytes | memoryview:
    """The plaintext of a parsed chunk file, checked against ``digest``; a raw chunk's is
    a view into ``blob`` (no copy)."""
    payload = memoryview(blob)[info.payload_at :]
    data: bytes | memoryview
    try:
        if info.codec == CODEC_DELTA:
            if base_of is None:
                raise ChunkCorrupt(
                    digest=digest.hex(), pool=where, reason="a delta chunk without its base"
                )
            assert info.base is not None
            held, xored = _delta_blocks(blob, info, digest, where)
            base = base_of(info.base)
            if len(base) != info.plain_len:
                raise ChunkCorrupt(digest=digest.hex(), pool=where, reason="delta base length")
            out = bytearray(base)
            for j, block in held.items():
                at = j * SUB_BLOCK
                end = at + len(block)
                out[at:end] = _xor(bytes(block), base[at:end]) if xored else block
            data = bytes(out)
        elif info.codec == CODEC_RAW:
            data = payload
        else:
            data = _unpack(info.codec, payload, info.plain_len)
    except zstandard.ZstdError as exc:
        raise ChunkCorrupt(digest=digest.hex(), pool=where, reason=f"zstd: {exc}") from exc
    if len(data) != info.plain_len:
        raise ChunkCorrupt(digest=digest.hex(), pool=where, reason="length mismatch")
    got, subs = hash_object(data)
    if got != digest:
        raise ChunkCorrupt(digest=digest.hex(), pool=where, reason="digest mismatch")
    if info.subs and info.subs != subs:  # (manifest objects carry none)
        raise ChunkCorrupt(digest=digest.hex(), pool=where, reason="sub-block digests")
    return data


def check_header(info: ChunkInfo, digest: bytes, where: str) -> None:
    """Raise unless the header's block digests and length are the ones ``digest`` names:
    then each block can be verified on its own against them."""
    if object_id(info.subs, info.plain_len) != digest:
        raise ChunkCorrupt(digest=digest.hex(), pool=where, reason="header does not match id")


def _delta_blocks(
    blob: bytes, info: ChunkInfo, digest: bytes, where: str
) -> tuple[dict[int, memoryview], bool]:
    """The blocks a delta chunk file holds (index -> bytes as stored, XORed or not) and
    whether they are XORed with the base's; decompresses only the delta's own payload."""
    _, mask, inner = DELTA_HEAD.unpack_from(blob, info.payload_at - DELTA_HEAD.size)
    held = [j for j in range(len(info.subs)) if mask >> j & 1]
    if mask >> len(info.subs):
        raise ChunkCorrupt(digest=digest.hex(), pool=where, reason="delta mask")
    sizes = [min(SUB_BLOCK, info.plain_len - j * SUB_BLOCK) for j in held]
    try:
        raw = _unpack(inner & ~DELTA_XOR, memoryview(blob)[info.payload_at :], sum(sizes))
    except zstandard.ZstdError as exc:
        raise ChunkCorrupt(digest=digest.hex(), pool=where, reason=f"zstd: {exc}") from exc
    if len(raw) != sum(sizes):
        raise ChunkCorrupt(digest=digest.hex(), pool=where, reason="delta payload length")
    view = memoryview(raw)
    out: dict[int, memoryview] = {}
    pos = 0
    for j, n in zip(held, sizes, strict=True):
        out[j] = view[pos : pos + n]
        pos += n
    return out, bool(inner & DELTA_XOR)


def syncfs(fd: int) -> None:
    """Flush the whole file system holding ``fd`` (one call instead of one fsync per file)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Start writing a file's dirty pages (``length`` bytes from ``offset``; 0: to its end)
    to disk now, without waiting (Linux ``sync_file_range``): the next ``syncfs`` or fsync
    then finds them written or under way instead of flushing a whole batch at once, and the
    disk works while the writer goes on. Best effort: a no-op where it is missing."""
    global _sync_file_range
    if _sync_file_range is None:
        func = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
        if func is not None:
            func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        _sync_file_range = func or False
    if _sync_file_range:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def drop_cached(path: Path | str) -> None:
    """Drop a written file's clean pages from the page cache (best effort: dirty pages
    stay, a file gone or a system without ``posix_fadvise`` is left as it is)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):
        pass
    finally:
        os.close(fd)


def _translate_oserror(exc: OSError, pool: Path) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return PoolFull(pool=str(pool), reason=exc.strerror or "ENOSPC")
    return StorageError(detail=f"pool {pool}: {exc}")


@dataclass
class PutResult:
    digest: bytes
    new: bool
    stored: int  # bytes written to the pool (0 when the chunk was already present)


@dataclass
class VerifyReport:
    chunks: int = 0
    bytes: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (hex digest, reason)
    manifests: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)  # (manifest hex, chunk hex)

    @property
    def ok(self) -> bool:
        return not self.bad and not self.missing


@dataclass
class GcReport:
    chunks_kept: int = 0
    chunks_removed: int = 0
    bytes_freed: int = 0
    manifests_removed: int = 0


class ChunkWriter(Protocol):
    """What capture needs from a writer: a local PoolWriter or a remote session's."""

    def has(self, digest: bytes) -> bool: ...

    def put(
        self,
        data: bytes | bytearray | memoryview,
        digest: bytes | None = None,
        subs: list[bytes] | None = None,
    ) -> PutResult: ...

    def put_delta(
        self,
        data: bytes | bytearray | memoryview,
        digest: bytes,
        subs: list[bytes],
        base: bytes,
        changed: list[int],
    ) -> PutResult: ...

    def sub_digests(self, digest: bytes) -> list[bytes]: ...

    def put_blocks(
        self, digest: bytes, subs: list[bytes], length: int, base: bytes, blocks: dict[int, bytes]
    ) -> PutResult | None: ...

    def commit_manifest(self, blob: bytes) -> bytes: ...

    def __enter__(self) -> ChunkWriter: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class WritablePool(Protocol):
    """Anything capture can write into: a ChunkPool, or an appliance session (RemotePool)."""

    def writer(self, bases: Iterable[bytes] = ()) -> ChunkWriter: ...


class ChunkPool:
    """A chunk pool in ``root``. Thread-safe for reads; writes go through ``writer()``."""

    clock_slack = 2.0
    """Seconds GC's cut-off leaves for clock granularity (and, on an object store, for the
    store's clock against the appliance's)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        meta = self.root / "pool.json"
        try:
            info = json.loads(meta.read_text())
        except FileNotFoundError as exc:
            raise NotAPool(path=self.root, problem="it has no pool.json") from exc
        if info.get("format") not in READABLE_FORMATS:
            raise NotAPool(
                path=self.root, problem=f"its pool.json names format {info.get('format')!r}"
            )
        pack_below = info.get("pack_below", DEFAULT_PACK_BELOW)
        if not isinstance(pack_below, int) or pack_below < 0:
            raise NotAPool(path=self.root, problem=f"its pool.json has pack_below {pack_below!r}")
        if info["format"] != POOL_FORMAT:
            # A pool from before packs: say so to older versions before packing into it. A
            # pool this process cannot write is only read (its writers would fail anyway).
            with contextlib.suppress(OSError):
                write_durably(meta, json.dumps({**info, "format": POOL_FORMAT}).encode())
        self.pack_below = pack_below
        self.chunks_dir = self.root / "chunks"
        self.packs_dir = self.root / "packs"
        with contextlib.suppress(FileExistsError):  # pools made before packs have none
            self.packs_dir.mkdir()
        self.packs = shared(self.packs_dir)
        self._chunks_prefix = f"{self.chunks_dir}/"
        self.manifests_dir = self.root / "manifests"
        self.tmp_dir = self.root / "tmp"
        self.writers_dir = self.root / "writers"
        self.layouts = Layouts(LAYOUTS_KEPT)
        self.image_layouts = ImageLayouts(self.root / "layouts", self.tmp_dir)
        self._clean_tmp()
        self.packs.refresh(force=True)

    @classmethod
    def create(cls, root: Path | str, *, pack_below: int | None = None) -> ChunkPool:
        """Create (or open, if it exists) a pool in ``root``. ``pack_below``: chunk files
        smaller than this many bytes go into pack files (0: none; default
        ``DEFAULT_PACK_BELOW``; see ``storage.packs``)."""
        root = Path(root)
        if not (root / "pool.json").exists():
            root.mkdir(parents=True, exist_ok=True)
            for sub in ("manifests", "tmp", "writers", "packs"):
                (root / sub).mkdir(exist_ok=True)
            for i in range(256):
                (root / "chunks" / f"{i:02x}").mkdir(parents=True, exist_ok=True)
            # Written last and durably: a pool.json names a complete pool (it used to be
            # renamed without an fsync, which a crash can leave as an empty file).
            meta: dict[str, Any] = {"format": POOL_FORMAT, "kind": "tandem-pool"}
            if pack_below is not None:
                meta["pack_below"] = pack_below
            write_durably(root / "pool.json", json.dumps(meta).encode())
        return cls(root)

    def _clean_tmp(self) -> None:
        # Only files of dead writers: a live writer holds its registration lock. A writer
        # of another process that registers after the look writes files newer than it.
        looked = time.time() - TMP_SLACK
        if self._active_writers():
            return
        for entry in os.scandir(self.tmp_dir):
            with contextlib.suppress(FileNotFoundError):
                if entry.stat(follow_symlinks=False).st_mtime >= looked:
                    continue
                if entry.is_dir(follow_symlinks=False):  # a layouts folder being made
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
        remove_orphans(self.packs_dir, str(self.root))

    # --- paths and presence -------------------------------------------------------------

    def chunk_path(self, digest: bytes) -> Path:
        hexd = digest.hex()
        return self.chunks_dir / hexd[:2] / hexd

    def _chunk_file(self, digest: bytes) -> str:
        """``chunk_path`` as a string, for the hot paths (no pathlib objects)."""
        hexd = digest.hex()
        return f"{self._chunks_prefix}{hexd[:2]}/{hexd}"

    def _packed(self, digest: bytes, refresh: bool = True) -> str | None:
        """The path of the pack holding ``digest``, if its index is loaded (after a cheap
        refresh when it is not)."""
        loc = self.packs.lookup(digest)
        if loc is None and refresh:
            self.packs.refresh()
            loc = self.packs.lookup(digest)
        return None if loc is None else self.packs.pack_path(loc[0])

    def has(self, digest: bytes) -> bool:
        pack = self._packed(digest, refresh=False)
        if pack is not None and os.path.exists(pack):
            return True
        if os.path.exists(self._chunk_file(digest)):
            return True
        pack = self._packed(digest)
        return pack is not None and os.path.exists(pack)

    def touch_loose(self, digest: bytes, chunks_fd: int | None = None) -> bool:
        """``touch`` of a chunk stored as a file of its own; False if there is none.
        ``chunks_fd``: an open descriptor of ``chunks/`` (a shorter path to resolve)."""
        hexd = digest.hex()
        try:
            if chunks_fd is None:
                os.utime(f"{self._chunks_prefix}{hexd[:2]}/{hexd}")
            else:
                os.utime(f"{hexd[:2]}/{hexd}", dir_fd=chunks_fd)
        except FileNotFoundError:
            return False
        return True

    def touch(self, digest: bytes) -> bool:
        """Mark a chunk as in use now (for GC); False if it is not present. A packed
        chunk's pack is touched (GC keeps a touched pack whole)."""
        pack = self._packed(digest, refresh=False)
        if pack is not None:
            with contextlib.suppress(FileNotFoundError):
                os.utime(pack)
                return True
        try:
            os.utime(self._chunk_file(digest))
        except FileNotFoundError:
            pass
        else:
            return True
        # Written by another process since we looked, or rewritten by GC into a new pack.
        self.packs.refresh(force=pack is not None)
        again = self._packed(digest, refresh=False)
        if again is not None and again != pack:
            with contextlib.suppress(FileNotFoundError):
                os.utime(again)
                return True
        return False

    def missing(self, digests: Iterable[bytes]) -> list[bytes]:
        """The digests, in order and without repeats, that the pool does not hold."""
        seen: set[bytes] = set()
        out = []
        for d in digests:
            if d not in seen:
                seen.add(d)
                if not self.has(d):
                    out.append(d)
        return out

    # --- reading ------------------------------------------------------------------------

    def _read_packed(self, digest: bytes) -> bytes | None:
        loc = self.packs.lookup(digest)
        if loc is None:
            return None
        pack_id, offset, length = loc
        try:
            return read_record(
                self.packs.pack_path(pack_id), digest, offset, length, str(self.root)
            )
        except FileNotFoundError:
            return None  # removed or rewritten by GC: the caller refreshes and retries

    def _read_packed_head(self, digest: bytes) -> bytes | None:
        """``_read_packed``, only the first ``HEAD_BYTES`` of the record (the header)."""
        loc = self.packs.lookup(digest)
        if loc is None:
            return None
        pack_id, offset, length = loc
        try:
            fd = os.open(self.packs.pack_path(pack_id), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return read_record_head(fd, digest, offset, length, str(self.root))
        finally:
            os.close(fd)

    def _read_file(self, digest: bytes) -> bytes:
        blob = self._read_packed(digest)
        if blob is not None:
            return blob
        try:
            with open(self._chunk_file(digest), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            pass
        self.packs.refresh(force=True)
        blob = self._read_packed(digest)
        if blob is None:
            raise ChunkMissing(digest=digest.hex(), pool=str(self.root))
        return blob

    def get(self, digest: bytes) -> bytes:
        """The verified plaintext of a chunk (a delta chunk is applied to its base)."""
        return decode_chunk(self._read_file(digest), digest, str(self.root), self.get)

    def get_stored(self, digest: bytes) -> bytes:
        """The chunk file exactly as stored (a delta needs its base to be read)."""
        return self._read_file(digest)

    def get_raw(self, digest: bytes) -> bytes:
        """Self-contained chunk-file bytes: a delta chunk is re-encoded whole."""
        blob = self._read_file(digest)
        info = parse_header(blob, digest, str(self.root))
        if info.codec != CODEC_DELTA:
            return blob
        return encode_chunk(self.get(digest), info.subs)

    def info(self, digest: bytes) -> ChunkInfo:
        """The header of a stored chunk (codec, delta depth and base, sub-block digests)."""
        head_size = HEADER.size + 64 * DIGEST_SIZE + DELTA_HEAD.size
        head = self._read_packed_head(digest)
        if head is None:
            try:
                with open(self._chunk_file(digest), "rb") as fh:
                    head = fh.read(head_size)
            except FileNotFoundError:
                head = self._read_file(digest)  # a pack written or rewritten since: refresh
        return parse_header(head[:head_size], digest, str(self.root))

    def infos(self, digests: Iterable[bytes]) -> dict[bytes, ChunkInfo]:
        """``info`` of many chunks, for garbage collection's marking (which needs each live
        chunk's delta base): a packed chunk's header is read alone (not its whole record)
        through one descriptor per pack. A chunk missing or corrupt is left out (verify
        reports it)."""
        out: dict[bytes, ChunkInfo] = {}
        by_pack: dict[str, list[tuple[bytes, int, int]]] = {}
        slow: list[bytes] = []
        for digest in digests:
            loc = self.packs.lookup(digest)
            if loc is None:
                slow.append(digest)
            else:
                by_pack.setdefault(loc[0], []).append((digest, loc[1], loc[2]))
        for pack_id, records in by_pack.items():
            try:
                fd = os.open(self.packs.pack_path(pack_id), os.O_RDONLY)
            except FileNotFoundError:  # rewritten or removed since: looked up again
                slow.extend(d for d, _, _ in records)
                continue
            try:
                for digest, offset, length in records:
                    try:
                        head = read_record_head(fd, digest, offset, length, str(self.root))
                        out[digest] = parse_header(head, digest, str(self.root))
                    except ChunkCorrupt:
                        continue
            finally:
                os.close(fd)
        for digest in slow:
            with contextlib.suppress(ChunkMissing, ChunkCorrupt):
                out[digest] = self.info(digest)
        return out

    def checked_info(self, digest: bytes) -> ChunkInfo:
        """``info``, with the header checked against the id: its block digests can then
        verify blocks on their own."""
        info = self.info(digest)
        check_header(info, digest, str(self.root))
        self.layouts.put(digest, info)
        return info

    def layouts_of(self, images: Iterable[bytes]) -> BaseLayouts:
        """The layout files of the volume images ``images`` (manifest ids; the others, and
        any unreadable, left out), read as chunks are asked for."""
        found: list[tuple[bytes, list[bytes | None]]] = []
        for mid in images:
            with contextlib.suppress(ChunkMissing, ChunkCorrupt, OSError):
                chunks = volume_chunks(self.get_manifest_blob(mid))
                if chunks is not None:
                    found.append((mid, chunks))
        # (An object-store pool, which keeps no layout files, has none.)
        return BaseLayouts(getattr(self, "image_layouts", None), found)

    def sub_digests(self, digest: bytes) -> list[bytes]:
        """The 64 KiB sub-block digests of a chunk, read from its header only (checked
        against the id)."""
        return self.checked_info(digest).subs

    def layout(self, digest: bytes) -> tuple[int, list[bytes]]:
        """(length, block digests) of a chunk, checked against its id: from memory when
        this pool lately read or stored it (``Layouts``), else from its header. Says
        nothing of whether the chunk is still stored; its blocks are read for that."""
        got = self.layouts.get(digest)
        if got is not None:
            return got
        info = self.checked_info(digest)
        return info.plain_len, info.subs

    def read_blocks(self, digest: bytes, indices: list[int]) -> list[bytes]:
        """The plaintext 64 KiB sub-blocks ``indices`` of a chunk, each verified.

        Decodes no more than it must: a delta's own blocks come from its payload alone,
        the others from its base; only a self-contained chunk is decompressed whole.
        """
        if not indices:
            return []
        where = str(self.root)
        blob = self._read_file(digest)
        info = parse_header(blob, digest, where)
        check_header(info, digest, where)
        if any(not 0 <= j < len(info.subs) for j in indices):
            raise InvalidInput(detail=f"block index out of range (chunk has {len(info.subs)})")
        found: dict[int, bytes | memoryview] = {}
        if info.codec == CODEC_DELTA:
            assert info.base is not None
            held, xored = _delta_blocks(blob, info, digest, where)
            mine = sorted({j for j in indices if j in held})
            rest = sorted({j for j in indices if j not in held})
            olds = dict(zip(mine, self.read_blocks(info.base, mine), strict=True)) if xored else {}
            for j in mine:
                found[j] = _xor(bytes(held[j]), olds[j]) if xored else held[j]
            found.update(zip(rest, self.read_blocks(info.base, rest), strict=True))
        else:
            payload = memoryview(blob)[info.payload_at :]
            try:
                plain = memoryview(_unpack(info.codec, payload, info.plain_len))
            except zstandard.ZstdError as exc:
                raise ChunkCorrupt(digest=digest.hex(), pool=where, reason=f"zstd: {exc}") from exc
            if len(plain) != info.plain_len:
                raise ChunkCorrupt(digest=digest.hex(), pool=where, reason="length mismatch")
            for j in set(indices):
                found[j] = plain[j * SUB_BLOCK : (j + 1) * SUB_BLOCK]
        out = []
        for j in indices:
            block = found[j]
            if hash_block(block) != info.subs[j]:
                raise ChunkCorrupt(digest=digest.hex(), pool=where, reason=f"block {j}")
            out.append(bytes(block))
        return out

    def decode_lazily(self, digest: bytes) -> tuple[bytes, list[bytes], bool]:
        """(plaintext, block digests, verified) of a chunk, decoded once for a cache whose
        readers want a few blocks at a time: the header is checked against the id, but the
        plaintext of a self-contained chunk is *not* hashed here (``verified`` False), so
        each 64 KiB block must be checked against its digest (``hash_block``) before it is
        used. A delta chunk comes verified whole (``verified`` True): its blocks come from
        several chunks. A chunk's length is checked either way.
        """
        where = str(self.root)
        blob = self._read_file(digest)
        info = parse_header(blob, digest, where)
        check_header(info, digest, where)
        if info.codec == CODEC_DELTA:
            return bytes(_verified_plaintext(blob, info, digest, where, self.get)), info.subs, True
        payload = memoryview(blob)[info.payload_at :]
        try:
            plain = _unpack(info.codec, payload, info.plain_len)
        except zstandard.ZstdError as exc:
            raise ChunkCorrupt(digest=digest.hex(), pool=where, reason=f"zstd: {exc}") from exc
        if len(plain) != info.plain_len:
            raise ChunkCorrupt(digest=digest.hex(), pool=where, reason="length mismatch")
        return plain, info.subs, False

    def sub_digests_many(self, digests: list[bytes]) -> list[list[bytes]]:
        """``sub_digests`` of each of ``digests``, in order."""
        return [self.sub_digests(d) for d in digests]

    def read_blocks_many(self, wants: list[tuple[bytes, list[int]]]) -> list[list[bytes]]:
        """``read_blocks`` of each (digest, indices), in order."""
        return [self.read_blocks(d, indices) for d, indices in wants]

    def stored_size(self, digest: bytes) -> int:
        loc = self.packs.lookup(digest)
        if loc is not None:
            return loc[2]
        return self.chunk_path(digest).stat().st_size

    def iter_chunks(self) -> Iterator[tuple[bytes, os.stat_result]]:
        """Every stored chunk: the loose ones with their file's stat, then the packed ones
        with a stat of their size and their pack's times."""
        yield from self.iter_loose_chunks()
        self.packs.refresh(force=True)
        for pack_id in self.packs.packs():
            try:
                st = os.stat(self.packs.pack_path(pack_id))
                entries = self.packs.entries(pack_id)
            except FileNotFoundError:
                continue
            except ChunkCorrupt as exc:
                log.error("pack %s of %s unreadable: %s", pack_id, self.root, exc.message)
                continue
            for digest, _, length in entries:
                if (self.packs.lookup(digest) or ("",))[0] == pack_id:  # one copy each
                    yield (
                        digest,
                        os.stat_result(
                            (
                                st.st_mode,
                                0,
                                0,
                                1,
                                0,
                                0,
                                length,
                                st.st_atime,
                                st.st_mtime,
                                st.st_ctime,
                            )
                        ),
                    )

    def iter_loose_chunks(self) -> Iterator[tuple[bytes, os.stat_result]]:
        for fan in sorted(os.scandir(self.chunks_dir), key=lambda e: e.name):
            for entry in os.scandir(fan.path):
                if len(entry.name) == DIGEST_SIZE * 2:
                    with contextlib.suppress(FileNotFoundError):
                        yield bytes.fromhex(entry.name), entry.stat()

    # --- manifests ----------------------------------------------------------------------

    def manifest_path(self, digest: bytes) -> Path:
        return self.manifests_dir / digest.hex()

    def has_manifest(self, digest: bytes) -> bool:
        return self.manifest_path(digest).exists()

    def get_manifest_blob(self, digest: bytes) -> bytes:
        """The verified bytes of a stored manifest object."""
        try:
            blob = self.manifest_path(digest).read_bytes()
        except FileNotFoundError as exc:
            raise ChunkMissing(digest=digest.hex(), pool=str(self.root)) from exc
        return decode_chunk(blob, digest, str(self.root))

    def list_manifests(self) -> list[bytes]:
        return [
            bytes.fromhex(e.name)
            for e in os.scandir(self.manifests_dir)
            if len(e.name) == DIGEST_SIZE * 2
        ]

    def delete_manifest(self, digest: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.manifest_path(digest))

    def manifest_times(self) -> Iterator[tuple[bytes, float]]:
        """(id, time written) of every manifest object."""
        for mid in self.list_manifests():
            with contextlib.suppress(FileNotFoundError):
                yield mid, os.stat(self.manifest_path(mid)).st_mtime

    # --- writing ------------------------------------------------------------------------

    def writer(
        self, bases: Iterable[bytes] = (), *, xor_deltas: bool = True, cached: bool = True
    ) -> PoolWriter:
        """A registered writer; ``bases`` are manifests whose chunks it may reuse untouched.
        ``xor_deltas``: see ``PoolWriter.put_encoded``. ``cached``: see ``PoolWriter``."""
        return PoolWriter(self, list(bases), xor_deltas=xor_deltas, cached=cached)

    def _active_writers(self) -> list[dict[str, Any]]:
        """Registrations of writers that still hold their lock; stale ones are removed."""
        active = []
        for entry in os.scandir(self.writers_dir):
            try:
                fd = os.open(entry.path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    with open(entry.path) as fh, contextlib.suppress(ValueError):
                        active.append(json.load(fh))
                    continue
                # Not locked: its process died. Drop the registration.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            finally:
                os.close(fd)
        return active

    # --- verification and garbage collection --------------------------------------------

    def verify(self, manifests: Mapping[bytes, Iterable[bytes]] | None = None) -> VerifyReport:
        """Read and check every chunk; with ``manifests`` (id -> chunk ids) also check that
        every chunk they name is present. Bad chunks are listed, never repaired silently."""
        report = VerifyReport()
        for digest, st in self.iter_chunks():
            report.chunks += 1
            report.bytes += st.st_size
            try:
                self.get(digest)
            except ChunkCorrupt as exc:
                report.bad.append((digest.hex(), exc.fields.get("reason", "corrupt")))
            except ChunkMissing as exc:  # a delta whose base is gone: unreadable, reported
                report.bad.append(
                    (digest.hex(), f"its delta base {exc.fields['digest']} is missing")
                )
        bad = {b for b, _ in report.bad}
        for mid, chunk_ids in (manifests or {}).items():
            report.manifests += 1
            for cid in set(chunk_ids):
                if cid.hex() in bad:
                    continue
                if not self.has(cid):
                    report.missing.append((mid.hex(), cid.hex()))
        return report

    def _add_delta_bases(self, referenced: set[bytes]) -> None:
        """Add to ``referenced`` every chunk a referenced delta chunk is built on."""
        todo = list(referenced)
        while todo:
            digest = todo.pop()
            try:
                base = self.info(digest).base
            except (ChunkMissing, ChunkCorrupt):
                continue  # verify reports it; GC must not fail on it
            if base is not None and base not in referenced:
                referenced.add(base)
                todo.append(base)

    def gc(self, live: Mapping[bytes, Iterable[bytes]], remove_manifests: bool = True) -> GcReport:
        """Remove chunks no live manifest names.

        ``live`` maps each live manifest id to the chunk ids it names. Base manifests of
        active writers count as live too (the caller passes their chunk lists in ``live`` if
        it can read them; a base listed by a writer but absent from ``live`` keeps its file).
        """
        report = GcReport()
        started = time.time()
        writers = self._active_writers()
        cutoff = min([started, *(float(w.get("started", started)) for w in writers)]) - 2.0
        keep_manifests = set(live) | {bytes.fromhex(b) for w in writers for b in w.get("bases", [])}
        referenced: set[bytes] = set()
        for chunk_ids in live.values():
            referenced.update(chunk_ids)
        self._add_delta_bases(referenced)
        for digest, st in self.iter_loose_chunks():
            if digest in referenced or st.st_mtime >= cutoff:
                report.chunks_kept += 1
                continue
            path = self.chunk_path(digest)
            doomed = path.with_name(path.name + ".gc")
            try:
                os.rename(path, doomed)
            except FileNotFoundError:
                continue
            # A writer may have touched it between our stat and the rename: keep it then.
            if os.stat(doomed).st_mtime >= cutoff:
                os.rename(doomed, path)
                report.chunks_kept += 1
                continue
            report.bytes_freed += st.st_size
            os.unlink(doomed)
            report.chunks_removed += 1
        self.packs.refresh(force=True)
        for pack_id in self.packs.packs():
            kept, removed, freed = self.sweep_pack(
                pack_id, lambda ds: {d for d in ds if d in referenced}, cutoff
            )
            report.chunks_kept += kept
            report.chunks_removed += removed
            report.bytes_freed += freed
        if remove_manifests:
            for mid in self.list_manifests():
                if mid not in keep_manifests:
                    st = os.stat(self.manifest_path(mid))
                    if st.st_mtime < cutoff:
                        self.delete_manifest(mid)
                        report.manifests_removed += 1
        return report

    def sweep_pack(
        self, pack_id: str, marked: Callable[[list[bytes]], set[bytes]], cutoff: float
    ) -> tuple[int, int, int]:
        """Collect one pack (see ``storage.packs``): keep it if touched since ``cutoff``
        or mostly live, else copy its ``marked`` chunks into a new pack and remove it.
        Returns (chunks kept, chunks removed, bytes freed)."""
        pack_path = self.packs.pack_path(pack_id)
        doomed = pack_path + ".gc"
        with contextlib.suppress(FileNotFoundError):
            _finish_doomed_pack(self, pack_id, cutoff)  # left by a killed run
        try:
            entries = self.packs.entries(pack_id)
            st = os.stat(pack_path)
        except FileNotFoundError:
            return 0, 0, 0
        except ChunkCorrupt as exc:
            log.error("pack %s of %s kept, unreadable index: %s", pack_id, self.root, exc.message)
            return 0, 0, 0
        if st.st_mtime >= cutoff:
            return len(entries), 0, 0
        live = marked([d for d, _, _ in entries])
        total = sum(n for _, _, n in entries) or 1
        live_bytes = sum(n for d, _, n in entries if d in live)
        if live and live_bytes >= REWRITE_BELOW * total:
            return len(entries), 0, 0
        copied = 0
        if live:
            with self.writer(cached=False) as w:
                for digest, offset, length in entries:
                    if digest not in live:
                        continue
                    held = self.packs.lookup(digest)
                    if (
                        held is not None
                        and held[0] != pack_id
                        and os.path.exists(self.packs.pack_path(held[0]))
                    ):
                        continue  # a newer copy exists (a rewrite killed half way)
                    w._write_pending(
                        digest, read_record(pack_path, digest, offset, length, str(self.root))
                    )
                    copied += length
        try:
            os.rename(pack_path, doomed)
        except FileNotFoundError:
            return 0, 0, 0
        # A writer may have touched it between our stat and the rename: keep it then.
        if os.stat(doomed).st_mtime >= cutoff:
            os.rename(doomed, pack_path)
            return len(entries), 0, 0
        _remove_pack(self, pack_id)
        return len(live), len(entries) - len(live), max(0, st.st_size - copied)


def _remove_pack(pool: ChunkPool, pack_id: str) -> None:
    """Remove a pack renamed to ``.gc``: its index first (its chunks stop being visible),
    then its bytes."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pool.packs.idx_path(pack_id))
    fsync_dir(pool.packs_dir)
    pool.packs.drop(pack_id)
    pool.packs.note(b"-", pack_id)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pool.packs.pack_path(pack_id) + ".gc")


def _finish_doomed_pack(pool: ChunkPool, pack_id: str, cutoff: float) -> None:
    """A pack a killed collection left renamed to ``.gc``: put it back if a writer
    touched it since ``cutoff``, else remove it."""
    doomed = pool.packs.pack_path(pack_id) + ".gc"
    if os.stat(doomed).st_mtime >= cutoff:
        os.rename(doomed, pool.packs.pack_path(pack_id))
    else:
        _remove_pack(pool, pack_id)


class PoolWriter:
    """Writes chunks and manifests into a pool, durably and in batches.

    Chunks written by ``put`` become visible (present) only at ``flush``, after one
    file-system sync; until then ``has`` answers for them from memory. Leaving the context
    with an exception discards unflushed chunks, so nothing half-written becomes visible.

    ``cached=False`` is for bulk ingest that is not read again soon (an agent's capture, a
    replica from the peer, GC's rewritten packs): once a flush made its files durable, their
    pages are dropped from the page cache, so that ingesting gigabytes does not evict what
    the appliance and its host read (the catalog, indexes, the chunks of a presented copy).
    It also makes the next writes reuse those pages: on a VM whose balloon reports free
    memory to the host, writing into never-used pages costs a fault each in the hypervisor
    (on the development VM it was 40% of the appliance's CPU during a volume's first
    capture). A syncback, read by the restore that follows, keeps the default.
    """

    on_stored: Callable[[bytes, bytes], None] | None = None
    """Told of each chunk file this writer stores (digest, bytes as stored), in the storing
    thread, once it is pending: a syncback streams them to its receiver."""

    def __init__(
        self, pool: ChunkPool, bases: list[bytes], *, xor_deltas: bool = True, cached: bool = True
    ) -> None:
        self.pool = pool
        self.bases = bases
        self.xor_deltas = xor_deltas
        self.cached = cached
        self._lock = threading.Lock()
        self._pending: dict[bytes, tuple[Path | None, int]] = {}  # (tmp file or packed, size)
        self._pending_bytes = 0
        # Chunks this writer made durable or touched: present, and kept by GC while the
        # writer is registered (GC keeps what was written or touched since the oldest live
        # writer started), so they are answered from memory, without a syscall each.
        self._held: set[bytes] = set()
        self._touched_packs: set[str] = set()
        self._bases_read: OrderedDict[bytes, Layout] = OrderedDict()
        # Layouts of the chunks this writer stored, as layout-file records (compact: ~2 KiB).
        self._stored = StoredLayouts(pool.tmp_dir, STORED_LAYOUTS_KEPT, STORED_LAYOUTS_SPILLED)
        self._base_layouts: BaseLayouts | None = None
        self._chunks_fd = -1  # ``chunks/``, opened by the first ``missing``
        self._pack: OpenPack | None = None
        self._flush_lock = threading.Lock()
        self.started = time.time()
        self._reg_path = pool.writers_dir / f"{uuid.uuid4().hex}.json"
        self._reg_fd = os.open(self._reg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(self._reg_fd, fcntl.LOCK_EX)
        os.write(
            self._reg_fd,
            json.dumps({"started": self.started, "bases": [b.hex() for b in bases]}).encode(),
        )
        self.chunks_written = 0
        self.bytes_written = 0

    def __enter__(self) -> PoolWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.flush()
        else:
            self.discard()
        self.close()

    def close(self) -> None:
        self._stored.close()
        if self._chunks_fd >= 0:
            os.close(self._chunks_fd)
            self._chunks_fd = -1
        if self._reg_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._reg_path)
            os.close(self._reg_fd)
            self._reg_fd = -1

    def has(self, digest: bytes) -> bool:
        """Present in the pool or pending in this writer; refreshes a present chunk for GC."""
        with self._lock:
            if digest in self._pending or digest in self._held:
                return True
        if not self.pool.touch(digest):
            return False
        with self._lock:
            self._held.add(digest)
        return True

    def missing(self, digests: Iterable[bytes], sizes: Iterable[int] | None = None) -> list[bytes]:
        """The digests, in order and without repeats, that neither the pool nor this writer
        holds; touches the ones it holds (for GC), each pack once for the writer's life.
        A batch of n digests costs one refresh of the pack index and at most one syscall
        per digest that is not packed (``has`` costs up to three).

        ``sizes`` (the length of each chunk's encoding, as the sender has it) spares that
        syscall for a chunk this pool would pack (smaller than ``pack_below``): one not in
        the pack index is taken as absent without looking for a loose file of it. Were it
        stored loose all the same (by a version before packs, or under another
        ``pack_below``), it is sent and stored once more, which is harmless."""
        small: set[bytes] = set()
        if sizes is not None:
            digests = list(digests)
            below = self.pool.pack_below
            small = {d for d, n in zip(digests, sizes, strict=True) if n < below}
        with self._lock:
            todo = [d for d in dict.fromkeys(digests) if d not in self._pending]
            todo = [d for d in todo if d not in self._held]
        if not todo:
            return []
        packs = self.pool.packs
        packs.refresh()
        with self._lock:
            if self._chunks_fd < 0:
                self._chunks_fd = os.open(self.pool.chunks_dir, os.O_RDONLY | os.O_DIRECTORY)
        absent: list[bytes] = []
        held: list[bytes] = []
        for d in todo:
            loc = packs.lookup(d)
            if loc is not None:
                path = packs.pack_path(loc[0])
                if path in self._touched_packs:
                    held.append(d)
                    continue
                try:
                    os.utime(path)
                except FileNotFoundError:
                    pass  # rewritten or removed by GC meanwhile: the slow path looks again
                else:
                    self._touched_packs.add(path)
                    held.append(d)
                    continue
            elif d not in small and self.pool.touch_loose(d, self._chunks_fd):
                held.append(d)
                continue
            else:
                # Absent (or sealed by another writer since the refresh: then it is sent
                # again and stored twice, which is harmless).
                absent.append(d)
                continue
            if self.pool.touch(d):
                held.append(d)
            else:
                absent.append(d)
        with self._lock:
            self._held.update(held)
        return absent

    def _has_cheaply(self, digest: bytes) -> bool:
        """``has`` from memory only (pending, held, or in the pack index, whose pack is
        then touched): a chunk stored loose and not yet looked at answers False, so the
        caller stores a second copy of it, which is harmless (see ``storage.packs``)."""
        with self._lock:
            if digest in self._pending or digest in self._held:
                return True
        return self.pool.packs.lookup(digest) is not None and self.has(digest)

    def put(
        self,
        data: bytes | bytearray | memoryview,
        digest: bytes | None = None,
        subs: list[bytes] | None = None,
    ) -> PutResult:
        """Store ``data`` unless present. Safe to call from several threads."""
        if digest is None or subs is None:
            digest, subs = hash_object(data)
        if self.has(digest):
            return PutResult(digest, False, 0)
        blob = encode_chunk(data, subs)
        self._write_pending(digest, blob)
        self._stored_layout(digest, Layout(len(data), subs, 0))
        return PutResult(digest, True, len(blob))

    def sub_digests(self, digest: bytes) -> list[bytes]:
        """Sub-block digests of a chunk this writer may build a delta on; its layout is
        kept a moment for the ``put_delta`` or ``put_blocks`` that may follow. A chunk of
        the images the writer builds on comes from their layout files when they have it
        (``storage.layouts``), else from its header."""
        layout = self.bases_layouts().get(digest)
        if layout is None:
            layout = _layout(self.pool.checked_info(digest))
        with self._lock:
            self._bases_read[digest] = layout
            if len(self._bases_read) > BASES_READ_KEPT:
                self._bases_read.popitem(last=False)
        return list(layout.subs)

    def bases_layouts(self) -> BaseLayouts:
        """The layouts of the chunks of the images this writer builds on (read as asked)."""
        if self._base_layouts is None:
            self._base_layouts = self.pool.layouts_of(self.bases)
        return self._base_layouts

    def prefetch_bases(self, digests: Iterable[bytes | None] | None = None) -> None:
        """Read ahead, in a thread, the layouts of these chunks of the base images (all of
        theirs when None), for the deltas about to be built or received on them."""
        self.bases_layouts().prefetch(digests)

    def _base_info(self, base: bytes) -> Layout | None:
        """The layout of chunk ``base`` to build a delta on (read once: ``sub_digests``
        kept it), None when the chunk is not here. A chunk of a base image is here (the
        registered bases are kept whole while the writer lives)."""
        with self._lock:
            layout = self._bases_read.pop(base, None)
        if layout is not None and (self.bases_layouts().holds(base) or self.has(base)):
            return layout
        try:
            return _layout(self.pool.info(base))
        except (ChunkMissing, ChunkCorrupt):
            return None

    def _stored_layout(self, digest: bytes, layout: Layout) -> None:
        self._stored.put(digest, encode_record(layout))

    def _known_layout(self, digest: bytes) -> Layout | None:
        record = self._stored.get(digest)
        if record is not None:
            return decode_record(record)
        return self.bases_layouts().get(digest)

    def put_delta(
        self,
        data: bytes | bytearray | memoryview,
        digest: bytes,
        subs: list[bytes],
        base: bytes,
        changed: list[int],
    ) -> PutResult:
        """Store ``data`` as its ``changed`` sub-blocks over chunk ``base``.

        Falls back to storing it whole when the base is missing, has another length (a
        delta rebuilds a chunk of its base's length), or its delta chain is already
        MAX_DELTA_DEPTH long, so reads never chase long chains.
        """
        if self.has(digest):
            return PutResult(digest, False, 0)
        view = memoryview(data)
        base_info = self._base_info(base)
        if base_info is None:
            return self.put(data, digest, subs)
        if base_info.depth >= MAX_DELTA_DEPTH or base_info.plain_len != len(view):
            return self.put(data, digest, subs)
        depth = base_info.depth
        blocks = {j: bytes(view[j * SUB_BLOCK : (j + 1) * SUB_BLOCK]) for j in changed}
        old = dict(zip(changed, self.pool.read_blocks(base, changed), strict=True))
        blob = encode_delta(base, depth, len(view), subs, blocks, old)
        self._write_pending(digest, blob)
        self._stored_layout(digest, Layout(len(view), subs, depth + 1))
        return PutResult(digest, True, len(blob))

    def put_blocks(
        self, digest: bytes, subs: list[bytes], length: int, base: bytes, blocks: dict[int, bytes]
    ) -> PutResult | None:
        """Store chunk ``digest`` given only as its changed ``blocks`` over chunk ``base``
        (the caller computed ``digest`` from ``subs``, see ``digest.object_id``): no byte of
        the base is read. Stored plain, not XORed. None when it cannot be a delta (the base
        is missing, of another length, or at the end of a long chain): store it whole then.
        """
        if self.has(digest):
            return PutResult(digest, False, 0)
        base_info = self._base_info(base)
        if base_info is None:
            return None
        if base_info.depth >= MAX_DELTA_DEPTH or base_info.plain_len != length:
            return None
        blob = encode_delta(base, base_info.depth, length, subs, blocks)
        self._write_pending(digest, blob)
        self._stored_layout(digest, Layout(length, subs, base_info.depth + 1))
        return PutResult(digest, True, len(blob))

    def put_encoded(self, digest: bytes, blob: bytes) -> PutResult:
        """Store a chunk file received from an agent or a peer, after verifying it.

        A delta needs its base here. It is verified without decoding the base: the header
        against the id, each block it holds against its digest, the others' digests against
        the base's header. It is then stored XORed with the base's blocks (``xor_deltas``),
        so that a small write costs about its own size here and on every later hop; a
        writer that must be quick (a syncback, during a failback's downtime) keeps it as
        it came. One whose chain would grow past MAX_DELTA_DEPTH is stored whole.
        """
        if self._has_cheaply(digest):
            return PutResult(digest, False, 0)
        where = "received chunk"
        info = parse_header(blob, digest, where)
        if len(info.subs) != -(-info.plain_len // SUB_BLOCK):
            raise ChunkCorrupt(digest=digest.hex(), pool=where, reason="sub-block digests")
        if info.base is None:
            # One decode; a raw chunk is hashed in place (no copy of its plaintext).
            _verified_plaintext(blob, info, digest, where, None)
            self._write_pending(digest, blob)
            self.pool.layouts.put(digest, info)
            self._stored_layout(digest, Layout(info.plain_len, info.subs, 0))
            return PutResult(digest, True, len(blob))
        # A delta is stored only when no copy of the chunk is here at all (a loose one
        # ``_has_cheaply`` does not see): a second copy built on a base would need that
        # base kept, and the collection's counts know each chunk's base from one copy.
        if self.has(digest):
            return PutResult(digest, False, 0)
        with self._lock:
            base_pending = info.base in self._pending
        if base_pending:
            self.flush()  # the base came in this session: make it readable first
        check_header(info, digest, where)
        # A base from the images this writer builds on is here (kept while it lives) and
        # its layout is in their layout files: no random read of the base's header.
        base_info = self.bases_layouts().get(info.base)
        if base_info is None:
            if not self.has(info.base):
                raise ChunkMissing(digest=info.base.hex(), pool=str(self.pool.root))
            base_info = _layout(self.pool.checked_info(info.base))
        if base_info.plain_len != info.plain_len:
            raise ChunkCorrupt(digest=digest.hex(), pool=where, reason="delta base length")
        held, xored = _delta_blocks(blob, info, digest, where)
        keys = sorted(held)
        olds = (
            dict(zip(keys, self.pool.read_blocks(info.base, keys), strict=True))
            if xored or self.xor_deltas
            else {}
        )
        blocks = {j: _xor(bytes(b), olds[j]) if xored else bytes(b) for j, b in held.items()}
        expected = list(base_info.subs)  # the base's blocks, but for those the delta holds
        for j, block in blocks.items():
            expected[j] = hash_block(block)
        if expected != info.subs:
            raise ChunkCorrupt(digest=digest.hex(), pool=where, reason="blocks do not match")
        # The sender cannot know our chain lengths: recompute, cut long chains.
        depth = base_info.depth + 1
        if depth > MAX_DELTA_DEPTH:
            whole = bytearray(self.pool.get(info.base))
            for j, block in blocks.items():
                whole[j * SUB_BLOCK : j * SUB_BLOCK + len(block)] = block
            blob = encode_chunk(whole, info.subs)
            depth = 0
        elif self.xor_deltas and not xored:
            blob = encode_delta(info.base, depth - 1, info.plain_len, info.subs, blocks, olds)
        else:
            blob = blob[:5] + bytes([depth]) + blob[6:]
        self._write_pending(digest, blob)
        self.pool.layouts.put(digest, info)  # the restore of a syncback asks for it next
        self._stored_layout(digest, Layout(info.plain_len, info.subs, depth))
        return PutResult(digest, True, len(blob))

    def _write_pending(self, digest: bytes, blob: bytes) -> None:
        """Add chunk file ``blob`` to what this writer holds pending, and hand it to
        ``on_stored`` when this call stored it (another thread may have won the race)."""
        if self._add_pending(digest, blob) and self.on_stored is not None:
            self.on_stored(digest, blob)

    def _add_pending(self, digest: bytes, blob: bytes) -> bool:
        """Store ``blob`` pending (loose, or in the open pack); False if it already was."""
        if len(blob) < self.pool.pack_below:
            return self._write_packed(digest, blob)
        tmp = self.pool.tmp_dir / f"{digest.hex()}.{uuid.uuid4().hex[:8]}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
                start_writeback(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise _translate_oserror(exc, self.pool.root) from exc
        with self._lock:
            if digest in self._pending:  # another thread won the race
                os.unlink(tmp)
                return False
            self._pending[digest] = (tmp, len(blob))
            self._pending_bytes += len(blob)
            self.chunks_written += 1
            self.bytes_written += len(blob)
            full = len(self._pending) >= FLUSH_CHUNKS or self._pending_bytes >= FLUSH_BYTES
        if full:
            self.flush()
        return True

    def _write_packed(self, digest: bytes, blob: bytes) -> bool:
        """Append a small chunk file to this writer's open pack (one pack per writer,
        appended under the writer's lock, so a flush seals exactly what its batch holds)."""
        with self._lock:
            if digest in self._pending:  # another thread won the race
                return False
            try:
                if self._pack is None:
                    self._pack = OpenPack.create(self.pool.tmp_dir)
                self._pack.append(digest, blob)
            except OSError as exc:
                raise _translate_oserror(exc, self.pool.root) from exc
            self._pending[digest] = (None, len(blob))
            self._pending_bytes += len(blob)
            self.chunks_written += 1
            self.bytes_written += len(blob)
            full = (
                len(self._pending) >= FLUSH_CHUNKS
                or self._pending_bytes >= FLUSH_BYTES
                or self._pack.size >= PACK_TARGET
            )
        if full:
            self.flush()
        return True

    def flush(self) -> None:
        """Make every pending chunk durable, then visible: loose chunk files are renamed
        into ``chunks/``, the open pack sealed (see ``storage.packs``)."""
        with self._flush_lock:
            with self._lock:
                # A snapshot: chunks added while we sync stay pending for the next flush
                # (a packed one goes to a new pack).
                batch = dict(self._pending)
                pack, self._pack = self._pack, None
                if not batch:
                    if pack is not None:
                        pack.discard()
                    return
            try:
                if pack is not None:
                    pack.close()
                fd = os.open(self.pool.tmp_dir, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    syncfs(fd)
                finally:
                    os.close(fd)
                if not self.cached:  # durable, so clean: the pages can go
                    for tmp, _ in batch.values():
                        if tmp is not None:
                            drop_cached(tmp)
                    if pack is not None:
                        drop_cached(pack.tmp)
                for digest, (tmp, _) in batch.items():
                    if tmp is not None:
                        os.rename(tmp, self.pool.chunk_path(digest))
                idx_tmp = None
                if pack is not None:
                    os.rename(pack.tmp, self.pool.packs.pack_path(pack.pack_id))
                    idx_tmp = self.pool.tmp_dir / f"{pack.pack_id}.idx"
                    with open(idx_tmp, "wb") as fh:
                        fh.write(encode_index(pack.entries))
                # one more sync makes the renames (and the pack's index) durable (cheaper
                # than an fsync per fan-out directory)
                fd = os.open(self.pool.tmp_dir, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    syncfs(fd)
                finally:
                    os.close(fd)
                if pack is not None and idx_tmp is not None:
                    # the commit point of the pack's chunks
                    os.rename(idx_tmp, self.pool.packs.idx_path(pack.pack_id))
                    fsync_dir(self.pool.packs_dir)
                    self.pool.packs.add(pack.pack_id, pack.entries)
                    self.pool.packs.note(b"+", pack.pack_id)
            except OSError as exc:
                raise _translate_oserror(exc, self.pool.root) from exc
            self._flushed(batch)

    def _flushed(self, batch: Mapping[bytes, tuple[Any, int]]) -> None:
        """``batch`` is durable and visible: no longer pending, held from now on."""
        with self._lock:
            for digest in batch:
                self._pending.pop(digest, None)
            self._held.update(batch)
            self._pending_bytes -= sum(size for _, size in batch.values())

    def discard(self) -> None:
        with self._lock:
            for tmp, _ in self._pending.values():
                if tmp is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            if self._pack is not None:
                self._pack.discard()
                self._pack = None
            self._pending.clear()
            self._pending_bytes = 0

    def commit_manifest(self, blob: bytes) -> bytes:
        """Flush every chunk, then store the manifest object durably; returns its id."""
        self.flush()
        digest = hash_bytes(blob)
        final = self.pool.manifest_path(digest)
        tmp = self.pool.tmp_dir / f"m-{digest.hex()}.{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(encode_chunk(blob, []))
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, final)
            fsync_dir(final.parent)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise _translate_oserror(exc, self.pool.root) from exc
        chunks = volume_chunks(blob)
        if chunks is not None:
            try:
                bases = self.bases_layouts().bases
                self.pool.image_layouts.save(digest, chunks, self._known_layout, bases)
            except Exception as exc:  # hints only: the image is committed either way
                log.warning("layouts of image %s not kept: %s", digest.hex(), exc)
        return digest
