"""Pack files: many small chunks in one file, found through per-pack index files.

One file per chunk costs a file creation per chunk (0.15-0.45 ms here, measured by
appending to one file vs creating, syncing and renaming one file per chunk: 35x the cost of
an append at 2 KiB, 5x at 64 KiB, 1.7x at 256 KiB and above). Chunk files whose encoded size
is under ``PACK_BELOW`` (256 KiB: small files of a tree, deltas of a few blocks) are therefore
appended to pack files; larger ones stay one file each (``chunks/``), where a file's
creation is a small part of its cost and GC frees its space without copying.

The design follows restic (immutable pack files, index files written only after the pack
they describe), borg 2 (each record in a pack names its chunk id, so a pack can be read
without its index) and kopia/borg compaction (a pack is rewritten when too much of it is
dead). It maps directly onto an object store: a pack and its index are two immutable
objects, the index written last.

Invariants
- A pack is written by one writer only (``PoolWriter``; no lock is shared between writers,
  which may be in different processes), in ``tmp/``, and never modified once sealed.
- Sealing (``PoolWriter.flush``): the pack's bytes are synced, the pack renamed into
  ``packs/``, its index file written and synced in ``tmp/``, then renamed into ``packs/``
  and the directory synced. The index file is the commit point: a chunk is visible (``has``)
  only once its pack *and* its index entry are durable. A pack without an index (a crash
  between the two renames, a torn pack) holds nothing visible; a pool opened with no active
  writer removes such packs older than a few seconds and logs each (a torn tail can exist
  only in such a pack, since nothing is appended to a sealed pack).
- Every read is verified by the chunk's id, exactly like a loose chunk file (the record is
  the same chunk-file bytes); the record's header must also name the id the index gave. An
  index file carries a digest of its entries; a bad one is reported and its pack ignored.
- The same chunk may be in several packs (two writers racing, a rewrite killed half way):
  each is a complete, verified copy. Lookups use the newest pack (pack ids sort by time).
- GC: a pack's mtime is its chunks' "touched" time. A writer that reuses a packed chunk
  touches its pack; a pack written or touched since the collection's cut-off is left whole.
  An older pack is deleted when no marked chunk is in it, rewritten (its marked chunks copied
  into a new pack by a registered writer, made durable, then the old one removed) when the
  live fraction of its bytes is under ``REWRITE_BELOW``. Removal renames the pack to
  ``.gc`` first and re-stats it, as for loose chunks: a touch before the rename keeps the
  pack, a touch after it fails, and the writer stores the chunk again.
- Memory: the index of packed chunks is held in memory per process (about 220 bytes a
  packed chunk) and refreshed from ``packs/`` when a lookup misses and the directory changed.

On-disk format::

    DIR/packs/<id>.pack     b"TPK1" | records: b"TPR1" | chunk id 32 | length u32 | chunk file
    DIR/packs/<id>.idx      b"TPX1" | count u32 | count * (chunk id 32 | offset u64 | length u32)
                            | BLAKE3 digest (32) of everything before it
    <id>                    32 hex digits: nanosecond time (16) and random (16)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tandem.errors import ChunkCorrupt
from tandem.storage.digest import DIGEST_SIZE, hash_bytes

log = logging.getLogger(__name__)

PACK_MAGIC = b"TPK1"
REC = struct.Struct("<4s32sI")
REC_MAGIC = b"TPR1"
IDX_MAGIC = b"TPX1"
IDX_HEAD = struct.Struct("<4sI")
IDX_ENTRY = struct.Struct("<32sQI")
PACK_BELOW = 256 * 1024  # encoded chunks smaller than this are packed (see the docstring)
PACK_TARGET = 32 * 1024 * 1024  # a writer seals its pack once it is this large
WRITE_BYTES = 1024 * 1024  # records gathered before one write to the open pack
REWRITE_BELOW = 0.5  # GC rewrites a pack whose live bytes fall under this fraction
ORPHAN_SLACK = 2.0  # seconds, as the pool's TMP_SLACK
JOURNAL = "journal"  # packs/journal: "+<id>\n" per sealed pack, "-<id>\n" per removed one
JOURNAL_LINE = 34
COMPACT_SLACK = 1 << 20  # bytes of journal past two lines a pack before ``compact`` rewrites it


def new_pack_id() -> str:
    return f"{time.time_ns():016x}{uuid.uuid4().hex[:16]}"


def is_pack_id(name: str) -> bool:
    return len(name) == 32 and all(c in "0123456789abcdef" for c in name)


def encode_index(entries: list[tuple[bytes, int, int]]) -> bytes:
    body = b"".join(
        [IDX_HEAD.pack(IDX_MAGIC, len(entries)), *(IDX_ENTRY.pack(*e) for e in entries)]
    )
    return body + hash_bytes(body)


def parse_index(blob: bytes, where: str) -> list[tuple[bytes, int, int]]:
    """The entries of an index file, checked against its trailing digest."""

    def bad(reason: str) -> ChunkCorrupt:
        return ChunkCorrupt(digest="-", pool=where, reason=f"pack index: {reason}")

    if len(blob) < IDX_HEAD.size + DIGEST_SIZE:
        raise bad("truncated")
    magic, count = IDX_HEAD.unpack_from(blob)
    if magic != IDX_MAGIC:
        raise bad("bad magic")
    end = IDX_HEAD.size + count * IDX_ENTRY.size
    if len(blob) != end + DIGEST_SIZE:
        raise bad("length")
    if hash_bytes(blob[:end]) != blob[end:]:
        raise bad("digest mismatch")
    return list(IDX_ENTRY.iter_unpack(blob[IDX_HEAD.size : end]))


def read_record(path: str, digest: bytes, offset: int, length: int, where: str) -> bytes:
    """The chunk-file bytes of ``digest`` at ``offset`` of a pack; raises FileNotFoundError
    when the pack is gone, ChunkCorrupt when the record does not name ``digest``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _pread_record(fd, digest, offset, length, length, where)
    finally:
        os.close(fd)


