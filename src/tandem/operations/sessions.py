"""Transfer sessions: a job's open door into this appliance's pool for one remote party.

A job that needs an agent (or a peer) to send or fetch chunks opens a session: a random id
and token, an open PoolWriter (registered with the base manifests, so GC keeps what the
sender reuses) and the manifests the party may read. The chunk routes resolve the bearer
token to the session. What is sent becomes visible only when the manifest is committed
through the session; closing a session without commit discards everything pending.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tandem.errors import ChunkMissing, InvalidInput, NotFound, Unauthorized
from tandem.storage.manifest import decode_manifest
from tandem.storage.pool import ChunkPool, PoolWriter
from tandem.transport.server import hash_token, token_matches

FLUSH_EVERY = 16 * 1024 * 1024  # one sender batch: a broken transfer re-sends at most this


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
    ) -> tuple[Session, str]:
        """Open a session; returns it and its token (shown once, kept as a hash)."""
        bases = list(bases)
        token = secrets.token_urlsafe(32)
        sid = secrets.token_hex(8)
        writer = self.pool.writer(bases) if write else None
        session = Session(
            id=sid,
            token_hash=hash_token(token),
            job_id=job_id,
            writer=writer,
            readable=set(bases) | set(readable),
            expires=time.time() + ttl,
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

    def missing(self, session: Session, digests: list[bytes]) -> list[bytes]:
        writer = self._writer(session)
        return [d for d in dict.fromkeys(digests) if not writer.has(d)]

    def receive(self, session: Session, frames: Iterable[tuple[bytes, bytes]]) -> int:
        writer = self._writer(session)
        n = size = 0
        for digest, blob in frames:
            writer.put_encoded(digest, blob)
            size += len(blob)
            n += 1
        # Durable and present every FLUSH_EVERY bytes: a transfer broken after that resumes
        # without them. (Not every batch: each flush is a file-system sync.)
        if session.bytes_received + size - session.flushed_at >= FLUSH_EVERY:
            writer.flush()
            session.flushed_at = session.bytes_received + size
        with self._lock:
            session.bytes_received += size
            session.chunks_received += n
        return n

    def commit(self, session: Session, blob: bytes) -> bytes:
        """Validate a manifest, check every chunk it names is present, then commit it."""
        writer = self._writer(session)
        manifest = decode_manifest(blob)
        writer.flush()
        absent = [d for d in manifest.chunk_ids() if not writer.has(d)]
        if absent:
            raise ChunkMissing(digest=absent[0].hex(), pool=str(self.pool.root))
        mid = writer.commit_manifest(blob)
        with self._lock:
            session.committed.append(mid)
            session.readable.add(mid)
            session.bytes_received += len(blob)
        return mid

    def count_sent(self, session: Session, n: int) -> None:
        """Account ``n`` bytes the party fetched (the job reports them as bytes sent)."""
        with self._lock:
            session.bytes_sent += n

    def check_readable(self, session: Session, manifest: bytes) -> None:
        if manifest not in session.readable:
            raise NotFound(what="manifest", name=manifest.hex(), listing="images APP")

    def _writer(self, session: Session) -> PoolWriter:
        if session.writer is None:
            raise InvalidInput(detail="this transfer session is read-only")
        return session.writer
