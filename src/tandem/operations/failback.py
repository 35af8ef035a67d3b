"""Failback in the snapshot-replication style (SPEC §4 step 5), on the DR appliance.

Once the latest syncback was restored to production (and the app runs there again):
1. The failover, test-failover and syncback images left here are withdrawn from their
   hosts and deleted — except that the newest syncback becomes a ``replica``: it is
   exactly what production was restored from, so the next replication is incremental
   against it (nothing written at the DR site crosses the wire again).
2. The app returns to ``managed`` here, and production is told the writer epoch of the
   failover so that its replications are accepted again (fencing kept them out while the
   DR copy was the writer). Mirroring resumes local → remote.

Refused, unless forced, when the DR copy holds anything production lacks, since the
failback discards the copy:
- before any syncback exists (the guard of the lifecycle table says so);
- while production has not restored the newest syncback (asked of production);
- when the DR copy changed since that syncback (``syncback.dr_copy_changes``: a volume's
  "written since the last capture" bitmap, a tree captured again and compared). A volume's
  overlay is frozen for the check, so no write can slip in between the check and the end.

Crash safety: once the checks passed, the presented images are marked ``deleting`` in the
catalog before anything is withdrawn. A failback that was interrupted (a kill -9 of this
appliance) is run again: it sees the mark, skips the checks (they passed, and the copy
may be half gone by now) and finishes withdrawing. A copy marked ``deleting`` is never
exported again at start-up, so nothing can write to it meanwhile. Production is told the
epoch before this appliance records ``managed``: an interrupted failback can always be
run again, and production has the epoch once it is ``managed`` here.

Production unreachable (a forced failback during an outage): the failback still ends, and
the epoch production has not been told is kept here as a pending *hand-back*
(``HANDBACK_KEY``, committed with ``managed``). The scheduler delivers it once production
answers (``deliver_handbacks``), so production's replications are accepted again without
an operator; it is dropped if the app fails over again first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tandem.catalog import queries as q
from tandem.catalog.models import App, Host, Image, Job
from tandem.domain.images import ImageKind, ImageState
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppFacts, AppKind, AppState, Operation, check_transition
from tandem.errors import Conflict, NotFound, SyncbackNotRestored, TandemError, UnsyncedWrites
from tandem.jobs.queue import submit_job
from tandem.jobs.runner import JobContext
from tandem.operations import peers, present, wal
from tandem.operations.jobparams import ForceParams
from tandem.operations.site import Site
from tandem.operations.spec import Spec
from tandem.operations.syncback import dr_copy_changes, failover_image, syncbacks_since_failover
from tandem.storage.overlay import Overlay
from tandem.transport.api import FailbackIn
from tandem.transport.peer import FailedOver, Location, Restored, Resumed

TYPE = "failback"
Params = ForceParams


def _facts(site: Site, app: str, force: bool) -> AppFacts:
    count = syncbacks_since_failover(site, app)
    return AppFacts(syncbacks_since_failover=max(count, 1 if force else 0))


def submit_failback(site: Site, *, app: str, force: bool = False, actor: str | None = None) -> Job:
    with site.catalog.begin() as session:
        row = q.get_app(session, name=app)
        check_transition(row.name, row.state, Operation.FAILBACK, _facts(site, app, force))
        newest = q.latest_image(session, app=app, kind=ImageKind.SYNCBACK)
    if not force and newest is not None and not withdrawing(site, app):
        _check_restored_at_production(site, app, newest.id)
        if row.kind in (AppKind.VOLUME, AppKind.VM):  # cheap here; a tree: by the job
            _check_unchanged(site, None, row, newest, Operation.FAILBACK, freeze=False)
    with site.catalog.begin() as session:
        job = submit_job(
            session,
            type=TYPE,
            app=app,
            params=Params(force=force).stored(),
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
        restored = remote.restored(app).image
    if restored != syncback:
        raise SyncbackNotRestored(
            peer=peer.name, syncback=syncback, app=app, restored=restored or "none"
        )


def _syncback_fix(app: str) -> str:
    return (
        f"Stop the app at the DR site, run `tandem syncback {app}`, restore that syncback at "
        "production, then fail back; or fail back with --force to discard them"
    )


def _check_unchanged(
    site: Site,
    ctx: JobContext | None,
    app: App,
    reference: Image,
    operation: Operation,
    *,
    freeze: bool,
    fix: str | None = None,
) -> Overlay | None:
    """Refuse (``UnsyncedWrites``) when the DR copy changed since ``reference``. With
    ``freeze``, a volume's overlay is left frozen when the check passes (returned; thaw it
    if the operation does not go on) so that no write lands between check and discard."""
    overlay = None
    if app.kind in (AppKind.VOLUME, AppKind.VM) and freeze:
        overlay = site.overlays.get(failover_image(site, app.name).id)
        if overlay is not None and overlay.frozen:
            overlay = None  # frozen already (a pending replica-style failback): stays so
        if overlay is not None:
            overlay.freeze()
    try:
        changes = dr_copy_changes(site, ctx, app, reference)
        if changes is not None:
            raise UnsyncedWrites(
                app=app.name,
                image=reference.id,
                changes=changes,
                operation=operation.value,
                fix=fix or _syncback_fix(app.name),
            )
    except BaseException:
        if overlay is not None:
            overlay.thaw()
        raise
    return overlay


def withdrawing(site: Site, app: str) -> bool:
    """Whether a failback of ``app`` passed its checks and began withdrawing the DR copy
    (then was interrupted): running it again only finishes the clean-up."""
    with site.catalog.read() as session:
        return any(
            i.state is ImageState.DELETING
            for i in q.list_images(session, app=app, kind=ImageKind.FAILOVER)
        )


def mark_withdrawing(site: Site, app: str) -> None:
    """The point of no return: the presented images of ``app`` are to be withdrawn. Their
    presentation fields stay (the clean-up needs them); start-up no longer exports them."""
    with site.catalog.begin() as session:
        for kind in (ImageKind.FAILOVER, ImageKind.TEST_FAILOVER):
            for row in q.list_images(session, app=app, kind=kind):
                if row.state is ImageState.MOUNTED:
                    row.state = ImageState.DELETING


@contextlib.contextmanager
def checked_discard(
    site: Site,
    ctx: JobContext,
    app: App,
    reference: Image | None,
    operation: Operation,
    *,
    fix: str | None = None,
) -> Iterator[None]:
    """Check that the DR copy equals ``reference`` (None: forced, no check), then mark the
    presented images for withdrawal; the overlay stays frozen from the check on. An
    interrupted earlier run that got past the mark is simply resumed."""
    if withdrawing(site, app.name):
        ctx.log("an earlier run began withdrawing the DR copy: finishing it")
        yield
        return
    overlay = None
    if reference is not None:
        overlay = _check_unchanged(site, ctx, app, reference, operation, freeze=True, fix=fix)
        ctx.log(f"the DR copy is unchanged since {reference.id}")
    try:
        mark_withdrawing(site, app.name)
    except BaseException:
        if overlay is not None:
            overlay.thaw()
        raise
    ctx.log("withdrawing the DR copy")
    yield


DOWNTIME_KEY = "failback_downtime:{app}"
HANDBACK_KEY = "handback:{app_id}"  # the writer epoch production still has to be told


def record_downtime(site: Site, *, app: str, seconds: float) -> None:
    """Keep the app's latest failback downtime (shown by `tandem apps`)."""
    with site.catalog.begin() as session:
        q.set_setting(session, key=DOWNTIME_KEY.format(app=app)[:64], value=f"{seconds:.3f}")


