"""A syncback's chunks streamed to production while the DR site captures them
(``replicate.ChunkStream``): only what the receiver can take as stored goes, and a batch
the receiver refuses stops the stream, never the capture; what it did not deliver is left
to the pass after the capture, which asks the receiver what it lacks."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from types import SimpleNamespace

from tandem.catalog import queries as q
from tandem.catalog.models import JobLog
from tandem.jobs.queue import submit_job
from tandem.jobs.runner import JobContext, JobInfo
from tandem.operations.replicate import STREAM_QUEUED, ChunkStream
from tandem.operations.sessions import Session
from tandem.storage.digest import SUB_BLOCK, hash_object
from tandem.storage.manifest import VOLUME_CHUNK, VolumeManifest, encode_manifest
from tandem.storage.pool import encode_chunk, encode_delta
from tandem.transport.peer import Opened
from tandem.transport.wire import encode_frames
from tests.appliance.conftest import Api, api, booted
from tests.catalog.conftest import catalog_url

__all__ = ["api", "booted", "catalog_url"]


def _chunk(rng: random.Random) -> tuple[bytes, bytes, bytes]:
    data = rng.randbytes(VOLUME_CHUNK)
    digest, subs = hash_object(data)
    return digest, encode_chunk(data, subs), data


def _delta(base: bytes, data: bytes, rng: random.Random) -> tuple[bytes, bytes]:
    """A delta over chunk ``base`` (content ``data``) with its second block rewritten."""
    changed = data[:SUB_BLOCK] + rng.randbytes(SUB_BLOCK) + data[2 * SUB_BLOCK :]
    digest, subs = hash_object(changed)
    block = changed[SUB_BLOCK : 2 * SUB_BLOCK]
    return digest, encode_delta(base, 0, len(changed), subs, {1: block})


def _stream(api: Api, held: list[tuple[bytes, bytes]]) -> tuple[Session, ChunkStream, JobContext]:
    """A receiver's session whose base image holds ``held``, and a stream into it."""
    site = api.appliance.site
    with site.pool.writer() as w:
        for digest, blob in held:
            w.put_encoded(digest, blob)
        manifest = VolumeManifest(size=len(held) * VOLUME_CHUNK, chunks=[d for d, _ in held])
        base = w.commit_manifest(encode_manifest(manifest))
    session, token = site.sessions.open(job_id="test", write=True, bases=[base], xor_deltas=False)
    opened = Opened(session=session.id, token=token, base=base.hex())
    with site.catalog.begin() as db:
        job = submit_job(db, type="stream-test")
    ctx = JobContext(site.catalog, JobInfo(id=job.id, type=job.type, app=None, image=None))
    peer = SimpleNamespace(url=site.url, fingerprint=site.fingerprint, name="prod")
    return session, ChunkStream(site, ctx, peer, opened), ctx


def test_a_stream_sends_what_the_receiver_can_take_as_it_is(api: Api) -> None:
    rng = random.Random(1)
    held_id, held_blob, held_data = _chunk(rng)
    elsewhere_id, _, elsewhere_data = _chunk(rng)  # a base the receiver does not hold
    session, stream, _ = _stream(api, [(held_id, held_blob)])
    over_held = _delta(held_id, held_data, rng)
    over_elsewhere = _delta(elsewhere_id, elsewhere_data, rng)
    whole = _chunk(rng)[:2]
    sessions = api.appliance.site.sessions
    try:
        with stream:
            for digest, blob in (over_held, over_elsewhere, whole):
                stream.offer(digest, blob)
        # A delta the receiver could not verify, and a whole chunk (a delta over what the
        # receiver holds at its offset may be smaller), are left to the pass after the
        # capture.
        wanted = [over_held[0], over_elsewhere[0], whole[0]]
        assert sessions.missing(session, wanted) == [over_elsewhere[0], whole[0]]
        assert stream.sent >= len(over_held[1])
    finally:
        sessions.close(session)


def test_a_batch_the_receiver_refuses_stops_the_stream_not_the_capture(api: Api) -> None:
    rng = random.Random(2)
    held_id, held_blob, held_data = _chunk(rng)
    session, stream, ctx = _stream(api, [(held_id, held_blob)])
    forged = (os.urandom(32), _delta(held_id, held_data, rng)[1])  # under another's id
    # (each delta is ~64 KiB: enough of them to fill the stream's queue twice)
    later = [_delta(held_id, held_data, rng) for _ in range(2 * STREAM_QUEUED // SUB_BLOCK)]
    sessions = api.appliance.site.sessions
    try:
        with stream:
            stream.offer(*forged)
            # More than the stream queues: a capture worker that offered them would wait
            # for a stream that had stopped (the test would time out) were it not let go.
            for digest, blob in later:
                stream.offer(digest, blob)
        assert sessions.missing(session, [forged[0]]) == [forged[0]]
        log = [line.text for line in _log(api, ctx)]
        assert any("streaming chunks to prod stopped" in t for t in log), log
        # what it did not deliver the pass after the capture sends: the session takes it
        left = set(sessions.missing(session, [d for d, _ in later]))
        assert left, "a stream that stopped at its first batch delivered everything"
        body = encode_frames([(d, blob) for d, blob in later if d in left])
        asyncio.run(sessions.receive_stream(session, _whole(body), len(body)))
        assert sessions.missing(session, [d for d, _ in later]) == []
    finally:
        sessions.close(session)


async def _whole(body: bytes) -> AsyncIterator[bytes]:
    yield body


def _log(api: Api, ctx: JobContext) -> list[JobLog]:
    with api.appliance.site.catalog.read() as db:
        return q.list_job_log(db, job_id=ctx.job.id)
