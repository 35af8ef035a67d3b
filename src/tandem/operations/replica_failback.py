"""Failback in the replica style (SPEC §5), run on the DR appliance, with commit and undo.

``failback --target original|restored|new``, the app failed over here:
0. Production is asked to agree (``failback-check``) before anything changes: the app must
   be one of its own, failed over here as far as it knows, and the target a location *its*
   operators registered (``restored``/``new``: ``--host``/``--path`` only look up an app
   registered there with ``tandem app add``; ``new`` also needs the target missing or
   empty, which production's agent checks). A wrong host fails here, before production's
   app is stopped or a syncback sent. Production carries out each later step itself, with
   its own catalog (its host, path and hooks), and only while that agreement holds.
1. Production stops the original (its stop hook, through the production appliance).
2.–3. The DR copy's state is captured and sent home as a syncback image (only what
   production lacks), then diff-restored onto the target (only differing blocks/files
   are written).
4. The DR copy is stopped (its stop hook on the DR host); it stays off until the
   failback is committed or undone.
5. A **protective snapshot** of the DR copy is taken here: its pre-failback state.
6. It is sent and diff-restored again: this catches what was written during step 3.
7. The app goes FAILED_OVER → FAILBACK_PENDING here. A volume's DR copy is read-only from
   the protective snapshot on (its NBD export refuses writes) until the failback is undone.
8. ``restored`` / ``new``: production's catalog identity of the app (host and path) is
   replaced by the target's before the data is applied (``new``: a fresh path, written
   whole); an undo reverts it; a commit merges the placeholder app registered there.
9. With ``--power-on`` production starts the app on the target.

A VM (``vm`` app) is powered off at steps 1 and 4 (graceful shutdown, then destroy after
``VM_SHUTDOWN_TIMEOUT``; production's domain, then the DR VM the failover defined; an
original domain that is gone is off already) and powered on at step 9; its hooks, if any,
run after that as any app's. Its DR copy is the failover's virtual copy, captured and
reverted like a volume's; the apply is a VM restore in place (``operations.restore``).
A VM's target is a host and a libvirt domain name (``--domain``, carried as ``path``):
- ``restored``: a domain production's operators restored and registered (``tandem app add
  NAME --kind vm --host H --domain D``, a placeholder), and that exists on H. Only the
  difference is written into its disks (their targets and sizes must match the image's).
- ``new``: a domain production defines on H, powered off, before the first apply
  (``agent.vm.define_empty``): the image's XML with a new UUID, the captured NICs and MACs,
  each disk a new empty qcow2 volume ``NAME-<disk>.qcow2`` of the pool named (``--pool``:
  active, file-backed), which the restore then writes whole. A name that exists on H (or
  is an app's domain, or the app's own), a pool H lacks, inactive or not file-backed, is
  refused at the check, before anything stops. Undo removes the domain with its volumes
  (so does a failback run again before it ended); commit keeps it.
The **identity switch** (SPEC §5 step 8; the seed: the original VM's ID in the
configuration database is replaced by the restored VM's) is production's catalog identity
of the app: its host and domain become the target's, so protection, restores and power
operations act on that domain from then on; undo switches them back, commit merges the
placeholder. The libvirt domain itself keeps its own UUID and MACs (a restored domain is
not redefined: libvirt keeps UUIDs unique per host, the original may still be defined there,
and the restored domain's NICs are configured for where it was restored); a new domain gets
a fresh UUID for the same reason and the captured MACs, which the guest's network settings
follow.

``commit-failback``: FAILBACK_PENDING → MANAGED; the DR images are cleaned up as in the
snapshot-style failback (the protective snapshot, equal to what production holds, stays as
the replica to mirror against) and production resumes mirroring with the current epoch.
Refused unless forced when the DR copy changed after the protective snapshot (written
though it should be off: a stop hook that did not stop everything, or none): production
lacks those writes and the clean-up would discard them (``failback.checked_discard``, which
also makes an interrupted commit resumable).
``undo-failback``: FAILBACK_PENDING → FAILED_OVER (a fencing step: the epoch rises again):
production stops the app and takes back its former identity, the DR copy is brought back
to the protective snapshot exactly (a tree: a diff-restore that writes only what differs; a
volume: the blocks written since the snapshot are rewritten from it) and started again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, Literal

from tandem.catalog import queries as q
from tandem.catalog.models import App, Host, Image, Job
from tandem.domain.hooks import Hook
from tandem.domain.images import ImageKind
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppFacts, AppKind, Operation, check_transition, storage_kind
from tandem.domain.vms import FILE_POOLS, check_domain_name
from tandem.errors import (
    AlreadyExists,
    AppBusy,
    ChoiceInvalid,
    ImageHoldsNoVm,
    NotFound,
    NotHypervisor,
    NoVmDefinition,
    OptionsDoNotApply,
    OptionsMissing,
    PeerApplyFailed,
    PeerApplyTimedOut,
    PeerRefused,
    StorageError,
    TargetInUse,
    TargetIsOriginal,
    TargetKindDiffers,
    TargetNotEmpty,
    TargetNotRegistered,
    VirtualCopyNotOpen,
    VmDiskMissing,
    VmTargetMissing,
    VmTargetNotRegistered,
)
from tandem.jobs.queue import submit_job
from tandem.jobs.runner import JobContext, JobInfo
from tandem.operations import failback, hooks, peers
from tandem.operations.hosts import agent_for, app_host
from tandem.operations.jobparams import ForceParams, JobParams
from tandem.operations.restore import own_domain_xml
from tandem.operations.site import Site
from tandem.operations.spec import Spec
from tandem.operations.streams import follow
from tandem.operations.syncback import capture_and_send_home, failover_image
from tandem.storage import vmimage
from tandem.storage.manifest import VolumeManifest, load_manifest
from tandem.storage.overlay import Overlay
from tandem.transport.agent import AgentClient
from tandem.transport.agent_api import EmptyDomainRequest, RestoreRequest
from tandem.transport.api import CommitFailbackIn, FailbackIn, checked
from tandem.transport.peer import (
    CommandRan,
    FailbackAgreed,
    FailbackCheck,
    FailbackTarget,
    PeerJob,
    Undone,
)

TYPE = "failback-replica"
COMMIT_TYPE = "commit-failback"
UNDO_TYPE = "undo-failback"
TARGETS = ("original", "restored", "new")
APPLY_TIMEOUT = 3600.0
VM_SHUTDOWN_TIMEOUT = 120.0
"""Seconds a VM's graceful shutdown may take in a failback before it is powered off."""