def downtimes(site: Site) -> dict[str, float]:
    """Latest failback downtime per app, in seconds (one query)."""
    with site.catalog.read() as session:
        stored = q.app_settings(session, prefix=DOWNTIME_KEY.format(app=""))
    return {name: float(value) for name, value in stored.items()}


def last_restored(site: Site, *, peer: str, app: str) -> Restored:
    """Production side: the image the newest successful restore of ``app`` (mirrored to
    ``peer``) wrote."""
    with site.catalog.read() as session:
        peers.mirrored_app(session, peer=peer, app=app, action="read the last restore of")
        for job in q.list_jobs(session, app=app, limit=200):
            if job.type == "restore" and job.status is JobStatus.SUCCEEDED:
                return Restored(image=job.image)
    return Restored(image=None)


def run_failback(site: Site, ctx: JobContext, params: Params) -> dict[str, Any]:
    name = ctx.job.app or ""
    force = params.force
    with site.catalog.read() as session:
        app = q.get_app(session, name=name)
        newest = q.latest_image(session, app=name, kind=ImageKind.SYNCBACK)
    facts = _facts(site, name, force)
    check_transition(app.name, app.state, Operation.FAILBACK, facts)
    reference = None if force else newest
    if reference is not None and not withdrawing(site, name):
        _check_restored_at_production(site, name, reference.id)
    with checked_discard(site, ctx, app, reference, Operation.FAILBACK):
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
        if image.kind is ImageKind.FAILOVER:
            wal.failover_ends(site, ctx, name, image)
        if image.state in (ImageState.MOUNTED, ImageState.DELETING):
            _withdraw(site, ctx, image, hosts.get(image.mounted_host or ""))
        removed.append(image.id)
    keep = syncbacks[0] if syncbacks else None
    with site.catalog.read() as session:
        epoch = q.get_app(session, name=name).writer_epoch  # no fencing step follows
    told = _tell_production(site, ctx, name, epoch)
    with site.catalog.begin() as session:
        app_id = q.get_app(session, name=name).id
        q.set_setting(
            session, key=HANDBACK_KEY.format(app_id=app_id), value="" if told else str(epoch)
        )
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
    ctx.log(f"deleted {', '.join(removed) or 'no images'} (space freed by the next collection)")
    peer = peers.the_peer(site)
    ctx.set_message(
        f"{name} failed back: {len(removed)} image(s) removed"
        + (f", {keep.id} kept as the replica to mirror against" if keep else "")
        + (f"; {peer.name} resumes mirroring" if told and peer is not None else "")
        + (
            f"; {peer.name} will be told to resume mirroring once it answers"
            if not told and peer is not None
            else ""
        )
    )
    return {"removed": removed, "replica": keep.id if keep else None, "epoch": epoch}


