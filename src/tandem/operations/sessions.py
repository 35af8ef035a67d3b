"""Transfer sessions: a job's open door into this appliance's pool for one remote party.

A job that needs an agent (or a peer) to send or fetch chunks opens a session: a random id
and token, an open PoolWriter (registered with the base manifests, so GC keeps what the
sender reuses) and the manifests the party may read. The chunk routes resolve the bearer
token to the session. What is sent becomes visible only when the manifest is committed
through the session; closing a session without commit discards everything pending.

A chunk batch is verified as it arrives (``receive_stream``): its frames are checked and
written in worker threads (a few calls at once, small frames several to a call) while the
event loop reads the next ones, so the whole body is never held in memory and verification
overlaps the transfer. A delta waits for the call storing its base, when one is under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from tandem.errors import (
    ChunkCorrupt,
    ChunkMissing,
    InvalidInput,
    NotFound,
    TandemError,
    Unauthorized,
)
from tandem.storage.layouts import BaseLayouts
from tandem.storage.manifest import decode_manifest, stored_chunk_ids
from tandem.storage.packs import HEAD_BYTES
from tandem.storage.pool import CODEC_DELTA, ChunkPool, PoolWriter, parse_header
from tandem.transport.server import hash_token, token_matches
from tandem.transport.wire import FrameReader

FLUSH_EVERY = 64 * 1024 * 1024  # default: a broken transfer re-sends at most this
QUEUED_BYTES = 8 * 1024 * 1024  # received frames waiting for verification, per request
STORE_FRAMES = 64  # frames verified and stored by one worker call, at most...
STORE_BYTES = 1024 * 1024  # ...and about this many bytes (a larger frame goes alone)
STORE_CALLS = 2  # worker calls storing frames of one request at once


ANY_BASE = b""
"""``_delta_base`` of a delta whose header does not say: it waits for every call before it
(and is then refused on its own)."""


def _delta_base(digest: bytes, parts: list[memoryview]) -> bytes | None:
    """The base a received chunk file (in pieces) is a delta over; None for a
    self-contained one (codec byte and header: ``storage.pool``)."""
    first = parts[0] if parts else memoryview(b"")
    codec = first[4] if len(first) > 4 else (b"".join(parts)[4:5] or b"\xff")[0]
    if codec != CODEC_DELTA:
        return None  # most frames: only their codec byte is looked at
    head = bytes(first[:HEAD_BYTES]) if len(first) >= HEAD_BYTES else b"".join(parts)[:HEAD_BYTES]
    try:
        return parse_header(head, digest, "received chunk").base or ANY_BASE
    except ChunkCorrupt:
        return ANY_BASE


@dataclass
class Session:
    id: str
    token_hash: str
    job_id: str
    writer: PoolWriter | None
    readable: set[bytes] = field(default_factory=set)  # manifests the party may read
    committed: list[bytes] = field(default_factory=list)
    bytes_received: int = 0  # chunk and manifest bytes the party sent us
    chunks_received: int = 0
    bytes_sent: int = 0  # chunk, block and manifest bytes the party fetched from us
    expires: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)  # what the opening operation keeps
    flushed_at: int = 0  # bytes_received when the writer last made chunks durable
    flush_every: int = FLUSH_EVERY  # received bytes between two flushes of the writer
    # Layout files of the readable images (``storage.layouts``), for the size of
    # ``readable`` they were gathered at.
    image_layouts: tuple[int, BaseLayouts] | None = None


class SessionRegistry:
    def __init__(self, pool: ChunkPool) -> None:
        self.pool = pool
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def open(
        self,
        *,
        job_id: str,
        write: bool,
        bases: Iterable[bytes] = (),
        readable: Iterable[bytes] = (),
        ttl: float = 24 * 3600,
        xor_deltas: bool = True,
        cached: bool = True,
        flush_every: int = FLUSH_EVERY,
        prefetch: bool = False,
    ) -> tuple[Session, str]:
        """Open a session; returns it and its token (shown once, kept as a hash).
        ``xor_deltas``: see ``PoolWriter.put_encoded``; ``cached``: see ``PoolWriter``.
        ``flush_every``: received bytes after which what arrived is made durable and
        present, so that a broken transfer resumes without them (each flush is a file-system
        sync: a sender on a slow link wants it per batch, an agent on the LAN re-sends a few
        batches faster). ``prefetch``: read the bases' layout files ahead (a syncback,
        whose deltas are built on them, arrives during a failback's downtime)."""
        bases = list(bases)
        token = secrets.token_urlsafe(32)
        sid = secrets.token_hex(8)
        writer = self.pool.writer(bases, xor_deltas=xor_deltas, cached=cached) if write else None
        if writer is not None and prefetch:
            writer.prefetch_bases()
        session = Session(
            id=sid,
            token_hash=hash_token(token),
            job_id=job_id,
            writer=writer,
            readable=set(bases) | set(readable),
            expires=time.time() + ttl,
            flush_every=flush_every,
        )
        with self._lock:
            self._sessions[sid] = session
            # Sessions of jobs that never closed them (a crashed handler) expire here.
            now = time.time()
            expired = [s for s in self._sessions.values() if now > s.expires]
        for old in expired:
            self.close(old)
        return session, token

    def get(self, sid: str, token: str) -> Session:
        with self._lock:
            session = self._sessions.get(sid)
        if session is None or time.time() > session.expires:
            raise NotFound(what="transfer session", name=sid, listing="jobs")
        if not token_matches(token, session.token_hash):
            raise Unauthorized()
        return session

    def close(self, session: Session) -> None:
        """End a session; anything sent but not committed is discarded."""
        with self._lock:
            self._sessions.pop(session.id, None)
        if session.writer is not None:
            session.writer.discard()
            session.writer.close()
            session.writer = None

    # --- what the routes call ------------------------------------------------------------

    def close_matching(self, **meta: Any) -> int:
        """Close the sessions whose ``meta`` has these items (e.g. an app's transfers)."""
        with self._lock:
            doomed = [
                s
                for s in self._sessions.values()
                if all(s.meta.get(k) == v for k, v in meta.items())
            ]
        for session in doomed:
            self.close(session)
        return len(doomed)

    def find(self, sid: str) -> Session:
        """A session by id, for a caller already authenticated otherwise (the peer)."""
        with self._lock:
            session = self._sessions.get(sid)
        if session is None or time.time() > session.expires:
            raise NotFound(what="transfer session", name=sid, listing="jobs")
        return session

    def missing(
        self, session: Session, digests: list[bytes], sizes: list[int] | None = None
    ) -> list[bytes]:
        return self._writer(session).missing(digests, sizes)

    async def receive_stream(
        self, session: Session, pieces: AsyncIterator[bytes], max_bytes: int
    ) -> int:
        """Verify and store a chunk batch (``transport.wire`` frames) while it arrives: each
        frame is checked and written in a worker thread as soon as it is complete, while the
        next ones are read; ``STORE_CALLS`` worker calls run at once (storing a small chunk
        is mostly waiting for the file system to create its file). Returns the number of
        frames; raises the first bad frame's error (what was stored stays pending in the
        session's writer: it becomes visible only through a committed manifest)."""
        writer = self._writer(session)
        loop = asyncio.get_running_loop()
        reader = FrameReader(max_bytes)
        queued: deque[tuple[bytes, list[memoryview]]] = deque()
        queued_bytes = 0
        # Calls under way, oldest first, each with the chunks it stores.
        works: deque[tuple[asyncio.Future[int], set[bytes]]] = deque()
        n = size = 0

        def store(frames: list[tuple[bytes, list[memoryview]]]) -> int:
            stored = 0
            for digest, parts in frames:
                blob = b"".join(parts)
                writer.put_encoded(digest, blob)
                stored += len(blob)
            return stored

        async def settle_oldest() -> None:
            nonlocal size
            size += await works.popleft()[0]

        async def start_next() -> None:
            # Small frames (a tree's small files) go several to a worker call: one call
            # each would cost more than storing them.
            nonlocal queued_bytes, n
            frames: list[tuple[bytes, list[memoryview]]] = []
            take = 0
            while queued and (not frames or (len(frames) < STORE_FRAMES and take < STORE_BYTES)):
                digest, parts = queued.popleft()
                k = sum(len(p) for p in parts)
                queued_bytes -= k
                take += k
                frames.append((digest, parts))
            # A delta whose base a call under way stores waits for that call (and those
            # before it); the others go on beside it: a syncback is all deltas.
            bases = {b for d, parts in frames if (b := _delta_base(d, parts)) is not None}
            while works and (ANY_BASE in bases or any(bases & digests for _, digests in works)):
                await settle_oldest()
            n += len(frames)
            future = loop.run_in_executor(None, store, frames)
            works.append((future, {d for d, _ in frames}))

        def may_start() -> bool:
            return len(works) < STORE_CALLS or works[0][0].done() or queued_bytes > QUEUED_BYTES

        try:
            async for piece in pieces:
                for frame in reader.feed(piece):
                    queued.append(frame)
                    queued_bytes += sum(len(p) for p in frame[1])
                while queued and may_start():
                    if len(works) >= STORE_CALLS:
                        await settle_oldest()  # (waits here when too much is queued)
                    await start_next()
            reader.close()
            while queued:
                if len(works) >= STORE_CALLS:
                    await settle_oldest()
                await start_next()
            while works:
                await settle_oldest()
        except BaseException:
            for work, _ in works:  # let the calls under way finish before answering
                with contextlib.suppress(Exception):
                    await asyncio.shield(work)
            raise
        await loop.run_in_executor(None, self._received, session, writer, n, size)
        return n

    def _received(self, session: Session, writer: PoolWriter, n: int, size: int) -> None:
        # Durable and present every ``flush_every`` bytes: a transfer broken after that
        # resumes without them.
        if session.bytes_received + size - session.flushed_at >= session.flush_every:
            writer.flush()
            session.flushed_at = session.bytes_received + size
        with self._lock:
            session.bytes_received += size
            session.chunks_received += n

    def commit(self, session: Session, blob: bytes) -> bytes:
        """Validate a manifest, check every chunk it names is present, then commit it."""
        writer = self._writer(session)
        manifest = decode_manifest(blob)
        writer.flush()
        # Chunks the registered bases name are present and kept from GC while the writer
        # lives (the job records the image before closing it): only the others are looked
        # up (and touched). A re-capture of 50,000 unchanged files checks none.
        held = self._base_chunks(writer)
        absent = [d for d in manifest.chunk_ids() if d not in held and not writer.has(d)]
        if absent:
            raise ChunkMissing(digest=absent[0].hex(), pool=str(self.pool.root))
        mid = writer.commit_manifest(blob)
        with self._lock:
            session.committed.append(mid)
            session.readable.add(mid)
            session.bytes_received += len(blob)
        return mid

    def _base_chunks(self, writer: PoolWriter) -> set[bytes]:
        held: set[bytes] = set()
        for base in writer.bases:
            # Unreadable: its chunks are then looked up like any other.
            with contextlib.suppress(TandemError, ValueError, KeyError, TypeError):
                held |= stored_chunk_ids(self.pool.get_manifest_blob(base))
        return held

    def count_sent(self, session: Session, n: int) -> None:
        """Account ``n`` bytes the party fetched (the job reports them as bytes sent)."""
        with self._lock:
            session.bytes_sent += n

    def layout(self, session: Session, digest: bytes) -> tuple[int, list[bytes]]:
        """(length, block digests) of a chunk, checked against its id: from memory
        (``ChunkPool.layout``'s), else from the layout files of the images the party may
        read (a restore asks for the blocks in which two of them differ: one sequential
        file per 64 chunks rather than a random read of each chunk's header), else from
        the chunk's header. Says nothing of whether the chunk is stored."""
        got = self.pool.layouts.get(digest)
        if got is not None:
            return got
        hint = self._readable_layouts(session).get(digest)
        if hint is not None:
            return hint.plain_len, hint.subs
        return self.pool.layout(digest)

    def _readable_layouts(self, session: Session) -> BaseLayouts:
        with self._lock:
            kept, readable = session.image_layouts, list(session.readable)
        if kept is not None and kept[0] == len(readable):
            return kept[1]
        built = self.pool.layouts_of(readable)
        with self._lock:
            session.image_layouts = (len(readable), built)
        return built

    def check_readable(self, session: Session, manifest: bytes) -> None:
        if manifest not in session.readable:
            raise NotFound(what="manifest", name=manifest.hex(), listing="images APP")

    def _writer(self, session: Session) -> PoolWriter:
        if session.writer is None:
            raise InvalidInput(detail="this transfer session is read-only")
        return session.writer
