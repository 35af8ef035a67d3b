"""Restore: diff-restore an image onto the production application through its host's agent.

Flow (SPEC §4.4)
1. The server checks both typed confirmations ("DATA LOSS", "OVERWRITE OTHER APPS") and
   the lifecycle before a job exists; a refused request touches nothing.
2. The job runs the app's ``--stop`` hook on the host (a failure ends the job before any
   data is written), then the agent diff-restores from a *read session* (it hashes the
   target and fetches only the 64 KiB blocks that differ), then the ``--start`` hook runs
   (``operations.hooks``: scripts by name, ``TANDEM_APP_PATH`` the app's path).
   The agent refuses while processes hold the app's data (the message names them and the
   fix). A volume untouched since its last capture or restore (``operations.stamps``) is
   restored from that image as a base: only the blocks the two images differ in are read
   and written, so a failback's final restore takes time in proportion to the change.
3. The lifecycle transition (restore) is recorded with the job and its actor.

A catch-up syncback of a PostgreSQL app (a base backup of the database running at the DR
site, ``pg_recovery.rolls_forward``) is rolled forward: after the diff-restore, the host's
agent recovers the cluster in place with the DR copy's WAL that the DR site pushed home
(staged by the appliance as at a DR recovery, ``pg_recovery.recover``) to ``--time`` or
the newest WAL held, promotes it, shuts it down, and the start hook runs; the point reached
(the last replayed commit's time) is the job's ``recovered_to``. Refused before anything is
touched when the WAL held here does not reach the backup's end (``WalNotHome`` names the
first segment missing) or the target is outside what it can reach.

A VM (``vm`` app) is restored by its host's agent in place (``agent.vm.restore``): the job
powers it off itself (graceful shutdown within ``shutdown_timeout`` s, then destroy), the
disks are diff-restored keeping the domain's identity and MACs, its checkpoints are dropped
(change tracking is lost: the next capture reads everything and says why), and ``power_on``
starts it. Hooks run around it as for any app.

Invariants
- The image must belong to the app: an image of another app is refused, never restored.
- When the data transfer fails after the app was stopped, the app is left stopped (starting
  it on half-restored data could make things worse) and the job's message says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from tandem.catalog import queries as q
from tandem.catalog.models import App, Host, Image, Job
from tandem.domain.hooks import Hook
from tandem.domain.images import ImageKind, ImageState
from tandem.domain.lifecycle import AppKind, Operation, check_transition, storage_kind
from tandem.domain.rules import RESTORE_CONFIRMATIONS, check_confirmations
from tandem.errors import (
    ImageBeingDeleted,
    ImageOfOtherApp,
    OptionsDoNotApply,
    PgBaseNeedsRecovery,
    TandemError,
)
from tandem.jobs.queue import submit_job
from tandem.jobs.runner import JobContext
from tandem.operations import failback, hooks, pg_recovery, stamps, wal
from tandem.operations.hosts import agent_for, app_host
from tandem.operations.jobparams import JobParams
from tandem.operations.site import Site
from tandem.operations.spec import Spec
from tandem.operations.streams import follow
from tandem.storage.manifest import VolumeManifest, load_manifest
from tandem.transport.agent import AgentClient
from tandem.transport.agent_api import RestoreRequest, VmRestoreRequest
from tandem.transport.api import RestoreIn, checked

TYPE = "restore"


class Params(JobParams):
    """A restore's job: whether the app's stop and start hooks run (``commands``: not in a
    replica-style failback, which stops and starts the app itself), a catch-up syncback's
    roll forward (to ``time``; none: the latest), and a VM's power-on and shutdown timeout."""

    commands: bool = True
    rollforward: bool = False
    time: str | None = None
    power_on: bool = False
    shutdown_timeout: float | None = None


def check_not_base_backup(img: Image) -> None:
    """A PostgreSQL base image is consistent only with its WAL replayed: written in place
    it would start as a torn cluster. Refused, saying how to get at its data."""
    if img.pg:
        raise PgBaseNeedsRecovery(image=img.id)