def _withdraw(site: Site, ctx: JobContext, image: Image, host: Host | None) -> None:
    """Withdraw ``image``; of one an interrupted run was withdrawing, what is gone is gone."""
    try:
        present.withdraw(site, image, host)
    except NotFound:
        if image.state is not ImageState.DELETING:
            raise
        ctx.log(f"{image.id} was no longer on host {image.mounted_host}")
        present.withdraw(site, image, None)  # the export and overlay, if any are left


def _tell_production(site: Site, ctx: JobContext, name: str, epoch: int) -> bool:
    """Give production the writer epoch so that its replications are accepted again.
    Done before ``managed`` is recorded here: until then a failback can be run again."""
    peer = peers.the_peer(site)
    if peer is None:
        return False
    try:
        _resume_at(site, peer, name, epoch)
    except TandemError as exc:
        ctx.log(
            f"could not tell {peer.name} to resume mirroring ({exc.message}); this appliance "
            f"keeps trying: until {peer.name} has writer epoch {epoch}, its replications "
            "are refused as stale",
            level="warning",
        )
        return False
    return True


def _resume_at(site: Site, peer: Any, name: str, epoch: int) -> None:
    with peers.client_for(peer) as remote:
        resumed = remote.resume(name, epoch)
    if resumed.location is not None:  # shown here, never acted on (a mirror record)
        with site.catalog.begin() as session:
            row = q.get_app(session, name=name, for_update=True)
            if row.origin == peer.name:
                row.host, row.path = resumed.location.host, resumed.location.path


