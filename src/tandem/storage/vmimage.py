"""VM images: every disk of a libvirt domain, cut at one instant, in one volume manifest.

Format (version 1)
    A VM image is a volume manifest (``storage.manifest``, kind ``volume``) whose bytes are
    the domain's disks laid end to end, in the order of the domain XML, each starting at a
    multiple of ``VOLUME_CHUNK`` (4 MiB), so no chunk spans two disks; the gap after a disk
    reads as zeros and is never stored. Its ``meta["vm"]`` is::

        {"format": 1,
         "domain": NAME, "uuid": UUID,
         "xml": the domain's inactive XML at the capture,
         "checkpoint": the libvirt checkpoint taken with this capture, or None,
         "disks": [{"target": "vda", "offset": O, "size": N, "format": "qcow2" | "raw",
                    "source": the disk's path on the production host}, ...]}

    Disk ``vda`` is bytes [O, O + N) of the image. At DR a disk is attached as the image's
    NBD export with libvirt's ``<slices><slice type='storage' offset=O size=N/></slices>``
    (qemu's raw driver with offset and size), so a new VM boots from the appliance's
    virtual copy without a byte being copied.

Why one manifest, not one per disk: replication, GC, retention, virtual copies, overlays,
NBD presentation and syncback already work on a volume manifest and need nothing new. The
per-disk alignment keeps chunking per disk: a disk's chunks are what a volume capture of it
would make, so they deduplicate across images (and a disk that grows, which moves the disks
after it, still deduplicates by content; only the reading of changed extents needs the
same layout, else the capture reads everything).

Capture (``capture_disks``): each disk is read through a ``DiskReader`` (the agent's NBD
connection to libvirt's pull-mode backup export). With a base image of the same layout and
a disk's changed extents (the dirty bitmap of the checkpoint the base was taken with), only
the changed 64 KiB blocks of that disk are read; the chunks they touch get their new ids
from the base chunk's block digests and are stored as deltas over it; the other chunks keep
their ids. Without (first capture, lost checkpoint, raw disk), the disk's allocated extents
are read in full and compared with the base by digest.

Restore (``restore_disks``): each disk of the image is written onto the domain's disk
through a ``DiskTarget`` (the agent's NBD connection to ``qemu-nbd`` serving the powered-off
disk in its own format). A chunk is read from the disk and hashed; when it differs from the
image's, only the 64 KiB blocks whose digests differ are fetched and written, each block
verified against the chunk's digest before a byte is written; a chunk that is all zeros in
the image has its non-zero blocks zeroed. The disk keeps its file, format and identity.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from tandem.errors import StorageError, VmDiskMissing, VmDiskSizeDiffers
from tandem.storage.digest import SUB_BLOCK, hash_object
from tandem.storage.manifest import VOLUME_CHUNK, VolumeManifest, store_manifest
from tandem.storage.overlay import capture_blocks, store_chunk
from tandem.storage.pool import PutResult, WritablePool
from tandem.storage.volume import (
    CaptureStats,
    ChunkSource,
    Progress,
    RestoreStats,
    _check_block,
    _check_fit,
    is_zero,
    zero_digest,
)

FORMAT = 1


class DiskReader(Protocol):
    """A disk at the instant of the cut: ``read`` is thread-safe."""

    def read(self, offset: int, length: int) -> bytes: ...


@dataclass(frozen=True)
class Slot:
    """Where disk ``target`` lies in a VM image."""

    target: str
    offset: int
    size: int
    format: str = "qcow2"
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "offset": self.offset,
            "size": self.size,
            "format": self.format,
            "source": self.source,
        }


def layout(disks: list[tuple[str, int, str, str]]) -> list[Slot]:
    """Slots for ``(target, size, format, source)`` disks, each at a 4 MiB boundary."""
    slots, pos = [], 0
    for target, size, fmt, source in disks:
        slots.append(Slot(target, pos, size, fmt, source))
        pos += -(-size // VOLUME_CHUNK) * VOLUME_CHUNK
    return slots


def image_size(slots: list[Slot]) -> int:
    return slots[-1].offset + slots[-1].size if slots else 0


def slots_of(manifest: VolumeManifest) -> list[Slot] | None:
    """The disk layout a VM image records; None for an image that is not a VM's."""
    vm = manifest.meta.get("vm") if isinstance(manifest.meta, dict) else None
    if not isinstance(vm, dict) or not isinstance(vm.get("disks"), list):
        return None
    try:
        return [
            Slot(
                str(d["target"]),
                int(d["offset"]),
                int(d["size"]),
                str(d.get("format", "")),
                str(d.get("source", "")),
            )
            for d in vm["disks"]
        ]
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class DiskSource:
    """One disk to capture: where it goes, how to read it, what may have changed.

    ``allocated``: (offset, length) ranges of the disk that hold data (the rest reads as
    zeros). ``dirty``: ranges changed since the base image's checkpoint, or None when
    unknown (then every allocated range is read)."""

    slot: Slot
    reader: DiskReader
    allocated: list[tuple[int, int]]
    dirty: list[tuple[int, int]] | None = None


