"""Syncback (SPEC §4): send what was written at the DR site home, as a ``syncback`` image.

Sender (DR appliance, job ``syncback``, app failed over):
1. Capture the failover image's current state into this pool. A volume: the overlay's dirty
   blocks only (``capture_overlay``). A file tree: the DR host's agent captures the mount
   point with the previous syncback (or the failover image) as base, so unchanged files are
   not sent. The result is recorded here as a ``syncback`` image (the base of the next one).
2. Send it to the production appliance like a replication (``replicate.send_image``): the
   manifest diff against what production holds, then only the chunks it lacks. Production
   records a ``syncback`` image with the same id. It is *not* applied to production: the
   operator restores it (``tandem restore``), mounts it or clones it.
Syncback may be repeated: each one moves only what changed since the one before (the final
syncback after stopping the app is short), and each is a new image.

A catch-up syncback runs while the app serves at the DR site, so step 1 reads a point in
time of the DR copy, never the copy as it changes:
- a volume: the overlay is cut (``Overlay.cut``): writes through NBD are held for the
  instant of the cut only (the job reports it, ``writes_held_seconds``), then go on while
  the capture reads the cut (the image's consistency is ``overlay``);
- a file tree: the DR host's agent cuts its copy exactly as a production capture does
  (``agent.pit``, under the app's ``--consistency``: a btrfs snapshot, reflink clones, a
  freeze); where the file system has none, the live files are read and re-checked, and a
  file that changed after it was read fails the syncback (``SourceChanged``), never a torn
  image. ``hooks`` counts as ``auto`` here: the app's hooks are production's. A tree the
  agent presents as a FUSE copy (a failover's default) is cut where it changes, its
  copy-on-write layer, merged read-only over the image (``agent.fusemount.point_in_time``);
- a PostgreSQL database running at DR: a base backup of the DR cluster
  (``pg_recovery.running_kind``), recorded with the image; restoring it rolls it forward
  with the DR WAL pushed home (``pg_recovery.rollforward``), the final syncback after the
  database stopped is restored as it is.
The final syncback (app stopped) reads the same way; nothing changes meanwhile.

What the DR copy holds that no capture took yet (``dr_copy_changes``) is what a failback
would lose: a volume's overlay keeps a "written since the last capture" bitmap and the
manifest id of that capture (``Overlay.begin_capture``/``commit_capture`` bracket each
capture here, committed once its image row exists); a tree is captured again at the host
with the reference image as base (unchanged files are not read) and the manifests compared.

Invariant: the image row of a capture is written while the session that received it is
still open (and so its writer registered), as ``capture`` does: a garbage collection
running meanwhile never sweeps the chunks of an image about to be recorded.

Receiver (production appliance, ``/api/v1/peer/syncbacks``, peer token): the app must be
this appliance's own production app; the writer epoch carried (the DR site's, raised by
the failover) is adopted, so production later replicates with the current epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tandem.catalog import queries as q
from tandem.catalog.models import App, Host, Image, Job
from tandem.domain.consistency import CUTS, ConsistencyMode, Cut
from tandem.domain.ids import new_image_id
from tandem.domain.images import ImageKind, ImageState
from tandem.domain.lifecycle import AppKind, AppState, Operation, check_transition, storage_kind
from tandem.errors import (
    AlreadyExists,
    FailbackInterrupted,
    InvalidInput,
    NotFound,
    PeerRefused,
    RemoteError,
    SenderNotWriter,
    SyncbackOfferMisplaced,
    TandemError,
    VirtualCopyNotOpen,
)
from tandem.jobs.queue import submit_job
from tandem.jobs.runner import JobContext
from tandem.operations import peers, pg_recovery
from tandem.operations.capture import check_label
from tandem.operations.hosts import agent_for
from tandem.operations.jobparams import LabelParams
from tandem.operations.present import BLOCK_KINDS
from tandem.operations.replicate import ChunkStream, offer_of, send_image
from tandem.operations.sessions import Session
from tandem.operations.site import Site
from tandem.operations.spec import Spec
from tandem.operations.streams import follow
from tandem.storage.manifest import FILE, TreeManifest, VolumeManifest, load_manifest
from tandem.storage.overlay import Overlay, capture_overlay
from tandem.storage.tree import diff_trees
from tandem.transport.agent_api import CaptureRequest
from tandem.transport.api import CaptureIn, checked
from tandem.transport.peer import ImageOffer, Opened, SyncbackOpen

TYPE = "syncback"
Params = LabelParams


def failover_image(site: Site, app: str) -> Image:
    """The presented failover image of ``app`` (the DR copy it runs on)."""
    with site.catalog.read() as session:
        images = q.list_images(session, app=app, kind=ImageKind.FAILOVER)
        pending = bool(images) and q.get_app(session, name=app).state is AppState.FAILBACK_PENDING
    for image in images:
        if image.state is ImageState.MOUNTED:
            return image
    for image in images:
        if image.state is ImageState.DELETING:
            again = "commit-failback" if pending else "failback"
            raise FailbackInterrupted(app=app, image=image.id, again=again)
    raise NotFound(what="failover image of application", name=app, listing=f"images {app}")


def syncbacks_since_failover(site: Site, app: str) -> int:
    with site.catalog.read() as session:
        return len(q.list_images(session, app=app, kind=ImageKind.SYNCBACK))


def submit_syncback(
    site: Site, *, app: str, label: str | None = None, actor: str | None = None
) -> Job:
    peers.require_peer(site)
    label = check_label(label)
    with site.catalog.begin() as session:
        row = q.get_app(session, name=app)
        check_transition(row.name, row.state, Operation.SYNCBACK)
    failover_image(site, app)
    with site.catalog.begin() as session:
        job = submit_job(
            session,
            type=TYPE,
            app=app,
            params=Params(label=label).stored(),
            lifecycle=True,
            actor=actor,
        )
    site.wake()
    return job


@contextmanager
def _capture_session(site: Site, ctx: JobContext, bases: list[bytes]) -> Iterator[Session]:
    """A write session for a capture here; closed under the GC lock once the caller has
    recorded (or decided not to record) what it captured."""
    transfer, _ = site.sessions.open(job_id=ctx.job.id, write=True, bases=bases)
    try:
        yield transfer
    finally:
        with site.gc_lock:
            site.sessions.close(transfer)


@dataclass(frozen=True)
class DrCapture:
    """What ``capture_dr_state`` took."""

    image: Image
    written: int
    """Bytes written at the DR site since the failover (see ``capture_dr_state``)."""
    cut: str | None
    """How the DR copy was cut (a ``Cut`` value; None when the agent did not say)."""
    held_seconds: float | None
    """How long the app's writes were held for the cut (None: not held)."""


