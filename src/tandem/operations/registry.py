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


@dataclass(frozen=True)
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
        new_vm=body.new_vm,
        network=body.network,
        power_on=body.power_on,
        pool=body.pool,
        vm=body.vm,
        shutdown_timeout=body.shutdown_timeout,
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
        new_vm=body.new_vm,
        network=body.network,
        power_on=body.power_on,
        pool=body.pool,
        vm=body.vm,
        shutdown_timeout=body.shutdown_timeout,
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
        new_vm=body.new_vm,
        network=body.network,
        power_on=body.power_on,
        pool=body.pool,
        vm=body.vm,
        shutdown_timeout=body.shutdown_timeout,
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

_O = Operation

CAPTURE = Spec(
    "capture", capture.TYPE, capture.Params, capture.run_capture,
    "POST /apps/{name}/capture", _capture, "app", _O.CAPTURE, CaptureIn,
    title="Capture now",
)  # fmt: skip
RESTORE = Spec(
    "restore", restore.TYPE, restore.Params, restore.run_restore,
    "POST /apps/{name}/restore", _restore, "app", _O.RESTORE, RestoreIn,
    title="Restore to production", danger=True, confirmations=RESTORE_CONFIRMATIONS,
)  # fmt: skip
TEST_FAILOVER = Spec(
    "test-failover", testfailover.TYPE, testfailover.Params, testfailover.run_test_failover,
    "POST /apps/{name}/test-failover", _test_failover, "app", _O.TEST_FAILOVER, PresentIn,
    title="Test Failover",
)  # fmt: skip
FAILOVER = Spec(
    "failover", failover.TYPE, failover.Params, failover.run_failover,
    "POST /apps/{name}/failover", _failover, "app", _O.FAILOVER, FailoverIn,
    title="Failover", danger=True, confirmations=(FAILOVER_CONFIRMATION,),
)  # fmt: skip
SYNCBACK = Spec(
    "syncback", syncback.TYPE, syncback.Params, syncback.run_syncback,
    "POST /apps/{name}/syncback", _syncback, "app", _O.SYNCBACK, CaptureIn,
    title="Syncback",
)  # fmt: skip
MOUNT = Spec(
    "mount", mount.TYPE, mount.Params, mount.run_mount,
    "POST /images/{image_id}/mount", _mount, "image", _O.MOUNT, MountIn,
    title="Mount",
)  # fmt: skip
CLONE = Spec(
    "clone", clone.TYPE, clone.Params, clone.run_clone,
    "POST /images/{image_id}/clone", _clone, "image", _O.CLONE, CloneIn,
    title="Clone",
)  # fmt: skip
FAILBACK = Spec(
    "failback", failback.TYPE, failback.Params, failback.run_failback,
    "POST /apps/{name}/failback", _failback, "app", _O.FAILBACK, FailbackIn,
    title="Failback (snapshot style)", danger=True,
)  # fmt: skip
REPLICA_FAILBACK = Spec(
    "failback-replica", replica_failback.TYPE, replica_failback.Params,
    replica_failback.run_replica_failback,
    "POST /apps/{name}/failback", _replica_failback, "app", _O.FAILBACK_REPLICA, FailbackIn,
    title="Failback (replica style)", danger=True,
)  # fmt: skip
COMMIT_FAILBACK = Spec(
    "commit-failback", replica_failback.COMMIT_TYPE, replica_failback.EndParams,
    replica_failback.run_commit,
    "POST /apps/{name}/commit-failback", _commit, "app", _O.COMMIT_FAILBACK, CommitFailbackIn,
    title="Commit failback",
)  # fmt: skip
UNDO_FAILBACK = Spec(
    "undo-failback", replica_failback.UNDO_TYPE, replica_failback.EndParams,
    replica_failback.run_undo,
    "POST /apps/{name}/undo-failback", _undo, "app", _O.UNDO_FAILBACK,
    title="Undo failback", danger=True,
)  # fmt: skip
DELETE_IMAGE = Spec(
    "delete", images.DELETE_TYPE, NoParams, images.run_delete,
    "DELETE /images/{image_id}", _delete, "image", _O.DELETE_IMAGE,
    title="Delete",
)  # fmt: skip
GC = Spec(
    "gc", gc.TYPE, gc.Params, gc.run_gc,
    "POST /gc", _gc, "site", None,
)  # fmt: skip
REPLICATE = Spec(
    "replicate", replicate.TYPE, NoParams, replicate.run_replicate,
    "POST /apps/{name}/replicate", _replicate, "app", _O.REPLICATE,
)  # fmt: skip

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
