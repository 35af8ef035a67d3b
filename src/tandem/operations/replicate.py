"""Mirroring: each snapshot of a mirrored app becomes a ``replica`` image at the peer.

Sender (production appliance, job ``replicate``, one app; not a lifecycle job, so it never
blocks the app's captures, and one app's replication never waits for another's):
1. Ask the peer which images of the app it holds; every snapshot newer than its newest
   replica is sent, oldest first (captures taken while the peer was down follow in order).
2. For each: open a replication on the peer (it answers the manifest of its previous
   replica); diff the new manifest against it locally (no round trip for unchanged data);
   ask in batches which offered chunks the peer lacks; send those in the encoding it can
   use best (``storage.transfer``: stored delta, computed XOR delta, or whole); send the
   manifest; commit.

Production stops mirroring an app that failed over at the peer (``App.peer_active``): the
peer says so at failover (best effort), and a replication it refuses as stale says so too.
No replication job is queued for such an app until a failback hands the epoch back.

Receiver (DR appliance, ``/api/v1/peer/…``, peer token):
- A replica of an app this site does not know creates a *mirror record*: name, kind, the
  peer's app id and origin = the peer. Production's host and path are kept for display
  only; nothing from the peer is a host to act on, a path to write or a command to run
  (``operations.hosts.app_host`` refuses them). An app whose origin is not that peer is
  never altered by it.
- ``open_replication`` checks fencing: the writer epoch carried must be at least the one
  held here (a failover here raised it: production may not overwrite the DR copy), the app
  must be one this peer mirrors here, in a state that takes replicas, and the image newer
  than the newest replica (a replayed old image is refused). It opens a write session whose
  writer registers the previous replica's manifest as its base.
- Received chunks are verified and made durable batch by batch, so a broken transfer
  resumes by running again and sends only what is still missing.
- ``commit_replication`` adds the replica image row (same id, creation time and label as
  the snapshot; ``source_image_id`` names it; ``parent_id`` the previous replica) in one
  transaction, only after the manifest and every chunk it names are durable. Nothing
  half-received is ever visible.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any

from tandem.catalog import queries as q
from tandem.catalog.models import Image, Job
from tandem.domain.consistency import CUTS, Cut
from tandem.domain.images import ImageKind
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppFacts, AppState, Operation, check_transition
from tandem.errors import (
    InvalidInput,
    MirrorKindDiffers,
    MirrorOfOther,
    NotFound,
    ReplicaOutOfOrder,
    StaleEpoch,
    TransitionRefused,
)
from tandem.jobs.queue import submit_job
from tandem.jobs.runner import JobContext
from tandem.operations import images, peers
from tandem.operations.jobparams import NoParams
from tandem.operations.site import Site
from tandem.operations.spec import Spec
from tandem.storage.manifest import Manifest, load_manifest
from tandem.storage.pool import CODEC_DELTA, parse_header
from tandem.storage.transfer import chunks_to_offer, encode_for_receiver, previous_at_same_offset
from tandem.transport.chunks import SessionClient
from tandem.transport.client import ApiClient
from tandem.transport.peer import (
    ImageOffer,
    Location,
    MirroredApp,
    Opened,
    PeerClient,
    PgBase,
    ReplicasHeld,
    ReplicationOpen,
)
from tandem.transport.wire import encode_frames

TYPE = "replicate"
ASK_BATCH = 1024  # digests per "which do you lack?" question
SEND_BYTES = 16 * 1024 * 1024  # chunk bytes per request
IN_FLIGHT = 3  # requests under way at once
STREAM_BATCH = 4 * 1024 * 1024  # chunk bytes per request while a capture goes on...
STREAM_QUEUED = 3 * STREAM_BATCH  # ...and queued at most, beside those under way


# --- sender ----------------------------------------------------------------------------


def failed_over_at_peer(site: Site, app: str) -> bool:
    """Whether ``app`` (of this site) is failed over at the peer: not mirrored meanwhile."""
    with site.catalog.read() as session:
        return q.get_app(session, name=app).peer_active


def check_not_failed_over_at_peer(app: Any, peer: str) -> None:
    if app.peer_active:
        raise TransitionRefused(
            app=app.name,
            operation=Operation.REPLICATE.value,
            reason=f"it is failed over at {peer}, whose copy is the writer; fail it back "
            f"there (`tandem failback {app.name}` on {peer}) and mirroring resumes by itself",
        )


def submit_replicate(site: Site, *, app: str, actor: str | None = None) -> Job:
    """Queue a replication of ``app`` to the peer, unless one is already queued or running."""
    peer = peers.require_peer(site)
    with site.catalog.begin() as session:
        row = q.get_app(session, name=app)
        facts = AppFacts(mirrored=peers.is_mirrored(session, row))
        check_transition(row.name, row.state, Operation.REPLICATE, facts)
        check_not_failed_over_at_peer(row, peer.name)
        for job in q.list_jobs(session, app=row.name, limit=20):
            if job.type == TYPE and job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
                return job
        job = submit_job(session, type=TYPE, app=row.name, params=NoParams().stored(), actor=actor)
    site.wake()
    return job


def mark_failed_over_at_peer(site: Site, *, app: str, active: bool = True) -> bool:
    """Record that ``app`` (of this site) is (or no longer is) failed over at the peer;
    returns whether that changed anything."""
    with site.catalog.begin() as session:
        row = q.get_app(session, name=app, for_update=True)
        changed = row.peer_active != active
        row.peer_active = active
    return changed


def run_replicate(site: Site, ctx: JobContext, params: NoParams) -> dict[str, Any]:
    """The job handler: bring the peer's replicas of the app up to date."""
    name = ctx.job.app or ""
    peer = peers.require_peer(site)
    with site.catalog.read() as session:
        app = q.get_app(session, name=name)
        template = q.get_template(session, name=app.template) if app.template else None
        facts = AppFacts(mirrored=peers.is_mirrored(session, app))
        check_transition(app.name, app.state, Operation.REPLICATE, facts)
        check_not_failed_over_at_peer(app, peer.name)
        mirrored = MirroredApp(id=app.id, name=app.name, kind=app.kind)
        location = Location(host=app.host, path=app.path)
        epoch = app.writer_epoch
    keep = template.keep if template is not None else None
    limit = peers.bandwidth(site)
    sent_total = 0
    replicated: list[str] = []
    with peers.client_for(peer) as remote:
        # Snapshots taken while this runs are picked up by the next round.
        while todo := _pending(site, remote, name, replicated):
            total = sum(s.size for s in todo)
            done = 0
            for snap in todo:
                ctx.set_message(f"replicating {snap.id} to {peer.name}")
                try:
                    sent = _replicate_one(
                        site,
                        ctx,
                        remote,
                        peer,
                        mirrored,
                        location,
                        snap,
                        epoch,
                        keep,
                        limit,
                        done,
                        total,
                    )
                except StaleEpoch:
                    # The peer holds a newer epoch: the app failed over there. Stop mirroring
                    # it until a failback hands the epoch back.
                    if mark_failed_over_at_peer(site, app=name):
                        ctx.log(f"{name} is failed over at {peer.name}: mirroring stops")
                    raise
                sent_total += sent
                done += snap.size
                replicated.append(snap.id)
                with site.catalog.begin() as session:
                    q.mark_replicated(session, name=name, at=snap.created)
                ctx.log(f"{snap.id} replicated to {peer.name}: {sent} bytes sent")
    if not replicated:
        ctx.set_message(f"{peer.name} already holds every snapshot of {name}")
    if replicated:
        ctx.set_image(replicated[-1])
        ctx.set_message(
            f"replicated {len(replicated)} image(s) of {name} to {peer.name}, "
            f"{sent_total} bytes sent"
        )
    return {"peer": peer.name, "replicated": replicated, "bytes_sent": sent_total}


