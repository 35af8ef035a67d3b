"""Peer routes: pairing (admin, ``/api/v1/peers``) and the calls of the other site's
appliance (peer role, ``/api/v1/peer/…``). Thin: parse, call the operation, answer.

The peer calls take and answer the models of ``transport.peer`` (unknown fields refused)
and are made by the peer's token only: it is a peer, not an admin.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, status

from tandem.appliance.auth import Caller, Principal
from tandem.appliance.documents import job_out
from tandem.appliance.params import JobId, Name
from tandem.catalog.models import Job
from tandem.domain.rules import Role
from tandem.errors import Forbidden, NotFound
from tandem.operations import (
    failback,
    monitor,
    peers,
    replica_failback,
    replicate,
    syncback,
    wal,
)
from tandem.operations.site import Site
from tandem.transport.api import AcceptIn, JobAnswer, PairIn, PeerOut
from tandem.transport.peer import (
    SESSION_PATTERN,
    Apply,
    Command,
    CommandRan,
    Commit,
    Committed,
    Epoch,
    FailbackAgreed,
    FailbackCheck,
    FailedOver,
    Opened,
    PeerJob,
    ReplicasHeld,
    ReplicationOpen,
    Restored,
    Resumed,
    SyncbackCommit,
    SyncbackOpen,
    Undone,
    WalHeld,
    WalPush,
    Wire,
)


def _peer_name(who: Principal) -> str:
    """The peer a peer token belongs to (its name is ``peer-NAME``); any other caller,
    admin included, is not a peer and makes none of the peer calls."""
    name = str(who.name)
    if who.role is not Role.PEER or not name.startswith("peer-"):
        raise Forbidden(role=str(who.role), action="make the calls of the peer site", needed="peer")
    return name.removeprefix("peer-")


def peer_caller(who: Caller) -> str:
    return _peer_name(who)


PeerName = Annotated[str, Depends(peer_caller)]
"""The name of the peer making the call (refused for any other token)."""
SessionName = Annotated[str, Path(pattern=SESSION_PATTERN)]


def _peer_job(job: Job) -> PeerJob:
    return PeerJob(id=job.id, status=job.status.value, message=job.message)


def make_router(site: Site) -> APIRouter:
    router = APIRouter()

    def paired(peer: PeerName) -> None:
        peers.check_paired(site, peer=peer)

    # The calls of the other site: its token, and it must be the appliance paired here.
    peer_router = APIRouter(dependencies=[Depends(paired)])

    @router.post("/peers", tags=["peers"], status_code=status.HTTP_201_CREATED)
    def pair(body: PairIn) -> PeerOut:
        return PeerOut.model_validate(
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
        return [PeerOut.model_validate(p) for p in peers.list_peers(site)]

    @router.delete("/peers/{name}", tags=["peers"])
    def remove_peer(name: Name) -> dict[str, str]:
        peers.remove_peer(site, name=name)
        return {"deleted": name}

    @router.post("/apps/{name}/replicate", tags=["operations"], status_code=202)
    def replicate_app(name: Name, who: Caller) -> JobAnswer:
        return JobAnswer(job=job_out(replicate.submit_replicate(site, app=name, actor=who.name)))

    # --- the calls the other site's appliance makes (peer token, ``transport.peer``) -----

    @peer_router.get("/peer/apps/{name}/replicas", tags=["peer"])
    def replicas(name: Name, peer: PeerName) -> ReplicasHeld:
        return replicate.replicas_held(site, peer=peer, app=name)

    @peer_router.post("/peer/replications", tags=["peer"])
    def open_replication(body: ReplicationOpen, peer: PeerName) -> Opened:
        return replicate.open_replication(site, peer=peer, body=body)

    @peer_router.post("/peer/replications/{sid}/commit", tags=["peer"])
    def commit_replication(sid: SessionName, body: Commit, peer: PeerName) -> Committed:
        image = replicate.commit_replication(site, peer=peer, sid=sid, token=body.token)
        return Committed(image=image.id, app=image.app.name)

    @peer_router.post("/peer/apps/{name}/wal", tags=["peer"])
    def push_wal(name: Name, body: WalPush, peer: PeerName) -> WalHeld:
        return wal.receive_push(site, peer=peer, app=name, body=body)

    @peer_router.post("/peer/syncbacks", tags=["peer"])
    def open_syncback(body: SyncbackOpen, peer: PeerName) -> Opened:
        return syncback.open_syncback(site, peer=peer, body=body)

    @peer_router.post("/peer/syncbacks/{sid}/commit", tags=["peer"])
    def commit_syncback(sid: SessionName, body: SyncbackCommit, peer: PeerName) -> Committed:
        image = syncback.commit_syncback(
            site, peer=peer, sid=sid, token=body.token, offer=body.image
        )
        return Committed(image=image.id, app=image.app.name)

    @peer_router.get("/peer/apps/{name}/restored", tags=["peer"])
    def restored(name: Name, peer: PeerName) -> Restored:
        return failback.last_restored(site, peer=peer, app=name)

    @peer_router.post("/peer/apps/{name}/failed-over", tags=["peer"])
    def failed_over(name: Name, body: Epoch, peer: PeerName) -> FailedOver:
        return failback.failed_over_at_peer(site, peer=peer, app=name, epoch=body.epoch)

    @peer_router.post("/peer/apps/{name}/resume", tags=["peer"])
    def resume(name: Name, body: Epoch, peer: PeerName) -> Resumed:
        return failback.resume_mirroring(site, peer=peer, app=name, epoch=body.epoch)

    @peer_router.post("/peer/apps/{name}/failback-check", tags=["peer"])
    def failback_check(name: Name, body: FailbackCheck, peer: PeerName) -> FailbackAgreed:
        return replica_failback.production_failback_check(site, peer=peer, app=name, body=body)

    @peer_router.post("/peer/apps/{name}/command", tags=["peer"])
    def command(name: Name, body: Command, peer: PeerName) -> CommandRan:
        return replica_failback.production_command(
            site, peer=peer, app=name, which=body.which, shutdown_timeout=body.shutdown_timeout
        )

    @peer_router.post("/peer/apps/{name}/apply", tags=["peer"], status_code=202)
    def apply(name: Name, body: Apply, peer: PeerName) -> PeerJob:
        job = replica_failback.production_apply(site, peer=peer, app=name, image=body.image)
        return _peer_job(job)

    @peer_router.post("/peer/apps/{name}/failback-undo", tags=["peer"])
    def failback_undo(name: Name, body: Wire, peer: PeerName) -> Undone:
        return replica_failback.production_undo(site, peer=peer, app=name)

    @peer_router.get("/peer/jobs/{job_id}", tags=["peer"])
    def peer_job(job_id: JobId, peer: PeerName) -> PeerJob:
        job = monitor.get_job(site, job_id=job_id)
        if job.actor != peers.peer_token_name(peer):  # only the jobs it asked for
            raise NotFound(what="job", name=job_id, listing="jobs")
        return _peer_job(job)

    router.include_router(peer_router)
    return router
