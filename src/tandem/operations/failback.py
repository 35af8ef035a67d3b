"""Failback in the snapshot-replication style (SPEC §4 step 5), on the DR appliance.

Once the latest syncback was restored to production (and the app runs there again):
1. The failover, test-failover and syncback images left here are withdrawn from their
   hosts and deleted — except that the newest syncback becomes a ``replica``: it is
   exactly what production was restored from, so the next replication is incremental
   against it (nothing written at the DR site crosses the wire again).
2. The app returns to ``managed`` here, and production is told the writer epoch of the
   failover so that its replications are accepted again (fencing kept them out while the
   DR copy was the writer). Mirroring resumes local → remote.

Refused before any syncback exists (data written at the DR site would be lost) unless
forced; the guard of the lifecycle table says so.
"""

from __future__ import annotations

import contextlib
from typing import Any

from tandem.catalog import queries as q
from tandem.catalog.models import Job
from tandem.domain.images import ImageKind, ImageState
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppFacts, Operation, check_transition
from tandem.errors import Conflict, NotFound, TandemError
from tandem.jobs.queue import submit_job
from tandem.jobs.runner import JobContext
from tandem.operations import images, peers, present
from tandem.operations.site import Site
from tandem.operations.syncback import syncbacks_since_failover

TYPE = "failback"


def _facts(site: Site, app: str, force: bool) -> AppFacts:
    count = syncbacks_since_failover(site, app)
    return AppFacts(syncbacks_since_failover=max(count, 1 if force else 0))


def submit_failback(site: Site, *, app: str, force: bool = False, actor: str | None = None) -> Job:
    with site.catalog.begin() as session:
        row = q.get_app(session, name=app)
        check_transition(row.name, row.state, Operation.FAILBACK, _facts(site, app, force))
        newest = q.latest_image(session, app=app, kind=ImageKind.SYNCBACK)
    if not force and newest is not None:
        _check_restored_at_production(site, app, newest.id)
    with site.catalog.begin() as session:
        job = submit_job(
            session,
            type=TYPE,
            app=app,
            params={"force": force},
            lifecycle=True,
            actor=actor,
        )
    site.wake()
    return job


def _check_restored_at_production(site: Site, app: str, syncback: str) -> None:
    """Refuse to fail back while production has not restored the newest syncback: the
    failback deletes the DR copy, and what only it holds would be lost."""
    peer = peers.require_peer(site)
    with peers.client_for(peer) as remote:
        restored = remote.get(f"/api/v1/peer/apps/{app}/restored").get("image")
    if restored != syncback:
        raise Conflict(
            detail=f"production ({peer.name}) has not restored the newest syncback {syncback} "
            f"of {app!r} (its last restore: {restored or 'none'}); restore it there first "
            f"(`tandem restore {app} --image {syncback} --confirm ...` on {peer.name}), "
            "or fail back with --force to drop what only the DR copy holds"
        )


DOWNTIME_KEY = "failback_downtime:{app}"


def record_downtime(site: Site, *, app: str, seconds: float) -> None:
    """Keep the app's latest failback downtime (shown by `tandem apps`)."""
    with site.catalog.begin() as session:
        q.set_setting(session, key=DOWNTIME_KEY.format(app=app)[:64], value=f"{seconds:.3f}")


def downtimes(site: Site) -> dict[str, float]:
    """Latest failback downtime per app, in seconds."""
    out: dict[str, float] = {}
    with site.catalog.read() as session:
        for app in q.list_apps(session):
            value = q.get_setting(session, key=DOWNTIME_KEY.format(app=app.name)[:64])
            if value is not None:
                out[app.name] = float(value)
    return out


def last_restored(site: Site, *, app: str) -> dict[str, Any]:
    """Production side: the image the app's newest successful restore wrote."""
    with site.catalog.read() as session:
        for job in q.list_jobs(session, app=app, limit=200):
            if job.type == "restore" and job.status is JobStatus.SUCCEEDED:
                return {"image": job.image}
    return {"image": None}


def run_failback(site: Site, ctx: JobContext) -> dict[str, Any]:
    name = ctx.job.app or ""
    force = bool(ctx.job.params.get("force"))
    with site.catalog.read() as session:
        app = q.get_app(session, name=name)
    facts = _facts(site, name, force)
    check_transition(app.name, app.state, Operation.FAILBACK, facts)
    return clean_up_and_resume(site, ctx, name, Operation.FAILBACK, facts)


def clean_up_and_resume(
    site: Site,
    ctx: JobContext,
    name: str,
    operation: Operation,
    facts: AppFacts | None = None,
) -> dict[str, Any]:
    """The end of a failback (snapshot style, or a committed replica-style one): withdraw
    and delete the DR images, keep the newest syncback as the replica, return to managed,
    and tell production the epoch so that mirroring resumes."""
    with site.catalog.read() as session:
        presented = [
            i
            for kind in (ImageKind.FAILOVER, ImageKind.TEST_FAILOVER)
            for i in q.list_images(session, app=name, kind=kind)
        ]
        syncbacks = q.list_images(session, app=name, kind=ImageKind.SYNCBACK)
        hosts = {h.name: h for h in q.list_hosts(session)}
    removed: list[str] = []
    for image in presented:
        if image.state is ImageState.MOUNTED:
            present.withdraw(site, image, hosts.get(image.mounted_host or ""))
        removed.append(image.id)
    keep = syncbacks[0] if syncbacks else None
    with site.catalog.begin() as session:
        for image_id in removed:
            q.delete_image(session, image_id=image_id)
        for image in syncbacks[1:]:
            q.delete_image(session, image_id=image.id)
            removed.append(image.id)
        if keep is not None:
            row = q.get_image(session, image_id=keep.id)
            row.kind = ImageKind.REPLICA  # what production was restored from: the new base
            row.parent_id = None
            row.protective = False
        step = q.record_transition(
            session,
            app=name,
            operation=operation,
            actor=ctx.job.actor,
            job=ctx.job.id,
            facts=facts,
        )
        epoch = step.epoch
    ctx.log(f"deleted {', '.join(removed) or 'no images'}")
    with contextlib.suppress(TandemError):
        images.collect_garbage(site, ctx)
    peer = peers.the_peer(site)
    told = False
    if peer is not None:
        try:
            with peers.client_for(peer) as remote:
                remote.post(f"/api/v1/peer/apps/{name}/resume", {"epoch": epoch})
            told = True
        except TandemError as exc:
            ctx.log(
                f"could not tell {peer.name} to resume mirroring ({exc.message}); "
                "it will be refused until it learns the epoch: run failback again",
                level="warning",
            )
    ctx.set_message(
        f"{name} failed back: {len(removed)} image(s) removed"
        + (f", {keep.id} kept as the replica to mirror against" if keep else "")
        + (f"; {peer.name} resumes mirroring" if told and peer is not None else "")
    )
    return {"removed": removed, "replica": keep.id if keep else None, "epoch": epoch}


def resume_mirroring(site: Site, *, peer: str, app: str, epoch: int) -> dict[str, Any]:
    """Production side: adopt the DR site's epoch after a failback; mirroring resumes."""
    with site.catalog.begin() as session:
        try:
            row = q.get_app(session, name=app, for_update=True)
        except NotFound:
            return {"app": app, "epoch": epoch, "known": False}
        if row.origin is not None:
            return {"app": app, "epoch": row.writer_epoch, "known": True}
        if epoch > row.writer_epoch:
            q.set_writer_epoch(session, name=app, epoch=epoch)
    site.wake()
    return {"app": app, "epoch": epoch, "known": True, "peer": peer}
