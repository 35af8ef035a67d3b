"""Operation, image and job routes: start jobs, follow them, look at images. Thin.

An operation's route is made from its entry in ``operations.registry`` (``_job_route``): it
hands the request model to the operation's ``submit`` (the console's forms do the same)."""

from __future__ import annotations

from collections.abc import Sequence
from inspect import Parameter, Signature
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from tandem.appliance.auth import Caller, Principal
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
    ExportOut,
    GcIn,
    GcOut,
    ImageOut,
    JobAnswer,
    JobLogOut,
    JobOut,
    VerifyOut,
)

ACCEPTED = status.HTTP_202_ACCEPTED


def make_router(site: Site) -> APIRouter:
    router = APIRouter()

    # --- operations (each starts a job): one route per registered operation -----------

    for route, specs in _by_route(ops.REGISTRY).items():
        _job_route(router, site, route, specs)

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
                "gc.full_every_seconds": body.full_every_seconds,
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


def _by_route(registry: Sequence[ops.Spec]) -> dict[str, list[ops.Spec]]:
    """The registered operations by the API call that starts them (in registry order; a
    call several share asks those with ``when`` first)."""
    routes: dict[str, list[ops.Spec]] = {}
    for spec in registry:
        if spec.generic_route:
            routes.setdefault(spec.route, []).append(spec)
    for specs in routes.values():
        specs.sort(key=lambda s: s.when is None)
    return routes


def _job_route(router: APIRouter, site: Site, route: str, specs: list[ops.Spec]) -> None:
    """``route`` starting the job of ``specs``' operation: the request model (optional when
    it has no required field), then the operation's ``submit``; 202 with the job."""
    first = specs[-1]  # the one without ``when``: it names the route
    method, path = route.split(" ", 1)
    subject = {"app": "name", "image": "image_id"}.get(first.subject)
    model = first.request
    optional = model is not None and not any(f.is_required() for f in model.model_fields.values())

    def start(**kw: Any) -> JobAnswer:
        who: Principal = kw["who"]
        body = kw.get("body")
        spec = next(s for s in specs if s.when is None or s.when(body))
        key = kw[subject] if subject is not None else ""
        return JobAnswer(job=job_out(spec.submit(site, key, body, who.name), who))

    params = []
    if subject is not None:
        kind = Name if subject == "name" else ImageId
        params.append(Parameter(subject, Parameter.KEYWORD_ONLY, annotation=kind))
    params.append(Parameter("who", Parameter.KEYWORD_ONLY, annotation=Caller))
    if model is not None:
        params.append(
            Parameter(
                "body",
                Parameter.KEYWORD_ONLY,
                annotation=model | None if optional else model,
                default=None if optional else Parameter.empty,
            )
        )
    start.__signature__ = Signature(params, return_annotation=JobAnswer)  # type: ignore[attr-defined]
    start.__name__ = first.function
    router.add_api_route(
        path,
        start,
        methods=[method],
        name=first.function,
        tags=[first.tag or ("images" if first.subject == "image" else "operations")],
        status_code=ACCEPTED,
        description=first.summary,
    )
