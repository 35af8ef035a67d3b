"""Failback in the replica style (SPEC §5), run on the DR appliance, with commit and undo.

``failback --target original|restored|new``, the app failed over here:
1. Production stops the original (its stop command, through the production appliance).
2.–3. The DR copy's state is captured and sent home as a syncback image (only what
   production lacks), then diff-restored onto the target (only differing blocks/files
   are written).
4. The DR copy is stopped (its stop command on the DR host); it stays off until the
   failback is committed or undone.
5. A **protective snapshot** of the DR copy is taken here: its pre-failback state.
6. It is sent and diff-restored again: this catches what was written during step 3.
7. The app goes FAILED_OVER → FAILBACK_PENDING here.
8. ``restored`` / ``new``: production's catalog identity of the app (host and path) is
   replaced by the target's before the data is applied (``new``: a fresh path, written whole).
9. With ``--power-on`` production starts the app on the target.

``commit-failback``: FAILBACK_PENDING → MANAGED; the DR images are cleaned up as in the
snapshot-style failback (the protective snapshot, equal to what production holds, stays as
the replica to mirror against) and production resumes mirroring with the current epoch.
Refused unless forced when the DR copy changed after the protective snapshot (written
though it should be off: a stop command that did not stop everything, or none): production
lacks those writes and the clean-up would discard them (``failback.checked_discard``, which
also makes an interrupted commit resumable).
``undo-failback``: FAILBACK_PENDING → FAILED_OVER (a fencing step: the epoch rises again):
production stops the app, the DR copy is brought back to the protective snapshot exactly
(a tree: a diff-restore that writes only what differs; a volume: the blocks written since
the snapshot are rewritten from it) and started again.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from tandem.catalog import queries as q
from tandem.catalog.models import App, Image, Job
from tandem.domain.hooks import Hook
from tandem.domain.images import ImageKind
from tandem.domain.lifecycle import AppFacts, AppKind, Operation, check_transition
from tandem.errors import InvalidInput, NotFound, StorageError, TandemError
from tandem.jobs.queue import submit_job
from tandem.jobs.runner import JobContext
from tandem.operations import failback, hooks, peers
from tandem.operations.hosts import agent_for
from tandem.operations.site import Site
from tandem.operations.streams import follow
from tandem.operations.syncback import capture_dr_state, failover_image, send_home
from tandem.storage.manifest import VolumeManifest, load_manifest

TYPE = "failback-replica"
COMMIT_TYPE = "commit-failback"
UNDO_TYPE = "undo-failback"
TARGETS = ("original", "restored", "new")
APPLY_TIMEOUT = 3600.0


def submit_replica_failback(
    site: Site,
    *,
    app: str,
    target: str,
    host: str | None = None,
    path: str | None = None,
    power_on: bool = False,
    actor: str | None = None,
) -> Job:
    if target not in TARGETS:
        raise InvalidInput(detail=f"--target is one of {', '.join(TARGETS)}, not {target!r}")
    if target != "original" and not (host and path and path.startswith("/")):
        raise InvalidInput(detail=f"--target {target} needs --host and a full --path")
    peers.require_peer(site)
    with site.catalog.begin() as session:
        row = q.get_app(session, name=app)
        replicas = len(q.list_images(session, app=app, kind=ImageKind.REPLICA))
        check_transition(
            row.name, row.state, Operation.FAILBACK_REPLICA, AppFacts(replica_images=replicas)
        )
        job = submit_job(
            session,
            type=TYPE,
            app=app,
            params={"target": target, "host": host, "path": path, "power_on": power_on},
            lifecycle=True,
            actor=actor,
        )
    failover_image(site, app)
    site.wake()
    return job


def _production_command(site: Site, app: str, which: str) -> dict[str, Any]:
    peer = peers.require_peer(site)
    with peers.client_for(peer) as remote:
        answer: dict[str, Any] = remote.post(f"/api/v1/peer/apps/{app}/command", {"which": which})
    return answer


def _apply_at_production(
    site: Site, ctx: JobContext, app: str, image: Image, params: Mapping[str, Any]
) -> dict[str, Any]:
    """Have production diff-restore ``image`` onto the target; wait for its job."""
    peer = peers.require_peer(site)
    body = {"image": image.id, "host": params.get("host"), "path": params.get("path")}
    with peers.client_for(peer) as remote:
        job = remote.post(f"/api/v1/peer/apps/{app}/apply", body)["job"]
        deadline = time.monotonic() + APPLY_TIMEOUT
        while job["status"] in ("queued", "running"):
            ctx.check_canceled()
            if time.monotonic() > deadline:
                raise TandemError(f"production's restore job {job['id']} did not finish in time")
            time.sleep(0.3)
            job = remote.get(f"/api/v1/peer/jobs/{job['id']}")
    if job["status"] != "succeeded":
        raise TandemError(
            f"production could not apply {image.id} ({job['id']}: {job['message']}); the DR "
            "copy is unchanged - run the failback again or undo it"
        )
    ctx.log(f"production applied {image.id} in job {job['id']}")
    return dict(job)


def _dr_command(site: Site, ctx: JobContext, app: App, which: str) -> None:
    if not hooks.script_for(app, Hook(which)):
        return
    failover = failover_image(site, app.name)
    with site.catalog.read() as session:
        host = q.get_host(session, name=failover.mounted_host or "")
    with agent_for(host) as agent:
        hooks.run_hook(
            agent,
            app,
            Hook(which),
            operation=ctx.job.type,
            image=failover.id,
            path=failover.mount_point,
            nbd_uri=failover.nbd_export,
            ctx=ctx,
        )
    ctx.log(f"{which} command ran on DR host {host.name}")


def run_replica_failback(site: Site, ctx: JobContext) -> dict[str, Any]:
    params = ctx.job.params
    name = ctx.job.app or ""
    with site.catalog.read() as session:
        app = q.get_app(session, name=name)
        replicas = len(q.list_images(session, app=name, kind=ImageKind.REPLICA))
    facts = AppFacts(replica_images=replicas)
    check_transition(app.name, app.state, Operation.FAILBACK_REPLICA, facts)
    # 1. stop the original
    _production_command(site, name, "stop")
    # 2.-3. difference, sent and applied
    first, _ = capture_dr_state(site, ctx, app, kind=ImageKind.SYNCBACK, label="failback 1/2")
    sent = send_home(site, ctx, app, first)
    _apply_at_production(site, ctx, name, first, params)
    # 4. the DR copy stops and stays off until commit or undo
    downtime_from = time.monotonic()
    _dr_command(site, ctx, app, "stop")
    # 5. the protective snapshot, 6. the difference again
    protective, _ = capture_dr_state(
        site, ctx, app, kind=ImageKind.PROTECTIVE, label="failback protective snapshot"
    )
    sent += send_home(site, ctx, app, protective)
    _apply_at_production(site, ctx, name, protective, params)
    # 7. failback pending
    with site.catalog.begin() as session:
        q.record_transition(
            session,
            app=name,
            operation=Operation.FAILBACK_REPLICA,
            actor=ctx.job.actor,
            job=ctx.job.id,
            facts=facts,
        )
    # 9. power on
    if params.get("power_on"):
        _production_command(site, name, "start")
    downtime = time.monotonic() - downtime_from
    failback.record_downtime(site, app=name, seconds=downtime)
    ctx.set_image(protective.id)
    ctx.set_message(
        f"{name} failed back to the {params['target']} app"
        + (" and started" if params.get("power_on") else "")
        + f"; protective snapshot {protective.id}; {sent} bytes moved; downtime {downtime:.1f} s."
        " Commit or undo the failback"
    )
    return {
        "protective": protective.id,
        "bytes_sent": sent,
        "downtime_seconds": downtime,
        "target": params["target"],
    }


def submit_end(
    site: Site, *, app: str, undo: bool, force: bool = False, actor: str | None = None
) -> Job:
    """Queue the commit or undo of a pending failback. ``force`` commits even though the
    DR copy changed after the protective snapshot (those changes are discarded)."""
    op = Operation.UNDO_FAILBACK if undo else Operation.COMMIT_FAILBACK
    with site.catalog.begin() as session:
        row = q.get_app(session, name=app)
        check_transition(row.name, row.state, op, _end_facts(session, app))
        job = submit_job(
            session,
            type=UNDO_TYPE if undo else COMMIT_TYPE,
            app=app,
            params={"force": force} if force else {},
            lifecycle=True,
            actor=actor,
        )
    site.wake()
    return job


def _end_facts(session: Any, app: str) -> AppFacts:
    protective = q.list_images(session, app=app, kind=ImageKind.PROTECTIVE)
    return AppFacts(has_protective_image=bool(protective), syncbacks_since_failover=1)


def _commit_fix(app: str) -> str:
    return (
        "Find what still writes to the DR copy and stop it; then undo the failback "
        f"(`tandem undo-failback {app}`: the DR copy goes back to the protective snapshot, "
        "without those writes) and fail back again, or commit with --force to discard them"
    )


def run_commit(site: Site, ctx: JobContext) -> dict[str, Any]:
    name = ctx.job.app or ""
    force = bool(ctx.job.params.get("force"))
    with site.catalog.read() as session:
        app = q.get_app(session, name=name)
        check_transition(app.name, app.state, Operation.COMMIT_FAILBACK)
        protective = q.latest_image(session, app=name, kind=ImageKind.PROTECTIVE)
    reference = None if force else protective
    with failback.checked_discard(
        site, ctx, app, reference, Operation.COMMIT_FAILBACK, fix=_commit_fix(name)
    ):
        with site.catalog.begin() as session:
            for image in q.list_images(session, app=name, kind=ImageKind.PROTECTIVE):
                image.kind = ImageKind.SYNCBACK  # newest: kept as the replica by the cleanup
        return failback.clean_up_and_resume(site, ctx, name, Operation.COMMIT_FAILBACK)


def run_undo(site: Site, ctx: JobContext) -> dict[str, Any]:
    name = ctx.job.app or ""
    with site.catalog.read() as session:
        app = q.get_app(session, name=name)
        facts = _end_facts(session, name)
        protective = q.latest_image(session, app=name, kind=ImageKind.PROTECTIVE)
    if protective is None:
        raise NotFound(what="protective snapshot of", name=name, listing=f"images {name}")
    check_transition(app.name, app.state, Operation.UNDO_FAILBACK, facts)
    _production_command(site, name, "stop")
    failover = failover_image(site, name)
    if app.kind is AppKind.FILESYSTEM and failover.mount_point:
        _restore_dr_copy(site, ctx, app, failover, protective)
    elif app.kind is AppKind.VOLUME:
        _revert_overlay(site, ctx, failover, protective)
    with site.catalog.begin() as session:
        step = q.record_transition(
            session,
            app=name,
            operation=Operation.UNDO_FAILBACK,
            actor=ctx.job.actor,
            job=ctx.job.id,
            facts=facts,
        )
    _dr_command(site, ctx, app, "start")
    ctx.set_message(
        f"failback of {name} undone: the DR copy is back at protective snapshot "
        f"{protective.id} and runs again (writer epoch {step.epoch})"
    )
    return {"protective": protective.id, "epoch": step.epoch}


def _revert_overlay(site: Site, ctx: JobContext, failover: Image, protective: Image) -> None:
    """Bring the DR volume back to the protective snapshot: the replica should have stayed
    off since, but whatever was written to it after the snapshot is undone here."""
    overlay = site.overlays.get(failover.id)
    if overlay is None:
        raise StorageError(detail=f"the virtual copy of {failover.id} is not open here")
    manifest = load_manifest(site.pool, bytes.fromhex(protective.manifest))
    if not isinstance(manifest, VolumeManifest):
        raise StorageError(detail=f"protective snapshot {protective.id} is not a volume image")
    rewritten = overlay.revert(manifest, bytes.fromhex(protective.manifest))
    if rewritten:
        ctx.log(f"{rewritten} bytes written to the DR copy after {protective.id} were undone")


def _restore_dr_copy(
    site: Site, ctx: JobContext, app: App, failover: Image, protective: Image
) -> None:
    with site.catalog.read() as session:
        host = q.get_host(session, name=failover.mounted_host or "")
    transfer, token = site.sessions.open(
        job_id=ctx.job.id, write=False, readable=[bytes.fromhex(protective.manifest)]
    )
    try:
        body = {
            "kind": app.kind.value,
            "path": failover.mount_point,
            "manifest": protective.manifest,
            "job": ctx.job.id,
            "appliance": site.session_ref(transfer.id, token),
        }
        with agent_for(host) as agent:
            follow(ctx, agent.restore(body), host=host.name, moved=lambda: transfer.bytes_sent)
    finally:
        site.sessions.close(transfer)


# --- production side (peer calls) -------------------------------------------------------


def production_command(site: Site, *, app: str, which: str) -> dict[str, Any]:
    """Run the app's stop or start command on its host (as failback asks)."""
    if which not in ("stop", "start"):
        raise InvalidInput(detail="which is stop or start")
    with site.catalog.read() as session:
        row = q.get_app(session, name=app)
        host = q.get_host(session, name=row.host)
    if not hooks.script_for(row, Hook(which)):
        return {"ran": False}
    with agent_for(host) as agent:
        hooks.run_hook(agent, row, Hook(which), operation="failback", path=row.path)
    return {"ran": True}


def production_apply(
    site: Site, *, peer: str, app: str, image: str, host: str | None, path: str | None
) -> Job:
    """Switch the app's identity to a restored/new target if given, then queue a restore of
    the syncback ``image`` onto it without the app's own commands (failback runs them)."""
    from tandem.domain.rules import RESTORE_CONFIRMATIONS
    from tandem.operations.restore import submit_restore

    if host or path:
        with site.catalog.begin() as session:
            row = q.get_app(session, name=app, for_update=True)
            if host:
                q.get_host(session, name=host)
                row.host = host
            if path:
                row.path = path
    return submit_restore(
        site,
        app=app,
        image=image,
        confirm=list(RESTORE_CONFIRMATIONS),
        actor=f"peer-{peer}",
        commands=False,
    )