def submit_restore(
    site: Site,
    *,
    app: str,
    image: str,
    confirm: Sequence[str],
    actor: str | None = None,
    commands: bool = True,
    power_on: bool = False,
    shutdown_timeout: float | None = None,
    time: str | None = None,
    latest: bool = False,
    rollforward: bool = True,
) -> Job:
    """Queue a restore of ``image`` onto ``app``; refused without both confirmations.

    ``commands=False`` (a replica-style failback, which stops and starts the app itself)
    restores without running the app's stop and start hooks. ``time``/``latest``: the point
    a catch-up syncback of a database is rolled forward to (default: the latest).
    ``rollforward=False`` (a replica-style failback's first pass, which the second, of the
    stopped database, completes) writes such a syncback as the files it holds.
    """
    check_confirmations(confirm, RESTORE_CONFIRMATIONS)
    rolled = (
        _rollforward_params(site, app=app, image=image, time=time, latest=latest)
        if rollforward
        else {}
    )
    with site.catalog.begin() as session:
        row = q.get_app(session, name=app)
        img = q.get_image(session, image_id=image)
        if img.app_id != row.id:
            raise ImageOfOtherApp(image=img.id, owner=img.app.name, app=row.name)
        if img.state is ImageState.DELETING:
            raise ImageBeingDeleted(image=img.id, app=row.name)
        pg_recovery.check_restorable(site, row, img)  # a syncback: names the one to restore
        if not pg_recovery.rolls_forward(row, img):  # that one is recovered after writing
            check_not_base_backup(img)  # (or a pre-copy: see ``rollforward``)
        check_transition(row.name, row.state, Operation.RESTORE)
        app_host(session, row, action="restore")
        fields: dict[str, Any] = {"commands": commands, **rolled}
        if row.kind is AppKind.VM:
            fields.update(power_on=power_on, shutdown_timeout=shutdown_timeout)
        elif power_on or shutdown_timeout is not None:
            raise OptionsDoNotApply(
                options="--power-on and --shutdown-timeout",
                why=f"they are for vm apps; {row.name!r} is a {row.kind.value} app, whose "
                "--start hook runs after the restore",
                fix="Leave them out",
            )
        job = submit_job(
            session,
            type=TYPE,
            app=row.name,
            image=img.id,
            lifecycle=True,
            actor=actor,
            params=Params(**fields).stored(),
        )
    site.wake()
    return job


def _rollforward_params(
    site: Site, *, app: str, image: str, time: str | None, latest: bool
) -> dict[str, Any]:
    """The job parameters of a roll-forward (``pg_recovery.rolls_forward``), planned now so
    that a target it cannot reach, or WAL not home yet, is refused before anything is
    touched; none for any other restore (refused when a recovery option is given)."""
    with site.catalog.read() as session:
        row = q.get_app(session, name=app)
        img = q.get_image(session, image_id=image)
    target = pg_recovery.parse_target(time, latest, row)  # refuses options of other kinds
    if img.app_id != row.id:
        return {}  # refused with the reason next
    if not pg_recovery.rolls_forward(row, img):
        if time is not None or latest:
            raise OptionsDoNotApply(
                options="--time and --latest",
                why="they roll a catch-up syncback of a database forward; image "
                f"{img.id} is a {img.kind.value} image, restored as it is",
                fix="Leave them out",
            )
        return {}
    pg_recovery.rollforward(site, row, img, target)
    return {"rollforward": True, "time": target.isoformat() if target is not None else None}


def _run_hook(agent: AgentClient, ctx: JobContext, app: App, hook: Hook, image: str) -> bool:
    return hooks.run_hook(agent, app, hook, operation=TYPE, image=image, path=app.path, ctx=ctx)


