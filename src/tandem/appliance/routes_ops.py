"""Operation, image and job routes: start jobs, follow them, look at images. Thin.

An operation's route hands its request model to the operation's ``submit`` in
``operations.registry`` (the console's forms do the same)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from tandem.appliance.auth import Caller
from tandem.appliance.documents import gc_out, image_out, job_log_out, job_out
from tandem.appliance.paging import MAX_PAGE, Limit, fetch, page
from tandem.appliance.params import ImageId, JobId, Name
from tandem.domain.ids import IMAGE_ID_PATTERN, JOB_ID_PATTERN
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppKind
from tandem.operations import gc, images, monitor, mount, present, wal
from tandem.operations import registry as ops
from tandem.operations.site import Site
from tandem.transport.api import (
    NAME,
    CaptureIn,
    CloneIn,
    CommitFailbackIn,
    ExportOut,
    FailbackIn,
    FailoverIn,
    GcIn,
    GcOut,
    ImageOut,
    JobAnswer,
    JobLogOut,
    JobOut,
    MountIn,
    PresentIn,
    RestoreIn,
    VerifyOut,
)

ACCEPTED = status.HTTP_202_ACCEPTED


def make_router(site: Site) -> APIRouter:
    router = APIRouter()

    # --- operations (each starts a job) -----------------------------------------------

    @router.post("/apps/{name}/capture", tags=["operations"], status_code=ACCEPTED)
    def capture_app(name: Name, who: Caller, body: CaptureIn | None = None) -> JobAnswer:
        return JobAnswer(job=job_out(ops.CAPTURE.submit(site, name, body, who.name), who))

    @router.post("/apps/{name}/restore", tags=["operations"], status_code=ACCEPTED)
    def restore_app(name: Name, body: RestoreIn, who: Caller) -> JobAnswer:
        return JobAnswer(job=job_out(ops.RESTORE.submit(site, name, body, who.name), who))

    @router.post("/apps/{name}/test-failover", tags=["operations"], status_code=ACCEPTED)
    def test_failover_app(name: Name, body: PresentIn, who: Caller) -> JobAnswer:
        return JobAnswer(job=job_out(ops.TEST_FAILOVER.submit(site, name, body, who.name), who))

    @router.post("/apps/{name}/failover", tags=["operations"], status_code=ACCEPTED)
    def failover_app(name: Name, body: FailoverIn, who: Caller) -> JobAnswer:
        return JobAnswer(job=job_out(ops.FAILOVER.submit(site, name, body, who.name), who))

    @router.post("/apps/{name}/syncback", tags=["operations"], status_code=ACCEPTED)
    def syncback_app(name: Name, who: Caller, body: CaptureIn | None = None) -> JobAnswer:
        return JobAnswer(job=job_out(ops.SYNCBACK.submit(site, name, body, who.name), who))

    @router.post("/apps/{name}/failback", tags=["operations"], status_code=ACCEPTED)
    def failback_app(name: Name, who: Caller, body: FailbackIn | None = None) -> JobAnswer:
        # Snapshot style; replica style when the body names a ``target``.
        spec = ops.REPLICA_FAILBACK if body is not None and body.target else ops.FAILBACK
        return JobAnswer(job=job_out(spec.submit(site, name, body, who.name), who))

    @router.post("/apps/{name}/commit-failback", tags=["operations"], status_code=ACCEPTED)
    def commit_failback(name: Name, who: Caller, body: CommitFailbackIn | None = None) -> JobAnswer:
        return JobAnswer(job=job_out(ops.COMMIT_FAILBACK.submit(site, name, body, who.name), who))

    @router.post("/apps/{name}/undo-failback", tags=["operations"], status_code=ACCEPTED)
    def undo_failback(name: Name, who: Caller) -> JobAnswer:
        return JobAnswer(job=job_out(ops.UNDO_FAILBACK.submit(site, name, None, who.name), who))

    @router.post("/images/{image_id}/clone", tags=["images"], status_code=ACCEPTED)
    def clone_image(image_id: ImageId, body: CloneIn, who: Caller) -> JobAnswer:
        return JobAnswer(job=job_out(ops.CLONE.submit(site, image_id, body, who.name), who))

    @router.post("/images/{image_id}/mount", tags=["images"], status_code=ACCEPTED)
    def mount_image(image_id: ImageId, body: MountIn, who: Caller) -> JobAnswer:
        return JobAnswer(job=job_out(ops.MOUNT.submit(site, image_id, body, who.name), who))

    @router.post("/images/{image_id}/unmount", tags=["images"])
    async def unmount_image(image_id: ImageId) -> ImageOut:
        row = await run_in_threadpool(mount.unmount, site, image=image_id)
        return image_out(row)

    # --- images -----------------------------------------------------------------------

    @router.get("/apps/{name}/images", tags=["images"])
    def list_images(
        name: Name,
        request: Request,
        response: Response,
        limit: Limit = None,
        after: Annotated[str | None, Query(pattern=IMAGE_ID_PATTERN)] = None,
    ) -> list[ImageOut]:
        """The app's images, newest first (paged with ``limit``/``after``: see X-Next-Cursor)."""
        rows = images.list_images(site, app=name, after=after, limit=fetch(limit))
        rows = page(rows, limit=limit, request=request, response=response, key=lambda r: r.id)
        shown = (
            wal.window(site, rows[0].app).as_dict()
            if rows and rows[0].app.kind is AppKind.POSTGRESQL
            else None
        )
        return [image_out(row, shown) for row in rows]

    @router.get("/images/{image_id}", tags=["images"])
    def show_image(image_id: ImageId) -> ImageOut:
        return image_out(images.get_image(site, image_id=image_id))

    @router.delete("/images/{image_id}", tags=["images"], status_code=ACCEPTED)
    def delete_image(image_id: ImageId, who: Caller) -> JobAnswer:
        return JobAnswer(job=job_out(ops.DELETE_IMAGE.submit(site, image_id, None, who.name), who))

    @router.post("/images/{image_id}/export", tags=["images"])
    def export_image(image_id: ImageId) -> ExportOut:
        """The NBD export of a presented image: a capability (whoever holds the URI reads
        and writes the copy), so it is asked for on purpose, by an operator, and audited."""
        uri = images.export_uri(site, image_id=image_id)
        return ExportOut(
            image=image_id, nbd_uri=uri, nbd_fingerprint=present.export_fingerprint(site, uri)
        )

    @router.get("/images/{image_id}/verify", tags=["images"])
    async def verify_image(image_id: ImageId) -> VerifyOut:
        report = await run_in_threadpool(images.verify_image, site, image_id=image_id)
        return VerifyOut(**report)

    # --- jobs (the Monitor) -----------------------------------------------------------

    @router.get("/jobs", tags=["jobs"])
    def list_jobs(
        who: Caller,
        request: Request,
        response: Response,
        app: Annotated[str | None, Query(max_length=64, pattern=NAME)] = None,
        status: Annotated[list[JobStatus] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        after: Annotated[str | None, Query(pattern=JOB_ID_PATTERN)] = None,
    ) -> list[JobOut]:
        """Jobs newest first; a page of ``limit`` (X-Next-Cursor names the next one)."""
        rows = monitor.list_jobs(site, app=app, status=status, after=after, limit=limit + 1)
        rows = page(rows, limit=limit, request=request, response=response, key=lambda r: r.id)
        return [job_out(row, who) for row in rows]

    # --- garbage collection -----------------------------------------------------------

    @router.post("/gc", tags=["jobs"], status_code=ACCEPTED)
    def start_gc(who: Caller) -> JobAnswer:
        """Start a garbage collection of the pool now (a ``gc`` job)."""
        return JobAnswer(job=job_out(ops.GC.submit(site, "", None, who.name), who))

    @router.get("/gc", tags=["jobs"])
    def gc_status() -> GcOut:
        return gc_out(gc.status(site))

    @router.patch("/gc", tags=["jobs"])
    def configure_gc(body: GcIn) -> GcOut:
        gc.configure(
            site,
            {
                "gc.after_deletions": body.after_deletions,
                "gc.every_seconds": body.every_seconds,
                "jobs.keep_days": body.keep_job_days,
            },
        )
        return gc_out(gc.status(site))

    @router.get("/jobs/{job_id}", tags=["jobs"])
    def show_job(
        job_id: JobId,
        who: Caller,
        wait: Annotated[
            float,
            Query(
                ge=0,
                le=monitor.MAX_WAIT,
                description="Seconds to wait for the job to end before answering (a long "
                "poll: the answer comes as soon as it ends); 0 answers at once.",
            ),
        ] = 0.0,
    ) -> JobOut:
        return job_out(monitor.get_job(site, job_id=job_id, wait=wait), who)

    @router.get("/jobs/{job_id}/log", tags=["jobs"])
    def job_log(job_id: JobId) -> list[JobLogOut]:
        return [job_log_out(line) for line in monitor.job_log(site, job_id=job_id)]

    @router.post("/jobs/{job_id}/cancel", tags=["jobs"])
    def cancel(job_id: JobId, who: Caller) -> JobAnswer:
        return JobAnswer(job=job_out(monitor.cancel_job(site, job_id=job_id, actor=who.name), who))

    return router
