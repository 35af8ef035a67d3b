"""A chunk batch of deltas is stored several calls at once, but never before its base.

A syncback is all deltas (the blocks written at the DR site over the chunks production
holds); storing them one call at a time made its receipt at production, during a failback's
downtime, as long as the sum of every delta's verification.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import AsyncIterator, Callable

import pytest

from tandem.operations import sessions
from tandem.operations.sessions import Session, SessionRegistry
from tandem.storage.digest import SUB_BLOCK, hash_object
from tandem.storage.manifest import VOLUME_CHUNK, VolumeManifest, encode_manifest
from tandem.storage.pool import PoolWriter, PutResult, encode_chunk, encode_delta
from tandem.transport.wire import encode_frames
from tests.appliance.conftest import Booted, booted

__all__ = ["booted"]


def _chunk_and_delta(seed: int) -> tuple[bytes, bytes, bytes, bytes]:
    """(base id, base chunk file, id of a version with block 1 changed, its delta file)."""
    rng = random.Random(seed)
    base = rng.randbytes(VOLUME_CHUNK)
    changed = base[:SUB_BLOCK] + rng.randbytes(SUB_BLOCK) + base[2 * SUB_BLOCK :]
    b, base_subs = hash_object(base)
    d, subs = hash_object(changed)
    return (
        b,
        encode_chunk(base, base_subs),
        d,
        encode_delta(b, 0, len(changed), subs, {1: changed[SUB_BLOCK : 2 * SUB_BLOCK]}),
    )


def _held(booted: Booted, chunks: list[tuple[bytes, bytes]]) -> None:
    """Store whole chunks in the receiver's pool under a committed image."""
    pool = booted.appliance.site.pool
    with pool.writer() as w:
        for digest, blob in chunks:
            w.put_encoded(digest, blob)
        manifest = VolumeManifest(size=len(chunks) * VOLUME_CHUNK, chunks=[d for d, _ in chunks])
        w.commit_manifest(encode_manifest(manifest))


async def _whole(body: bytes) -> AsyncIterator[bytes]:
    yield body


def _receive(registry: SessionRegistry, session: Session, frames: list[tuple[bytes, bytes]]) -> int:
    body = encode_frames(frames)
    return asyncio.run(registry.receive_stream(session, _whole(body), len(body)))


def _wrap(session: Session, around: Callable[[bytes, Callable[[], PutResult]], PutResult]) -> None:
    writer = session.writer
    assert isinstance(writer, PoolWriter)
    real = writer.put_encoded

    def put_encoded(digest: bytes, blob: bytes) -> PutResult:
        return around(digest, lambda: real(digest, blob))

    writer.put_encoded = put_encoded  # type: ignore[method-assign]


def test_deltas_over_chunks_held_are_stored_several_calls_at_once(
    booted: Booted, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions, "STORE_FRAMES", 1)  # one frame a call
    registry = booted.appliance.site.sessions
    b1, base1, d1, delta1 = _chunk_and_delta(1)
    b2, base2, d2, delta2 = _chunk_and_delta(2)
    _held(booted, [(b1, base1), (b2, base2)])
    session, _ = registry.open(job_id="test", write=True)
    # Each call waits until the other one stores too: one call at a time never gets there.
    both = threading.Barrier(2, timeout=60)

    def around(digest: bytes, store: Callable[[], PutResult]) -> PutResult:
        both.wait()
        return store()

    _wrap(session, around)
    try:
        assert _receive(registry, session, [(d1, delta1), (d2, delta2)]) == 2
        assert registry.missing(session, [d1, d2]) == []
    finally:
        registry.close(session)


def test_a_delta_whose_base_is_being_stored_waits_for_it(
    booted: Booted, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions, "STORE_FRAMES", 1)
    registry = booted.appliance.site.sessions
    b, base, d, delta = _chunk_and_delta(3)
    session, _ = registry.open(job_id="test", write=True)
    delta_started = threading.Event()
    order: list[str] = []

    def around(digest: bytes, store: Callable[[], PutResult]) -> PutResult:
        if digest == d:
            delta_started.set()
            order.append("delta")
            return store()
        # The base's call gives a delta that did not wait every chance to start first.
        if delta_started.wait(timeout=2):
            order.append("delta started while its base was stored")
        result = store()
        order.append("base")
        return result

    _wrap(session, around)
    try:
        assert _receive(registry, session, [(b, base), (d, delta)]) == 2
        assert order == ["base", "delta"]
        assert registry.missing(session, [b, d]) == []
    finally:
        registry.close(session)


def test_a_delta_whose_header_does_not_say_its_base_waits_for_every_call_before_it() -> None:
    b, _, d, delta = _chunk_and_delta(4)
    as_sent = [memoryview(delta[:10]), memoryview(delta[10:])]
    assert sessions._delta_base(d, as_sent) == b  # a header split across pieces
    # A delta's codec byte with a header cut short: no base to wait for alone.
    assert sessions._delta_base(d, [memoryview(delta[:40])]) == sessions.ANY_BASE
    x, subs = hash_object(b"x" * 10)
    assert sessions._delta_base(x, [memoryview(encode_chunk(b"x" * 10, subs))]) is None