def run_restore(site: Site, ctx: JobContext, params: Params) -> dict[str, Any]:
    """The job handler."""
    name, image_id = ctx.job.app or "", ctx.job.image or ""
    with site.catalog.read() as session:
        app = q.get_app(session, name=name)
        image = q.get_image(session, image_id=image_id)
        check_transition(app.name, app.state, Operation.RESTORE)
        host = app_host(session, app, action="restore")
    if app.kind is AppKind.VM:
        return _run_vm_restore(site, ctx, app, image, host, params)
    rolled: pg_recovery.Recovery | None = None
    if params.rollforward:  # planned again: the WAL held may have moved on
        target = pg_recovery.parse_target(params.time, False, app)
        rolled = pg_recovery.Recovery(pg_recovery.rollforward(site, app, image, target), target)
    recovered: dict[str, Any] = {}
    readable = [bytes.fromhex(image.manifest)]
    known = stamps.known(site, app_id=app.id) if app.kind is AppKind.VOLUME else None
    if known is not None and site.pool.has_manifest(bytes.fromhex(known[0])):
        readable.append(bytes.fromhex(known[0]))  # the agent may start from it (its stamp)
    else:
        known = None
    transfer, token = site.sessions.open(job_id=ctx.job.id, write=False, readable=readable)
    try:
        with agent_for(host) as agent:
            commands = params.commands
            stopped = False
            if commands:
                try:
                    stopped = _run_hook(agent, ctx, app, Hook.STOP, image.id)
                except TandemError as exc:
                    raise type(exc)(f"{exc.message.rstrip('.')}; nothing was restored") from exc
            ctx.set_message(f"restoring {image.id} onto {app.path} on host {host.name}")
            body = checked(
                RestoreRequest,
                kind=storage_kind(app.kind),
                path=app.path,
                manifest=image.manifest,
                job=ctx.job.id,
                appliance=site.session_ref(transfer.id, token),
                base=known[0] if known else None,
                stamp=known[1] if known else None,
                rollforward=rolled is not None,
            )
            if app.kind is AppKind.VOLUME:
                stamps.forget(site, app_id=app.id)  # from here it holds neither image
            if app.kind is AppKind.POSTGRESQL:
                wal.replaced(site, app)  # the stream of the cluster about to be replaced
            try:
                done = follow(
                    ctx, agent.restore(body), host=host.name, moved=lambda: transfer.bytes_sent
                )
                if rolled is not None:
                    recovered = pg_recovery.recover(
                        site,
                        ctx,
                        app=app,
                        host=host,
                        chosen=rolled.plan,
                        path=app.path,
                        target=rolled.target,
                        port=None,
                        stop=True,
                    )
            except TandemError as exc:
                if not stopped:
                    raise
                raise type(exc)(
                    f"{exc.message.rstrip('.')}. The application was stopped for the restore "
                    "and is left stopped; restore again, or start it by hand"
                ) from exc
            if commands:
                try:
                    _run_hook(agent, ctx, app, Hook.START, image.id)
                except TandemError as exc:
                    raise type(exc)(
                        f"{exc.message.rstrip('.')}; image {image.id} was restored, start the "
                        "application by hand"
                    ) from exc
    finally:
        site.sessions.close(transfer)
    with site.catalog.begin() as session:
        q.record_transition(
            session, app=app.name, operation=Operation.RESTORE, actor=ctx.job.actor, job=ctx.job.id
        )
    if app.kind is AppKind.VOLUME:
        stamps.record(site, app_id=app.id, manifest=image.manifest, stamp=done.get("stamp"))
        if done.get("from_base"):
            ctx.log(
                "the volume was untouched since its last capture or restore: only the "
                "blocks in which the images differ were compared and written"
            )
    stats = done.get("stats") or {}
    written = int(stats.get("bytes_written") or 0)
    ctx.log(
        f"host {host.name} wrote {written} bytes in {float(stats.get('seconds') or 0):.2f} s "
        f"({int(stats.get('bytes_compared') or 0)} bytes of the target compared, "
        f"{transfer.bytes_sent} bytes sent)"
    )
    downtime = None
    if image.kind is ImageKind.SYNCBACK and rolled is None:
        # Failback downtime: the final syncback is taken once the app stopped at the DR
        # site; production is back when its start hook has run. (A catch-up syncback rolled
        # forward was taken while the DR copy ran: its age is no downtime.)
        downtime = max(0.0, (datetime.now(UTC) - image.created).total_seconds())
        failback.record_downtime(site, app=app.name, seconds=downtime)
    ctx.set_message(
        f"restored {image.id} onto {app.path}: {written} bytes written, "
        f"{transfer.bytes_sent} bytes sent"
        + (f"; failback downtime {downtime:.1f} s" if downtime is not None else "")
        + (
            f"; PostgreSQL rolled forward to {recovered.get('recovered_to')} (the last commit "
            "replayed), promoted and shut down"
            if recovered
            else ""
        )
    )
    if recovered:
        recovered.update(port=None, socket_dir=None)  # stopped: its start hook starts it
    return {
        "image": image.id,
        "bytes_sent": transfer.bytes_sent,
        "stats": stats,
        "downtime_seconds": downtime,
        **recovered,
    }