def _dr_mode(app: App) -> ConsistencyMode:
    """What the DR copy of ``app`` may be cut from: the app's mode, but its hooks are
    production's, so ``hooks`` cuts the best way the DR host has."""
    mode = ConsistencyMode(app.consistency or ConsistencyMode.AUTO)
    return ConsistencyMode.AUTO if mode is ConsistencyMode.HOOKS else mode


def _capture_tree_at_host(
    site: Site,
    ctx: JobContext,
    app: App,
    host: Host,
    path: str,
    base: bytes,
    kind: str | None = None,
) -> tuple[Session, bytes, int, dict[str, Any]]:
    """The DR host's agent captures a point in time of ``path`` (``agent.pit``) into a new
    session here (close it with ``site.sessions.close``); returns it, the manifest id, the
    size and the agent's final event (how it cut the tree)."""
    transfer, token = site.sessions.open(job_id=ctx.job.id, write=True, bases=[base])
    try:
        body = checked(
            CaptureRequest,
            kind=kind or storage_kind(app.kind),
            path=path,
            base=base.hex(),
            job=ctx.job.id,
            appliance=site.session_ref(transfer.id, token),
            consistency=_dr_mode(app).value,
        )
        with agent_for(host) as agent:
            done = follow(ctx, agent.capture(body), host=host.name, moved=lambda: 0)
        manifest = bytes.fromhex(str(done.get("manifest", "")))
        if manifest not in transfer.committed:
            raise RemoteError(what="host", name=host.name, detail="capture not committed")
        return transfer, manifest, int(done.get("size") or 0), done
    except BaseException:
        with site.gc_lock:
            site.sessions.close(transfer)
        raise