def pending_handbacks(site: Site) -> dict[str, int]:
    """App name -> the writer epoch production has not been told since a failback."""
    with site.catalog.read() as session:  # one query, not one per app (at every retry)
        stored = q.app_settings(session, prefix=HANDBACK_KEY.format(app_id=""), by_id=True)
    return {name: int(value) for name, value in stored.items() if value}


def deliver_handbacks(site: Site) -> list[str]:
    """Tell production the epochs failbacks could not hand back (it was unreachable);
    returns the apps now handed back. One still failing stays pending; one whose app is no
    longer ``managed`` here (it failed over again) is dropped."""
    pending = pending_handbacks(site)
    peer = peers.the_peer(site)
    if not pending or peer is None:
        return []
    delivered = []
    for name, epoch in pending.items():
        with site.catalog.read() as session:
            app = q.get_app(session, name=name)
        if app.state is AppState.MANAGED:
            try:
                _resume_at(site, peer, name, epoch)
            except TandemError:
                continue
            delivered.append(name)
        with site.catalog.begin() as session:
            q.set_setting(session, key=HANDBACK_KEY.format(app_id=app.id), value="")
    return delivered


def resume_mirroring(site: Site, *, peer: str, app: str, epoch: int) -> Resumed:
    """Production side: adopt the DR site's epoch after a failback; mirroring resumes (an
    app this site does not mirror to the peer is answered as unknown and left alone). A
    replica-style failback's agreement ends here: the placeholder app registered at its
    target (the app took its identity) is merged into the app and removed."""
    merged = None
    with site.catalog.begin() as session:
        try:
            row = q.get_app(session, name=app, for_update=True)
        except NotFound:
            return Resumed(app=app, epoch=epoch, known=False)
        if row.origin is not None:
            return Resumed(app=app, epoch=row.writer_epoch, known=True)
        if not peers.is_mirrored(session, row):  # none of the peer's business: unchanged
            return Resumed(app=app, epoch=epoch, known=False)
        if epoch > row.writer_epoch:
            q.set_writer_epoch(session, name=app, epoch=epoch)
        row.peer_active = False
        doc = peers.agreement(session, app_id=row.id)
        if doc is not None:
            peers.set_agreement(session, app_id=row.id, doc=None)
            if doc.get("previous") and doc.get("target_app"):
                merged = str(doc["target_app"])
        location = Location(host=row.host, path=row.path)
        epoch = max(epoch, row.writer_epoch)
    if merged is not None:
        with contextlib.suppress(TandemError), site.catalog.begin() as session:
            q.remove_app(session, name=merged)  # kept if it has images or a template
    site.wake()
    return Resumed(app=app, epoch=epoch, known=True, location=location)


def failed_over_at_peer(site: Site, *, peer: str, app: str, epoch: int) -> FailedOver:
    """Production side: the peer failed ``app`` over; its copy is the writer. Mirroring of
    it stops until a failback hands the epoch back."""
    with site.catalog.begin() as session:
        row = peers.mirrored_app(session, peer=peer, app=app, action="have failed over")
        if epoch <= row.writer_epoch:
            raise Conflict(
                detail=f"a failover of {app!r} raises its writer epoch above {row.writer_epoch}; "
                f"{peer!r} sent {epoch}"
            )
        row.peer_active = True
    return FailedOver(app=app, peer_active=True)


def submit(site: Site, app: str, body: FailbackIn | None, actor: str | None = None) -> Job:
    """``submit_failback`` from the API's request (snapshot style: no ``target``)."""
    return submit_failback(site, app=app, force=body.force if body else False, actor=actor)


SPEC = Spec(
    name="failback",
    job_type=TYPE,
    params=Params,
    run=run_failback,
    route="POST /apps/{name}/failback",
    submit=submit,
    subject="app",
    lifecycle=Operation.FAILBACK,
    request=FailbackIn,
    title="Failback (snapshot style)",
    danger=True,
)
