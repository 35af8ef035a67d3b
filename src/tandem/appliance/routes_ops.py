"""Operation, image and job routes: start jobs, follow them, look at images. Thin."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status
from starlette.concurrency import run_in_threadpool

from tandem.appliance.auth import Caller
from tandem.appliance.schemas import (
    CaptureIn,
    ImageOut,
    JobAnswer,
    JobLogOut,
    JobOut,
    RestoreIn,
    VerifyOut,
)
from tandem.domain.jobs import JobStatus
from tandem.operations import capture, images, monitor, restore
from tandem.operations.site import Site

ACCEPTED = status.HTTP_202_ACCEPTED


def make_router(site: Site) -> APIRouter:
    router = APIRouter()

    # --- operations (each starts a job) -----------------------------------------------

    @router.post("/apps/{name}/capture", tags=["operations"], status_code=ACCEPTED)
    def capture_app(name: str, who: Caller, body: CaptureIn | None = None) -> JobAnswer:
        label = body.label if body is not None else None
        job = capture.submit_capture(site, app=name, label=label, actor=who.name)
        return JobAnswer(job=JobOut.of(job))

    @router.post("/apps/{name}/restore", tags=["operations"], status_code=ACCEPTED)
    def restore_app(name: str, body: RestoreIn, who: Caller) -> JobAnswer:
        job = restore.submit_restore(
            site, app=name, image=body.image, confirm=body.confirm, actor=who.name
        )
        return JobAnswer(job=JobOut.of(job))

    # --- images -----------------------------------------------------------------------

    @router.get("/apps/{name}/images", tags=["images"])
    def list_images(name: str) -> list[ImageOut]:
        return [ImageOut.of(row) for row in images.list_images(site, app=name)]

    @router.get("/images/{image_id}", tags=["images"])
    def show_image(image_id: str) -> ImageOut:
        return ImageOut.of(images.get_image(site, image_id=image_id))

    @router.delete("/images/{image_id}", tags=["images"], status_code=ACCEPTED)
    def delete_image(image_id: str, who: Caller) -> JobAnswer:
        job = images.submit_delete(site, image_id=image_id, actor=who.name)
        return JobAnswer(job=JobOut.of(job))

    @router.get("/images/{image_id}/verify", tags=["images"])
    async def verify_image(image_id: str) -> VerifyOut:
        report = await run_in_threadpool(images.verify_image, site, image_id=image_id)
        return VerifyOut(**report)

    # --- jobs (the Monitor) -----------------------------------------------------------

    @router.get("/jobs", tags=["jobs"])
    def list_jobs(
        app: Annotated[str | None, Query(max_length=64)] = None,
        status: Annotated[list[JobStatus] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> list[JobOut]:
        rows = monitor.list_jobs(site, app=app, status=status, limit=limit)
        return [JobOut.of(row) for row in rows]

    @router.get("/jobs/{job_id}", tags=["jobs"])
    def show_job(job_id: str) -> JobOut:
        return JobOut.of(monitor.get_job(site, job_id=job_id))

    @router.get("/jobs/{job_id}/log", tags=["jobs"])
    def job_log(job_id: str) -> list[JobLogOut]:
        return [JobLogOut.of(line) for line in monitor.job_log(site, job_id=job_id)]

    @router.post("/jobs/{job_id}/cancel", tags=["jobs"])
    def cancel(job_id: str, who: Caller) -> JobAnswer:
        return JobAnswer(job=JobOut.of(monitor.cancel_job(site, job_id=job_id, actor=who.name)))

    return router
