"""Failover (SPEC §3): the app comes up at the DR site from its latest (or chosen) replica.

Runs on the DR appliance; the server requires the typed confirmation ``FAILOVER``.
1. The lifecycle moves the app MANAGED → FAILED_OVER and raises its writer epoch here:
   from now on this appliance refuses replication carrying the old epoch (production can
   no longer overwrite the DR copy: never two writable copies feeding replication), and
   transfers of the app that are under way are cut.
2. A writable virtual copy of the replica (a ``failover`` image) is presented to the chosen
   host: an NBD export for a volume; a file tree as a FUSE copy at the mount point (its
   copy-on-write layer beside the mount point, ``agent.fusemount``), or a full copy with
   ``--action copy`` or where the host has no FUSE; the replica itself stays intact as the
   reference copy.
3. The app's start hook runs on that host (``operations.hooks``; the DR site's own hooks,
   set at the DR appliance, with ``TANDEM_APP_PATH`` the failed-over copy's mount point and
   ``TANDEM_NBD_URI`` a volume's export).

If presenting fails, nothing is left (no export, no files, no row) and the state is
unchanged: the transition is recorded only after the copy is presented.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from tandem.catalog import queries as q
from tandem.catalog.models import Job
from tandem.domain.hooks import Hook
from tandem.domain.ids import new_image_id
from tandem.domain.images import ImageKind
from tandem.domain.lifecycle import AppFacts, AppKind, Operation, check_transition
from tandem.domain.rules import FAILOVER_CONFIRMATION, check_confirmations
from tandem.errors import OptionsDoNotApply, TandemError
from tandem.jobs.runner import JobContext
from tandem.operations import hooks, peers, pg_recovery, present, wal
from tandem.operations.capture import check_label
from tandem.operations.hosts import agent_for
from tandem.operations.site import Site
from tandem.operations.spec import Spec
from tandem.operations.testfailover import check_not_production_host, pick_replica
from tandem.transport.api import FailoverIn

TYPE = "failover"


class Params(present.PresentParams):
    """A failover's job: a presentation, its label, the other hosts a new VM is defined on
    (``--hosts``), and whether a database copy is verified."""

    label: str | None = None
    vm_hosts: list[str] = Field(default_factory=list)
    verify: bool = False


def submit(site: Site, app: str, body: FailoverIn, actor: str | None = None) -> Job:
    """Queue a failover of ``app`` as ``body`` asks (the API's request)."""
    host, image, mount_point, action = body.host, body.image, body.mount_point, body.action
    machine, confirm, hosts, all_hosts = (
        present.VmAsk.of(body),
        body.confirm,
        body.hosts,
        body.all_hosts,
    )
    label = body.label
    check_confirmations(confirm, [FAILOVER_CONFIRMATION])
    label = check_label(label)
    with site.catalog.read() as session:
        row = q.get_app(session, name=app)
    if machine.vm and (hosts or all_hosts):
        raise OptionsDoNotApply(
            options="--hosts and --all-hosts",
            why="they define a new VM on several hosts, and an existing domain (--vm) lives on "
            "its own host",
            fix="Leave them out, or use --new-vm NAME",
        )
    present.check_at_host(
        site,
        row,
        host,
        machine,
        keep_identity=True,
        required=True,
        image=image,
        confirm=confirm,
        before=(FAILOVER_CONFIRMATION,),
    )
    also = present.vm_hosts_for(site, row, host, hosts, all_hosts)
    elsewhere = present.VmAsk(machine.new_vm, machine.network, pool=machine.pool)  # defined off
    for other in also:  # the same pool and network on every host the VM is defined on
        present.check_vm_target(site, other, elsewhere.check(row, keep_identity=True))
    image, recovering = pg_recovery.requested(site, row, body, image)
    with site.catalog.begin() as session:
        row = q.get_app(session, name=app)
        replicas = len(q.list_images(session, app=app, kind=ImageKind.REPLICA))
        check_transition(row.name, row.state, Operation.FAILOVER, AppFacts(replica_images=replicas))
        replica = pick_replica(session, row, image)
        check_not_production_host(session, row, host)
        action, target = present.placed(
            row, machine, action, mount_point, keep_identity=True, required=True
        )
        if row.kind is AppKind.VM and action == "specify":
            raise OptionsDoNotApply(
                options="--mount-point",
                why="a failed-over VM runs as a VM (--new-vm NAME or --vm DOMAIN); its disks' "
                "file systems are mounted by test-failover or mount",
                fix="Leave it out",
            )
        if row.kind is AppKind.VM and action == "copy":
            raise OptionsDoNotApply(
                options="--action copy",
                why="a failed-over VM runs from the appliance's export, so that syncback sees "
                "its writes (copies are for test failover and mount)",
                fix="Leave it out",
            )
        if row.kind is AppKind.VOLUME and action != "map-only":
            # A file copy at a mount point would take writes that syncback never sees.
            raise OptionsDoNotApply(
                options="--mount-point and --action",
                why=f"the failed-over volume {row.name!r} is presented over NBD only",
                fix="Leave them out and attach the export its job shows (nbd_uri)",
            )
        job = present.queued(
            session, Params, type=TYPE, app=row.name, image=replica.id, lifecycle=True,
            actor=actor, host=host, mount_point=mount_point, action=action, target=target,
            label=label, vm_hosts=also, **recovering,
        )  # fmt: skip
    site.wake()
    return job


def run_failover(site: Site, ctx: JobContext, params: Params) -> dict[str, Any]:
    with site.catalog.read() as session:
        app = q.get_app(session, name=ctx.job.app or "")
        replicas = len(q.list_images(session, app=app.name, kind=ImageKind.REPLICA))
        check_transition(app.name, app.state, Operation.FAILOVER, AppFacts(replica_images=replicas))
        replica = pick_replica(session, app, ctx.job.image)
        host = q.get_host(session, name=params.host)
        also = [q.get_host(session, name=n) for n in params.vm_hosts]
    for where in (host, *also):
        with agent_for(where) as agent:
            agent.info()
    recovery = None
    if app.kind is AppKind.POSTGRESQL:
        recovery = pg_recovery.asked(site, app, params.time)
        replica = recovery.base
    cut = site.sessions.close_matching(app=app.name)
    if cut:
        ctx.log(f"cut {cut} replication transfer(s) of {app.name} under way")
    image_id = new_image_id()
    shown, recovered = pg_recovery.present_copy(
        site,
        ctx,
        recovery,
        image_id=image_id,
        base=replica,
        app=app,
        host=host,
        params=params,
        verify=params.verify,
        vm_hosts=also,
        # The app serves from this copy, and a catch-up syncback cuts its layer while it
        # does: the layer lives on the mount point's file system, the operator's choice.
        layer_beside=True,
    )
    try:
        with site.catalog.begin() as session:
            step = q.record_transition(
                session,
                app=app.name,
                operation=Operation.FAILOVER,
                actor=ctx.job.actor,
                job=ctx.job.id,
                facts=AppFacts(replica_images=replicas),
            )
            epoch = step.epoch
    except BaseException:
        present.withdraw_unrecorded(site, image_id, host, shown)
        raise
    row = present.record(
        site,
        image_id=image_id,
        app=app,
        base=replica,
        kind=ImageKind.FAILOVER,
        host=host,
        presented=shown,
        label=params.label,
    )
    ctx.set_image(row.id)
    ctx.log(
        f"{app.name} is failed over; writer epoch {epoch}: replication from production is refused"
    )
    if recovery is not None and shown.paths:
        wal.start_dr_capture(site, ctx, app, (host.name, shown.paths[0]))
    refused = peers.tell_failed_over(site, app=app.name, epoch=epoch)
    if refused is not None:  # production also learns it when its next replication is refused
        ctx.log(f"could not tell production that {app.name} failed over: {refused}", "warning")
    started = False
    if hooks.script_for(app, Hook.START):
        try:
            with agent_for(host) as agent:
                started = hooks.run_hook(
                    agent,
                    app,
                    Hook.START,
                    operation=TYPE,
                    image=row.id,
                    path=shown.mount_point,
                    nbd_uri=shown.nbd_uri,
                    ctx=ctx,
                )
        except TandemError as exc:
            raise type(exc)(
                f"{exc.message.rstrip('.')}; the app is failed over to image {row.id}, start "
                "it by hand"
            ) from exc
    ctx.set_message(
        f"{app.name} failed over to {row.id} on host {host.name}"
        + (f" at {shown.mount_point}" if shown.mount_point else "")
        + (", started" if started else "")
        + (f" as VM {shown.vm['name']}" if shown.vm else "")
        + (f" (defined on {', '.join(shown.vm_hosts)} too)" if shown.vm_hosts else "")
        + pg_recovery.note(recovered)
    )
    return {
        "image": row.id,
        **shown.export_fields(),
        "paths": shown.paths,
        "epoch": epoch,
        **recovered,
        "vm": shown.vm,
        "vm_hosts": [host.name, *(shown.vm_hosts or [])] if shown.vm else None,
    }


SPEC = Spec(
    name="failover",
    job_type=TYPE,
    params=Params,
    run=run_failover,
    route="POST /apps/{name}/failover",
    submit=submit,
    subject="app",
    lifecycle=Operation.FAILOVER,
    request=FailoverIn,
    title="Failover",
    danger=True,
    confirmations=(FAILOVER_CONFIRMATION,),
)
