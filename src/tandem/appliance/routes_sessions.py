"""Chunk transfer routes: agents and peers send and fetch chunks through a job's session.

Authenticated by the session's own token (not an operator token): a session is scoped to
one job and ends with it.

Batched reads (a restore asks for the block digests and blocks of many chunks at once, so
its round trips grow with the change, not with the number of chunks):

- ``POST /subs`` with ``{"digests": [hex, ...]}`` (at most ``SUBS_PER_REQUEST``) answers,
  in order, one subs frame per chunk (``wire.encode_subs``: its length and block digests).
- ``POST /blocks`` with ``{"chunks": [{"digest": hex, "blocks": [j, ...]}, ...]}`` (at most
  ``SUBS_PER_REQUEST`` chunks and ``BLOCKS_PER_REQUEST`` blocks in all) answers, in order,
  for each chunk its subs frame and then one frame ``block digest | block`` per index asked.

The server checks every header against its chunk id before it answers; the reader checks
again (it trusts no server). A request over the limits, a bad digest or a block index out of
range is refused with 422 saying what to change.
"""

# No ``from __future__ import annotations`` here: the routes' parameter types refer to
# names local to ``make_router``, which FastAPI can only see as evaluated annotations.

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from tandem.errors import InvalidInput, TooManyPerRequest, Unauthorized
from tandem.operations.sessions import Session, SessionRegistry
from tandem.storage.digest import from_hex
from tandem.transport.wire import (
    BLOCK_BYTES_PER_REQUEST,
    BLOCKS_PER_REQUEST,
    SUBS_PER_REQUEST,
    decode_digests,
    encode_digests,
    encode_frames,
    encode_subs,
)

OCTETS = "application/octet-stream"
MAX_BATCH = 256 * 1024 * 1024


class MissingAsk(BaseModel):
    """``POST /missing``: the digests a sender is about to send and, optionally, the length
    of each one's encoding (``sizes``, same order): a chunk whose encoding the pool would
    pack is looked up in the pack index only, without a syscall for a loose file."""

    model_config = ConfigDict(extra="forbid")
    digests: list[str]
    sizes: list[Annotated[int, Field(ge=0)]] | None = None


class SubsAsk(BaseModel):
    model_config = ConfigDict(extra="forbid")
    digests: list[str]


class BlocksOf(BaseModel):
    model_config = ConfigDict(extra="forbid")
    digest: str
    blocks: list[int]


class BlocksAsk(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chunks: list[BlocksOf]


def _digest(text: str) -> bytes:
    try:
        return from_hex(text)
    except ValueError as exc:
        raise InvalidInput(detail=f"not a 64-hex-digit digest: {text[:80]!r}") from exc


def _check_count(n: int, what: str) -> None:
    if n > SUBS_PER_REQUEST:
        raise TooManyPerRequest(
            count=n, what=f"chunks ({what})", limit=f"{SUBS_PER_REQUEST} chunks"
        )


def make_router(registry: SessionRegistry) -> APIRouter:
    router = APIRouter(prefix="/api/v1/sessions/{sid}", tags=["transfer"])

    def session(sid: str, authorization: Annotated[str | None, Header()] = None) -> Session:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized()
        return registry.get(sid, token)

    S = Annotated[Session, Depends(session)]

    def _sent(s: Session, body: bytes) -> Response:
        registry.count_sent(s, len(body))
        return Response(body, media_type=OCTETS)

    @router.post("/missing")
    def missing(s: S, body: MissingAsk) -> dict[str, Any]:
        digests = decode_digests(body.digests)
        if body.sizes is not None and len(body.sizes) != len(digests):
            raise InvalidInput(
                detail=f"{len(body.sizes)} sizes for {len(digests)} digests; give one size per"
                " digest, in the same order, or leave sizes out"
            )
        return {"missing": encode_digests(registry.missing(s, digests, body.sizes))}

    @router.post("/chunks")
    async def chunks(s: S, request: Request) -> dict[str, Any]:
        n = await registry.receive_stream(s, request.stream(), MAX_BATCH)
        return {"stored": n}

    @router.post("/manifest")
    async def manifest(s: S, request: Request) -> dict[str, Any]:
        blob = await request.body()
        mid = await run_in_threadpool(registry.commit, s, blob)
        return {"manifest": mid.hex()}

    @router.get("/manifests/{mid}")
    def get_manifest(s: S, mid: str) -> Response:
        digest = _digest(mid)
        registry.check_readable(s, digest)
        return _sent(s, registry.pool.get_manifest_blob(digest))

    @router.get("/chunks/{cid}")
    def get_chunk(s: S, cid: str) -> Response:
        digest = _digest(cid)
        return _sent(s, registry.pool.get_raw(digest))

    @router.get("/chunks/{cid}/subs")
    def get_subs(s: S, cid: str) -> Response:
        """The block digests of a chunk held here, for an agent to send a change to it as a
        delta: read from the chunk (never ``layout``), so a chunk gone is sent whole."""
        return _sent(s, b"".join(registry.pool.sub_digests(_digest(cid))))

    @router.get("/chunks/{cid}/blocks")
    def get_blocks(s: S, cid: str, i: Annotated[str, Query(pattern=r"^\d+(,\d+)*$")]) -> Response:
        digest = _digest(cid)
        indices = [int(x) for x in i.split(",")]
        subs = registry.layout(s, digest)[1]
        if any(j >= len(subs) for j in indices):
            raise InvalidInput(detail=f"block index out of range (chunk has {len(subs)})")
        blocks = registry.pool.read_blocks(digest, indices)
        return _sent(s, encode_frames((subs[j], b) for j, b in zip(indices, blocks, strict=True)))

    @router.post("/subs")
    def post_subs(s: S, body: SubsAsk) -> Response:
        """The length and block digests of each chunk named, in order (one subs frame each)."""
        _check_count(len(body.digests), "the block digests")
        digests = decode_digests(body.digests)
        layouts = [registry.layout(s, d) for d in digests]
        return _sent(
            s,
            encode_frames(
                (d, encode_subs(*layout)) for d, layout in zip(digests, layouts, strict=True)
            ),
        )

    @router.post("/blocks")
    def post_blocks(s: S, body: BlocksAsk) -> Response:
        """Blocks of several chunks: per chunk, its subs frame, then one frame per block."""
        _check_count(len(body.chunks), "blocks")
        total = sum(len(c.blocks) for c in body.chunks)
        if total > BLOCKS_PER_REQUEST:
            raise TooManyPerRequest(
                count=total,
                what="blocks",
                limit=f"{BLOCKS_PER_REQUEST} blocks ({BLOCK_BYTES_PER_REQUEST >> 20} MiB)",
            )
        digests = decode_digests(c.digest for c in body.chunks)
        layouts = [registry.layout(s, d) for d in digests]
        for d, (_, subs), c in zip(digests, layouts, body.chunks, strict=True):
            bad = [j for j in c.blocks if not 0 <= j < len(subs)]
            if bad:
                raise InvalidInput(
                    detail=f"block index {bad[0]} out of range for chunk {d.hex()}, which has"
                    f" {len(subs)} blocks (indices 0 to {len(subs) - 1})"
                )
        wants = [(d, c.blocks) for d, c in zip(digests, body.chunks, strict=True)]
        blocks = registry.pool.read_blocks_many(wants)
        frames: list[tuple[bytes, bytes]] = []
        for (d, indices), (length, subs), got in zip(wants, layouts, blocks, strict=True):
            frames.append((d, encode_subs(length, subs)))
            frames += ((subs[j], b) for j, b in zip(indices, got, strict=True))
        return _sent(s, encode_frames(frames))

    return router