def _pending(site: Site, remote: PeerClient, app: str, done: list[str]) -> list[Image]:
    """The app's snapshots the peer does not hold, newer than its newest replica, oldest
    first."""
    held = remote.replicas(app)
    have = set(held.images) | set(done)
    newest_at = held.newest_created
    with site.catalog.read() as session:
        snapshots = reversed(q.list_images(session, app=app, kind=ImageKind.SNAPSHOT))
        return [
            s
            for s in snapshots
            if s.id not in have and (newest_at is None or s.created > newest_at)
        ]


def _replicate_one(
    site: Site,
    ctx: JobContext,
    remote: PeerClient,
    peer: Any,
    app: MirroredApp,
    location: Location,
    snap: Image,
    epoch: int,
    keep: int | None,
    limit: int,
    done_before: int,
    total: int,
) -> int:
    opened = remote.open_replication(
        ReplicationOpen(
            app=app,
            image=offer_of(snap),
            epoch=epoch,
            keep=keep,
            production=location,
        )
    )
    if opened.status == "present":
        return 0
    sent = send_image(site, ctx, peer, opened, snap.manifest, snap.size, limit, done_before, total)
    remote.commit_replication(str(opened.session), str(opened.token))
    return sent


def offer_of(image: Image) -> ImageOffer:
    return ImageOffer(
        id=image.id,
        created=image.created,
        label=image.label,
        size=image.size,
        manifest=image.manifest,
        consistency=Cut(image.consistency) if image.consistency in CUTS else None,
        pg=PgBase.model_validate(image.pg) if image.pg else None,
    )


