"""PostgreSQL WAL, as tandem reasons about it: segment names, LSNs, and the recoverable
window (pure; no I/O).

A segment file is named ``TTTTTTTTXXXXXXXXYYYYYYYY``: timeline, then the segment number as
``XXXXXXXX * 2**32 / SEGMENT + YYYYYYYY``. With 16 MiB segments a segment starts at LSN
``number * SEGMENT``. An LSN is written ``HI/LO`` in hex.

The window of an app at a site runs from the stop point of its oldest base image (a copy
is consistent only once replayed that far) to the newest moment its WAL was seen without a
gap from that base's first segment. A missing segment, or one not complete before the next,
is a gap: no point past it can be reached.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

SEGMENT = 16 * 1024 * 1024
PER_XLOGID = 0x100000000 // SEGMENT
NAME_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")


def parse_name(name: str) -> tuple[int, int]:
    """(timeline, start LSN) of a segment file name; ValueError for anything else."""
    m = NAME_RE.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a WAL segment name")
    timeline, hi, lo = (int(g, 16) for g in m.groups())
    if lo >= PER_XLOGID:
        raise ValueError(f"{name!r} is not a WAL segment name for 16 MiB segments")
    return timeline, (hi * PER_XLOGID + lo) * SEGMENT


def segment_name(timeline: int, lsn: int) -> str:
    number = lsn // SEGMENT
    return f"{timeline:08X}{number // PER_XLOGID:08X}{number % PER_XLOGID:08X}"


def parse_lsn(text: str) -> int:
    hi, _, lo = text.partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass(frozen=True)
class Held:
    """What a site holds of one segment."""

    name: str
    timeline: int
    start_lsn: int
    size: int
    complete: bool
    seen: datetime


@dataclass(frozen=True)
class Chain:
    """The segments that follow one another from a base's first segment, and where they
    stop: ``end`` is when the last of them was seen; ``gap`` the first missing LSN, if a
    segment that should follow is missing (None: the chain runs to the newest held)."""

    segments: list[Held]
    end: datetime | None
    gap: str | None


def chain_from(held: list[Held], timeline: int, start_lsn: int) -> Chain:
    """The unbroken run of ``held`` on ``timeline`` from the segment holding ``start_lsn``."""
    by_lsn = {h.start_lsn: h for h in held if h.timeline == timeline}
    lsn = start_lsn - start_lsn % SEGMENT
    newest = max((h.start_lsn for h in by_lsn.values()), default=-1)
    out: list[Held] = []
    while lsn in by_lsn:
        seg = by_lsn[lsn]
        out.append(seg)
        if not seg.complete:
            break
        lsn += SEGMENT
    end = out[-1].seen if out else None
    gap = None
    if not out or newest > out[-1].start_lsn:
        gap = format_lsn(lsn)
    return Chain(out, end, gap)
