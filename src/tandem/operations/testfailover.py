"""Test failover (SPEC §2): a writable virtual copy of a replica presented to a DR host while
replication goes on. The replica is never changed; the app's state does not change.

Rules, checked when the job is submitted and again when it runs: the app has a replica
here; at most one test-failover image per host, and an app is tested on one host at a
time; never onto the host the app runs on in production; the host's agent must answer
(a clear "host NAME unreachable at URL" otherwise).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from tandem.catalog import queries as q
from tandem.catalog.models import App, Image, Job
from tandem.domain.ids import new_image_id
from tandem.domain.images import ImageKind, ImageState
from tandem.domain.lifecycle import AppFacts, AppKind, Operation, check_transition
from tandem.domain.rules import PresentedImage, check_test_failover_target
from tandem.errors import (
    ImageNotOfApp,
    NotFound,
    TestOnProductionHost,
)
from tandem.jobs.runner import JobContext
from tandem.operations import pg_recovery, present
from tandem.operations.hosts import agent_for
from tandem.operations.site import Site
from tandem.operations.spec import Spec
from tandem.transport.api import PresentIn

TYPE = "test-failover"


class Params(present.PresentParams):
    """A test failover's job: a presentation, and whether a database copy is verified."""

    verify: bool = False


def pick_replica(session: Session, app: App, image: str | None) -> Image:
    """The replica to present: the one named, or the newest."""
    if image:
        row = q.get_image(session, image_id=image)
        if row.app.name != app.name or row.kind is not ImageKind.REPLICA:
            raise ImageNotOfApp(image=image, what="a replica", app=app.name)
        return row
    newest = q.latest_image(session, app=app.name, kind=ImageKind.REPLICA)
    if newest is None:
        raise NotFound(what="replica of application", name=app.name, listing=f"images {app.name}")
    return newest


def check_not_production_host(session: Session, app: App, host: str) -> None:
    """The host exists here and is not the one the app runs on in production."""
    q.get_host(session, name=host)
    if host == app.host:
        raise TestOnProductionHost(host=host, app=app.name)


def check_target(session: Session, app: App, host: str) -> None:
    check_not_production_host(session, app, host)
    presented = [
        PresentedImage(image_id=i.id, app=i.app.name, host=i.mounted_host or "")
        for i in q.list_images_of_kind(session, kind=ImageKind.TEST_FAILOVER)
        if i.state is ImageState.MOUNTED
    ]
    check_test_failover_target(
        app=app.name, source_host=app.host, target_host=host, is_vm=False, test_images=presented
    )


def submit(site: Site, app: str, body: PresentIn, actor: str | None = None) -> Job:
    """Queue a test failover of ``app`` as ``body`` asks (the API's request)."""
    host, image, mount_point, action = body.host, body.image, body.mount_point, body.action
    machine, confirm = present.VmAsk.of(body), body.confirm
    with site.catalog.read() as session:
        row = q.get_app(session, name=app)
    required = not mount_point  # a vm app runs as a VM, or has its disks' file systems mounted
    present.check_at_host(
        site,
        row,
        host,
        machine,
        keep_identity=False,
        required=required,
        image=image,
        confirm=confirm,
    )
    image, recovering = pg_recovery.requested(site, row, body, image)
    with site.catalog.begin() as session:
        row = q.get_app(session, name=app)
        replicas = len(q.list_images(session, app=app, kind=ImageKind.REPLICA))
        check_transition(
            row.name, row.state, Operation.TEST_FAILOVER, AppFacts(replica_images=replicas)
        )
        replica = pick_replica(session, row, image)
        check_target(session, row, host)
        action, target = present.placed(
            row, machine, action, mount_point, keep_identity=False, required=required
        )
        job = present.queued(
            session, Params, type=TYPE, app=row.name, image=replica.id, lifecycle=True,
            actor=actor, host=host, mount_point=mount_point, action=action, target=target,
            **recovering,
        )  # fmt: skip
    site.wake()
    return job


def run_test_failover(site: Site, ctx: JobContext, params: Params) -> dict[str, Any]:
    with site.catalog.read() as session:
        app = q.get_app(session, name=ctx.job.app or "")
        replica = pick_replica(session, app, ctx.job.image)
        check_target(session, app, params.host)
        host = q.get_host(session, name=params.host)
    with agent_for(host) as agent:
        agent.info()  # reachable, or "host NAME unreachable at URL"
    recovery = None
    if app.kind is AppKind.POSTGRESQL:
        recovery = pg_recovery.asked(site, app, params.time)
        replica = recovery.base
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
    )
    row = present.record(
        site,
        image_id=image_id,
        app=app,
        base=replica,
        kind=ImageKind.TEST_FAILOVER,
        host=host,
        presented=shown,
        label=None,
    )
    with site.catalog.begin() as session:
        q.record_transition(
            session,
            app=app.name,
            operation=Operation.TEST_FAILOVER,
            actor=ctx.job.actor,
            job=ctx.job.id,
            facts=AppFacts(replica_images=1),
        )
    ctx.set_image(row.id)
    ctx.set_message(
        f"test copy {row.id} of {replica.id} on host {host.name}"
        + (f" at {shown.mount_point}" if shown.mount_point else "")
        + (" (NBD)" if shown.nbd_uri else "")
        + (f" as {present.vm_kind(shown.vm)} VM {shown.vm['name']}" if shown.vm else "")
        + pg_recovery.note(recovered)
    )
    return {
        "image": row.id,
        **shown.export_fields(),
        "paths": shown.paths,
        "vm": shown.vm,
        **recovered,
    }


SPEC = Spec(
    name="test-failover",
    job_type=TYPE,
    params=Params,
    run=run_test_failover,
    route="POST /apps/{name}/test-failover",
    submit=submit,
    subject="app",
    lifecycle=Operation.TEST_FAILOVER,
    request=PresentIn,
    title="Test Failover",
)