def own_domain_xml(site: Site, app: App) -> str | None:
    """The domain XML of ``app`` as this site's own agent captured it (the newest snapshot
    image that holds it), or None. A domain is only ever defined at a site from this: the
    XML in a syncback or replica image is the other site's word, and a domain definition
    names binaries, devices and files of the host (``domain.vms.tame_domain_xml``)."""
    with site.catalog.read() as session:
        images = q.list_images(session, app=app.name, kind=ImageKind.SNAPSHOT, limit=20)
    for image in images:
        manifest = load_manifest(site.pool, bytes.fromhex(image.manifest))
        vm = manifest.meta.get("vm") if isinstance(manifest, VolumeManifest) else None
        if isinstance(vm, dict) and vm.get("domain") == app.path and isinstance(vm.get("xml"), str):
            return str(vm["xml"])
    return None


def _run_vm_restore(
    site: Site, ctx: JobContext, app: App, image: Image, host: Host, params: Params
) -> dict[str, Any]:
    """Restore a VM image onto the app's domain in place (module docstring)."""
    transfer, token = site.sessions.open(
        job_id=ctx.job.id, write=False, readable=[bytes.fromhex(image.manifest)]
    )
    try:
        with agent_for(host) as agent:
            commands = params.commands
            if commands:
                try:
                    _run_hook(agent, ctx, app, Hook.STOP, image.id)
                except TandemError as exc:
                    raise type(exc)(f"{exc.message.rstrip('.')}; nothing was restored") from exc
            ctx.set_message(f"restoring {image.id} onto VM {app.path} on host {host.name}")
            timeout = params.shutdown_timeout
            body = checked(
                VmRestoreRequest,
                domain=app.path,
                image=image.id,
                manifest=image.manifest,
                job=ctx.job.id,
                appliance=site.session_ref(transfer.id, token),
                power_on=params.power_on,
                definition=own_domain_xml(site, app),
                **({"shutdown_timeout": float(timeout)} if timeout is not None else {}),
            )
            done = follow(
                ctx, agent.restore_vm(body), host=host.name, moved=lambda: transfer.bytes_sent
            )
            if commands:
                try:
                    _run_hook(agent, ctx, app, Hook.START, image.id)
                except TandemError as exc:
                    raise type(exc)(
                        f"{exc.message.rstrip('.')}; image {image.id} was restored, start the "
                        "application by hand"
                    ) from exc
    finally:
        site.sessions.close(transfer)
    with site.catalog.begin() as session:
        q.record_transition(
            session, app=app.name, operation=Operation.RESTORE, actor=ctx.job.actor, job=ctx.job.id
        )
    stats = done.get("stats") or {}
    written = int(stats.get("bytes_written") or 0)
    ctx.log(
        f"host {host.name} wrote {written} bytes of VM {app.path} in "
        f"{float(stats.get('seconds') or 0):.2f} s ({int(stats.get('bytes_compared') or 0)} "
        f"bytes of its disks compared, {transfer.bytes_sent} bytes sent)"
    )
    downtime = None
    if image.kind is ImageKind.SYNCBACK:
        downtime = max(0.0, (datetime.now(UTC) - image.created).total_seconds())
        failback.record_downtime(site, app=app.name, seconds=downtime)
    running = bool(done.get("running"))
    ctx.set_message(
        f"restored {image.id} onto VM {app.path} ({done.get('power')}): {written} bytes "
        f"written, {transfer.bytes_sent} bytes sent; its checkpoints were dropped, so the next "
        "capture reads everything (change tracking is lost after a restore); "
        + ("powered on" if running else "left powered off")
        + (f"; failback downtime {downtime:.1f} s" if downtime is not None else "")
    )
    return {
        "image": image.id,
        "bytes_sent": transfer.bytes_sent,
        "stats": stats,
        "downtime_seconds": downtime,
        "vm": {
            "name": app.path,
            "uuid": done.get("uuid"),
            "running": running,
            "power": done.get("power"),
            "redefined": bool(done.get("redefined")),
            "checkpoints_dropped": int(done.get("checkpoints_dropped") or 0),
        },
    }


def submit(site: Site, app: str, body: RestoreIn, actor: str | None = None) -> Job:
    """``submit_restore`` from the API's request."""
    return submit_restore(
        site,
        app=app,
        image=body.image,
        confirm=body.confirm,
        actor=actor,
        power_on=body.power_on,
        shutdown_timeout=body.shutdown_timeout,
        time=body.time,
        latest=body.latest,
    )


SPEC = Spec(
    name="restore",
    job_type=TYPE,
    params=Params,
    run=run_restore,
    route="POST /apps/{name}/restore",
    submit=submit,
    subject="app",
    lifecycle=Operation.RESTORE,
    request=RestoreIn,
    title="Restore to production",
    danger=True,
    confirmations=RESTORE_CONFIRMATIONS,
)
