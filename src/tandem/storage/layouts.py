"""Per-image chunk layouts: a volume image's chunks' block digests, in manifest order.

A delta is named and verified from its base chunk's block digests (``digest.object_id``),
so a syncback's capture at the DR site and its receipt at production each need the layout
of every touched chunk's base. Read from each base chunk's header, that is a random read
per touched chunk (0.1-0.2 ms cold on the development VM's disk): a failback's downtime grew
with the number of chunks the same writes land in. So a pool keeps, beside each volume
image's manifest, its chunks' layouts in manifest order (``layouts/<manifest id>/<n>``, one
file per ``SEGMENT`` chunks, 256 MiB of volume), and a syncback reads its bases' layouts
as a few sequential files.

Everything in them is a hint. A record is used only once checked against the chunk id it
stands for (its digests must name the id), and a missing, short or corrupt file, or a
record the writer did not know, means reading the chunk's header as before. The delta
depth a record carries is how the pool stored the chunk when the file was written (an
image's chunks are kept as they are while it lives); it only bounds delta chains, and
nothing relies on it for correctness.

A segment an image shares with the image it was built on is a hard link to that image's
file, so an unchanged re-capture writes no layout bytes; the files are written without a
sync (a crash loses hints, never data), and garbage collection removes an image's folder
with its manifest.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tandem.storage.digest import DIGEST_SIZE, object_id, split_digests

SEGMENT = 64  # chunks per file: 256 MiB of volume, at most ~130 KiB of layouts
SEGMENTS_KEPT = 256  # segments a writer keeps read (~32 MiB at most)
_MAGIC = b"TLY1"
_HEAD = struct.Struct("<4sH")  # magic, records
_KNOWN = struct.Struct("<BBIB")  # known (1), depth, plain length, block digests
_UNKNOWN = b"\0"

Chunks = Sequence[bytes | None]


@dataclass(frozen=True, slots=True)
class Layout:
    """What a writer needs of a chunk to build or verify a delta on it."""

    plain_len: int
    subs: list[bytes]
    depth: int  # delta chain length in this pool (0: self-contained)


def encode_record(rec: Layout | None) -> bytes:
    if rec is None or len(rec.subs) > 255 or rec.depth > 255:
        return _UNKNOWN
    return b"".join([_KNOWN.pack(1, rec.depth, rec.plain_len, len(rec.subs)), *rec.subs])


def encode_segment(records: Sequence[Layout | None]) -> bytes:
    return _join([encode_record(r) for r in records])


def _join(records: list[bytes]) -> bytes:
    return b"".join([_HEAD.pack(_MAGIC, len(records)), *records])


def segment_records(blob: bytes) -> list[bytes]:
    """The records of a segment file, each as its bytes; ValueError when it is not one
    (torn, foreign)."""
    if len(blob) < _HEAD.size:
        raise ValueError("short segment")
    magic, n = _HEAD.unpack_from(blob)
    if magic != _MAGIC:
        raise ValueError("not a layout segment")
    out: list[bytes] = []
    pos = _HEAD.size
    for _ in range(n):
        if pos >= len(blob):
            raise ValueError("short segment")
        if blob[pos] == 0:
            out.append(_UNKNOWN)
            pos += 1
            continue
        if len(blob) < pos + _KNOWN.size:
            raise ValueError("short segment")
        end = pos + _KNOWN.size + blob[pos + _KNOWN.size - 1] * DIGEST_SIZE
        if len(blob) < end:
            raise ValueError("short segment")
        out.append(blob[pos:end])
        pos = end
    return out


def decode_record(rec: bytes) -> Layout | None:
    if rec == _UNKNOWN:
        return None
    _, depth, plain_len, _ = _KNOWN.unpack_from(rec)
    return Layout(plain_len, split_digests(rec[_KNOWN.size :]), depth)


def decode_segment(blob: bytes) -> list[Layout | None]:
    """The records of a segment file; ValueError when it is not one (torn, foreign)."""
    return [decode_record(r) for r in segment_records(blob)]


def checked(layout: Layout | None, digest: bytes) -> Layout | None:
    """``layout`` if its block digests name ``digest``, else None."""
    if layout is None or object_id(layout.subs, layout.plain_len) != digest:
        return None
    return layout


class StoredLayouts:
    """The layout records of the chunks a writer stored, by id, until the layout files of
    the images it commits are written: the latest ``kept`` in memory, older ones appended
    to an unlinked file in ``spill_dir`` (a first capture or a first copy of a large volume
    stores more chunks than memory should hold: 2 KiB a 4 MiB chunk, ~130 MB for 256 GiB),
    at most ``spilled`` of them (each costs ~150 bytes of index). Without ``spill_dir``, or
    once spilling failed, an older record is forgotten: the image's file then says unknown
    for that chunk (a hint missing, read from the chunk's header when needed)."""

    def __init__(self, spill_dir: Path | None, kept: int, spilled: int) -> None:
        self._dir = spill_dir
        self._kept, self._spilled = kept, spilled
        self._recent: OrderedDict[bytes, bytes] = OrderedDict()
        self._index: dict[bytes, int] = {}  # id -> offset << 12 | length (a record < 4 KiB)
        self._fd = -1
        self._end = 0
        self._lock = threading.Lock()

    def put(self, digest: bytes, record: bytes) -> None:
        with self._lock:
            self._recent[digest] = record
            self._recent.move_to_end(digest)
            if len(self._recent) > self._kept:
                self._spill(*self._recent.popitem(last=False))

    def get(self, digest: bytes) -> bytes | None:
        with self._lock:
            record = self._recent.get(digest)
            where = self._index.get(digest) if record is None else None
            if where is None:
                return record
            try:
                record = os.pread(self._fd, where & 0xFFF, where >> 12)
            except OSError:
                return None
        return record if len(record) == where & 0xFFF else None

    def _spill(self, digest: bytes, record: bytes) -> None:
        if self._dir is None or len(self._index) >= self._spilled or len(record) > 0xFFF:
            return
        try:
            if self._fd < 0:
                self._fd = os.open(self._dir, os.O_TMPFILE | os.O_RDWR, 0o600)
            os.pwrite(self._fd, record, self._end)
        except OSError:
            self._dir = None  # hints only: spill no more, forget what does not fit
            return
        self._index[digest] = self._end << 12 | len(record)
        self._end += len(record)

    def close(self) -> None:
        with self._lock:
            self._recent.clear()
            self._index.clear()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class ImageLayouts:
    """The layout files of a local pool's volume images (``DIR/layouts``)."""

    def __init__(self, root: Path, tmp_dir: Path) -> None:
        self.root = root
        self.tmp_dir = tmp_dir

    def folder(self, mid: bytes) -> Path:
        return self.root / mid.hex()

    def segment_path(self, mid: bytes, n: int) -> Path:
        return self.folder(mid) / f"{n:06d}"

    def read_segment(self, mid: bytes, n: int) -> list[bytes]:
        """The records of segment ``n`` of image ``mid`` as bytes, unchecked and not yet
        decoded (a failback touches a few chunks of each); [] when unreadable."""
        try:
            return segment_records(self.segment_path(mid, n).read_bytes())
        except (OSError, ValueError):
            return []

    def read_ahead(self, mid: bytes, n: int) -> None:
        """Start reading segment ``n`` of image ``mid`` into the page cache (advice)."""
        try:
            fd = os.open(self.segment_path(mid, n), os.O_RDONLY)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def save(
        self,
        mid: bytes,
        chunks: Chunks,
        known: Callable[[bytes], Layout | None],
        bases: Sequence[tuple[bytes, Chunks]] = (),
    ) -> None:
        """Write image ``mid``'s layouts: a segment whose chunks are those of a base image
        (its manifest id and chunks) at the same place is a link to that image's file; in
        the others, a chunk a base has at the same place keeps that base's record as it
        is, and the rest come from ``known``. Nothing is written when nothing is known.
        Best effort: a failure leaves hints missing, never a wrong one (records are
        checked on use)."""
        folder = self.folder(mid)
        if folder.exists():
            return  # the same manifest committed again
        tmp = self.tmp_dir / f"layouts-{mid.hex()}.{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
            wrote = False
            for n, start in enumerate(range(0, len(chunks), SEGMENT)):
                ids = list(chunks[start : start + SEGMENT])
                name = tmp / f"{n:06d}"
                same = [(b, list(c[start : start + SEGMENT])) for b, c in reversed(bases)]
                if any(self._link(b, n, name) for b, theirs in same if theirs == ids):
                    wrote = True
                    continue
                records = self._records(n, ids, same, known)
                if any(r != _UNKNOWN for r in records):
                    name.write_bytes(_join(records))
                    wrote = True
            if wrote:
                self.root.mkdir(exist_ok=True)
                os.rename(tmp, folder)
        except OSError:
            pass
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _records(
        self,
        n: int,
        ids: list[bytes | None],
        bases: list[tuple[bytes, list[bytes | None]]],
        known: Callable[[bytes], Layout | None],
    ) -> list[bytes]:
        records: list[bytes | None] = [None] * len(ids)
        for base, theirs in bases:
            same = [
                k
                for k, d in enumerate(ids)
                if records[k] is None and d is not None and k < len(theirs) and theirs[k] == d
            ]
            if not same:
                continue
            try:
                olds = segment_records(self.segment_path(base, n).read_bytes())
            except (OSError, ValueError):
                continue
            for k in same:
                if k < len(olds) and olds[k] != _UNKNOWN:
                    records[k] = olds[k]
        return [
            r if r is not None else _UNKNOWN if d is None else encode_record(known(d))
            for d, r in zip(ids, records, strict=True)
        ]

    def _link(self, base: bytes, n: int, name: Path) -> bool:
        try:
            os.link(self.segment_path(base, n), name)
        except OSError:  # none there, or too many links
            return False
        return True

    def remove(self, mid: bytes) -> None:
        shutil.rmtree(self.folder(mid), ignore_errors=True)

    def folders(self) -> list[bytes]:
        """The manifest ids that have a layouts folder."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            with contextlib.suppress(ValueError):
                if len(name) == DIGEST_SIZE * 2:
                    out.append(bytes.fromhex(name))
        return out


class BaseLayouts:
    """The layouts of the chunks of the images a writer builds on, read a segment at a time
    as chunks are asked for (or ahead, ``prefetch``); each record checked against its id
    before it is given. A chunk several bases name is looked up in the last of them (a
    syncback builds on the failover image and on its previous syncback, which names most
    of the first's chunks too: one file per segment is read, not two)."""

    def __init__(self, store: ImageLayouts | None, bases: Sequence[tuple[bytes, Chunks]]) -> None:
        self._store = store
        self._bases = list(bases)
        self._where: dict[bytes, tuple[int, int]] = {}
        for b in reversed(range(len(self._bases))):
            for i, d in enumerate(self._bases[b][1]):
                if d is not None:
                    self._where.setdefault(d, (b, i))
        self._loaded: OrderedDict[tuple[int, int], list[bytes]] = OrderedDict()
        self._loading: dict[tuple[int, int], threading.Event] = {}
        self._lock = threading.Lock()

    @property
    def bases(self) -> list[tuple[bytes, Chunks]]:
        return self._bases

    def holds(self, digest: bytes) -> bool:
        """Whether a base image names chunk ``digest`` (then present and kept while the
        writer that registered the bases lives)."""
        return digest in self._where

    def get(self, digest: bytes) -> Layout | None:
        where = self._where.get(digest)
        if where is None:
            return None
        b, i = where
        records = self._segment((b, i // SEGMENT))
        at = i % SEGMENT
        return checked(decode_record(records[at]), digest) if at < len(records) else None

    def prefetch(self, digests: Iterable[bytes | None] | None = None) -> None:
        """Read, in a thread of its own and in order, the segments that hold ``digests``
        (every base's, up to SEGMENTS_KEPT, when None): a writer about to ask for them
        then finds them read, the reading done while it works."""
        if self._store is None:
            return
        if digests is None:
            keys = [
                (b, n) for b, (_, c) in enumerate(self._bases) for n in range(-(-len(c) // SEGMENT))
            ]
        else:
            found = (self._where.get(d) for d in digests if d is not None)
            keys = sorted({(w[0], w[1] // SEGMENT) for w in found if w is not None})
        if not keys:
            return
        keys = keys[:SEGMENTS_KEPT]
        threading.Thread(target=self._read_all, args=(keys,), daemon=True).start()

    def _read_all(self, keys: list[tuple[int, int]]) -> None:
        if self._store is not None:  # all asked of the disk at once, then read in order
            for b, n in keys:
                self._store.read_ahead(self._bases[b][0], n)
        for key in keys:
            self._segment(key)

    def _segment(self, key: tuple[int, int]) -> list[bytes]:
        """The records of segment ``key`` (base, number), read once even when several
        threads ask at the same time."""
        while True:
            with self._lock:
                records = self._loaded.get(key)
                if records is not None:
                    return records
                loading = self._loading.get(key)
                if loading is None:
                    self._loading[key] = threading.Event()
            if loading is None:
                break
            loading.wait()
        records = []
        try:
            if self._store is not None:
                records = self._store.read_segment(self._bases[key[0]][0], key[1])
        finally:
            with self._lock:
                self._loaded[key] = records
                if len(self._loaded) > SEGMENTS_KEPT:
                    self._loaded.popitem(last=False)
                self._loading.pop(key).set()
        return records


__all__ = [
    "SEGMENT",
    "BaseLayouts",
    "ImageLayouts",
    "Layout",
    "checked",
    "decode_record",
    "decode_segment",
    "encode_record",
    "encode_segment",
]
