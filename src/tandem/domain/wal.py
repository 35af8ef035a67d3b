"""PostgreSQL WAL, as tandem reasons about it: segment names, LSNs, and the recoverable
window (pure; no I/O).

A segment file is named ``TTTTTTTTXXXXXXXXYYYYYYYY``: timeline, then the segment number as
``XXXXXXXX * 2**32 / SEGMENT + YYYYYYYY``. With 16 MiB segments a segment starts at LSN
``number * SEGMENT``. An LSN is written ``HI/LO`` in hex.

The window of an app at a site runs from the stop point of its oldest base image (a copy
is consistent only once replayed that far) to the newest moment its WAL was seen without a
gap from that base's first segment. A missing segment, or one not complete before the next,
is a gap: no point past it can be reached.

Timelines: a promoted copy (a failover) writes a new timeline, and a history file
``TTTTTTTT.history`` naming, for each ancestor, the LSN where its successor branched off.
A chain from a base on timeline 1 follows the newest timeline descending from it, as
PostgreSQL's ``recovery_target_timeline = 'latest'`` does: a segment is read from the
newest timeline that had begun by that segment (the segment of a switch point is the new
timeline's file, which holds the old timeline's WAL up to the switch).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

SEGMENT = 16 * 1024 * 1024
PER_XLOGID = 0x100000000 // SEGMENT
NAME_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
HISTORY_RE = re.compile(r"^([0-9A-F]{8})\.history$")


def parse_name(name: str) -> tuple[int, int]:
    """(timeline, start LSN) of a segment file name; ValueError for anything else."""
    m = NAME_RE.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a WAL segment name")
    timeline, hi, lo = (int(g, 16) for g in m.groups())
    if lo >= PER_XLOGID:
        raise ValueError(f"{name!r} is not a WAL segment name for 16 MiB segments")
    return timeline, (hi * PER_XLOGID + lo) * SEGMENT


def history_timeline(name: str) -> int | None:
    """The timeline of a history file's name; None for any other name."""
    m = HISTORY_RE.match(name)
    return int(m.group(1), 16) if m else None


def parse_file_name(name: str) -> tuple[int, int]:
    """(timeline, start LSN) of a segment, (timeline, 0) of a history file; ValueError for
    anything else."""
    timeline = history_timeline(name)
    return (timeline, 0) if timeline is not None else parse_name(name)


@dataclass(frozen=True)
class Branch:
    """Timeline ``parent`` ran until ``at``, where its successor in a history began."""

    parent: int
    at: int


def parse_history(text: str) -> list[Branch]:
    """A history file's lines ``PARENT<tab>HI/LO<tab>reason``, oldest ancestor first;
    ValueError for anything else (comments and blank lines are skipped)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2 or not fields[0].isdigit() or "/" not in fields[1]:
            raise ValueError(f"{line[:60]!r} is not a timeline history line")
        try:
            out.append(Branch(int(fields[0]), parse_lsn(fields[1])))
        except ValueError as exc:
            raise ValueError(f"{line[:60]!r} is not a timeline history line") from exc
    return out


def floor_of(held: Iterable[tuple[str, datetime]]) -> datetime | None:
    """The newest point the segments held vouch for, from (name, seen) of the files held
    (a history file vouches for nothing: it is stored before its timeline's segments)."""
    return max((seen for name, seen in held if history_timeline(name) is None), default=None)


def vouched(names: list[str], seen: datetime, floor: datetime) -> dict[str, datetime]:
    """The point each file of one listing may vouch for.

    A listing's ``seen`` says every commit acknowledged before it lies in the files listed
    *together*. Files are stored and sent one at a time, and a chain that ends at an older
    segment of them (the next one not arrived yet) would claim commits that lie in the
    next: only the newest segment (by position) carries ``seen``. The others, and history
    files, carry ``floor`` (``floor_of`` what was held before this listing), whose commits
    lay in segments up to the newest held then, which every segment listed now reaches or
    follows."""
    segments = [n for n in names if history_timeline(n) is None]
    newest = max(segments, key=lambda n: parse_name(n)[::-1], default=None)
    return {n: seen if n == newest else floor for n in names}


def path_from(timeline: int, start_lsn: int, histories: dict[int, list[Branch]]) -> list[Branch]:
    """The timelines WAL from ``start_lsn`` on ``timeline`` follows, as (timeline, LSN it
    begins at) with ``Branch.parent`` the timeline: the newest timeline whose history runs
    through ``timeline`` past ``start_lsn``, else ``timeline`` alone."""
    for newest in sorted(histories, reverse=True):
        if newest <= timeline:
            break
        branches = histories[newest]
        ends = {b.parent: b.at for b in branches}
        if timeline not in ends or ends[timeline] < start_lsn:
            continue
        path = [Branch(timeline, 0)]
        for i, b in enumerate(branches):
            if b.parent == timeline:
                following = [x.parent for x in branches[i + 1 :]] + [newest]
                starts = [x.at for x in branches[i:]]
                path += [Branch(t, at) for t, at in zip(following, starts, strict=True)]
                return path
    return [Branch(timeline, 0)]


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


def chain_from(
    held: list[Held],
    timeline: int,
    start_lsn: int,
    histories: dict[int, list[Branch]] | None = None,
) -> Chain:
    """The unbroken run of ``held`` from the segment holding ``start_lsn`` on ``timeline``,
    following the newest timeline of ``histories`` (by timeline) that descends from it."""
    path = path_from(timeline, start_lsn, histories or {})
    on = {b.parent for b in path}

    def timeline_at(lsn: int) -> int:
        return max(b.parent for b in path if b.at - b.at % SEGMENT <= lsn)

    by_key = {(h.timeline, h.start_lsn): h for h in held if h.timeline in on}
    lsn = start_lsn - start_lsn % SEGMENT
    newest = max(
        (h.start_lsn for h in by_key.values() if h.timeline == timeline_at(h.start_lsn)),
        default=-1,
    )
    out: list[Held] = []
    while (timeline_at(lsn), lsn) in by_key:
        seg = by_key[(timeline_at(lsn), lsn)]
        out.append(seg)
        if not seg.complete:
            break
        lsn += SEGMENT
    end = out[-1].seen if out else None
    gap = None
    if not out or newest > out[-1].start_lsn:
        gap = format_lsn(lsn)
    return Chain(out, end, gap)