class Params(JobParams):
    """A replica-style failback's job: the target production agreed to, the host and path
    (or domain) of a restored or new target, its storage pool, whether production's app is
    started at the end, and a VM's graceful shutdown timeout."""

    target: FailbackTarget
    host: str | None = None
    path: str | None = None
    power_on: bool = False
    shutdown_timeout: float | None = None
    pool: str | None = None


EndParams = ForceParams
"""A commit's job: ``force`` commits although the DR copy changed after the protective
snapshot (an undo takes nothing)."""


def _target(target: str) -> FailbackTarget:
    if target == "original":
        return "original"
    if target == "restored":
        return "restored"
    if target == "new":
        return "new"
    raise ChoiceInvalid(what="--target", value=target, choices=", ".join(TARGETS))


def _check_request(
    target: str,
    host: str | None,
    path: str | None,
    kind: AppKind | None = None,
    pool: str | None = None,
) -> FailbackTarget:
    """The target asked for, refused unless ``original`` comes without a location and
    ``restored``/``new`` with one: a full path, or for a VM (``kind``) a domain name, and
    ``--pool`` only for a new VM, which needs one (checked by the DR site before it asks,
    and by production on the request)."""
    chosen = _target(target)
    if chosen == "original" and (host or path or pool):
        raise OptionsDoNotApply(
            options="--host, --path/--domain and --pool",
            why="--target original fails back to the app as production registered it; they "
            "name a restored or new target",
            fix="Leave them out, or choose --target restored or new",
        )
    if chosen == "original":
        return chosen
    if kind is AppKind.VM:
        if not (host and path):
            raise OptionsMissing(
                what=f"--target {target} of a VM",
                options="--host and --domain" + (" and --pool" if chosen == "new" else ""),
                why=" (the production hypervisor host and the domain there"
                + (", and the storage pool for its disks)" if chosen == "new" else ")"),
            )
        check_domain_name(path, "--domain")
        if chosen == "new" and pool is None:
            raise OptionsMissing(
                what="--target new of a VM",
                options="--pool",
                why=" (the storage pool of the production host its disks are made in; "
                "`virsh pool-list` on the host lists them)",
            )
        if chosen == "restored" and pool is not None:
            raise OptionsDoNotApply(
                options="--pool",
                why="it is for --target new of a VM; a restored domain keeps its disks",
                fix="Leave it out",
            )
        return chosen
    if pool is not None:
        raise OptionsDoNotApply(
            options="--pool", why="it is for --target new of a vm app", fix="Leave it out"
        )
    if not (host and path and path.startswith("/")):
        raise OptionsMissing(
            what=f"--target {target}", options="--host and --path", why=" (a full path)"
        )
    return chosen


def _agree(
    site: Site,
    app: App,
    target: FailbackTarget,
    host: str | None,
    path: str | None,
    pool: str | None = None,
) -> FailbackAgreed:
    """Production's agreement to fail ``app`` back onto the target (nothing changes yet)."""
    peer = peers.require_peer(site)
    check = FailbackCheck(target=target, host=host, path=path, epoch=app.writer_epoch, pool=pool)
    with peers.client_for(peer) as remote:
        return remote.failback_check(app.name, check)