class _Batches:
    """Chunk batches posted to a peer's session, up to ``IN_FLIGHT`` at once: the receiver
    verifies them in parallel while the next one is read and encoded here. A batch counts
    as sent (and its chunks as held by the receiver) only once it was answered."""

    def __init__(self, channel: SessionClient, ctx: JobContext, limit: int = 0) -> None:
        self.channel, self.ctx, self.limit = channel, ctx, limit
        self.sent = 0
        self.held: set[bytes] = set()  # chunks the receiver answered for
        self._started = time.monotonic()
        self._senders = ThreadPoolExecutor(IN_FLIGHT)
        self._inflight: deque[tuple[Future[Any], list[bytes], int]] = deque()

    def __enter__(self) -> _Batches:
        return self

    def __exit__(self, *exc: object) -> None:
        self._senders.shutdown(wait=True)

    def post(self, frames: list[tuple[bytes, bytes]]) -> None:
        body = encode_frames(frames)
        future = self._senders.submit(self.channel.send_chunks, body)
        self._inflight.append((future, [d for d, _ in frames], len(body)))
        while len(self._inflight) >= IN_FLIGHT:
            self._settle_one()

    def settle(self) -> None:
        """Wait for every batch under way; raises the first one's error."""
        while self._inflight:
            self._settle_one()

    def _settle_one(self) -> None:
        future, digests, n = self._inflight.popleft()
        future.result()
        self.sent += n
        self.ctx.add_sent(n)
        self.held.update(digests)
        if self.limit > 0:  # --bandwidth: sleep until the average rate is back under it
            ahead = self.sent / self.limit - (time.monotonic() - self._started)
            if ahead > 0:
                time.sleep(ahead)


def send_image(
    site: Site,
    ctx: JobContext,
    peer: Any,
    opened: Opened,
    manifest_hex: str,
    size: int,
    limit: int = 0,
    done_before: int = 0,
    total: int = 0,
) -> int:
    """Fill the session the peer ``opened`` with what it lacks of image ``manifest_hex``,
    then send the manifest; returns the bytes sent. (The caller commits.)"""
    sid, token = str(opened.session), str(opened.token)
    mid = bytes.fromhex(manifest_hex)
    manifest = load_manifest(site.pool, mid)
    prev = _base_at_receiver(site, opened)
    held = prev.chunk_ids() if prev is not None else set()
    at_offset = previous_at_same_offset(manifest, prev)
    offered = chunks_to_offer(manifest, prev)

    with (
        ApiClient(peer.url, token, peer.fingerprint, what="peer", name=peer.name) as client,
        _Batches(SessionClient(client, sid), ctx, limit) as batches,
    ):
        channel = batches.channel

        def receiver_has(digest: bytes) -> bool:
            return digest in held or digest in batches.held

        for i in range(0, len(offered), ASK_BATCH):
            batch = offered[i : i + ASK_BATCH]
            frames: list[tuple[bytes, bytes]] = []
            queued = 0
            for digest in channel.missing(batch):
                blob = encode_for_receiver(site.pool, digest, receiver_has, at_offset.get(digest))
                frames.append((digest, blob))
                queued += len(blob)
                if queued >= SEND_BYTES:
                    batches.post(frames)
                    frames, queued = [], 0
            if frames:
                batches.post(frames)
            share = (i + len(batch)) / max(1, len(offered))
            ctx.progress(done_before + int(share * size), total or size)
            ctx.check_canceled()
        batches.settle()
        blob = site.pool.get_manifest_blob(mid)
        channel.commit_manifest(blob)
        ctx.add_sent(len(blob))
    return batches.sent + len(blob)


def _base_at_receiver(site: Site, opened: Opened) -> Manifest | None:
    """The manifest the receiver named as its base for the session, if held here."""
    if opened.base and site.pool.has_manifest(bytes.fromhex(opened.base)):
        return load_manifest(site.pool, bytes.fromhex(opened.base))
    return None


