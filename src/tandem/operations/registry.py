"""Every operation that runs as a job, in one table: the one place an operation is declared.

An entry (``Spec``) says what the operator calls the operation, its job type, the typed
parameters its job stores and its run function reads (``Params``), the API call that starts
it with its request model and the function that submits it from that request, the lifecycle
operation whose rule it obeys, and how the console offers it (title, danger, confirmations).

Invariants
- ``handlers.job_handlers`` (the runner's table), the console's titles, dangers and action handlers,
  and the routes' submit calls are all read from ``REGISTRY``; ``tests/test_layers.py``
  checks that every entry has a handler, an API route and (when titled) a console form.
- A job's run function gets its parameters validated (``Spec.params.of``): a stored row
  that does not validate fails the job before anything is touched (``JobParamsInvalid``).
- ``submit`` takes the API's own request model, so the API and the console (whose forms are
  validated with the same model) start an operation the same way and are refused with the
  same message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from tandem.catalog.models import Job
from tandem.domain.lifecycle import Operation
from tandem.domain.rules import FAILOVER_CONFIRMATION, RESTORE_CONFIRMATIONS
from tandem.jobs.runner import Handler, JobContext
from tandem.operations import (
    capture,
    clone,
    failback,
    failover,
    gc,
    images,
    mount,
    present,
    replica_failback,
    replicate,
    restore,
    syncback,
    testfailover,
)
from tandem.operations.jobparams import JobParams, NoParams
from tandem.operations.site import Site
from tandem.transport.api import (
    CaptureIn,
    CloneIn,
    CommitFailbackIn,
    FailbackIn,
    FailoverIn,
    MountIn,
    PresentIn,
    RestoreIn,
)

Submit = Callable[[Site, str, Any, str | None], Job]
"""``submit(site, subject, request, actor)``: ``subject`` is the app's name, or the image's
id for an operation on an image (``Spec.subject``); ``request`` the API's request model, or
``None`` when the call has no body."""


@dataclass(frozen=True, kw_only=True)
class Spec:
    """One operation (see the module's docstring)."""

    name: str
    """What the operator calls it: the console's action, the CLI's command."""
    job_type: str
    params: type[JobParams]
    run: Callable[[Site, JobContext, Any], Mapping[str, Any] | None]
    """``run(site, ctx, params)``, ``params`` an instance of ``params``."""
    route: str
    """The API call that starts it, as ``METHOD /path`` under ``/api/v1``."""
    submit: Submit
    subject: Literal["app", "image", "site"]
    lifecycle: Operation | None
    """The lifecycle operation whose rule it obeys (none: housekeeping)."""
    request: type[BaseModel] | None = None
    """The API's request body (``None``: the call takes none)."""
    title: str | None = None
    """The console's title for it (``None``: the console does not offer it)."""
    danger: bool = False
    """The console shows it as destructive."""
    confirmations: tuple[str, ...] = ()
    """The phrases the operator types, in order (checked by the operation itself)."""
    command: str = ""
    """The CLI command that starts it, when it is not ``name`` (``image delete``)."""

    @property
    def cli(self) -> tuple[str, ...]:
        """The words of its CLI command after ``tandem``."""
        return tuple((self.command or self.name).split())

    def handler(self, site: Site) -> Handler:
        """The runner's handler: the stored parameters validated, then ``run``."""

        def handle(ctx: JobContext) -> Mapping[str, Any] | None:
            return self.run(site, ctx, self.params.of(ctx.job))

        return handle


# --- from the API's request models to the submit functions ---------------------------------


def _capture(site: Site, app: str, body: CaptureIn | None, actor: str | None) -> Job:
    label = body.label if body is not None else None
    return capture.submit_capture(site, app=app, label=label, actor=actor)


def _restore(site: Site, app: str, body: RestoreIn, actor: str | None) -> Job:
    return restore.submit_restore(
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


def _test_failover(site: Site, app: str, body: PresentIn, actor: str | None) -> Job:
    return testfailover.submit_test_failover(
        site,
        app=app,
        host=body.host,
        image=body.image,
        mount_point=body.mount_point,
        action=body.action,
        actor=actor,
        time=body.time,
        latest=body.latest,
        port=body.port,
        verify=body.verify,
        machine=present.VmAsk.of(body),
        confirm=body.confirm,
    )


def _failover(site: Site, app: str, body: FailoverIn, actor: str | None) -> Job:
    return failover.submit_failover(
        site,
        app=app,
        host=body.host,
        confirm=body.confirm,
        image=body.image,
        mount_point=body.mount_point,
        action=body.action,
        label=body.label,
        actor=actor,
        time=body.time,
        latest=body.latest,
        port=body.port,
        verify=body.verify,
        machine=present.VmAsk.of(body),
        hosts=body.hosts,
        all_hosts=body.all_hosts,
    )


def _mount(site: Site, image: str, body: MountIn, actor: str | None) -> Job:
    return mount.submit_mount(
        site,
        image=image,
        host=body.host,
        mount_point=body.mount_point,
        action=body.action,
        actor=actor,
        time=body.time,
        latest=body.latest,
        port=body.port,
        machine=present.VmAsk.of(body),
        confirm=body.confirm,
    )


def _clone(site: Site, image: str, body: CloneIn, actor: str | None) -> Job:
    return clone.submit_clone(
        site, image=image, host=body.host, path=body.path, name=body.name, actor=actor
    )


def _syncback(site: Site, app: str, body: CaptureIn | None, actor: str | None) -> Job:
    label = body.label if body is not None else None
    return syncback.submit_syncback(site, app=app, label=label, actor=actor)


def _failback(site: Site, app: str, body: FailbackIn | None, actor: str | None) -> Job:
    force = body.force if body is not None else False
    return failback.submit_failback(site, app=app, force=force, actor=actor)


def _replica_failback(site: Site, app: str, body: FailbackIn, actor: str | None) -> Job:
    return replica_failback.submit_replica_failback(
        site,
        app=app,
        target=body.target or "",
        host=body.host,
        path=body.path,
        power_on=body.power_on,
        shutdown_timeout=body.shutdown_timeout,
        pool=body.pool,
        actor=actor,
    )


def _commit(site: Site, app: str, body: CommitFailbackIn | None, actor: str | None) -> Job:
    force = body.force if body is not None else False
    return replica_failback.submit_end(site, app=app, undo=False, force=force, actor=actor)


def _undo(site: Site, app: str, body: None, actor: str | None) -> Job:
    return replica_failback.submit_end(site, app=app, undo=True, actor=actor)


def _delete(site: Site, image: str, body: None, actor: str | None) -> Job:
    return images.submit_delete(site, image_id=image, actor=actor)


def _gc(site: Site, subject: str, body: None, actor: str | None) -> Job:
    return gc.submit_gc(site, actor=actor)


def _replicate(site: Site, app: str, body: None, actor: str | None) -> Job:
    return replicate.submit_replicate(site, app=app, actor=actor)


# --- the table ----------------------------------------------------------------------------


CAPTURE = Spec(
    name="capture",
    job_type=capture.TYPE,
    params=capture.Params,
    run=capture.run_capture,
    route="POST /apps/{name}/capture",
    submit=_capture,
    subject="app",
    lifecycle=Operation.CAPTURE,
    request=CaptureIn,
    title="Capture now",
)
REPLICATE = Spec(
    name="replicate",
    job_type=replicate.TYPE,
    params=NoParams,
    run=replicate.run_replicate,
    route="POST /apps/{name}/replicate",
    submit=_replicate,
    subject="app",
    lifecycle=Operation.REPLICATE,
)
TEST_FAILOVER = Spec(
    name="test-failover",
    job_type=testfailover.TYPE,
    params=testfailover.Params,
    run=testfailover.run_test_failover,
    route="POST /apps/{name}/test-failover",
    submit=_test_failover,
    subject="app",
    lifecycle=Operation.TEST_FAILOVER,
    request=PresentIn,
    title="Test Failover",
)
FAILOVER = Spec(
    name="failover",
    job_type=failover.TYPE,
    params=failover.Params,
    run=failover.run_failover,
    route="POST /apps/{name}/failover",
    submit=_failover,
    subject="app",
    lifecycle=Operation.FAILOVER,
    request=FailoverIn,
    title="Failover",
    danger=True,
    confirmations=(FAILOVER_CONFIRMATION,),
)
SYNCBACK = Spec(
    name="syncback",
    job_type=syncback.TYPE,
    params=syncback.Params,
    run=syncback.run_syncback,
    route="POST /apps/{name}/syncback",
    submit=_syncback,
    subject="app",
    lifecycle=Operation.SYNCBACK,
    request=CaptureIn,
    title="Syncback",
)
RESTORE = Spec(
    name="restore",
    job_type=restore.TYPE,
    params=restore.Params,
    run=restore.run_restore,
    route="POST /apps/{name}/restore",
    submit=_restore,
    subject="app",
    lifecycle=Operation.RESTORE,
    request=RestoreIn,
    title="Restore to production",
    danger=True,
    confirmations=RESTORE_CONFIRMATIONS,
)
MOUNT = Spec(
    name="mount",
    job_type=mount.TYPE,
    params=mount.Params,
    run=mount.run_mount,
    route="POST /images/{image_id}/mount",
    submit=_mount,
    subject="image",
    lifecycle=Operation.MOUNT,
    request=MountIn,
    title="Mount",
)
CLONE = Spec(
    name="clone",
    job_type=clone.TYPE,
    params=clone.Params,
    run=clone.run_clone,
    route="POST /images/{image_id}/clone",
    submit=_clone,
    subject="image",
    lifecycle=Operation.CLONE,
    request=CloneIn,
    title="Clone",
)
FAILBACK = Spec(
    name="failback",
    job_type=failback.TYPE,
    params=failback.Params,
    run=failback.run_failback,
    route="POST /apps/{name}/failback",
    submit=_failback,
    subject="app",
    lifecycle=Operation.FAILBACK,
    request=FailbackIn,
    title="Failback (snapshot style)",
    danger=True,
)
REPLICA_FAILBACK = Spec(
    name="failback-replica",
    job_type=replica_failback.TYPE,
    params=replica_failback.Params,
    run=replica_failback.run_replica_failback,
    route="POST /apps/{name}/failback",
    submit=_replica_failback,
    subject="app",
    lifecycle=Operation.FAILBACK_REPLICA,
    request=FailbackIn,
    command="failback",  # with --target original|restored|new
    title="Failback (replica style)",
    danger=True,
)
COMMIT_FAILBACK = Spec(
    name="commit-failback",
    job_type=replica_failback.COMMIT_TYPE,
    params=replica_failback.EndParams,
    run=replica_failback.run_commit,
    route="POST /apps/{name}/commit-failback",
    submit=_commit,
    subject="app",
    lifecycle=Operation.COMMIT_FAILBACK,
    request=CommitFailbackIn,
    title="Commit failback",
)
UNDO_FAILBACK = Spec(
    name="undo-failback",
    job_type=replica_failback.UNDO_TYPE,
    params=replica_failback.EndParams,
    run=replica_failback.run_undo,
    route="POST /apps/{name}/undo-failback",
    submit=_undo,
    subject="app",
    lifecycle=Operation.UNDO_FAILBACK,
    title="Undo failback",
    danger=True,
)
DELETE_IMAGE = Spec(
    name="delete",
    job_type=images.DELETE_TYPE,
    params=NoParams,
    run=images.run_delete,
    route="DELETE /images/{image_id}",
    submit=_delete,
    subject="image",
    lifecycle=Operation.DELETE_IMAGE,
    title="Delete",
    command="image delete",
)
GC = Spec(
    name="gc",
    job_type=gc.TYPE,
    params=gc.Params,
    run=gc.run_gc,
    route="POST /gc",
    submit=_gc,
    subject="site",
    lifecycle=None,
)

REGISTRY: tuple[Spec, ...] = (
    CAPTURE,
    REPLICATE,
    TEST_FAILOVER,
    FAILOVER,
    SYNCBACK,
    RESTORE,
    MOUNT,
    CLONE,
    FAILBACK,
    REPLICA_FAILBACK,
    COMMIT_FAILBACK,
    UNDO_FAILBACK,
    DELETE_IMAGE,
    GC,
)
BY_NAME: Mapping[str, Spec] = {spec.name: spec for spec in REGISTRY}
BY_OPERATION: Mapping[Operation, Spec] = {
    spec.lifecycle: spec for spec in REGISTRY if spec.lifecycle is not None
}
