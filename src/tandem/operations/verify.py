"""Verify an image as a job: read and check every chunk it names, with progress in the Monitor.

A long verify of a big image is a job like any operation (``tandem image verify``, the
console's "Verify" on an image): it changes nothing, so it is no lifecycle job and runs
beside the app's other jobs. Its result is the report of ``images.verify_image`` (what is
missing or corrupt); a damaged image is a job that succeeded with ``ok: false``, so the
report is always there to read. ``GET /images/{id}/verify`` answers the same report at once
(a viewer's check of a small image).
"""

from __future__ import annotations

from typing import Any

from tandem.catalog import queries as q
from tandem.catalog.models import Job
from tandem.jobs.queue import submit_job
from tandem.jobs.runner import JobContext
from tandem.operations import images
from tandem.operations.jobparams import NoParams
from tandem.operations.site import Site
from tandem.operations.spec import Spec

TYPE = "verify-image"


def submit(site: Site, image: str, body: None, actor: str | None = None) -> Job:
    """Queue the verification of ``image`` (an image of this appliance)."""
    with site.catalog.begin() as session:
        row = q.get_image(session, image_id=image)
        job = submit_job(session, type=TYPE, app=row.app.name, image=row.id, actor=actor)
    site.wake()
    return job


def run(site: Site, ctx: JobContext, params: NoParams) -> dict[str, Any]:
    """The job handler: the report, every chunk read and checked."""
    report = images.verify_image(site, image_id=ctx.job.image or "", progress=ctx.progress)
    bad = len(report["missing"]) + len(report["bad"])
    ctx.set_message(
        f"{report['chunks']} chunk(s) verified" if report["ok"] else f"{bad} chunk(s) damaged"
    )
    return report


SPEC = Spec(
    name="verify",
    job_type=TYPE,
    params=NoParams,
    run=run,
    route="POST /images/{image_id}/verify",
    submit=submit,
    subject="image",
    lifecycle=None,
    summary="Start verifying the image (a ``verify-image`` job): its result is the report "
    "``GET /images/{image_id}/verify`` answers at once.",
    title="Verify",
    command="image verify",
)