class ChunkStream:
    """Sends the chunks a capture stores (``offer``, its ``on_stored``) to the session a
    peer ``opened``, while the capture goes on: the receiver verifies and stores them on
    its own cores beside the capture instead of after it (a syncback during a failback's
    downtime). Only deltas whose base is in the receiver's base image go, as stored here
    (a scattered write's chunks). A chunk stored whole, which the receiver may hold an
    older version of at its offset (``send_image`` then sends a delta over that), other
    deltas and whatever a failed batch carried are left to ``send_image`` after the
    capture, which asks the receiver what it lacks; a failure here is logged, never the
    capture's.

    A capture worker that offers a chunk waits while ``STREAM_QUEUED`` bytes are queued
    (memory stays bounded however much was written)."""

    def __init__(self, site: Site, ctx: JobContext, peer: Any, opened: Opened) -> None:
        self._ctx, self._peer, self._opened = ctx, peer, opened
        base = _base_at_receiver(site, opened)
        self._bases = base.chunk_ids() if base is not None else set()
        self._cond = threading.Condition()
        self._queue: deque[tuple[bytes, bytes]] = deque()
        self._queued = 0
        self._closing = False
        self._failed: BaseException | None = None
        self.sent = 0
        self.waited = 0.0  # seconds capture workers waited for room in the queue, together
        self._thread = threading.Thread(target=self._run, name="tandem-chunk-stream", daemon=True)

    def __enter__(self) -> ChunkStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Send what is queued (unless the block failed), and wait for the answers."""
        with self._cond:
            self._closing = True
            if exc[0] is not None:
                self._queue.clear()
                self._queued = 0
            self._cond.notify_all()
        self._thread.join()
        if self._failed is not None:
            self._ctx.log(
                f"streaming chunks to {self._peer.name} stopped ({self._failed}); "
                "what it did not send goes after the capture"
            )

    def offer(self, digest: bytes, blob: bytes) -> None:
        if blob[4:5] != bytes([CODEC_DELTA]):
            return
        base = parse_header(blob, digest, "stored chunk").base
        if base is None or base not in self._bases:
            return
        with self._cond:
            if self._queued >= STREAM_QUEUED:
                t0 = time.monotonic()
                while self._queued >= STREAM_QUEUED and self._failed is None and not self._closing:
                    self._cond.wait()
                self.waited += time.monotonic() - t0
            if self._failed is not None or self._closing:
                return
            self._queue.append((digest, blob))
            self._queued += len(blob)
            self._cond.notify_all()

    def _take(self) -> list[tuple[bytes, bytes]] | None:
        """The next batch: ``STREAM_BATCH`` bytes, or what is left once closing; None at
        the end."""
        with self._cond:
            while self._queued < STREAM_BATCH and not self._closing:
                self._cond.wait()
            frames: list[tuple[bytes, bytes]] = []
            size = 0
            while self._queue and size < STREAM_BATCH:
                digest, blob = self._queue.popleft()
                frames.append((digest, blob))
                size += len(blob)
            self._queued -= size
            self._cond.notify_all()
            return frames or None

    def _run(self) -> None:
        peer, opened = self._peer, self._opened
        try:
            with (
                ApiClient(
                    peer.url, str(opened.token), peer.fingerprint, what="peer", name=peer.name
                ) as client,
                _Batches(SessionClient(client, str(opened.session)), self._ctx) as batches,
            ):
                try:
                    while (frames := self._take()) is not None:
                        batches.post(frames)
                    batches.settle()
                finally:
                    self.sent = batches.sent
        except Exception as exc:  # the capture goes on; send_image sends the rest
            with self._cond:
                self._failed = exc
                self._queue.clear()
                self._queued = 0
                self._cond.notify_all()


# --- receiver --------------------------------------------------------------------------


def _mirror_of(session: Any, *, peer: str, app: str) -> Any:
    """The mirror record of ``peer``'s ``app`` here; an app that is not that peer's mirror
    (this site's own, or another's) is never touched by it."""
    row = q.get_app(session, name=app, for_update=True)
    if row.origin != peer:
        raise MirrorOfOther(app=app, peer=peer, origin=row.origin or "this appliance")
    return row


def replicas_held(site: Site, *, peer: str, app: str) -> ReplicasHeld:
    """What the peer asks before sending: the replicas of its ``app`` held here."""
    with site.catalog.read() as session:
        try:
            row = q.get_app(session, name=app)
        except NotFound:
            return ReplicasHeld(images=[], newest_created=None, epoch=None)
        if row.origin != peer:
            raise MirrorOfOther(app=app, peer=peer, origin=row.origin or "this appliance")
        replicas = q.list_images(session, app=app, kind=ImageKind.REPLICA)
        return ReplicasHeld(
            images=[r.id for r in replicas],
            newest_created=replicas[0].created if replicas else None,
            epoch=row.writer_epoch,
        )


def open_replication(site: Site, *, peer: str, body: ReplicationOpen) -> Opened:
    """Check fencing and order, then open the write session the sender fills."""
    name = body.app.name
    image = body.image
    epoch = body.epoch
    shown = body.production
    with site.catalog.begin() as session:
        try:
            q.get_app(session, name=name)
        except NotFound:
            # A mirror record: nothing in it is a host to act on or a command to run.
            row = q.add_app(
                session,
                name=name,
                kind=body.app.kind,
                host=shown.host if shown else "",
                path=shown.path if shown else "",
                origin=peer,
                app_id=body.app.id,
                state=AppState.MANAGED,
            )
            row.writer_epoch = epoch
        row = _mirror_of(session, peer=peer, app=name)
        if row.kind is not body.app.kind:
            raise MirrorKindDiffers(
                peer=peer, sent=body.app.kind.value, app=name, kind=row.kind.value
            )
        if epoch < row.writer_epoch:
            raise StaleEpoch(app=name, carried=epoch, current=row.writer_epoch)
        check_transition(row.name, row.state, Operation.REPLICATE, AppFacts(mirrored=True))
        replicas = q.list_images(session, app=name, kind=ImageKind.REPLICA)
        if any(r.id == image.id for r in replicas):
            return Opened(status="present")
        if replicas and image.created <= replicas[0].created:
            raise ReplicaOutOfOrder(image=image.id, app=name, newest=replicas[0].id)
        base = replicas[0] if replicas else None
        if epoch > row.writer_epoch:
            row.writer_epoch = epoch
        if shown is not None and row.state is AppState.MANAGED:  # shown, never acted on
            row.host, row.path = shown.host, shown.path
    base_id = bytes.fromhex(base.manifest) if base is not None else None
    if base_id is not None and not site.pool.has_manifest(base_id):
        base_id = None
    transfer, token = site.sessions.open(
        job_id=f"replication of {image.id} from {peer}",
        write=True,
        bases=[base_id] if base_id else [],
        ttl=3600,
        # Every batch the sender sees answered is kept: across sites, sending it again
        # costs more than a sync per batch.
        flush_every=SEND_BYTES,
        cached=False,  # bulk ingest: what it stores leaves the page cache once durable
    )
    transfer.meta.update(
        peer=peer,
        app=name,
        image=image.model_dump(mode="json"),
        epoch=epoch,
        keep=body.keep,
        parent=base.id if base is not None else None,
    )
    return Opened(session=transfer.id, token=token, base=base_id.hex() if base_id else None)


def commit_replication(site: Site, *, peer: str, sid: str, token: str) -> Image:
    """Make the received image a replica, once its manifest is committed in the session."""
    transfer = site.sessions.get(sid, token)
    meta = transfer.meta
    if meta.get("peer") != peer:
        raise NotFound(what="replication", name=sid, listing="jobs")
    image = meta["image"]
    manifest = bytes.fromhex(str(image["manifest"]))
    if manifest not in transfer.committed:
        raise InvalidInput(
            detail=f"the manifest of {image['id']} was not received: send it before committing"
        )
    try:
        with site.gc_lock:
            with site.catalog.begin() as session:
                row = _mirror_of(session, peer=peer, app=meta["app"])
                if meta["epoch"] < row.writer_epoch:
                    raise StaleEpoch(app=row.name, carried=meta["epoch"], current=row.writer_epoch)
                check_transition(row.name, row.state, Operation.REPLICATE, AppFacts(mirrored=True))
                created = datetime.fromisoformat(str(image["created"]))
                replica = q.add_image(
                    session,
                    app=row.name,
                    kind=ImageKind.REPLICA,
                    manifest=manifest.hex(),
                    size=int(image.get("size") or 0),
                    label=image.get("label"),
                    origin=peer,
                    parent_id=meta.get("parent"),
                    source_image_id=str(image["id"]),
                    image_id=str(image["id"]),
                    created=created,
                    epoch=int(meta["epoch"]),
                    consistency=image.get("consistency"),
                    pg=image.get("pg"),
                )
                q.mark_replicated(session, name=row.name, at=created)
            site.sessions.close(transfer)
    finally:
        site.sessions.close(transfer)
    if meta.get("keep"):
        images.prune_snapshots(
            site, None, app=meta["app"], keep=int(meta["keep"]), kind=ImageKind.REPLICA
        )
    return replica


def submit(site: Site, app: str, body: None, actor: str | None = None) -> Job:
    """``submit_replicate`` from the API's call (it has no body)."""
    return submit_replicate(site, app=app, actor=actor)


SPEC = Spec(
    name="replicate",
    job_type=TYPE,
    params=NoParams,
    run=run_replicate,
    route="POST /apps/{name}/replicate",
    submit=submit,
    subject="app",
    lifecycle=Operation.REPLICATE,
    generic_route=False,  # a peer's call too: routes_peer
)
