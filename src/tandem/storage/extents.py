"""Where two reflink-related files may differ, from their extent maps (``FIEMAP``).

After a reflink clone (``FICLONE``) or a btrfs snapshot, the two files share every data
extent. The file systems that make them (btrfs, XFS) never overwrite a shared extent in
place: a write goes to new blocks (copy on write). So a range that both files map to the
*same physical bytes* holds the same data in both, and only the other ranges can differ —
which is how btrfs send and XFS-aware backup tools stay incremental without reading
unchanged data.

Guards: extent maps are trusted only when every extent of both files is plainly on disk.
An extent that is delayed (``DELALLOC``: data still in memory, no place yet), of unknown
place, encoded (compressed, encrypted), inline or in a tail, or a map that cannot be read
(``FIEMAP`` unsupported), makes ``changed_ranges`` return None: the caller reads the whole
file. ``sync`` asks the kernel to write the file's dirty pages first
(``FIEMAP_FLAG_SYNC``); on a frozen file system there are none, and it is not asked.
"""

from __future__ import annotations

import fcntl
import itertools
import struct
from dataclasses import dataclass

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
UNTRUSTED = (
    0x2  # UNKNOWN
    | 0x4  # DELALLOC
    | 0x8  # ENCODED
    | 0x80  # DATA_ENCRYPTED
    | 0x100  # NOT_ALIGNED
    | 0x200  # DATA_INLINE
    | 0x400  # DATA_TAIL
)
_HEAD = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3 reserved
BATCH = 512
MAX_EXTENTS = 1 << 20
"""More extents than this in one file: not worth comparing (read it)."""


@dataclass(frozen=True)
class Extent:
    logical: int
    physical: int
    length: int
    unwritten: bool


def file_extents(fd: int, size: int, *, sync: bool = True) -> list[Extent] | None:
    """The data extents of the open file ``fd`` over [0, size), in order; None when they
    cannot be trusted (see the module's guards)."""
    out: list[Extent] = []
    start = 0
    flags = FIEMAP_FLAG_SYNC if sync else 0
    while start < size:
        buf = bytearray(_HEAD.size + BATCH * _EXTENT.size)
        _HEAD.pack_into(buf, 0, start, size - start, flags, 0, BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        except OSError:
            return None
        flags = 0  # synced once is enough
        mapped = _HEAD.unpack_from(buf, 0)[3]
        if mapped == 0:
            break
        last = False
        for i in range(mapped):
            logical, physical, length, _, _, eflags, _, _, _ = _EXTENT.unpack_from(
                buf, _HEAD.size + i * _EXTENT.size
            )
            if eflags & UNTRUSTED:
                return None
            out.append(Extent(logical, physical, length, bool(eflags & FIEMAP_EXTENT_UNWRITTEN)))
            start = logical + length
            last = bool(eflags & FIEMAP_EXTENT_LAST)
        if last or len(out) > MAX_EXTENTS:
            break
    if len(out) > MAX_EXTENTS:
        return None
    return out


def _segments(extents: list[Extent]) -> list[tuple[int, int, Extent]]:
    return [(e.logical, e.logical + e.length, e) for e in extents]


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def changed_ranges(
    new_fd: int, new_size: int, old_fd: int, old_size: int, *, sync: bool = True
) -> list[tuple[int, int]] | None:
    """The byte ranges [start, end) of the file ``new_fd`` (``new_size`` bytes) that may
    differ from the file ``old_fd`` it shares extents with: every range that the two do not
    map to the same physical bytes, and whatever lies past ``old_size``. Sorted and merged;
    None when the extent maps cannot be trusted (read the whole file)."""
    new = file_extents(new_fd, new_size, sync=sync)
    old = file_extents(old_fd, old_size, sync=sync) if new is not None else None
    if new is None or old is None:
        return None
    limit = min(new_size, old_size)
    points = {0, limit}
    for e in new + old:
        for p in (e.logical, e.logical + e.length):
            if 0 < p < limit:
                points.add(p)
    cuts = sorted(points)
    changed: list[tuple[int, int]] = []
    ni = oi = 0
    for start, end in itertools.pairwise(cuts):
        while ni < len(new) and new[ni].logical + new[ni].length <= start:
            ni += 1
        while oi < len(old) and old[oi].logical + old[oi].length <= start:
            oi += 1
        a = new[ni] if ni < len(new) and new[ni].logical <= start else None
        b = old[oi] if oi < len(old) and old[oi].logical <= start else None
        if a is None and b is None:
            continue  # a hole in both: zeros in both
        if (
            a is None
            or b is None
            or a.unwritten != b.unwritten
            or a.physical - a.logical != b.physical - b.logical
        ):
            changed.append((start, end))
    if new_size > old_size:
        changed.append((old_size, new_size))
    return _merge(changed)


__all__ = ["Extent", "changed_ranges", "file_extents"]