HEAD_BYTES = 4096  # enough for any chunk header: 64 sub-block digests and a delta's head


def read_record_head(fd: int, digest: bytes, offset: int, length: int, where: str) -> bytes:
    """The first bytes (up to ``HEAD_BYTES``: the chunk header) of the record of ``digest``
    at ``offset`` of the pack open at ``fd``; ChunkCorrupt when the record does not name it."""
    return _pread_record(fd, digest, offset, length, min(length, HEAD_BYTES), where)


def _pread_record(fd: int, digest: bytes, offset: int, length: int, want: int, where: str) -> bytes:
    """``want`` bytes of the record of ``digest`` (``length`` bytes long) at ``offset``,
    its record header checked."""
    blob = os.pread(fd, REC.size + want, offset)
    if len(blob) != REC.size + want:
        raise ChunkCorrupt(digest=digest.hex(), pool=where, reason="truncated pack record")
    magic, rec_digest, rec_len = REC.unpack_from(blob)
    if magic != REC_MAGIC or rec_digest != digest or rec_len != length:
        raise ChunkCorrupt(digest=digest.hex(), pool=where, reason="pack record header")
    return blob[REC.size :]


def scan_pack(path: str) -> Iterator[tuple[bytes, int, int]]:
    """(chunk id, offset, length) of each whole record of a pack, without its index; stops
    at the first torn or unreadable record."""
    with open(path, "rb") as fh:
        if fh.read(len(PACK_MAGIC)) != PACK_MAGIC:
            return
        offset = len(PACK_MAGIC)
        size = os.fstat(fh.fileno()).st_size
        while offset + REC.size <= size:
            magic, digest, length = REC.unpack(fh.read(REC.size))
            if magic != REC_MAGIC or offset + REC.size + length > size:
                return
            yield digest, offset, length
            fh.seek(length, os.SEEK_CUR)
            offset += REC.size + length


