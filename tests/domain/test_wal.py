"""WAL names, LSNs and the unbroken run of segments a recovery needs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tandem.domain.wal import (
    SEGMENT,
    Branch,
    Held,
    chain_from,
    format_lsn,
    history_timeline,
    parse_history,
    parse_lsn,
    parse_name,
    segment_name,
)

T0 = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)


def held(n: int, complete: bool = True, timeline: int = 1) -> Held:
    lsn = n * SEGMENT
    return Held(segment_name(timeline, lsn), timeline, lsn, SEGMENT, complete, T0 + timedelta(n))


def test_names_and_lsns_round_trip() -> None:
    assert segment_name(1, 0x2_0100_0000) == "000000010000000200000001"
    assert parse_name("000000010000000200000001") == (1, 0x2_0100_0000)
    assert parse_lsn("2/1000028") == 0x2_0100_0028
    assert format_lsn(0x2_0100_0028) == "2/1000028"
    for bad in ("00000001000000020000000", "00000001000000020000100", "x" * 24):
        with pytest.raises(ValueError):
            parse_name(bad)


def test_the_run_follows_segments_to_the_growing_one() -> None:
    chain = chain_from([held(2), held(3), held(4, complete=False)], 1, parse_lsn("0/2000028"))
    assert [s.start_lsn // SEGMENT for s in chain.segments] == [2, 3, 4]
    assert chain.gap is None and chain.end == T0 + timedelta(4)


def test_a_missing_segment_is_a_gap_and_nothing_past_it_is_in_the_run() -> None:
    chain = chain_from([held(2), held(4), held(5, complete=False)], 1, 2 * SEGMENT + 40)
    assert [s.start_lsn // SEGMENT for s in chain.segments] == [2]
    assert chain.gap == format_lsn(3 * SEGMENT)
    assert chain.end == T0 + timedelta(2)


def test_no_segment_from_the_start_is_a_gap_at_the_start() -> None:
    chain = chain_from([held(5)], 1, 2 * SEGMENT)
    assert chain.segments == [] and chain.end is None and chain.gap == format_lsn(2 * SEGMENT)
    other_timeline = chain_from([held(2, timeline=2)], 1, 2 * SEGMENT)
    assert other_timeline.segments == []


def test_the_run_follows_a_promotion_onto_the_new_timeline_and_leaves_the_old_branch() -> None:
    """Promoted in segment 4 (a failover): segment 4 on is read from timeline 2, whose file
    of segment 4 holds timeline 1's WAL up to the switch; timeline 1 past it is a dead end."""
    histories = parse_history("1\t0/4000100\tno recovery target specified\n")
    assert histories == [Branch(1, 4 * SEGMENT + 0x100)]
    segments = [held(2), held(3), held(4), held(5, complete=False)]  # timeline 1, further
    segments += [held(4, timeline=2), held(5, timeline=2, complete=False)]
    chain = chain_from(segments, 1, 2 * SEGMENT, {2: histories})
    assert [(s.timeline, s.start_lsn // SEGMENT) for s in chain.segments] == [
        (1, 2),
        (1, 3),
        (2, 4),
        (2, 5),
    ]
    assert chain.gap is None
    # The new timeline's segment of the switch not held yet: the run stops before it.
    waiting = chain_from(segments[:3], 1, 2 * SEGMENT, {2: histories})
    assert [s.start_lsn // SEGMENT for s in waiting.segments] == [2, 3]
    # A base taken on timeline 1 after the branch is not on timeline 2's history.
    later = chain_from(segments, 1, 5 * SEGMENT, {2: histories})
    assert [(s.timeline, s.start_lsn // SEGMENT) for s in later.segments] == [(1, 5)]
    assert history_timeline("00000002.history") == 2 and history_timeline("x.history") is None
    with pytest.raises(ValueError):
        parse_history("not a history\n")
