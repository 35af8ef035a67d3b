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

import contextlib
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

from tandem.errors import ChunkCorrupt, InvalidInput
from tandem.storage.digest import (
    SUB_BLOCK,
    hash_block,
    hash_object,
    object_id,
    split_digests,
)
from tandem.storage.pool import PutResult, decode_chunk, encode_chunk_parts, encode_delta
from tandem.transport.client import ApiClient, api_path
from tandem.transport.wire import (
    BLOCKS_PER_REQUEST,
    SUBS_PER_REQUEST,
    decode_digests,
    decode_frames,
    decode_subs,
    encode_digests,
    encode_frames_of_parts,
)

BATCH_BYTES = 16 * 1024 * 1024
BATCH_COUNT = 4096
"""Chunks a batch holds at most (BATCH_BYTES bounds it first for chunks over ~4 KiB). Each
batch is two requests, whose fixed cost (routing, a worker thread hand-off, the answer) on
both daemons is paid per batch: a tree of small files sends fewer, larger ones."""
SENDERS = 3
"""Batches a RemoteWriter has in flight at once, each on its own connection: while one
waits for the appliance's answer (which may include a file-system sync), the next streams.
The capture threads keep hashing and compressing meanwhile; only when SENDERS batches are
under way does the next full batch wait (flat memory: at most SENDERS + 1 batches)."""


def session_path(session: str, *rest: str) -> str:
    """The path of a transfer session's resource: ``/api/v1/sessions/SID[/REST…]``."""
    return api_path("/api/v1/sessions", session, *rest)


class SessionClient:
    """The calls of one transfer session of an appliance (``/api/v1/sessions/SID/…``),
    one method each: the only place a client writes their paths."""

    def __init__(self, client: ApiClient, session: str) -> None:
        self.client = client
        self.id = session
        self.base = session_path(session)

    def missing(self, digests: Iterable[bytes], sizes: list[int] | None = None) -> list[bytes]:
        """Which of ``digests`` the appliance lacks (durable and verified counts as held).
        ``sizes``: the length of each one's encoding, if known (the appliance then skips
        looking for a loose file of a chunk it would pack)."""
        body: dict[str, Any] = {"digests": encode_digests(digests)}
        if sizes is not None:
            body["sizes"] = sizes
        answer = self.client.post(f"{self.base}/missing", body)
        return list(decode_digests(answer["missing"]))

    def send_chunks(self, body: bytes) -> None:
        """Store a batch of chunk frames (``wire.encode_frames``); each is verified there."""
        self.client.request("POST", f"{self.base}/chunks", content=body)

    def commit_manifest(self, blob: bytes) -> bytes:
        """Store the manifest ``blob`` once every chunk it names is held; its id."""
        answer = self.client.request("POST", f"{self.base}/manifest", content=blob)
        return bytes.fromhex(answer["manifest"])

    def subs(self, digest: bytes) -> bytes:
        """The block digests of a chunk the appliance holds, concatenated."""
        path = session_path(self.id, "chunks", digest.hex(), "subs")
        return bytes(self.client.request("GET", path, raw=True))

    def manifest(self, manifest: str) -> bytes:
        """The encoded manifest ``manifest`` (hex id) of an image the session reads."""
        path = session_path(self.id, "manifests", manifest)
        return bytes(self.client.request("GET", path, raw=True))


