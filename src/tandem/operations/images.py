"""Images: deletion (as a job), retention and verification.

Invariants
- Deleting and retention only remove catalog rows (and count them); the chunks an image
  named are removed later by the appliance's garbage collection job
  (``tandem.operations.gc``), which keeps every chunk named by an image still in the catalog
  and everything an active writer may still reuse. No capture or replication waits for it.
- Retention (``keep``) counts the app's ``snapshot`` images, newest first, and removes the
  older ones that are not presented to a host; other kinds are never pruned.
- Deletion refuses what ``check_image_deletable`` refuses (the copy a failed-over app runs
  on, the protective snapshot of a pending failback).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tandem.catalog import queries as q
from tandem.catalog.models import Image, Job
from tandem.domain.images import ImageKind, ImageState
from tandem.domain.lifecycle import Operation, check_transition
from tandem.domain.rules import check_image_deletable
from tandem.errors import (
    ChunkCorrupt,
    ChunkMissing,
    ImagePresented,
    NotExported,
    StorageError,
)
from tandem.jobs.queue import submit_job
from tandem.jobs.runner import JobContext
from tandem.operations.jobparams import NoParams
from tandem.operations.site import Site
from tandem.operations.spec import Spec
from tandem.storage.manifest import load_manifest

DELETE_TYPE = "delete-image"


def get_image(site: Site, *, image_id: str) -> Image:
    with site.catalog.read() as session:
        return q.get_image(session, image_id=image_id)


def export_uri(site: Site, *, image_id: str, app: str | None = None) -> str:
    """The NBD export URI of a presented image (of ``app``, if given). It is a capability:
    callers show it only to whoever asked for it on purpose (see appliance.schemas)."""
    row = get_image(site, image_id=image_id)
    if not row.nbd_export or (app is not None and row.app.name != app):
        raise NotExported(image=row.id)
    return row.nbd_export


def list_images(
    site: Site, *, app: str, after: str | None = None, limit: int | None = None
) -> list[Image]:
    """The app's images on this appliance, newest first; ``after`` (an image id) and
    ``limit`` make a page."""
    with site.catalog.read() as session:
        return q.list_images(session, app=app, after=after, limit=limit)


def _check_deletable(image: Image) -> None:
    check_transition(image.app.name, image.app.state, Operation.DELETE_IMAGE)
    check_image_deletable(
        image_id=image.id, kind=image.kind, app=image.app.name, app_state=image.app.state
    )
    if image.state is ImageState.MOUNTED:
        raise ImagePresented(image=image.id, host=image.mounted_host)


def submit_delete(site: Site, *, image_id: str, actor: str | None = None) -> Job:
    """Queue the deletion of an image (a lifecycle job of its app)."""
    with site.catalog.begin() as session:
        image = q.get_image(session, image_id=image_id)
        _check_deletable(image)
        job = submit_job(
            session,
            type=DELETE_TYPE,
            app=image.app.name,
            image=image.id,
            lifecycle=True,
            actor=actor,
        )
    site.wake()
    return job


def run_delete(site: Site, ctx: JobContext, params: NoParams) -> dict[str, Any]:
    """The job handler: drop the row; the next garbage collection frees its chunks."""
    image_id = ctx.job.image or ""
    with site.catalog.begin() as session:
        image = q.get_image(session, image_id=image_id)
        _check_deletable(image)
        q.delete_image(session, image_id=image_id)
    ctx.log(f"deleted the catalog row of image {image_id}")
    ctx.set_message(
        f"deleted image {image_id}; its space comes back at the next garbage collection "
        "(`tandem gc` starts one now)"
    )
    return {"deleted": [image_id]}


def prune_snapshots(
    site: Site,
    ctx: JobContext | None,
    *,
    app: str,
    keep: int,
    kind: ImageKind = ImageKind.SNAPSHOT,
) -> list[str]:
    """Remove the app's images of ``kind`` (snapshots, or replicas at the DR site) beyond
    the ``keep`` newest: their rows only (see the module's invariants)."""
    removed: list[str] = []
    with site.catalog.begin() as session:
        older = q.images_beyond(session, app=app, kind=kind, keep=keep)
        for image in older:
            if image.state is not ImageState.READY:
                continue  # presented to a host or already going: not retention's to remove
            q.delete_image(session, image_id=image.id)
            removed.append(image.id)
    if removed and ctx is not None:
        ctx.log(
            f"retention (keep {keep}) removed {', '.join(removed)}; their space comes back "
            "at the next garbage collection"
        )
    return removed


def verify_image(
    site: Site, *, image_id: str, progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """Read and check every chunk the image names; the report says what is bad or missing.
    ``progress(done, total)`` is told how much of the image's size was checked, as it goes."""
    image = get_image(site, image_id=image_id)
    report: dict[str, Any] = {
        "image": image.id,
        "app": image.app.name,
        "manifest": image.manifest,
        "ok": False,
        "chunks": 0,
        "bytes": 0,
        "missing": [],
        "bad": [],
    }
    mid = bytes.fromhex(image.manifest)
    try:
        manifest = load_manifest(site.pool, mid)
    except ChunkMissing:
        report["missing"].append(image.manifest)
        return report
    except StorageError as exc:
        report["bad"].append({"chunk": image.manifest, "reason": exc.message})
        return report
    digests = sorted(manifest.chunk_ids())
    for n, digest in enumerate(digests):
        if progress is not None:  # before the n-th chunk: n of them checked
            progress(image.size * n // len(digests), image.size)
        try:
            data = site.pool.get(digest)
        except ChunkMissing:
            report["missing"].append(digest.hex())
            continue
        except ChunkCorrupt as exc:
            report["bad"].append({"chunk": digest.hex(), "reason": exc.fields.get("reason", "")})
            continue
        report["chunks"] += 1
        report["bytes"] += len(data)
    if progress is not None:
        progress(image.size, image.size)
    report["ok"] = not report["missing"] and not report["bad"]
    return report


def submit(site: Site, image: str, body: None, actor: str | None = None) -> Job:
    """``submit_delete`` from the API's call (it has no body)."""
    return submit_delete(site, image_id=image, actor=actor)


SPEC = Spec(
    name="delete",
    job_type=DELETE_TYPE,
    params=NoParams,
    run=run_delete,
    route="DELETE /images/{image_id}",
    submit=submit,
    subject="image",
    lifecycle=Operation.DELETE_IMAGE,
    title="Delete",
    command="image delete",
)
