"""Clone (SPEC §4, CLI.md): a full, independent copy of an image as a new app on a host.

The new app is registered only after its data is in place: the host's agent writes the
whole image at the path, which must be missing (a volume) or missing or an empty folder (a
tree) — a clone never overwrites anything. The path is canonical and overlaps no app of
this site on the host (checked when the job is queued and again, in the same transaction,
when the new app is registered). The agent opens it without following any symlink. The new
app starts unmanaged, with the source app's kind and no hooks: hooks run as root on a host
and only an admin registers them (`tandem app set NEW --start SCRIPT …`), while an operator
may clone.
"""

from __future__ import annotations

from typing import Any

from tandem.catalog import queries as q
from tandem.catalog.models import Job
from tandem.domain.ids import validate_name
from tandem.domain.lifecycle import Operation, check_transition, storage_kind
from tandem.domain.paths import check_path
from tandem.errors import AlreadyExists, NotFound
from tandem.jobs.queue import submit_job
from tandem.jobs.runner import JobContext
from tandem.operations.apps import check_no_overlap
from tandem.operations.hosts import agent_for
from tandem.operations.jobparams import JobParams
from tandem.operations.restore import check_not_base_backup
from tandem.operations.site import Site
from tandem.operations.spec import Spec
from tandem.operations.streams import follow
from tandem.transport.agent_api import RestoreRequest
from tandem.transport.api import CloneIn, checked

TYPE = "clone"


class Params(JobParams):
    """A clone's job: the host and path the copy goes to, and the new app's name."""

    host: str
    path: str
    name: str


def submit(site: Site, image: str, body: CloneIn, actor: str | None = None) -> Job:
    """Queue a clone of ``image`` as ``body`` asks (the API's request)."""
    host, path, name = body.host, body.path, body.name
    check_path(path, "--path")
    with site.catalog.begin() as session:
        base = q.get_image(session, image_id=image)
        check_not_base_backup(base)
        check_transition(base.app.name, base.app.state, Operation.CLONE)
        q.get_host(session, name=host)
        check_no_overlap(session, host=host, path=path)
        new_name = validate_name(name or f"{base.app.name}-clone-{base.id[-6:]}", "app name")
        try:
            q.get_app(session, name=new_name)
        except NotFound:
            pass
        else:
            raise AlreadyExists(what="application", name=new_name)
        job = submit_job(
            session,
            type=TYPE,
            app=base.app.name,
            image=base.id,
            params=Params(host=host, path=path, name=new_name).stored(),
            actor=actor,
        )
    site.wake()
    return job


def run_clone(site: Site, ctx: JobContext, params: Params) -> dict[str, Any]:
    with site.catalog.read() as session:
        base = q.get_image(session, image_id=ctx.job.image or "")
        source = base.app
        host = q.get_host(session, name=params.host)
    transfer, token = site.sessions.open(
        job_id=ctx.job.id, write=False, readable=[bytes.fromhex(base.manifest)]
    )
    try:
        ctx.set_message(f"copying {base.id} to {params.path} on host {host.name}")
        body = checked(
            RestoreRequest,
            kind=storage_kind(source.kind),
            path=params.path,
            manifest=base.manifest,
            job=ctx.job.id,
            new_only=True,
            appliance=site.session_ref(transfer.id, token),
        )
        with agent_for(host) as agent:
            follow(ctx, agent.restore(body), host=host.name, moved=lambda: transfer.bytes_sent)
    finally:
        site.sessions.close(transfer)
    with site.catalog.begin() as session:
        check_no_overlap(session, host=host.name, path=params.path)
        app = q.add_app(
            session,
            name=params.name,
            kind=source.kind,
            host=host.name,
            path=params.path,
        )
    ctx.set_message(f"cloned {base.id} as application {app.name} on host {host.name}")
    return {"app": app.name, "path": params.path, "bytes_sent": transfer.bytes_sent}


SPEC = Spec(
    name="clone",
    job_type=TYPE,
    params=Params,
    run=run_clone,
    route="POST /images/{image_id}/clone",
    submit=submit,
    subject="image",
    lifecycle=Operation.CLONE,
    request=CloneIn,
    title="Clone",
)