class RemoteWriter:
    """Has the PoolWriter interface the capture functions use; sends in batches.

    Each batch is one exchange with the session: ``/missing`` with its digests (the
    appliance answers which it lacks), then ``/chunks`` with those. Batches go out in
    background threads (``SENDERS`` at once) while the caller goes on producing chunks; the
    first error of a batch is raised by the next ``put`` or by ``flush``. ``flush`` returns
    once every batch was answered, so ``commit_manifest`` (which flushes first) commits
    only after the appliance stored every chunk.
    """

    def __init__(self, client: ApiClient, session: str) -> None:
        self.client = client
        self.session = SessionClient(client, session)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._batch: list[tuple[bytes, int, list[bytes]]] = []  # (id, length, blob's parts)
        self._batch_bytes = 0
        self._known: set[bytes] = set()
        self._inflight: deque[Future[None]] = deque()
        self._senders: ThreadPoolExecutor | None = None
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
        try:
            if exc_type is None:
                self.flush()
            else:
                self.discard()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the sender threads (after the batches under way)."""
        senders, self._senders = self._senders, None
        if senders is not None:
            senders.shutdown(wait=True, cancel_futures=True)

    def has(self, digest: bytes) -> bool:
        with self._lock:
            return digest in self._known

    def put(
        self,
        data: bytes | bytearray | memoryview,
        digest: bytes | None = None,
        subs: list[bytes] | None = None,
    ) -> PutResult:
        if digest is None or subs is None:
            digest, subs = hash_object(data)
        with self._lock:
            if digest in self._known:
                return PutResult(digest, False, 0)
            self._known.add(digest)
        parts = encode_chunk_parts(data, subs)
        length = sum(len(p) for p in parts)
        self._queue(digest, length, parts)
        return PutResult(digest, True, length)

    def sub_digests(self, digest: bytes) -> list[bytes]:
        """Sub-block digests of a chunk the appliance holds (to send a change as a delta)."""
        raw = self.session.subs(digest)
        return split_digests(raw)

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
        self._queue(digest, len(blob), [blob])
        return PutResult(digest, True, len(blob))

    def put_blocks(
        self, digest: bytes, subs: list[bytes], length: int, base: bytes, blocks: dict[int, bytes]
    ) -> PutResult | None:
        """Queue a chunk given as its changed ``blocks`` over ``base`` (see PoolWriter)."""
        with self._lock:
            if digest in self._known:
                return PutResult(digest, False, 0)
            self._known.add(digest)
        blob = encode_delta(base, 0, length, subs, blocks)
        self._queue(digest, len(blob), [blob])
        return PutResult(digest, True, len(blob))

    def _queue(self, digest: bytes, length: int, parts: list[bytes]) -> None:
        """Queue a chunk file given as the parts it is made of (joined once, into the body
        of its batch)."""
        with self._lock:
            self._batch.append((digest, length, parts))
            self._batch_bytes += length
            full = self._batch_bytes >= BATCH_BYTES or len(self._batch) >= BATCH_COUNT
        if full:
            self._dispatch(wait_all=False)

    def _dispatch(self, *, wait_all: bool) -> None:
        """Hand the current batch to a sender; wait until fewer than SENDERS batches are
        under way (all of them with ``wait_all``). Raises the first failed batch's error."""
        with self._send_lock:
            with self._lock:
                batch, self._batch, self._batch_bytes = self._batch, [], 0
            limit = 0 if wait_all else SENDERS - 1
            while len(self._inflight) > limit:
                self._inflight.popleft().result()
            if batch:
                if self._senders is None:
                    self._senders = ThreadPoolExecutor(SENDERS, thread_name_prefix="tandem-send")
                self._inflight.append(self._senders.submit(self._send, batch))
                if wait_all:
                    self._inflight.popleft().result()

    def _send(self, batch: list[tuple[bytes, int, list[bytes]]]) -> None:
        """Ask which chunks of the batch the appliance lacks, then send those."""
        missing = set(self.session.missing([d for d, _, _ in batch], [n for _, n, _ in batch]))
        frames = [f for f in batch if f[0] in missing]
        if frames:
            body = encode_frames_of_parts(frames)
            self.session.send_chunks(body)
            with self._lock:
                self.bytes_sent += len(body)
                self.chunks_sent += len(frames)

    def flush(self) -> None:
        """Send what is queued and wait until the appliance has stored every batch."""
        self._dispatch(wait_all=True)

    def discard(self) -> None:
        """Drop what is queued; wait for the batches under way, ignoring their errors."""
        with self._lock:
            self._batch, self._batch_bytes = [], 0
        with self._send_lock:
            while self._inflight:
                fut = self._inflight.popleft()
                fut.cancel()
                with contextlib.suppress(Exception):
                    fut.result()

    def commit_manifest(self, blob: bytes) -> bytes:
        self.flush()
        manifest = self.session.commit_manifest(blob)
        self.bytes_sent += len(blob)
        return manifest


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
    """A ChunkSource reading from an appliance; every chunk and block is verified.

    Block digests are checked against the chunk id (``object_id(subs, length)``) and each
    block against its digest, so a lying or broken appliance raises ChunkCorrupt and never
    gets a wrong byte written. The ``_many`` reads batch many chunks into few requests
    (see ``wire.SUBS_PER_REQUEST`` and ``wire.BLOCKS_PER_REQUEST``); a larger ask is
    split, one request after the other (callers wanting several in flight use threads).
    """

    def __init__(self, client: ApiClient, session: str) -> None:
        self.client = client
        self.base = session_path(session)
        self.where = client.url
        self.bytes_received = 0
        self._count_lock = threading.Lock()

    def _post(self, path: str, body: Any) -> bytes:
        raw: bytes = self.client.request("POST", f"{self.base}/{path}", json_body=body, raw=True)
        with self._count_lock:
            self.bytes_received += len(raw)
        return raw

    def _corrupt(self, digest: bytes, reason: str) -> ChunkCorrupt:
        return ChunkCorrupt(digest=digest.hex(), pool=self.where, reason=reason)

    def _frames(self, raw: bytes, first: bytes) -> Iterator[tuple[bytes, bytes]]:
        try:
            yield from decode_frames(raw)
        except InvalidInput as exc:  # the appliance's answer, not the caller's input
            raise self._corrupt(first, f"malformed answer: {exc.fields.get('detail')}") from exc

    def _checked_subs(self, digest: bytes, frame: tuple[bytes, bytes] | None) -> list[bytes]:
        """The block digests in a subs frame, if they are the ones ``digest`` names."""
        if frame is None or frame[0] != digest:
            raise self._corrupt(digest, "answer out of order or incomplete")
        try:
            length, subs = decode_subs(frame[1])
        except InvalidInput as exc:
            raise self._corrupt(digest, "malformed block digest list") from exc
        if len(subs) != -(-length // SUB_BLOCK) or object_id(subs, length) != digest:
            raise self._corrupt(digest, "block digests do not match the chunk id")
        return subs

    def get(self, digest: bytes) -> bytes:
        blob = self.client.request("GET", f"{self.base}/chunks/{digest.hex()}", raw=True)
        with self._count_lock:
            self.bytes_received += len(blob)
        return decode_chunk(blob, digest, self.client.url)

    def sub_digests(self, digest: bytes) -> list[bytes]:
        """The block digests of a chunk, verified against its id."""
        return self.sub_digests_many([digest])[0]

    def sub_digests_many(self, digests: list[bytes]) -> list[list[bytes]]:
        """``sub_digests`` of each of ``digests``, in order, in few requests."""
        out: list[list[bytes]] = []
        for start in range(0, len(digests), SUBS_PER_REQUEST):
            part = digests[start : start + SUBS_PER_REQUEST]
            raw = self._post("subs", {"digests": encode_digests(part)})
            frames = self._frames(raw, part[0])
            out += (self._checked_subs(d, next(frames, None)) for d in part)
            if next(frames, None) is not None:
                raise self._corrupt(part[-1], "answer longer than asked")
        return out

    def read_blocks(self, digest: bytes, indices: list[int]) -> list[bytes]:
        """Blocks ``indices`` of a chunk, each verified."""
        return self.read_blocks_many([(digest, indices)])[0]

    def read_blocks_many(self, wants: list[tuple[bytes, list[int]]]) -> list[list[bytes]]:
        """``read_blocks`` of each (digest, indices), in order, in few requests."""
        out: list[list[bytes]] = [[] for _ in wants]
        for request in _split_wants(wants):
            body = {"chunks": [{"digest": wants[k][0].hex(), "blocks": js} for k, js in request]}
            raw = self._post("blocks", body)
            frames = self._frames(raw, wants[request[0][0]][0])
            for k, indices in request:
                digest = wants[k][0]
                subs = self._checked_subs(digest, next(frames, None))
                for j in indices:
                    frame = next(frames, None)
                    if frame is None:
                        raise self._corrupt(digest, "answer incomplete")
                    if not 0 <= j < len(subs) or frame[0] != subs[j]:
                        raise self._corrupt(digest, f"block {j} not the one asked for")
                    if hash_block(frame[1]) != subs[j]:
                        raise self._corrupt(digest, f"block {j} does not match its digest")
                    out[k].append(frame[1])
            if next(frames, None) is not None:
                raise self._corrupt(wants[request[-1][0]][0], "answer longer than asked")
        return out


def _split_wants(wants: list[tuple[bytes, list[int]]]) -> Iterator[list[tuple[int, list[int]]]]:
    """Cut (digest, indices) asks into requests within the endpoint's limits: each request is
    a list of (position in ``wants``, indices); a long index list is spread over several."""
    request: list[tuple[int, list[int]]] = []
    blocks = 0
    for k, (_, indices) in enumerate(wants):
        if not indices:
            continue
        pos = 0
        while pos < len(indices):
            if blocks == BLOCKS_PER_REQUEST or len(request) == SUBS_PER_REQUEST:
                yield request
                request, blocks = [], 0
            take = indices[pos : pos + BLOCKS_PER_REQUEST - blocks]
            request.append((k, take))
            blocks += len(take)
            pos += len(take)
    if request:
        yield request