def _open_overlay(site: Site, failover: Image) -> Overlay:
    overlay = site.overlays.get(failover.id)
    if overlay is None:
        raise VirtualCopyNotOpen(image=failover.id)
    return overlay


def _vm_meta(app: App, overlay: Overlay) -> dict[str, Any] | None:
    """A VM's DR state carries the captured domain (XML, disk layout) on, so production can
    restore it onto the domain or define the domain again; its checkpoint is production's
    and says nothing of what the DR guest wrote, so it is dropped."""
    if app.kind is not AppKind.VM or overlay.base is None:
        return None
    vm = overlay.base.meta.get("vm") if isinstance(overlay.base.meta, dict) else None
    if not isinstance(vm, dict):
        return None
    return {
        "source": f"vm:{app.path} (DR copy)",
        "vm": {**vm, "checkpoint": None},
    }


def _tree_location(site: Site, failover: Image) -> tuple[Host, str]:
    with site.catalog.read() as session:
        host = q.get_host(session, name=failover.mounted_host or "")
    if not failover.mount_point:
        raise InvalidInput(detail=f"failover image {failover.id} has no mount point")
    return host, failover.mount_point


def capture_dr_state(
    site: Site,
    ctx: JobContext,
    app: App,
    *,
    kind: ImageKind,
    label: str | None,
    on_stored: Callable[[bytes, bytes], None] | None = None,
) -> DrCapture:
    """Capture a point in time of the failover image here as an image of ``kind``
    (syncback, or the protective snapshot of a replica-style failback), while the app may
    keep writing; returns it with the bytes written at the DR site since the failover: a
    volume's dirty blocks, a tree's files added or changed since the failover image (not
    what an earlier syncback already took: every syncback reports all that production
    would get back), and how the copy was cut. ``on_stored``: see ``capture_overlay``
    (a volume's capture only)."""
    with site.catalog.read() as session:
        previous = q.latest_image(session, app=app.name, kind=ImageKind.SYNCBACK)
    failover = failover_image(site, app.name)
    ctx.set_message(f"capturing the state of {failover.id} at the DR site")

    def record(mid: bytes, size: int, cut: str | None, pg: dict[str, Any] | None = None) -> Image:
        with site.gc_lock, site.catalog.begin() as session:
            return q.add_image(
                session,
                app=app.name,
                kind=kind,
                manifest=mid.hex(),
                size=size,
                label=label,
                parent_id=failover.id,
                source_image_id=failover.id,
                image_id=new_image_id(),
                epoch=app.writer_epoch,
                protective=kind is ImageKind.PROTECTIVE,
                consistency=cut,
                pg=pg,
            )

    if app.kind in BLOCK_KINDS:
        overlay = _open_overlay(site, failover)
        since = overlay.changed_bytes_since_capture()
        # The capture takes every block written up to the cut; writes from then on count
        # as changed since it, and go on while it reads. Only once its row exists is it
        # the copy's reference.
        cut = overlay.cut()
        ctx.log(f"cut {failover.id}: writes held {cut.held_seconds * 1000:.1f} ms")
        try:
            with cut:
                written = cut.dirty_bytes()  # since the failover, as of the cut
                # Start from the last capture: only what was written since it is read.
                reference = cut.reference
                last: VolumeManifest | None = None
                if reference is not None and site.pool.has_manifest(reference):
                    loaded = load_manifest(site.pool, reference)
                    last = loaded if isinstance(loaded, VolumeManifest) else None
                bases = [bytes.fromhex(failover.manifest)]
                if last is not None and reference is not None:
                    bases.append(reference)
                with _capture_session(site, ctx, bases):
                    mid, manifest, stats = capture_overlay(
                        site.pool,
                        cut,
                        previous=last,
                        meta=_vm_meta(app, overlay),
                        on_stored=on_stored,
                    )
                    image = record(mid, manifest.size, Cut.OVERLAY.value)
        except BaseException:
            overlay.abort_capture()
            raise
        overlay.commit_capture(mid)
        ctx.log(
            f"{since} bytes written at the DR site since the previous capture "
            f"({stats.bytes_read} read)"
        )
        return DrCapture(image, written, Cut.OVERLAY.value, cut.held_seconds)
    host, path = _tree_location(site, failover)
    base = bytes.fromhex(previous.manifest if previous else failover.manifest)
    running = pg_recovery.running_kind(app, host, path)  # a database running at DR
    transfer, mid, size, done = _capture_tree_at_host(site, ctx, app, host, path, base, running)
    tree_cut = str(done["consistency"]) if done.get("consistency") in CUTS else None
    held = done.get("held_seconds")
    if tree_cut is not None:
        ctx.log(
            f"cut {path} on host {host.name}: {tree_cut} ({done.get('consistency_reason')})"
            + (f"; writes held {float(held) * 1000:.1f} ms" if held is not None else "")
        )
    try:
        written = _files_written(site, bytes.fromhex(failover.manifest), mid)
        image = record(mid, size, tree_cut, pg_recovery.base_of(done) if running else None)
    finally:
        with site.gc_lock:
            site.sessions.close(transfer)
    return DrCapture(image, written, tree_cut, float(held) if held is not None else None)