def _blocks_of(ranges: list[tuple[int, int]], start: int, length: int) -> list[int]:
    """Indices of the 64 KiB blocks of [start, start+length) that ``ranges`` touch."""
    out: set[int] = set()
    end = start + length
    for off, n in ranges:
        lo, hi = max(off, start), min(off + n, end)
        if lo < hi:
            out.update(range((lo - start) // SUB_BLOCK, (hi - 1 - start) // SUB_BLOCK + 1))
    return sorted(out)


def _padded(disk: DiskSource) -> Callable[[int, int], bytes]:
    """``disk``'s reader, reading zeros past its end (the gap to the next chunk boundary)."""

    def read(offset: int, length: int) -> bytes:
        inside = max(0, min(length, disk.slot.size - offset))
        data = disk.reader.read(offset, inside) if inside else b""
        return data + bytes(length - len(data)) if len(data) == inside else data

    return read


def capture_disks(
    pool: WritablePool,
    disks: list[DiskSource],
    *,
    base: VolumeManifest | None = None,
    base_id: bytes | None = None,
    meta: dict[str, Any] | None = None,
    workers: int = 4,
    progress: Progress | None = None,
) -> tuple[bytes, VolumeManifest, CaptureStats]:
    """Capture ``disks`` into one VM image (module docstring); returns (id, manifest,
    stats). ``stats.bytes_read`` counts the bytes read from the disks."""
    t0 = time.monotonic()
    slots = [d.slot for d in disks]
    size = image_size(slots)
    n = -(-size // VOLUME_CHUNK)
    same_layout = base is not None and slots_of(base) == slots and base.size == size
    chunks: list[bytes | None] = [None] * n
    stats = CaptureStats(bytes_total=size, chunks=n)
    work: list[tuple[int, DiskSource, int, int, list[int] | None]] = []
    for disk in disks:
        first = disk.slot.offset // VOLUME_CHUNK
        for k in range(-(-disk.slot.size // VOLUME_CHUNK)):
            i = first + k
            off = k * VOLUME_CHUNK  # within the disk
            # The image's chunk: a disk's short tail is padded with the zero gap after it.
            length = min(VOLUME_CHUNK, size - i * VOLUME_CHUNK)
            if not _blocks_of(disk.allocated, off, min(length, disk.slot.size - off)):
                continue  # all zeros
            if same_layout and disk.dirty is not None and base is not None:
                changed = _blocks_of(disk.dirty, off, length)
                if not changed:
                    chunks[i] = base.chunks[i]
                    continue
                work.append((i, disk, off, length, changed))
            else:
                work.append((i, disk, off, length, None))
    total = sum(length for _, _, _, length, _ in work)
    with pool.writer([base_id] if base_id else []) as writer:

        def capture(
            item: tuple[int, DiskSource, int, int, list[int] | None],
        ) -> tuple[int, bytes | None, int, PutResult | None]:
            i, disk, off, length, changed = item
            read_at = _padded(disk)
            base_chunk = base.chunks[i] if base is not None and i < len(base.chunks) else None
            if changed is not None and base_chunk is not None:
                quick = capture_blocks(writer, read_at, off, length, base_chunk, changed)
                if quick is not None:
                    read = sum(min(SUB_BLOCK, length - j * SUB_BLOCK) for j in changed)
                    return i, quick[0], read, quick[1]
            if changed is not None and base_chunk is None:
                # All zeros in the base: the changed blocks over zeros are the chunk.
                buf = bytearray(length)
                for j in changed:
                    start, n = j * SUB_BLOCK, min(SUB_BLOCK, length - j * SUB_BLOCK)
                    buf[start : start + n] = read_at(off + start, n)
                data = bytes(buf)
                read = sum(min(SUB_BLOCK, length - j * SUB_BLOCK) for j in changed)
            else:
                data = read_at(off, length)
                read = min(length, disk.slot.size - off)
            if len(data) != length:
                raise StorageError(detail=f"disk {disk.slot.target} gave a short read at {off}")
            digest, subs = hash_object(data)
            if digest == zero_digest(length):
                return i, None, read, None
            if digest == base_chunk:
                return i, digest, read, None
            every = list(range(len(subs)))
            return i, digest, read, store_chunk(writer, data, digest, subs, base_chunk, every)

        done = 0
        with ThreadPoolExecutor(workers) as ex:
            for i, digest, read, result in ex.map(capture, work):
                chunks[i] = digest
                stats.bytes_read += read
                if result is not None and result.new:
                    stats.chunks_new += 1
                    stats.bytes_new += min(VOLUME_CHUNK, size - i * VOLUME_CHUNK)
                    stats.bytes_stored += result.stored
                done += min(VOLUME_CHUNK, size - i * VOLUME_CHUNK)
                if progress:
                    progress(done, total)
        stats.chunks_zero = sum(1 for c in chunks if c is None)
        manifest = VolumeManifest(size=size, chunks=chunks, meta=meta or {})
        mid = store_manifest(writer, manifest)
    stats.seconds = time.monotonic() - t0
    return mid, manifest, stats


class DiskTarget(Protocol):
    """A disk being restored: thread-safe reads and writes at disk offsets."""

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...


def check_targets(
    manifest: VolumeManifest, sizes: dict[str, int], where: str = "the domain"
) -> list[Slot]:
    """The image's disks, refusing unless the domain has each at the same size
    (``sizes``: target -> bytes); nothing is touched."""
    slots = slots_of(manifest)
    if not slots:
        raise StorageError(detail="the image holds no VM disks (no disk layout in its meta)")
    for slot in slots:
        have = sizes.get(slot.target)
        if have is None:
            raise VmDiskMissing(
                where=where,
                what="disk",
                disk=slot.target,
                has=", ".join(sorted(sizes)) or "no disks",
            )
        if have != slot.size:
            raise VmDiskSizeDiffers(disk=slot.target, where=where, have=have, want=slot.size)
    return slots


def restore_disks(
    source: ChunkSource,
    manifest: VolumeManifest,
    targets: dict[str, DiskTarget],
    *,
    workers: int = 4,
    progress: Progress | None = None,
) -> RestoreStats:
    """Make each disk in ``targets`` equal to its slot of the image (module docstring),
    writing only the 64 KiB blocks that differ."""
    t0 = time.monotonic()
    slots = [s for s in slots_of(manifest) or [] if s.target in targets]
    total = sum(s.size for s in slots)
    stats = RestoreStats(bytes_total=total)
    work: list[tuple[Slot, int]] = [
        (slot, k) for slot in slots for k in range(-(-slot.size // VOLUME_CHUNK))
    ]

    def restore(item: tuple[Slot, int]) -> tuple[int, int, int, int]:
        """Restore one chunk; returns (disk bytes, compared, fetched, written)."""
        slot, k = item
        disk = targets[slot.target]
        i = slot.offset // VOLUME_CHUNK + k
        off = k * VOLUME_CHUNK
        length = min(VOLUME_CHUNK, manifest.size - i * VOLUME_CHUNK)
        inside = min(length, slot.size - off)
        current = disk.read(off, inside)
        digest = manifest.chunks[i] if i < len(manifest.chunks) else None
        written = 0
        if digest is None:
            view = memoryview(current)
            for j in range(0, inside, SUB_BLOCK):
                part = view[j : j + SUB_BLOCK]
                if not is_zero(part):
                    disk.write_zeroes(off + j, len(part))
                    written += len(part)
            return inside, inside, 0, written
        padded = current + bytes(length - inside)
        now, have = hash_object(padded)
        if now == digest:
            return inside, inside, 0, 0
        want = source.sub_digests(digest)
        _check_fit(source, digest, want, length)
        differ = [j for j, (a, b) in enumerate(zip(want, have, strict=True)) if a != b]
        fetched = 0
        for j, block in zip(differ, source.read_blocks(digest, differ), strict=True):
            _check_block(source, digest, j, block, length)
            fetched += len(block)
            start = j * SUB_BLOCK
            kept = bytes(block[: max(0, inside - start)])  # the padding past the disk stays out
            if kept:
                disk.write(off + start, kept)
                written += len(kept)
        return inside, inside, fetched, written

    done = 0
    with ThreadPoolExecutor(workers) as ex:
        for n, compared, fetched, written in ex.map(restore, work):
            done += n
            stats.bytes_compared += compared
            stats.bytes_fetched += fetched
            stats.bytes_written += written
            if progress:
                progress(done, total)
    stats.seconds = time.monotonic() - t0
    return stats