def submit(site: Site, app: str, body: FailbackIn, actor: str | None = None) -> Job:
    """Queue a replica-style failback of ``app`` as ``body`` asks (the API's request)."""
    target, host, path, pool = body.target or "", body.host, body.path, body.pool
    power_on, shutdown_timeout = body.power_on, body.shutdown_timeout
    peers.require_peer(site)
    with site.catalog.read() as session:
        row = q.get_app(session, name=app)
        replicas = len(q.list_images(session, app=app, kind=ImageKind.REPLICA))
        busy = _lifecycle_job(session, app)
    chosen = _check_request(target, host, path, row.kind, pool)
    check_transition(
        row.name, row.state, Operation.FAILBACK_REPLICA, AppFacts(replica_images=replicas)
    )
    failover_image(site, app)
    if busy is not None:  # (asking production to agree again would reset a running one)
        raise AppBusy(app=app, type=busy.type, job=busy.id, status=busy.status.value)
    # A wrong target is refused now, before the job stops anything at production.
    _agree(site, row, chosen, host, path, pool)
    with site.catalog.begin() as session:
        row = q.get_app(session, name=app)
        check_transition(
            row.name, row.state, Operation.FAILBACK_REPLICA, AppFacts(replica_images=replicas)
        )
        job = submit_job(
            session,
            type=TYPE,
            app=app,
            params=Params(
                target=chosen,
                host=host,
                path=path,
                power_on=power_on,
                shutdown_timeout=shutdown_timeout,
                pool=pool,
            ).stored(),
            lifecycle=True,
            actor=actor,
        )
    site.wake()
    return job


def _lifecycle_job(session: Any, app: str) -> Job | None:
    for job in q.list_jobs(session, app=app, limit=50):
        if job.lifecycle and job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            return job
    return None


def _production_command(
    site: Site, app: str, which: Literal["stop", "start"], shutdown_timeout: float | None = None
) -> CommandRan:
    peer = peers.require_peer(site)
    with peers.client_for(peer) as remote:
        return remote.command(app, which, shutdown_timeout)


def _apply_at_production(site: Site, ctx: JobContext, app: str, image: Image) -> PeerJob:
    """Have production diff-restore ``image`` onto the agreed target; wait for its job."""
    peer = peers.require_peer(site)
    with peers.client_for(peer) as remote:
        job = remote.apply(app, image.id)
        deadline = time.monotonic() + APPLY_TIMEOUT
        while job.status in (JobStatus.QUEUED.value, JobStatus.RUNNING.value):
            ctx.check_canceled()
            if time.monotonic() > deadline:
                raise PeerApplyTimedOut(
                    peer=peer.name, job=job.id, image=image.id, seconds=APPLY_TIMEOUT
                )
            time.sleep(0.3)
            job = remote.job(job.id)
    if job.status != JobStatus.SUCCEEDED.value:
        raise PeerApplyFailed(
            peer=peer.name, image=image.id, job=job.id, status=job.status, reason=job.message
        )
    ctx.log(f"production applied {image.id} in job {job.id}")
    return job


def _dr_command(
    site: Site, ctx: JobContext, app: App, which: str, shutdown_timeout: float | None = None
) -> None:
    """Stop or start the DR copy: a VM presented as a new VM is powered off or on first
    (graceful within ``VM_SHUTDOWN_TIMEOUT``, then destroyed); then the app's hook runs."""
    failover = failover_image(site, app.name)
    if app.kind is AppKind.VM and failover.vm_name:
        with site.catalog.read() as session:
            vm_host = q.get_host(session, name=failover.mounted_host or "")
        with agent_for(vm_host) as agent:
            done = agent.power_vm(
                failover.vm_name,
                on=which == "start",
                timeout=VM_SHUTDOWN_TIMEOUT if shutdown_timeout is None else shutdown_timeout,
            )
        ctx.log(f"DR VM {failover.vm_name} on host {vm_host.name}: {done.get('how')}")
    database = app.kind is AppKind.POSTGRESQL and failover.mount_point is not None
    with site.catalog.read() as session:
        host = q.get_host(session, name=failover.mounted_host or "")
    if database and which == "start":
        _start_dr_database(site, ctx, app, failover, host)
    if hooks.script_for(app, Hook(which)):
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
        ctx.log(f"{which} hook ran on DR host {host.name}")
    if database and which == "stop":  # after its hook, as a VM is powered off
        with agent_for(host) as agent:
            stopped = agent.pg_stop(failover.mount_point or "")
        ctx.log(
            f"PostgreSQL of the DR copy {failover.mount_point} on host {host.name} "
            + ("stopped" if stopped else "was not running")
        )