def _files_written(site: Site, then: bytes, now: bytes) -> int:
    """Bytes of the files of tree ``now`` added or changed since tree ``then``, from the
    two manifests held here (the open capture session keeps ``now``)."""
    old, new = load_manifest(site.pool, then), load_manifest(site.pool, now)
    if not isinstance(old, TreeManifest) or not isinstance(new, TreeManifest):
        raise TandemError("a file-tree syncback compares two file-tree images")
    diff = diff_trees(old, new)
    touched = set(diff.added) | set(diff.changed)
    return sum(e.size for e in new.entries if e.type == FILE and e.path in touched)


def dr_copy_changes(site: Site, ctx: JobContext | None, app: App, reference: Image) -> str | None:
    """What the DR copy (the failover image) holds that ``reference`` (an image captured
    from it) does not; None when it is unchanged since. Cautious: a change it cannot rule
    out counts. A tree is captured again at its host, which takes a job (``ctx``)."""
    failover = failover_image(site, app.name)
    if app.kind in BLOCK_KINDS:
        overlay = _open_overlay(site, failover)
        held = overlay.reference
        if held is None or held.hex() != reference.manifest:
            return (
                "it was captured again since, or its last capture is unknown here"
                if held is not None
                else "no capture of it is known here"
            )
        changed = overlay.changed_bytes_since_capture()
        return f"{changed} bytes written since" if changed else None
    if ctx is None:
        raise TandemError("comparing a file tree with an image needs a job")
    host, path = _tree_location(site, failover)
    ctx.log(f"comparing {path} on host {host.name} with {reference.id}")
    ctx.set_message(f"comparing {path} on host {host.name} with {reference.id}")
    base = bytes.fromhex(reference.manifest)
    transfer, mid, _, _ = _capture_tree_at_host(site, ctx, app, host, path, base)
    try:
        then, now = load_manifest(site.pool, base), load_manifest(site.pool, mid)
    finally:
        with site.gc_lock:
            site.sessions.close(transfer)
    if not isinstance(then, TreeManifest) or not isinstance(now, TreeManifest):
        return "its image is not a file tree"
    diff = diff_trees(then, now)
    if not diff:
        return None
    parts = [
        f"{len(paths)} {what}"
        for paths, what in (
            (diff.added, "added"),
            (diff.changed, "changed"),
            (diff.removed, "removed"),
            (diff.metadata_changed, "with new metadata"),
        )
        if paths
    ]
    example = (diff.added + diff.changed + diff.removed + diff.metadata_changed)[0]
    return f"{', '.join(parts)} since, e.g. {example!r}"


def _home_bases(site: Site, app: App, image: Image | None = None) -> list[str]:
    """Images production may hold that a syncback of ``app`` builds on: the newest
    syncback before ``image``, then the failover image's source."""
    failover = failover_image(site, app.name)
    with site.catalog.read() as session:
        older = [
            i.id
            for i in q.list_images(session, app=app.name, kind=ImageKind.SYNCBACK)
            if image is None or i.id != image.id
        ]
    bases = [*older[:1], failover.source_image_id or failover.parent_id or ""]
    return [b for b in bases if b]