@dataclass
class OpenPack:
    """A pack a writer is appending to, in ``tmp/`` until it is sealed. Records are
    gathered in memory and written ``WRITE_BYTES`` at a time (one ``write`` per record cost
    a syscall per small chunk); ``close`` writes the rest, before the seal syncs the file."""

    pack_id: str
    tmp: Path
    fd: int
    size: int = 0  # bytes appended, written or still in ``buf``
    entries: list[tuple[bytes, int, int]] = field(default_factory=list)
    buf: bytearray = field(default_factory=bytearray)

    @classmethod
    def create(cls, tmp_dir: Path) -> OpenPack:
        pack_id = new_pack_id()
        tmp = tmp_dir / f"{pack_id}.pack"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        pack = cls(pack_id, tmp, fd)
        pack._write(PACK_MAGIC)
        return pack

    def _write(self, data: bytes | memoryview) -> None:
        self.buf += data
        self.size += len(data)
        if len(self.buf) >= WRITE_BYTES:
            self._drain()

    def _drain(self) -> None:
        view = memoryview(self.buf)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        finally:
            view.release()
        self.buf.clear()

    def append(self, digest: bytes, blob: bytes) -> None:
        offset = self.size
        self._write(REC.pack(REC_MAGIC, digest, len(blob)))
        self._write(blob)
        self.entries.append((digest, offset, len(blob)))

    def close(self) -> None:
        """Write what is gathered and close the file (raises OSError, e.g. ENOSPC)."""
        if self.fd >= 0:
            try:
                self._drain()
            finally:
                os.close(self.fd)
                self.fd = -1

    def discard(self) -> None:
        self.buf.clear()
        with contextlib.suppress(OSError):
            self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class PackIndex:
    """The in-memory map chunk id -> (pack id, offset, length) of one pool's ``packs/``,
    shared by every ``ChunkPool`` of that directory in this process (``shared``).

    It follows ``packs/`` through the journal (``JOURNAL``): each writer appends
    ``+<pack id>`` once the pack's index is durable, and a collection ``-<pack id>`` once it
    removed one, so a refresh reads only what was appended since the last one, whatever the
    number of packs (listing ``packs/`` on every refresh made each capture cost O(packs):
    20 ms at 10,000 packs). The journal is a hint, never the truth: a line lost to a crash
    only hides a pack from the *other* processes' incremental view,
    where a missed chunk is stored again (harmless) and a read that misses lists
    ``packs/`` (``refresh(force=True)``) before it reports a chunk missing. A pool without
    a journal yet (made by an earlier version) is listed whenever ``packs/`` changed."""

    def __init__(self, packs_dir: Path) -> None:
        self.dir = packs_dir
        self.where = str(packs_dir.parent)
        self.map: dict[bytes, tuple[str, int, int]] = {}
        self.by_pack: dict[str, list[bytes]] = {}
        self._lock = threading.Lock()
        self._seen = -1  # packs/'s mtime at the last listing (pools without a journal)
        self._journal: tuple[int, int] | None = None  # (inode, bytes read) of the journal
        self._dups: dict[bytes, set[str]] = {}  # chunk -> the packs holding it, if several
        self._listed = False

    def pack_path(self, pack_id: str) -> str:
        return f"{self.dir}/{pack_id}.pack"

    def idx_path(self, pack_id: str) -> str:
        return f"{self.dir}/{pack_id}.idx"

    def journal_path(self) -> str:
        return f"{self.dir}/{JOURNAL}"

    def lookup(self, digest: bytes) -> tuple[str, int, int] | None:
        return self.map.get(digest)

    def refresh(self, force: bool = False) -> None:
        """Catch up with ``packs/``: new packs loaded, removed ones forgotten. Cheap when
        nothing changed (one ``stat``); ``force`` lists the directory."""
        with self._lock:
            if force or not self._listed:
                self._list()
                return
            try:
                st = os.stat(self.journal_path())
            except FileNotFoundError:
                self._list_if_changed()
                return
            ino, done = self._journal or (st.st_ino, 0)
            if st.st_ino != ino:
                self._list()  # compacted: read it again from a fresh listing
            elif st.st_size > done:
                self._follow(ino, done)

    def _list_if_changed(self) -> None:
        try:
            mtime = os.stat(self.dir).st_mtime_ns
        except FileNotFoundError:
            return
        if mtime != self._seen:
            self._list()

    def _list(self) -> None:
        """Load every index file of ``packs/`` not loaded yet, forget the ones gone. The
        journal's position is taken first: a line appended meanwhile is read again by the
        next refresh, which costs nothing for a pack loaded already."""
        try:
            st = os.stat(self.journal_path())
            position: tuple[int, int] | None = (st.st_ino, st.st_size)
        except FileNotFoundError:
            position = None
        try:
            mtime = os.stat(self.dir).st_mtime_ns
            names = {n[:-4] for n in os.listdir(self.dir) if n.endswith(".idx")} - {""}
        except FileNotFoundError:
            return
        for gone in set(self.by_pack) - names:
            self._drop(gone)
        for pack_id in sorted(names - set(self.by_pack)):
            self._load_pack(pack_id)
        self._seen = mtime
        self._journal = position
        self._listed = True

    def _follow(self, ino: int, done: int) -> None:
        """Apply the journal's lines from byte ``done`` on (whole lines only: a line being
        appended is read next time)."""
        try:
            fd = os.open(self.journal_path(), os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            if os.fstat(fd).st_ino != ino:
                self._list()
                return
            os.lseek(fd, done, os.SEEK_SET)
            with os.fdopen(os.dup(fd), "rb") as fh:
                tail = fh.read()
        finally:
            os.close(fd)
        whole = tail.rfind(b"\n") + 1
        for line in tail[:whole].split(b"\n"):
            # a line torn by a crash runs into the next one: that one is its last 33 bytes
            line = line[-JOURNAL_LINE + 1 :]
            sign, pack_id = line[:1], line[1:].decode("ascii", "replace")
            if not is_pack_id(pack_id):
                continue  # torn by a crash: the pack, if any, is found by a listing
            if sign == b"+" and pack_id not in self.by_pack:
                self._load_pack(pack_id)
            elif sign == b"-":
                self._drop(pack_id)
        self._journal = (ino, done + whole)

    def _load_pack(self, pack_id: str) -> None:
        try:
            with open(self.idx_path(pack_id), "rb") as fh:
                entries = parse_index(fh.read(), self.where)
        except FileNotFoundError:
            return  # removed since
        except ChunkCorrupt as exc:
            log.error("pack %s in %s ignored: %s", pack_id, self.where, exc.message)
            return
        self._add(pack_id, entries)

    def note(self, sign: bytes, pack_id: str) -> None:
        """Append ``+pack_id`` (sealed: its index is durable) or ``-pack_id`` (removed) to
        the journal. Not synced: after a crash every process lists ``packs/`` at start."""
        line = sign + pack_id.encode("ascii") + b"\n"
        path = self.journal_path()
        while True:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)  # not while ``compact`` replaces it
                try:
                    current = os.stat(path).st_ino
                except FileNotFoundError:
                    continue
                if os.fstat(fd).st_ino != current:
                    continue  # replaced by a compaction meanwhile: append to the new one
                os.write(fd, line)
                return
            finally:
                os.close(fd)

    def compact(self) -> bool:
        """Rewrite the journal as one ``+`` line per pack when it has grown well past that
        (a collection calls it); appenders wait on its lock, then append to the new one."""
        path = self.journal_path()
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return False
        names = sorted(n[:-4] for n in os.listdir(self.dir) if n.endswith(".idx"))
        if size <= 2 * JOURNAL_LINE * len(names) + COMPACT_SLACK:
            return False
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            listed = os.listdir(self.dir)
            for name in listed:  # left by a compaction that was killed
                if name.startswith(f"{JOURNAL}.") and name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{self.dir}/{name}")
            names = sorted(n[:-4] for n in listed if n.endswith(".idx") and is_pack_id(n[:-4]))
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(b"".join(b"+" + n.encode("ascii") + b"\n" for n in names))
            os.rename(tmp, path)
        finally:
            os.close(fd)
        return True

    def add(self, pack_id: str, entries: list[tuple[bytes, int, int]]) -> None:
        with self._lock:
            self._add(pack_id, entries)

    def _add(self, pack_id: str, entries: list[tuple[bytes, int, int]]) -> None:
        self.by_pack[pack_id] = [d for d, _, _ in entries]
        for digest, offset, length in entries:
            held = self.map.get(digest)
            if held is not None and held[0] != pack_id:
                self._dups.setdefault(digest, {held[0]}).add(pack_id)
            if held is None or held[0] < pack_id:
                self.map[digest] = (pack_id, offset, length)

    def drop(self, pack_id: str) -> None:
        with self._lock:
            self._drop(pack_id)

    def _drop(self, pack_id: str) -> None:
        again: set[str] = set()  # packs holding another copy of a chunk the map loses
        for digest in self.by_pack.pop(pack_id, []):
            others = self._dups.get(digest)
            if others is not None:
                others.discard(pack_id)
                if len(others) < 2:
                    del self._dups[digest]
            held = self.map.get(digest)
            if held is not None and held[0] == pack_id:
                del self.map[digest]
                if others:
                    again.add(max(others))
        for other in sorted(again):
            if other in self.by_pack:
                self._load_pack(other)  # its entries map the chunks again

    def packs(self) -> list[str]:
        with self._lock:
            return sorted(self.by_pack)

    def entries(self, pack_id: str) -> list[tuple[bytes, int, int]]:
        """The entries of one pack, read from its index file."""
        with open(self.idx_path(pack_id), "rb") as fh:
            return parse_index(fh.read(), self.where)


_shared: dict[str, PackIndex] = {}
_shared_lock = threading.Lock()


def shared(packs_dir: Path) -> PackIndex:
    key = os.path.realpath(packs_dir)
    with _shared_lock:
        index = _shared.get(key)
        if index is None:
            index = _shared[key] = PackIndex(packs_dir)
        return index


def remove_orphans(packs_dir: Path, where: str) -> int:
    """Remove packs that have no index file (never visible: see the invariants), older
    than ``ORPHAN_SLACK``. Call only when no writer is active."""
    looked = time.time() - ORPHAN_SLACK
    removed = 0
    try:
        entries = list(os.scandir(packs_dir))
    except FileNotFoundError:
        return 0
    names = {e.name for e in entries}
    for e in entries:
        # ``.pack.gc``: a collection removed the index and was killed before the bytes
        pack_id = e.name.split(".")[0]
        if e.name.endswith((".pack", ".pack.gc")) and f"{pack_id}.idx" not in names:
            with contextlib.suppress(FileNotFoundError):
                if e.stat().st_mtime < looked:
                    log.warning(
                        "removing pack %s of %s: it has no index (a writer died)", e.name, where
                    )
                    os.unlink(e.path)
                    removed += 1
    return removed