def _start_dr_database(site: Site, ctx: JobContext, app: App, failover: Image, host: Host) -> None:
    """Start the DR copy's PostgreSQL again (an undone failback) where the failover started
    it: its port and socket folder, from the failover job's result."""
    listen: dict[str, Any] = {}
    with site.catalog.read() as session:
        for job in q.list_jobs(session, app=app.name, limit=200):
            result = job.result or {}
            if job.type == "failover" and result.get("image") == failover.id:
                listen = result
                break
    port = listen.get("port")
    with agent_for(host) as agent:
        done = agent.pg_start(
            failover.mount_point or "",
            int(port) if port is not None else None,
            listen.get("socket_dir"),
        )
    ctx.log(
        f"PostgreSQL of the DR copy {failover.mount_point} started on host {host.name}, port "
        f"{done.get('port')}"
    )


def _dr_overlay(site: Site, app: App) -> Overlay | None:
    """The virtual copy a volume or VM app runs on here (None for a file tree)."""
    if app.kind not in (AppKind.VOLUME, AppKind.VM):
        return None
    return site.overlays.get(failover_image(site, app.name).id)


@contextlib.contextmanager
def _read_only(site: Site, app: App) -> Iterator[None]:
    """Freeze a volume's DR copy (writes fail: EPERM over NBD) from here on; thawed again
    if what follows fails, since the app is then still failed over here."""
    overlay = _dr_overlay(site, app)
    if overlay is not None:
        overlay.freeze()
    try:
        yield
    except BaseException:
        if overlay is not None:
            overlay.thaw()
        raise