def send_home(site: Site, ctx: JobContext, app: App, image: Image) -> int:
    """Send ``image`` to production as a syncback image (only what it lacks)."""
    peer = peers.require_peer(site)
    bases = _home_bases(site, app, image)
    ctx.set_message(f"sending {image.id} to {peer.name}")
    with peers.client_for(peer) as remote:
        opened = remote.open_syncback(
            SyncbackOpen(app=app.name, image=offer_of(image), bases=bases, epoch=app.writer_epoch)
        )
        sent = send_image(site, ctx, peer, opened, image.manifest, image.size)
        remote.commit_syncback(str(opened.session), str(opened.token))
    return sent


def capture_and_send_home(
    site: Site, ctx: JobContext, app: App, *, kind: ImageKind, label: str | None
) -> tuple[DrCapture, int]:
    """``capture_dr_state``, then the image sent home as a syncback (``send_home``);
    returns it with the bytes sent. A volume's syncback is opened at production first and
    its new chunks are sent while the capture stores them (``replicate.ChunkStream``):
    production verifies and stores them beside the capture rather than after it, and the
    image is offered when the session is committed."""
    t0 = time.monotonic()
    if app.kind not in BLOCK_KINDS:
        taken = capture_dr_state(site, ctx, app, kind=kind, label=label)
        ctx.log(f"captured {taken.image.id} in {time.monotonic() - t0:.2f} s")
        return taken, send_home(site, ctx, app, taken.image)
    peer = peers.require_peer(site)
    with peers.client_for(peer) as remote:
        opened = remote.open_syncback(
            SyncbackOpen(app=app.name, bases=_home_bases(site, app), epoch=app.writer_epoch)
        )
        with ChunkStream(site, ctx, peer, opened) as stream:
            taken = capture_dr_state(site, ctx, app, kind=kind, label=label, on_stored=stream.offer)
        image = taken.image
        t1 = time.monotonic()
        ctx.log(
            f"captured {image.id} in {t1 - t0:.2f} s, {stream.sent} bytes sent meanwhile"
            f" (its workers waited {stream.waited:.2f} s for the stream)"
        )
        ctx.set_message(f"sending {image.id} to {peer.name}")
        sent = stream.sent + send_image(site, ctx, peer, opened, image.manifest, image.size)
        remote.commit_syncback(str(opened.session), str(opened.token), offer_of(image))
        ctx.log(f"the rest sent and committed in {time.monotonic() - t1:.2f} s")
    return taken, sent


def run_syncback(site: Site, ctx: JobContext, params: Params) -> dict[str, Any]:
    name = ctx.job.app or ""
    peer = peers.require_peer(site)
    with site.catalog.read() as session:
        app = q.get_app(session, name=name)
        check_transition(app.name, app.state, Operation.SYNCBACK)
    t0 = time.monotonic()
    taken, sent = capture_and_send_home(site, ctx, app, kind=ImageKind.SYNCBACK, label=params.label)
    image, changed, held = taken.image, taken.written, taken.held_seconds
    ctx.log(f"{image.id}: {sent} bytes sent to {peer.name}, {time.monotonic() - t0:.2f} s in all")
    with site.catalog.begin() as session:
        q.record_transition(
            session, app=name, operation=Operation.SYNCBACK, actor=ctx.job.actor, job=ctx.job.id
        )
    ctx.set_image(image.id)
    ctx.set_message(
        f"syncback {image.id} of {name} sent to {peer.name}: {sent} bytes moved"
        + (f" ({changed} bytes written at the DR site since failover)" if changed else "")
        + (f"; writes held {held * 1000:.1f} ms for the cut" if held is not None else "")
    )
    return {
        "image": image.id,
        "bytes_sent": sent,
        "changed_since_failover": changed,
        "consistency": taken.cut,
        "writes_held_seconds": held,
    }


# --- receiver (production appliance) ---------------------------------------------------


