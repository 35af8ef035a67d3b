"""Chunk transfer routes: agents and peers send and fetch chunks through a job's session.

Authenticated by the session's own token (not an operator token): a session is scoped to
one job and ends with it.
"""

# No ``from __future__ import annotations`` here: the routes' parameter types refer to
# names local to ``make_router``, which FastAPI can only see as evaluated annotations.

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from tandem.errors import InvalidInput, Unauthorized
from tandem.operations.sessions import Session, SessionRegistry
from tandem.storage.digest import from_hex
from tandem.transport.wire import decode_digests, encode_digests, encode_frames

OCTETS = "application/octet-stream"
MAX_BATCH = 256 * 1024 * 1024


def _digest(text: str) -> bytes:
    try:
        return from_hex(text)
    except ValueError as exc:
        raise InvalidInput(detail=f"not a 64-hex-digit digest: {text[:80]!r}") from exc


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
    def missing(s: S, body: dict[str, list[str]]) -> dict[str, Any]:
        digests = decode_digests(body.get("digests", []))
        return {"missing": encode_digests(registry.missing(s, digests))}

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
        return _sent(s, b"".join(registry.pool.sub_digests(_digest(cid))))

    @router.get("/chunks/{cid}/blocks")
    def get_blocks(s: S, cid: str, i: Annotated[str, Query(pattern=r"^\d+(,\d+)*$")]) -> Response:
        digest = _digest(cid)
        indices = [int(x) for x in i.split(",")]
        subs = registry.pool.sub_digests(digest)
        if any(j >= len(subs) for j in indices):
            raise InvalidInput(detail=f"block index out of range (chunk has {len(subs)})")
        blocks = registry.pool.read_blocks(digest, indices)
        return _sent(s, encode_frames((subs[j], b) for j, b in zip(indices, blocks, strict=True)))

    return router