def run_replica_failback(site: Site, ctx: JobContext, params: Params) -> dict[str, Any]:
    name = ctx.job.app or ""
    with site.catalog.read() as session:
        app = q.get_app(session, name=name)
        replicas = len(q.list_images(session, app=name, kind=ImageKind.REPLICA))
    facts = AppFacts(replica_images=replicas)
    check_transition(app.name, app.state, Operation.FAILBACK_REPLICA, facts)
    # 0. production agrees (or refuses) before anything changes anywhere
    agreed = _agree(
        site,
        app,
        params.target,
        params.host,
        params.path,
        params.pool,
    )
    ctx.log(
        f"production agreed to fail back onto {agreed.host}:{agreed.path}"
        + (f" (registered there as {agreed.target_app})" if agreed.target_app else "")
    )
    timeout = params.shutdown_timeout
    # 1. stop the original (a VM: powered off)
    _production_command(site, name, "stop", timeout)
    # 2.-3. difference, sent and applied
    taken, sent = capture_and_send_home(
        site, ctx, app, kind=ImageKind.SYNCBACK, label="failback 1/2"
    )
    first = taken.image
    _apply_at_production(site, ctx, name, first)
    # 4. the DR copy stops and stays off until commit or undo
    downtime_from = time.monotonic()
    _dr_command(site, ctx, app, "stop", timeout)
    # 5. the protective snapshot, 6. the difference again
    with _read_only(site, app):
        taken, more = capture_and_send_home(
            site, ctx, app, kind=ImageKind.PROTECTIVE, label="failback protective snapshot"
        )
        protective, sent = taken.image, sent + more
        _apply_at_production(site, ctx, name, protective)
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
    if params.power_on:
        _production_command(site, name, "start")
    downtime = time.monotonic() - downtime_from
    failback.record_downtime(site, app=name, seconds=downtime)
    ctx.set_image(protective.id)
    ctx.set_message(
        f"{name} failed back to the {params.target} app at {agreed.host}:{agreed.path}"
        + (" and started" if params.power_on else " (stopped there)")
        + f"; protective snapshot {protective.id}; {sent} bytes moved; downtime {downtime:.1f} s."
        " Commit or undo the failback"
    )
    return {
        "protective": protective.id,
        "bytes_sent": sent,
        "downtime_seconds": downtime,
        "target": params.target,
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
            params=EndParams(force=force).stored(),
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


def run_commit(site: Site, ctx: JobContext, params: EndParams) -> dict[str, Any]:
    name = ctx.job.app or ""
    force = params.force
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
            started = _powered_on(session, name)
        result = failback.clean_up_and_resume(site, ctx, name, Operation.COMMIT_FAILBACK)
    if not started:
        peer = peers.the_peer(site)
        where = peer.name if peer is not None else "production"
        ctx.set_message(
            f"{ctx.message or name + ' committed'}. {name} is stopped at {where}: the "
            f"failback ran without --power-on; start it there by running its start hook "
            f"script on its host (`tandem app show {name}` on {where} names both)"
        )
    return result


def _last_failback(session: Any, app: str) -> Params | None:
    """The parameters of the latest successful replica-style failback of ``app``."""
    for job in q.list_jobs(session, app=app, limit=50):
        if job.type == TYPE and job.status is JobStatus.SUCCEEDED:
            return Params.of(JobInfo.from_row(job))
    return None


def _powered_on(session: Any, app: str) -> bool:
    """Whether the latest replica-style failback of ``app`` started production's app."""
    last = _last_failback(session, app)
    return last is not None and last.power_on


def run_undo(site: Site, ctx: JobContext, params: EndParams) -> dict[str, Any]:
    name = ctx.job.app or ""
    with site.catalog.read() as session:
        app = q.get_app(session, name=name)
        facts = _end_facts(session, name)
        protective = q.latest_image(session, app=name, kind=ImageKind.PROTECTIVE)
    if protective is None:
        raise NotFound(what="protective snapshot of", name=name, listing=f"images {name}")
    check_transition(app.name, app.state, Operation.UNDO_FAILBACK, facts)
    with site.catalog.read() as session:
        last = _last_failback(session, name)
        timeout = last.shutdown_timeout if last is not None else None
    _production_command(site, name, "stop", timeout)
    peer = peers.require_peer(site)
    with peers.client_for(peer) as remote:
        undone = remote.failback_undo(name)
    ctx.log(f"{peer.name} stopped {name} and runs it from {undone.host}:{undone.path} again")
    failover = failover_image(site, name)
    if app.kind in (AppKind.FILESYSTEM, AppKind.POSTGRESQL) and failover.mount_point:
        _restore_dr_copy(site, ctx, app, failover, protective)
    elif app.kind in (AppKind.VOLUME, AppKind.VM):
        _revert_overlay(site, ctx, failover, protective)
        overlay = _dr_overlay(site, app)
        if overlay is not None:
            overlay.thaw()  # the DR copy is the writer again
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
        raise VirtualCopyNotOpen(image=failover.id)
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
        body = checked(
            RestoreRequest,
            kind=storage_kind(app.kind),
            path=failover.mount_point,
            manifest=protective.manifest,
            job=ctx.job.id,
            appliance=site.session_ref(transfer.id, token),
        )
        with agent_for(host) as agent:
            follow(ctx, agent.restore(body), host=host.name, moved=lambda: transfer.bytes_sent)
    finally:
        site.sessions.close(transfer)


# --- production side (peer calls) -------------------------------------------------------
#
# Each step the peer requests is checked against the app's state *here* and carried out
# with this site's own catalog: the app must be one of this site's that it mirrors to that
# peer (``peers.mirrored_app``), failed over there as far as this site knows
# (``peer_active``), and, for the failback steps, a failback this site agreed to
# (``production_failback_check``) with no restore of it applying (``_not_applying``). The
# peer never names a host, a path or a command.


def _own_app_failed_over_at(session: Any, *, peer: str, app: str, action: str) -> App:
    row = peers.mirrored_app(session, peer=peer, app=app, action=action)
    if not row.peer_active:
        raise PeerRefused(
            peer=peer,
            action=action,
            app=app,
            reason=f"this site does not know it as failed over at {peer}",
            fix=f"Fail it over at {peer} first; a failover there tells this site",
        )
    return row


def _not_applying(session: Any, row: App, *, peer: str, action: str, any_job: bool = False) -> None:
    """Refuse a step while a restore of the app is queued or running here (an apply under
    way): agreeing again or undoing would move the app's identity under it, a start would
    run the app on half-written data. ``any_job``: while any lifecycle job of it is (an
    apply could not queue its restore then, and must not switch the identity first)."""
    busy = _lifecycle_job(session, row.name)
    if busy is not None and (any_job or busy.type == "restore"):
        raise PeerRefused(
            peer=peer,
            action=action,
            app=row.name,
            reason=f"its {busy.type} job {busy.id} is {busy.status.value} here",
            fix="Run the step again once that job has ended",
        )


def _agreed(session: Any, row: App, *, peer: str, action: str) -> dict[str, Any]:
    doc = peers.agreement(session, app_id=row.id)
    if doc is None or doc.get("peer") != peer:
        raise PeerRefused(
            peer=peer,
            action=action,
            app=row.name,
            reason="no failback of it was agreed here",
            fix=f"Start the failback at {peer} (`tandem failback {row.name} --target ...`): "
            "it asks this site first",
        )
    return doc


def _revert_identity(row: App, doc: dict[str, Any]) -> None:
    """Give ``row`` back the location it had before a failback switched it to the target."""
    if doc.get("previous"):
        row.host, row.path = doc["previous"]["host"], doc["previous"]["path"]
        doc["previous"] = None


def _registered_target(session: Any, site: Site, row: App, host: str, path: str) -> App:
    """The app this site's operators registered at ``host``:``path`` (the only way a
    restored or new target is named: a lookup, never a place the peer defines): of the
    app's kind, and a placeholder (unprotected, without images), never an app in service."""
    where = path.rstrip("/") or "/"
    if host == row.host and where == (row.path.rstrip("/") or "/"):
        raise TargetIsOriginal(where=f"{host}:{path}", app=row.name, how="where it runs")
    found = [
        a
        for a in q.list_apps(session)
        if a.origin is None and a.host == host and (a.path.rstrip("/") or "/") == where
    ]
    if not found and row.kind is AppKind.VM:
        raise VmTargetNotRegistered(host=host, domain=path, site=site.name)
    if not found:
        raise TargetNotRegistered(kind=row.kind.value, host=host, path=path, site=site.name)
    other = found[0]
    if other.kind is not row.kind:
        raise TargetKindDiffers(
            where=f"{host}:{path}",
            other=other.name,
            other_kind=other.kind.value,
            app=row.name,
            kind=row.kind.value,
        )
    # A placeholder registered for the failback, not an app in service: restoring over one
    # would destroy its data, and the commit merges the placeholder away.
    why = None
    if other.template is not None:
        why = f"protected (template {other.template!r})"
    elif q.list_images(session, app=other.name):
        why = "an app with images of its own"
    if why is not None:
        raise TargetInUse(
            other=other.name, site=site.name, host=host, path=path, why=why, kind=row.kind.value
        )
    return other


def _new_domain_host(session: Any, row: App, host: str, domain: str) -> Host:
    """The host of this site a new domain ``domain`` is to be defined on, refusing the
    VM's own domain and a domain an app of this site is registered with."""
    if host == row.host and domain == row.path:
        raise TargetIsOriginal(
            where=f"domain {domain} on host {host}",
            app=row.name,
            how="--target new defines a new domain",
        )
    for other in q.list_apps(session):
        if other.kind is AppKind.VM and other.host == host and other.path == domain:
            raise AlreadyExists(
                what=f"On host {host}, the domain of app {other.name!r}", name=domain
            )
    return q.get_host(session, name=host)


def _image_disks(site: Site, app: str) -> set[str]:
    """The disk targets of the app's newest snapshot here (empty: none known)."""
    with site.catalog.read() as session:
        image = q.latest_image(session, app=app, kind=ImageKind.SNAPSHOT)
    if image is None or not site.pool.has_manifest(bytes.fromhex(image.manifest)):
        return set()
    manifest = load_manifest(site.pool, bytes.fromhex(image.manifest))
    if not isinstance(manifest, VolumeManifest):
        return set()
    return {slot.target for slot in vmimage.slots_of(manifest) or []}


def _check_vm_target(
    agent: AgentClient,
    host: str,
    target: str,
    domain: str,
    pool: str | None,
    disks: set[str] | None = None,
) -> None:
    """On the production host: a restored domain exists, with a file disk for each of
    ``disks`` (the image's); a new one does not, and its pool is there, active and
    file-backed (``domain.vms.FILE_POOLS``). Nothing changes."""
    info = agent.info()
    if not info.get("hypervisor"):
        raise NotHypervisor(reason=f"host {host}: {info.get('reason', 'no libvirt')}")
    domains = {str(d.get("name")): d for d in agent.vms()}
    if target == "restored":
        found = domains.get(domain)
        if found is None:
            raise NotFound(what="Domain", name=domain, listing=f"vms --host {host}")
        has = {str(d.get("target")): d for d in found.get("disks") or [] if isinstance(d, dict)}
        for disk in sorted(disks or ()):
            if disk not in has or has[disk].get("type") != "file":
                raise VmDiskMissing(
                    where=f"domain {domain} on host {host}",
                    what="file disk",
                    disk=disk,
                    has=", ".join(sorted(has)) or "no disks",
                )
        return
    if target != "new":
        return
    names = set(domains)
    if domain in names:
        raise AlreadyExists(what=f"On host {host}, domain", name=domain)
    pools = {str(p["name"]): p for p in agent.vm_resources()["pools"]}
    found = pools.get(pool or "")
    if found is None:
        raise VmTargetMissing(host=host, what="storage pool", name=pool, why="")
    if not found.get("active"):
        raise VmTargetMissing(
            host=host, what="active storage pool", name=pool, why=" (it is inactive)"
        )
    if found.get("type") not in FILE_POOLS:
        raise VmTargetMissing(
            host=host,
            what="file-backed storage pool",
            name=pool,
            why=f" (it is a {found.get('type')} pool; a new VM's disks are qcow2 files)",
        )


def _define_new_domain(site: Site, row: App, doc: dict[str, Any], img: Image) -> dict[str, Any]:
    """Define the agreed new domain, powered off, on empty volumes of the agreed pool, from
    the XML and disk layout of syncback ``img``; returns what to record in the agreement."""
    manifest = load_manifest(site.pool, bytes.fromhex(img.manifest))
    vm_meta = manifest.meta.get("vm") if isinstance(manifest, VolumeManifest) else None
    slots = vmimage.slots_of(manifest) if isinstance(manifest, VolumeManifest) else []
    if not isinstance(vm_meta, dict) or not slots:
        raise ImageHoldsNoVm(image=img.id)
    # The syncback's XML is the DR site's word: the new domain is defined from production's
    # own capture of the VM (its binaries, devices and files are this site's business).
    xml = own_domain_xml(site, row)
    if xml is None:
        raise NoVmDefinition(domain=row.path)
    with site.catalog.read() as session:
        host = q.get_host(session, name=doc["host"])
    body = checked(
        EmptyDomainRequest,
        name=doc["path"],
        xml=xml,
        disks=[{"target": slot.target, "size": slot.size} for slot in slots],
        pool=doc["pool"],
        source_domain=row.path,
    )
    with agent_for(host) as agent:
        made = agent.define_empty_vm(body)
    return {"host": host.name, "domain": str(made["name"]), "uuid": made.get("uuid")}


def _remove_defined(site: Site, doc: dict[str, Any]) -> None:
    """Remove the domain (and its volumes) a failback ``--target new`` defined, if any."""
    defined = doc.get("defined")
    if not defined:
        return
    with site.catalog.read() as session:
        host = q.get_host(session, name=defined["host"])
    with agent_for(host) as agent:
        agent.remove_vm(defined["domain"])


def production_failback_check(
    site: Site, *, peer: str, app: str, body: FailbackCheck
) -> FailbackAgreed:
    """Agree to a replica-style failback of ``app`` onto ``body.target`` (nothing changes
    but the agreement): its host and path come from this site's catalog, are reachable,
    and a ``new`` target is missing or empty."""
    action = f"fail back onto a {body.target} target"
    target_app: App | None = None
    with site.catalog.begin() as session:
        row = peers.mirrored_app(session, peer=peer, app=app, action=action)
        if not row.peer_active and body.epoch > row.writer_epoch:
            row.peer_active = True  # a newer writer epoch: the app failed over at the peer
        row = _own_app_failed_over_at(session, peer=peer, app=app, action=action)
        _not_applying(session, row, peer=peer, action=action)
        previous = peers.agreement(session, app_id=row.id)
        if previous is not None:  # a failback run again: start from the app's own identity
            _revert_identity(row, previous)
        _check_request(body.target, body.host, body.path, row.kind, body.pool)
        new_vm = row.kind is AppKind.VM and body.target == "new"
        if new_vm and body.host and body.path:  # a domain this failback defines
            host_name, path = body.host, body.path
            host = _new_domain_host(session, row, host_name, path)
        elif body.host and body.path:  # restored or new (original has neither: checked above)
            target_app = _registered_target(session, site, row, body.host, body.path)
            host_name, path = target_app.host, target_app.path
            host = app_host(session, target_app, action="fail back onto")
        else:
            host_name, path = row.host, row.path
            host = app_host(session, row, action="fail back onto")
        kind = row.kind
        peers.set_agreement(session, app_id=row.id, doc=None)
    if previous is not None:
        _remove_defined(site, previous)  # a domain an earlier, unfinished failback defined
    with agent_for(host) as agent:
        agent.info()  # reachable, or "host NAME unreachable at URL"
        if kind is AppKind.VM and body.target != "original":
            disks = _image_disks(site, app) if body.target == "restored" else set()
            _check_vm_target(agent, host.name, body.target, path, body.pool, disks)
        elif body.target == "new":
            held = agent.check_target(kind.value, path)
            if not held["usable"]:
                raise TargetNotEmpty(path=path, host=host.name, held=held["kind"])
    with site.catalog.begin() as session:
        row = _own_app_failed_over_at(session, peer=peer, app=app, action=action)
        peers.set_agreement(
            session,
            app_id=row.id,
            doc={
                "peer": peer,
                "target": body.target,
                "host": host_name,
                "path": path,
                "target_app": target_app.name if target_app is not None else None,
                "previous": None,
                **({"pool": body.pool} if new_vm else {}),
            },
        )
    return FailbackAgreed(
        app=app,
        target=body.target,
        host=host_name,
        path=path,
        target_app=target_app.name if target_app is not None else None,
    )


def production_command(
    site: Site,
    *,
    peer: str,
    app: str,
    which: Literal["stop", "start"],
    shutdown_timeout: float | None = None,
) -> CommandRan:
    """Run the app's own stop or start hook on its own host, as an agreed failback asks."""
    with site.catalog.read() as session:
        row = _own_app_failed_over_at(session, peer=peer, app=app, action=f"{which} the app of")
        _agreed(session, row, peer=peer, action=f"{which} the app of")
        _not_applying(session, row, peer=peer, action=f"{which} the app of")
        host = app_host(session, row, action=which)
    if row.kind is AppKind.VM:  # a VM is powered off and on, then its hooks run as any app's
        with agent_for(host) as agent:
            timeout = VM_SHUTDOWN_TIMEOUT if shutdown_timeout is None else shutdown_timeout
            # An original that is gone (a failback onto a restored or new VM, the usual case
            # after an outage) is off already; a start needs the domain.
            gone = which == "stop" and row.path not in {str(d.get("name")) for d in agent.vms()}
            if not gone:
                agent.power_vm(row.path, on=which == "start", timeout=timeout)
    ran = row.kind is AppKind.VM
    if hooks.script_for(row, Hook(which)):
        with agent_for(host) as agent:
            hooks.run_hook(agent, row, Hook(which), operation="failback", path=row.path)
        ran = True
    if row.kind is AppKind.POSTGRESQL and which == "stop":
        # What its stop hook left running (or all, without one): the restore that follows
        # must find the cluster stopped.
        with agent_for(host) as agent:
            ran = agent.pg_stop(row.path) or ran
    return CommandRan(ran=ran)


def production_apply(site: Site, *, peer: str, app: str, image: str) -> Job:
    """Restore a syncback ``image`` the peer sent onto the agreed target, without the app's
    own hooks (the failback runs them). For a restored/new target the app first takes
    the target's identity (host and path), which an undo reverts."""
    from tandem.domain.rules import RESTORE_CONFIRMATIONS
    from tandem.operations.restore import submit_restore

    action = "apply an image to"
    with site.catalog.begin() as session:
        row = _own_app_failed_over_at(session, peer=peer, app=app, action=action)
        doc = _agreed(session, row, peer=peer, action=action)
        _not_applying(session, row, peer=peer, action=action, any_job=True)
        img = q.get_image(session, image_id=image)
        if img.app_id != row.id or img.kind is not ImageKind.SYNCBACK or img.origin != peer:
            raise PeerRefused(
                peer=peer,
                action=action,
                app=app,
                reason=f"{image} is not a syncback of it from {peer}",
                fix="Send the image as a syncback first",
            )
        define = row.kind is AppKind.VM and doc["target"] == "new" and not doc.get("defined")
        if doc["target"] != "original" and not doc.get("previous") and not define:
            _switch_identity(session, row, doc)
    if define:  # a new VM: its domain is defined first, on empty disks the restore fills
        defined = _define_new_domain(site, row, doc, img)
        try:
            with site.catalog.begin() as session:
                row = _own_app_failed_over_at(session, peer=peer, app=app, action=action)
                doc = _agreed(session, row, peer=peer, action=action)
                doc["defined"] = defined
                _switch_identity(session, row, doc)
        except BaseException:  # the agreement ended meanwhile: the domain is nobody's
            _remove_defined(site, {"defined": defined})
            raise
    return submit_restore(
        site,
        app=app,
        image=image,
        confirm=list(RESTORE_CONFIRMATIONS),
        actor=peers.peer_token_name(peer),
        commands=False,
        rollforward=False,
    )


def _switch_identity(session: Any, row: App, doc: dict[str, Any]) -> None:
    """Step 8: the app takes the target's identity (host and path; a VM's domain), the
    former one kept in the agreement for an undo."""
    doc["previous"] = {"host": row.host, "path": row.path}
    row.host, row.path = doc["host"], doc["path"]
    peers.set_agreement(session, app_id=row.id, doc=doc)


def production_undo(site: Site, *, peer: str, app: str) -> Undone:
    """An agreed failback is undone at the peer: the app takes back its former identity;
    the peer's copy is the writer again (the app stays failed over there)."""
    with site.catalog.begin() as session:
        row = _own_app_failed_over_at(session, peer=peer, app=app, action="undo a failback of")
        doc = _agreed(session, row, peer=peer, action="undo a failback of")
        _not_applying(session, row, peer=peer, action="undo a failback of")
        _revert_identity(row, doc)
        peers.set_agreement(session, app_id=row.id, doc=None)
        undone = Undone(app=app, host=row.host, path=row.path)
    _remove_defined(site, doc)  # a new VM: its domain and volumes go
    return undone


def submit_commit(
    site: Site, app: str, body: CommitFailbackIn | None, actor: str | None = None
) -> Job:
    """``submit_end`` (commit) from the API's request."""
    return submit_end(site, app=app, undo=False, force=body.force if body else False, actor=actor)


def submit_undo(site: Site, app: str, body: None, actor: str | None = None) -> Job:
    """``submit_end`` (undo) from the API's call (it has no body)."""
    return submit_end(site, app=app, undo=True, actor=actor)


SPECS = (
    Spec(
        name="failback-replica",
        job_type=TYPE,
        params=Params,
        run=run_replica_failback,
        route="POST /apps/{name}/failback",
        submit=submit,
        subject="app",
        lifecycle=Operation.FAILBACK_REPLICA,
        request=FailbackIn,
        when=lambda body: body is not None and bool(body.target),
        command="failback",  # with --target original|restored|new
        title="Failback (replica style)",
        danger=True,
    ),
    Spec(
        name="commit-failback",
        job_type=COMMIT_TYPE,
        params=EndParams,
        run=run_commit,
        route="POST /apps/{name}/commit-failback",
        submit=submit_commit,
        subject="app",
        lifecycle=Operation.COMMIT_FAILBACK,
        request=CommitFailbackIn,
        endpoint="commit_failback",
        title="Commit failback",
    ),
    Spec(
        name="undo-failback",
        job_type=UNDO_TYPE,
        params=EndParams,
        run=run_undo,
        route="POST /apps/{name}/undo-failback",
        submit=submit_undo,
        subject="app",
        lifecycle=Operation.UNDO_FAILBACK,
        endpoint="undo_failback",
        title="Undo failback",
        danger=True,
    ),
)