def open_syncback(site: Site, *, peer: str, body: SyncbackOpen) -> Opened:
    """Production side: take a syncback of one of this site's apps that is failed over at
    the peer (a newer writer epoch says so too); it only adds a ``syncback`` image."""
    app, image, bases, epoch = body.app, body.image, body.bases, body.epoch
    with site.catalog.begin() as session:
        row = peers.mirrored_app(session, peer=peer, app=app, action="send a syncback of")
        if not row.peer_active and epoch <= row.writer_epoch:
            raise PeerRefused(
                peer=peer,
                action="send a syncback of",
                app=app,
                reason=f"this site does not know it as failed over at {peer}",
                fix=f"Fail it over at {peer} first; a syncback carries what was written there",
            )
        row.peer_active = True
        if epoch < row.writer_epoch:
            raise SenderNotWriter(what="syncback", app=app, carried=epoch, current=row.writer_epoch)
        row.writer_epoch = epoch
        if image is not None:
            _check_new(session, app, image)
        base_id = None
        for candidate in bases:
            try:
                found = q.get_image(session, image_id=candidate)
            except NotFound:
                continue
            if found.app_id != row.id:  # another app's image is no base the peer may name
                continue
            if site.pool.has_manifest(bytes.fromhex(found.manifest)):
                base_id = bytes.fromhex(found.manifest)
                break
    transfer, token = site.sessions.open(
        job_id=f"syncback of {image.id if image else app} from {peer}",
        write=True,
        bases=[base_id] if base_id else [],
        ttl=3600,
        # It lands during a failback's downtime: stored as sent, no base decoded.
        xor_deltas=False,
        prefetch=True,
    )
    transfer.meta.update(
        peer=peer,
        app=app,
        image=image.model_dump(mode="json") if image is not None else None,
        epoch=epoch,
        syncback=True,
    )
    return Opened(session=transfer.id, token=token, base=base_id.hex() if base_id else None)


def _check_new(session: Any, app: str, image: ImageOffer) -> None:
    if any(i.id == image.id for i in q.list_images(session, app=app)):
        raise AlreadyExists(what="Image", name=image.id)


def commit_syncback(
    site: Site, *, peer: str, sid: str, token: str, offer: ImageOffer | None = None
) -> Image:
    """Production side: the syncback's image, from the offer made at the open or, for a
    session opened without one, at this commit (one of the two, never both)."""
    transfer = site.sessions.get(sid, token)
    meta = transfer.meta
    if meta.get("peer") != peer or not meta.get("syncback"):
        raise NotFound(what="syncback", name=sid, listing="jobs")
    if (meta["image"] is None) == (offer is None):
        with_it = "with" if offer is not None else "without"
        raise SyncbackOfferMisplaced(session=sid, opened=with_it, committed=with_it)
    image = meta["image"] if offer is None else offer.model_dump(mode="json")
    manifest = bytes.fromhex(str(image["manifest"]))
    if manifest not in transfer.committed:
        raise InvalidInput(detail=f"the manifest of {image['id']} was not received")
    load_manifest(site.pool, manifest)  # readable and valid before it becomes an image
    try:
        with site.gc_lock:
            with site.catalog.begin() as session:
                if offer is not None:
                    _check_new(session, str(meta["app"]), offer)
                row = q.add_image(
                    session,
                    app=meta["app"],
                    kind=ImageKind.SYNCBACK,
                    manifest=manifest.hex(),
                    size=int(image.get("size") or 0),
                    label=image.get("label"),
                    origin=peer,
                    source_image_id=str(image["id"]),
                    image_id=str(image["id"]),
                    created=datetime.fromisoformat(str(image["created"])),
                    epoch=int(meta["epoch"]),
                    consistency=image.get("consistency"),
                    pg=image.get("pg"),
                )
            site.sessions.close(transfer)
    finally:
        site.sessions.close(transfer)
    return row


def submit(site: Site, app: str, body: CaptureIn | None, actor: str | None = None) -> Job:
    """``submit_syncback`` from the API's request."""
    return submit_syncback(site, app=app, label=body.label if body else None, actor=actor)


SPEC = Spec(
    name="syncback",
    job_type=TYPE,
    params=Params,
    run=run_syncback,
    route="POST /apps/{name}/syncback",
    submit=submit,
    subject="app",
    lifecycle=Operation.SYNCBACK,
    request=CaptureIn,
    title="Syncback",
)
