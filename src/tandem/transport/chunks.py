"""Remote pools: the storage engine's writer and chunk-source interfaces over HTTP.

``RemotePool`` lets an agent run ``capture_volume``/``capture_tree`` against an appliance's
pool: chunks are hashed and compressed at the source and only those the appliance lacks are
sent, in batches. ``RemoteChunkSource`` lets an agent diff-restore from an appliance's pool,
fetching only the 64 KiB blocks that differ.

Both talk to a *session* the appliance opened for one job (``/api/v1/sessions/{id}``); the
session holds the appliance-side PoolWriter, so what the agent sends becomes visible only
when the manifest is committed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from types import TracebackType

from tandem.errors import ChunkCorrupt
from tandem.storage.digest import DIGEST_SIZE, SUB_BLOCK, hash_bytes, hash_sub_blocks
from tandem.storage.pool import PutResult, decode_chunk, encode_chunk, encode_delta
from tandem.transport.client import ApiClient
from tandem.transport.wire import decode_digests, decode_frames, encode_digests, encode_frames

BATCH_BYTES = 16 * 1024 * 1024
BATCH_COUNT = 1024


class RemoteWriter:
    """Has the PoolWriter interface the capture functions use; sends in batches."""

    def __init__(self, client: ApiClient, session: str) -> None:
        self.client = client
        self.base = f"/api/v1/sessions/{session}"
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._batch: list[tuple[bytes, bytes]] = []
        self._batch_bytes = 0
        self._known: set[bytes] = set()
        self.bytes_sent = 0
        self.chunks_sent = 0

    def __enter__(self) -> RemoteWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.flush()
        else:
            self.discard()

    def has(self, digest: bytes) -> bool:
        with self._lock:
            return digest in self._known

    def put(
        self,
        data: bytes | bytearray | memoryview,
        digest: bytes | None = None,
        subs: list[bytes] | None = None,
    ) -> PutResult:
        if digest is None:
            digest = hash_bytes(data)
        with self._lock:
            if digest in self._known:
                return PutResult(digest, False, 0)
            self._known.add(digest)
        blob = encode_chunk(data, subs if subs is not None else hash_sub_blocks(data))
        self._queue(digest, blob)
        return PutResult(digest, True, len(blob))

    def sub_digests(self, digest: bytes) -> list[bytes]:
        """Sub-block digests of a chunk the appliance holds (to send a change as a delta)."""
        raw = self.client.request("GET", f"{self.base}/chunks/{digest.hex()}/subs", raw=True)
        return [raw[i : i + DIGEST_SIZE] for i in range(0, len(raw), DIGEST_SIZE)]

    def put_delta(
        self,
        data: bytes | bytearray | memoryview,
        digest: bytes,
        subs: list[bytes],
        base: bytes,
        changed: list[int],
    ) -> PutResult:
        """Queue a changed chunk as its changed 64 KiB sub-blocks over ``base``, which the
        appliance holds; it checks the result against ``digest`` before storing it."""
        with self._lock:
            if digest in self._known:
                return PutResult(digest, False, 0)
            self._known.add(digest)
        view = memoryview(data)
        blocks = {j: bytes(view[j * SUB_BLOCK : (j + 1) * SUB_BLOCK]) for j in changed}
        blob = encode_delta(base, 0, len(view), subs, blocks)
        self._queue(digest, blob)
        return PutResult(digest, True, len(blob))

    def _queue(self, digest: bytes, blob: bytes) -> None:
        with self._lock:
            self._batch.append((digest, blob))
            self._batch_bytes += len(blob)
            full = self._batch_bytes >= BATCH_BYTES or len(self._batch) >= BATCH_COUNT
        if full:
            self.flush()

    def flush(self) -> None:
        """Ask which chunks of the batch the appliance lacks, then send those."""
        with self._send_lock:
            with self._lock:
                batch, self._batch, self._batch_bytes = self._batch, [], 0
            if not batch:
                return
            answer = self.client.post(
                f"{self.base}/missing", {"digests": encode_digests(d for d, _ in batch)}
            )
            missing = set(decode_digests(answer["missing"]))
            frames = [(d, b) for d, b in batch if d in missing]
            if frames:
                body = encode_frames(frames)
                self.client.request("POST", f"{self.base}/chunks", content=body)
                self.bytes_sent += len(body)
                self.chunks_sent += len(frames)

    def discard(self) -> None:
        with self._lock:
            self._batch, self._batch_bytes = [], 0

    def commit_manifest(self, blob: bytes) -> bytes:
        self.flush()
        answer = self.client.request("POST", f"{self.base}/manifest", content=blob)
        self.bytes_sent += len(blob)
        return bytes.fromhex(answer["manifest"])


class RemotePool:
    """Stands in for a ChunkPool in the capture functions: ``writer()`` sends to a session.

    ``bases`` are the manifests the appliance registered with the session's writer: their
    chunks are held (and kept from GC) on the appliance, so a capture may reuse them without
    sending or touching them (``has_manifest`` answers for them).
    """

    def __init__(self, client: ApiClient, session: str, bases: Iterable[bytes] = ()) -> None:
        self.client = client
        self.session = session
        self.bases = frozenset(bases)
        self.last_writer: RemoteWriter | None = None

    def has_manifest(self, digest: bytes) -> bool:
        return digest in self.bases

    def writer(self, bases: Iterable[bytes] = ()) -> RemoteWriter:
        # The appliance-side session registered the bases when it was opened.
        self.last_writer = RemoteWriter(self.client, self.session)
        return self.last_writer


class RemoteChunkSource:
    """A ChunkSource reading from an appliance; every chunk and block is verified."""

    def __init__(self, client: ApiClient, session: str) -> None:
        self.client = client
        self.base = f"/api/v1/sessions/{session}"
        self.bytes_received = 0

    def get(self, digest: bytes) -> bytes:
        blob = self.client.request("GET", f"{self.base}/chunks/{digest.hex()}", raw=True)
        self.bytes_received += len(blob)
        return decode_chunk(blob, digest, self.client.url)

    def sub_digests(self, digest: bytes) -> list[bytes]:
        raw = self.client.request("GET", f"{self.base}/chunks/{digest.hex()}/subs", raw=True)
        self.bytes_received += len(raw)
        return [raw[i : i + DIGEST_SIZE] for i in range(0, len(raw), DIGEST_SIZE)]

    def read_blocks(self, digest: bytes, indices: list[int]) -> list[bytes]:
        if not indices:
            return []
        raw = self.client.request(
            "GET",
            f"{self.base}/chunks/{digest.hex()}/blocks",
            params={"i": ",".join(map(str, indices))},
            raw=True,
        )
        self.bytes_received += len(raw)
        out = []
        for sub, block in decode_frames(raw):
            if hash_bytes(block) != sub:
                raise ChunkCorrupt(digest=digest.hex(), pool=self.client.url, reason="block")
            out.append(block)
        if len(out) != len(indices):
            raise ChunkCorrupt(digest=digest.hex(), pool=self.client.url, reason="block count")
        return out
