"""Peer routes: pairing (admin, ``/api/v1/peers``) and replication (peer role,
``/api/v1/peer/…``). Thin: parse, call the operation, answer."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from tandem.appliance.auth import Caller
from tandem.appliance.schemas import Body, ImageOut, JobAnswer, JobOut
from tandem.catalog.models import Peer
from tandem.errors import Forbidden
from tandem.operations import failback, monitor, peers, replica_failback, replicate, syncback
from tandem.operations.site import Site


class PairIn(Body):
    url: str = Field(min_length=8, max_length=2048)
    token: str = Field(min_length=1, max_length=512)
    fingerprint: str = Field(min_length=64, max_length=128)
    bandwidth: int | None = Field(default=None, ge=0, description="bytes per second, 0: no cap")


class AcceptIn(Body):
    name: str = Field(min_length=1, max_length=64)
    url: str = Field(min_length=8, max_length=2048)
    token: str = Field(min_length=1, max_length=512)
    fingerprint: str = Field(min_length=64, max_length=128)


class PeerOut(BaseModel):
    name: str
    url: str
    fingerprint: str

    @classmethod
    def of(cls, peer: Peer) -> PeerOut:
        return cls(name=peer.name, url=peer.url, fingerprint=peer.fingerprint)


class ReplicationIn(Body):
    app: dict[str, Any]
    image: dict[str, Any]
    epoch: int = Field(ge=1)
    keep: int | None = Field(default=None, ge=1)


class SyncbackOpenIn(Body):
    app: str = Field(min_length=1, max_length=64)
    image: dict[str, Any]
    bases: list[str] = Field(default_factory=list, max_length=8)
    epoch: int = Field(ge=1)


class CommandIn(Body):
    which: str = Field(pattern="^(stop|start)$")


class ApplyIn(Body):
    image: str = Field(min_length=1, max_length=64)
    host: str | None = Field(default=None, max_length=64)
    path: str | None = Field(default=None, max_length=4096)


class ResumeIn(Body):
    epoch: int = Field(ge=1)


class CommitIn(Body):
    token: str = Field(min_length=1, max_length=512)


def _peer_name(who: Any) -> str:
    """The peer a peer token belongs to (its name is ``peer-NAME``)."""
    name = str(who.name)
    if not name.startswith("peer-"):
        raise Forbidden(role=str(who.role), action="replicate", needed="peer")
    return name.removeprefix("peer-")


def make_router(site: Site) -> APIRouter:
    router = APIRouter()

    @router.post("/peers", tags=["peers"], status_code=status.HTTP_201_CREATED)
    def pair(body: PairIn) -> PeerOut:
        return PeerOut.of(
            peers.pair(
                site,
                url=body.url,
                token=body.token,
                fingerprint=body.fingerprint,
                bandwidth=body.bandwidth,
            )
        )

    @router.post("/peers/accept", tags=["peers"])
    def accept(body: AcceptIn) -> dict[str, Any]:
        return peers.accept(
            site, name=body.name, url=body.url, fingerprint=body.fingerprint, token=body.token
        )

    @router.get("/peers", tags=["peers"])
    def list_peers() -> list[PeerOut]:
        return [PeerOut.of(p) for p in peers.list_peers(site)]

    @router.delete("/peers/{name}", tags=["peers"])
    def remove_peer(name: str) -> dict[str, str]:
        peers.remove_peer(site, name=name)
        return {"deleted": name}

    @router.post("/apps/{name}/replicate", tags=["operations"], status_code=202)
    def replicate_app(name: str, who: Caller) -> JobAnswer:
        return JobAnswer(job=JobOut.of(replicate.submit_replicate(site, app=name, actor=who.name)))

    # --- the calls the other site's appliance makes (peer token) ------------------------

    @router.get("/peer/apps/{name}/replicas", tags=["replication"])
    def replicas(name: str) -> dict[str, Any]:
        return replicate.replicas_held(site, app=name)

    @router.post("/peer/replications", tags=["replication"])
    def open_replication(body: ReplicationIn, who: Caller) -> dict[str, Any]:
        return replicate.open_replication(
            site,
            peer=_peer_name(who),
            app=body.app,
            image=body.image,
            epoch=body.epoch,
            keep=body.keep,
        )

    @router.post("/peer/replications/{sid}/commit", tags=["replication"])
    def commit_replication(sid: str, body: CommitIn, who: Caller) -> ImageOut:
        return ImageOut.of(
            replicate.commit_replication(site, peer=_peer_name(who), sid=sid, token=body.token)
        )

    @router.post("/peer/syncbacks", tags=["replication"])
    def open_syncback(body: SyncbackOpenIn, who: Caller) -> dict[str, Any]:
        return syncback.open_syncback(
            site,
            peer=_peer_name(who),
            app=body.app,
            image=body.image,
            bases=body.bases,
            epoch=body.epoch,
        )

    @router.post("/peer/syncbacks/{sid}/commit", tags=["replication"])
    def commit_syncback(sid: str, body: CommitIn, who: Caller) -> ImageOut:
        return ImageOut.of(
            syncback.commit_syncback(site, peer=_peer_name(who), sid=sid, token=body.token)
        )

    @router.get("/peer/apps/{name}/restored", tags=["replication"])
    def restored(name: str, who: Caller) -> dict[str, Any]:
        _peer_name(who)
        return failback.last_restored(site, app=name)

    @router.post("/peer/apps/{name}/resume", tags=["replication"])
    def resume(name: str, body: ResumeIn, who: Caller) -> dict[str, Any]:
        return failback.resume_mirroring(site, peer=_peer_name(who), app=name, epoch=body.epoch)

    @router.post("/peer/apps/{name}/command", tags=["replication"])
    def command(name: str, body: CommandIn, who: Caller) -> dict[str, Any]:
        _peer_name(who)
        return replica_failback.production_command(site, app=name, which=body.which)

    @router.post("/peer/apps/{name}/apply", tags=["replication"], status_code=202)
    def apply(name: str, body: ApplyIn, who: Caller) -> JobAnswer:
        job = replica_failback.production_apply(
            site, peer=_peer_name(who), app=name, image=body.image, host=body.host, path=body.path
        )
        return JobAnswer(job=JobOut.of(job))

    @router.get("/peer/jobs/{job_id}", tags=["replication"])
    def peer_job(job_id: str, who: Caller) -> JobOut:
        _peer_name(who)
        return JobOut.of(monitor.get_job(site, job_id=job_id))

    return router
