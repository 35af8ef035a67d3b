"""Mount and unmount: present any image (a snapshot, replica, syncback…) to a host as a
writable virtual copy, and take a presentation away.

A mount is a ``mount`` image over the image it was made from; writing to it never changes
that image. Unmount withdraws any presented image (mount, test-failover, failover): the NBD
export, what the agent placed at the mount point, and the overlay; the row stays, ready to
be deleted with ``tandem image delete``. A failover image in use by a failed-over app is not
unmounted (fail back first).
"""

from __future__ import annotations

from typing import Any

from tandem.catalog import queries as q
from tandem.catalog.models import Image, Job
from tandem.domain.ids import new_image_id
from tandem.domain.images import ImageKind, ImageState
from tandem.domain.lifecycle import AppKind, AppState, Operation, check_transition
from tandem.errors import (
    ImageInService,
    ImageNotMounted,
    NotFound,
    PortWithoutRecovery,
)
from tandem.jobs.runner import JobContext
from tandem.operations import pg_recovery, present
from tandem.operations.hosts import agent_for
from tandem.operations.site import Site
from tandem.operations.spec import Spec
from tandem.transport.api import MountIn

TYPE = "mount"
PRESENTED = (ImageKind.MOUNT, ImageKind.TEST_FAILOVER, ImageKind.FAILOVER)


class Params(present.PresentParams):
    """A mount's job: a presentation, and whether a database base is recovered (to
    ``time``; none: the end of the WAL held)."""

    recover: bool = False


def submit(site: Site, image: str, body: MountIn, actor: str | None = None) -> Job:
    """Queue a mount of ``image`` as ``body`` asks (the API's request)."""
    host, mount_point, action, confirm = body.host, body.mount_point, body.action, body.confirm
    time, latest, port, machine = body.time, body.latest, body.port, present.VmAsk.of(body)
    with site.catalog.read() as session:
        app = q.get_image(session, image_id=image).app
    # A vm app's image may be mounted as its export alone: no VM required.
    present.check_at_host(
        site,
        app,
        host,
        machine,
        keep_identity=False,
        required=False,
        image=image,
        confirm=confirm,
    )
    target = pg_recovery.parse_target(time, latest, app)
    recover = app.kind is AppKind.POSTGRESQL and (time is not None or latest)
    if recover:
        pg_recovery.plan(site, app, target, image)  # refused outside the window
    elif port is not None:
        raise PortWithoutRecovery()
    with site.catalog.begin() as session:
        base = q.get_image(session, image_id=image)
        app = base.app
        check_transition(app.name, app.state, Operation.MOUNT)
        q.get_host(session, name=host)
        action, chosen = present.placed(
            app, machine, action, mount_point, keep_identity=False, required=False
        )
        recovering: dict[str, Any] = {}
        if recover:
            time_text = target.isoformat() if target else None
            recovering = {"recover": True, "time": time_text, "port": port}
        job = present.queued(
            session, Params, type=TYPE, app=app.name, image=base.id, lifecycle=False,
            actor=actor, host=host, mount_point=mount_point, action=action, target=chosen,
            **recovering,
        )  # fmt: skip
    site.wake()
    return job


def run_mount(site: Site, ctx: JobContext, params: Params) -> dict[str, Any]:
    with site.catalog.read() as session:
        base = q.get_image(session, image_id=ctx.job.image or "")
        app = base.app
        host = q.get_host(session, name=params.host)
    with agent_for(host) as agent:
        agent.info()
    recovery = pg_recovery.asked(site, app, params.time, base.id) if params.recover else None
    image_id = new_image_id()
    shown, recovered = pg_recovery.present_copy(
        site, ctx, recovery, image_id=image_id, base=base, app=app, host=host, params=params
    )
    row = present.record(
        site,
        image_id=image_id,
        app=app,
        base=base,
        kind=ImageKind.MOUNT,
        host=host,
        presented=shown,
        label=None,
    )
    ctx.set_image(row.id)
    ctx.set_message(
        f"{base.id} mounted as {row.id} on host {host.name}"
        + (f" at {shown.mount_point}" if shown.mount_point else "")
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


def unmount(site: Site, *, image: str) -> Image:
    """Withdraw a presented image; it stays as a row until deleted."""
    with site.catalog.read() as session:
        row = q.get_image(session, image_id=image)
        if row.kind not in PRESENTED or row.state is not ImageState.MOUNTED:
            raise ImageNotMounted(image=row.id, kind=row.kind.value)
        if row.kind is ImageKind.FAILOVER and row.app.state is not AppState.MANAGED:
            raise ImageInService(image=row.id, app=row.app.name)
        host = None
        if row.mounted_host:
            try:
                host = q.get_host(session, name=row.mounted_host)
            except NotFound:
                host = None
    present.withdraw(site, row, host)
    with site.catalog.begin() as session:
        return q.set_image_state(session, image_id=row.id, state=ImageState.READY)


SPEC = Spec(
    name="mount",
    job_type=TYPE,
    params=Params,
    run=run_mount,
    route="POST /images/{image_id}/mount",
    submit=submit,
    subject="image",
    lifecycle=Operation.MOUNT,
    request=MountIn,
    title="Mount",
)
