"""The WAL of PostgreSQL apps: pulled from the production host, stored verified, mirrored to
the peer, pruned with the base images, and measured as a recoverable window.

On disk (``DIR/wal/<app id>/<segment name>``): the bytes of each segment held so far, up
to ``wal_segments.size``; a file is grown by appending (WAL is append-only: bytes once
held never change) with a temp copy, fsync and rename, so a crash leaves the previous
length; the catalog row, written after, carries the BLAKE3-256 of exactly those bytes, and
every read checks it (a bad file is reported, never served).

The shipper (``WalShipper``, a thread of the appliance) ticks every ``TICK`` seconds: for
each PostgreSQL app of this site that is unmanaged it stops the receiver and drops the slot
(once); for each that is managed, it keeps the host's receiver running
(``pg_stream``), reads what the host holds past what is stored here, stores it, acknowledges
completed segments (the host then removes them), and pushes what the peer lacks when the
app's template mirrors. Every step is idempotent: after a break (agent, appliance or peer
restarted) the next tick reads from what is held, so resume = run again. A push answers
what the peer holds, and a peer holding less than the sender recorded (rebuilt, or a
segment pruned before its answer was recorded) is sent it again from there.

While the app is failed over at the peer (``peer_active``) production's own cluster is
not streamed: the DR copy is the writer, and WAL a production cluster writes meanwhile (a
replica-style failback not yet committed, then undone) would fork the DR copy's timeline
in the store. Streaming resumes once the failback ends (a new base image bridges).

Trust: the peer's pushes (``receive_push``) are taken only for an app that is already a
mirror record of that peer here, of kind postgresql; names and sizes are validated by the
wire models, and the bytes must match the digest the sender computed.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3

from tandem.catalog import queries as q
from tandem.catalog.models import App, Image, WalSegment
from tandem.domain import wal
from tandem.domain.images import ImageKind, ImageState
from tandem.domain.lifecycle import AppKind, AppState
from tandem.errors import (
    Conflict,
    InvalidInput,
    StorageError,
    TandemError,
    WalRefused,
    WalSegmentDamaged,
)
from tandem.jobs.runner import JobContext
from tandem.operations import peers
from tandem.operations.hosts import agent_for
from tandem.operations.site import Site
from tandem.transport.peer import WalHeld, WalPush

log = logging.getLogger(__name__)

TICK = float(os.environ.get("TANDEM_WAL_TICK", "1"))
NEVER = datetime(1970, 1, 1, tzinfo=UTC)
"""The point covered by WAL whose coverage no listing confirmed yet."""
PUSH_MAX = 4 * 1024 * 1024
"""Bytes of a segment per push to the peer."""
SEEN_PUSH_EVERY = 5.0
"""Seconds a segment's point may run ahead of what the peer was told before it is sent
with no new bytes (an idle database: its DR window follows within this)."""
PUSH_RETRY = 30.0
"""Seconds before a failed-over app's WAL is pushed home again after production refused or
did not answer (its capture at DR goes on every tick meanwhile)."""


def wal_dir(site: Site, app_id: str) -> Path:
    return site.pool.root.parent / "wal" / app_id


def _digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def read_segment(site: Site, seg: WalSegment) -> bytes:
    """The held bytes of ``seg``, verified against their digest."""
    path = wal_dir(site, seg.app_id) / seg.name
    try:
        data = path.read_bytes()[: seg.size]
    except FileNotFoundError as exc:
        raise WalSegmentDamaged(segment=seg.name, path=path, problem="is missing") from exc
    if len(data) != seg.size or _digest(data) != seg.digest:
        raise WalSegmentDamaged(segment=seg.name, path=path, problem="does not match its digest")
    return data


def _append(site: Site, app_id: str, name: str, held: int, data: bytes) -> bytes:
    """Store ``data`` after the first ``held`` bytes of the segment; returns the whole."""
    folder = wal_dir(site, app_id)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    old = path.read_bytes()[:held] if held else b""
    if len(old) != held:
        raise StorageError(detail=f"WAL segment {name} holds {len(old)} bytes, not {held}")
    whole = old + data
    tmp = folder / f".{name}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(whole)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return whole


def store(
    site: Site,
    *,
    app_id: str,
    name: str,
    offset: int,
    data: bytes,
    complete: bool,
    seen: datetime,
    digest: str | None = None,
) -> WalSegment:
    """Hold ``data`` at ``offset`` of segment ``name`` (idempotent: bytes already held are
    skipped; ``offset`` past what is held is refused)."""
    timeline, start = wal.parse_file_name(name)
    with site.catalog.read() as session:
        row = q.get_wal_segment(session, app_id=app_id, name=name)
        held = row.size if row is not None else 0
    if row is not None:
        seen = max(seen, row.seen)  # what was covered stays covered
    if offset > held:
        raise Conflict(detail=f"WAL segment {name}: bytes from {offset} sent, {held} held")
    new = data[held - offset :]
    if row is not None and (row.complete or (not new and complete == row.complete)):
        if not row.complete and seen > row.seen:  # nothing new: only "seen" moves on
            with site.catalog.begin() as session:
                return q.put_wal_segment(
                    session, app_id=app_id, name=name, timeline=timeline, start_lsn=start,
                    size=row.size, complete=False, digest=row.digest, seen=seen,
                )  # fmt: skip
        return row
    whole = _append(site, app_id, name, held, new)
    actual = _digest(whole)
    if digest is not None and actual != digest:
        _append(site, app_id, name, 0, whole[:held])  # back to what was verified
        raise InvalidInput(detail=f"WAL segment {name} does not match the digest sent")
    with site.catalog.begin() as session:
        return q.put_wal_segment(
            session, app_id=app_id, name=name, timeline=timeline, start_lsn=start,
            size=len(whole), complete=complete, digest=actual, seen=seen,
        )  # fmt: skip


# --- pulling from the production host ----------------------------------------------------


def pull(site: Site, app: App, where: tuple[str, str] | None = None) -> int:
    """One round for ``app``: store what its host holds past what is stored here, then keep
    its receiver running (after: WAL received before the server stopped is still taken);
    returns the bytes stored. ``where``: (host, path) of the cluster when it is not the
    app's own (the DR copy a failed-over app runs on)."""
    host_name, path = where or (app.host, app.path)
    with site.catalog.read() as session:
        host = q.get_host(session, name=host_name)
        held = {s.name: s for s in q.list_wal_segments(session, app_id=app.id)}
    moved = 0
    with agent_for(host) as agent:
        listing = agent.pg_wal(app.name)
        # The point every acknowledged commit before it is held: never past this moment (a
        # host's clock ahead of the appliance's claims no future), and while none is known
        # yet (the agent restarted) the window's end stays where it was.
        floor = wal.floor_of((s.name, s.seen) for s in held.values()) or NEVER
        seen = min(listing.seen, datetime.now(UTC)) if listing.seen else floor
        done: list[str] = []
        stamps = wal.vouched([e.name.removesuffix(".partial") for e in listing.files], seen, floor)
        for entry in listing.files:
            name = entry.name.removesuffix(".partial")
            complete = entry.name == name
            row = held.get(name)
            if row is not None and row.complete:
                done.append(name)
                continue
            offset = row.size if row is not None else 0
            data = agent.pg_wal_read(app.name, entry.name, offset)
            if not data and not listing.running and row is not None:
                continue  # nothing new and nothing coming: the point seen stays
            store(
                site, app_id=app.id, name=name, offset=offset, data=data, complete=complete,
                seen=stamps[name],
            )  # fmt: skip
            moved += len(data)
            if complete:
                done.append(name)
        if done:
            agent.pg_wal_ack(app.name, done)
        agent.pg_stream(app.name, path)
    return moved


# --- mirroring to the peer ---------------------------------------------------------------


def push(site: Site, app: App, *, written_here: bool = False) -> int:
    """Send the peer the bytes of ``app``'s segments it does not hold yet. ``written_here``
    (a failed-over app at DR): only the WAL of timelines newer than every base image here,
    the DR copy's since its promotion (the rest came from the peer)."""
    peer = peers.the_peer(site)
    if peer is None:
        return 0
    with site.catalog.read() as session:
        rows = q.list_wal_segments(session, app_id=app.id)
        bases = base_images(session, app)
    newest_base = max((int((b.pg or {})["timeline"]) for b in bases), default=0)
    todo = [
        s
        for s in rows
        if (s.mirrored < s.size or (s.complete and s.mirrored == s.size) or _point_ahead(s))
        and (not written_here or s.timeline > newest_base)
    ]
    sent = 0
    with peers.client_for(peer) as remote:
        for seg in todo:
            data = read_segment(site, seg)
            offset = seg.mirrored
            rewound = False
            while True:
                piece = data[offset : offset + PUSH_MAX]
                last = offset + len(piece) >= len(data)
                body = WalPush(
                    name=seg.name,
                    offset=offset,
                    data=base64.b64encode(piece).decode(),
                    complete=seg.complete and last,
                    digest=_digest(data[: offset + len(piece)]),
                    seen=seg.seen,
                )
                held = remote.push_wal(app.name, body)
                sent += len(piece)
                if held.size < offset + len(piece):
                    # The peer holds less than it was sent: it was rebuilt, or pruned the
                    # segment before our record of its answer. From what it holds, once: a
                    # peer that keeps answering less is not followed round.
                    if rewound:
                        offset = held.size
                        break
                    offset, rewound = held.size, True
                    continue
                offset = held.size
                if last or offset >= len(data):
                    break
            with site.catalog.begin() as session:
                row = q.get_wal_segment(session, app_id=app.id, name=seg.name)
                if row is not None:  # size + 1: the peer holds it whole and complete
                    row.mirrored = offset + (1 if seg.complete and offset >= len(data) else 0)
                    row.mirrored_seen = seg.seen
    return sent


def _point_ahead(seg: WalSegment) -> bool:
    """Whether a segment being written, which the peer holds every byte of, vouches for a
    point the peer was not told, by ``SEEN_PUSH_EVERY`` or more: an idle database adds no
    byte, but every commit before its newer point is held, and the DR window says so only
    once the peer is told."""
    if seg.complete or seg.mirrored < seg.size:
        return False
    return seg.mirrored_seen is None or (
        (seg.seen - seg.mirrored_seen).total_seconds() >= SEEN_PUSH_EVERY
    )


def receive_push(site: Site, *, peer: str, app: str, body: WalPush) -> WalHeld:
    """Hold WAL the peer sends for ``app``: its mirror record here, or this site's own app
    while it is failed over at the peer (the DR copy's WAL, written on its own timeline:
    production's window then runs on through the DR period)."""
    with site.catalog.read() as session:
        row = q.get_app(session, name=app)
        mirror = row.origin == peer
        failed_over_there = row.origin is None and row.peer_active
        if not (mirror or failed_over_there) or row.kind is not AppKind.POSTGRESQL:
            raise WalRefused(
                segment=body.name,
                app=app,
                peer=peer,
                reason="the application here is not a PostgreSQL mirror of the peer nor "
                "failed over at it, and WAL is taken only for apps whose base images this site "
                "already holds",
            )
        app_id = row.id
        newest_base = max(
            (int((b.pg or {})["timeline"]) for b in base_images(session, row)), default=0
        )
    try:
        data = base64.b64decode(body.data, validate=True)
    except ValueError as exc:
        raise InvalidInput(detail=f"WAL segment {body.name}: data is not base64") from exc
    try:
        timeline, _ = wal.parse_file_name(body.name)
    except ValueError as exc:
        raise InvalidInput(detail=str(exc)) from exc
    if failed_over_there and timeline <= newest_base:  # the rule ``push(written_here)`` sends by
        raise WalRefused(
            segment=body.name,
            app=app,
            peer=peer,
            reason=f"it is on timeline {timeline}, which this site's own base images reach "
            f"({newest_base}), and only the timelines the DR copy wrote after its promotion are "
            "taken home from the peer",
        )
    with site.catalog.read() as session:
        current = q.get_wal_segment(session, app_id=app_id, name=body.name)
    if body.offset > (current.size if current is not None else 0):
        # Bytes past what is held would leave a hole: not stored, and the answer says what
        # is held, so the sender goes on from there (a sender whose record of this site
        # is ahead of it would otherwise be refused at every push, its WAL stuck here).
        return WalHeld(name=body.name, size=current.size if current is not None else 0)
    seg = store(
        site, app_id=app_id, name=body.name, offset=body.offset, data=data,
        complete=body.complete, seen=body.seen, digest=body.digest,
    )  # fmt: skip
    if failed_over_there:  # the peer holds what it sent: it is not pushed back to it
        with site.catalog.begin() as session:
            held = q.get_wal_segment(session, app_id=app_id, name=seg.name)
            if held is not None:
                held.mirrored = max(held.mirrored, held.size + (1 if held.complete else 0))
                held.mirrored_seen = held.seen
    return WalHeld(name=seg.name, size=seg.size)


# --- the window, and pruning --------------------------------------------------------------


BASE_KINDS = (ImageKind.SNAPSHOT, ImageKind.REPLICA)


def base_images(session: Any, app: App) -> list[Image]:
    """The app's base images here (snapshots at production, replicas at DR), newest first."""
    rows = [i for k in BASE_KINDS for i in q.list_images(session, app=app.name, kind=k)]
    return sorted((i for i in rows if i.pg), key=lambda i: i.created, reverse=True)


def held_of(rows: list[WalSegment]) -> list[wal.Held]:
    """The segments among ``rows`` (not the history files)."""
    return [
        wal.Held(s.name, s.timeline, s.start_lsn, s.size, s.complete, s.seen)
        for s in rows
        if wal.history_timeline(s.name) is None
    ]


def histories_of(site: Site, rows: list[WalSegment]) -> dict[int, list[wal.Branch]]:
    """The timeline history files among ``rows``, read and parsed, by timeline (one that
    cannot be read or parsed is left out, and said so in the log: no chain follows it)."""
    out: dict[int, list[wal.Branch]] = {}
    for row in rows:
        timeline = wal.history_timeline(row.name)
        if timeline is None or not row.complete:
            continue
        try:
            out[timeline] = wal.parse_history(read_segment(site, row).decode())
        except (TandemError, ValueError, UnicodeDecodeError) as exc:
            log.warning("timeline history %s of app %s is not used: %s", row.name, row.app_id, exc)
    return out


@dataclass(frozen=True)
class Lineage:
    """What an app's WAL held here is: its segments and its timelines' histories."""

    held: list[wal.Held]
    histories: dict[int, list[wal.Branch]]

    def history_names(self, chain: wal.Chain) -> list[str]:
        """The history files a recovery along ``chain`` reads (those of its timelines)."""
        timelines = sorted({h.timeline for h in chain.segments})
        return [f"{t:08X}.history" for t in timelines if t in self.histories]


def lineage(site: Site, app: App) -> Lineage:
    with site.catalog.read() as session:
        rows = q.list_wal_segments(session, app_id=app.id)
    return Lineage(held_of(rows), histories_of(site, rows))


@dataclass(frozen=True)
class Window:
    """What an app can be recovered to at this site."""

    start: datetime | None
    end: datetime | None
    gap: str | None

    def shown(self) -> str:
        if self.start is None or self.end is None:
            return "none yet"
        return f"{self.start.isoformat(sep=' ', timespec='seconds')} → " + self.end.isoformat(
            sep=" ", timespec="seconds"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "start": self.start.isoformat() if self.start else None,
            "end": self.end.isoformat() if self.end else None,
            "gap": self.gap,
        }


def stop_time(image: Image) -> datetime:
    return datetime.fromisoformat(str((image.pg or {})["stop_time"]))


def chain_of(image: Image, lineage: Lineage) -> wal.Chain:
    pg = image.pg or {}
    return wal.chain_from(
        lineage.held,
        int(pg["timeline"]),
        wal.parse_lsn(str(pg["start_lsn"])),
        lineage.histories,
    )


def window(site: Site, app: App) -> Window:
    """Oldest base's stop point → the newest WAL seen with no gap from it."""
    with site.catalog.read() as session:
        bases = base_images(session, app)
    if not bases:
        return Window(None, None, None)
    held = lineage(site, app)
    oldest = bases[-1]
    chain = chain_of(oldest, held)
    end = chain.end
    # A newer base may bridge a gap of the oldest's chain.
    for base in bases:
        c = chain_of(base, held)
        if c.end is not None and (end is None or c.end > end) and c.gap is None:
            end, chain = c.end, c
    start = stop_time(oldest)
    return Window(start, end if end is not None and end >= start else None, chain.gap)


def prune(site: Site, app: App) -> list[str]:
    """Delete complete segments older than the first one the oldest base image needs."""
    with site.catalog.read() as session:
        bases = base_images(session, app)
        rows = q.list_wal_segments(session, app_id=app.id)
    if not bases:
        return []
    pg = bases[-1].pg or {}
    first = wal.parse_lsn(str(pg["start_lsn"]))
    first -= first % wal.SEGMENT
    timeline = int(pg["timeline"])
    old = [
        s.name
        for s in rows
        if s.complete
        and wal.history_timeline(s.name) is None  # a timeline's history is kept (tiny)
        and (s.timeline < timeline or (s.timeline == timeline and s.start_lsn < first))
        and (s.mirrored > s.size or app.origin is not None or not _mirrors(site, app))
    ]
    if old:
        with site.catalog.begin() as session:
            q.delete_wal_segments(session, app_id=app.id, names=old)
        for name in old:
            (wal_dir(site, app.id) / name).unlink(missing_ok=True)
    return old


def _mirrors(site: Site, app: App) -> bool:
    with site.catalog.read() as session:
        template = q.get_template(session, name=app.template) if app.template else None
    return bool(template and template.mirror and peers.the_peer(site) is not None)


def forget(site: Site, app: App) -> None:
    """Remove every segment held for ``app`` (it is being removed)."""
    with site.catalog.begin() as session:
        names = [s.name for s in q.list_wal_segments(session, app_id=app.id)]
        q.delete_wal_segments(session, app_id=app.id, names=names)
    folder = wal_dir(site, app.id)
    for name in names:
        (folder / name).unlink(missing_ok=True)


def stop_streaming(site: Site, app: App, where: tuple[str, str] | None = None) -> None:
    """Stop ``app``'s receiver and drop its slot (an unprotected cluster must not keep WAL
    for nobody); protecting it again starts a new stream, which a new base image bridges.
    ``where``: as for ``pull``."""
    host_name, path = where or (app.host, app.path)
    with site.catalog.read() as session:
        host = q.get_host(session, name=host_name)
    with agent_for(host) as agent:
        agent.pg_drop(app.name, path)


# --- at the DR site, while a failed-over database runs there -----------------------------


def dr_copy(site: Site, app: App) -> tuple[str, str] | None:
    """(host, folder) of the DR copy a failed-over PostgreSQL app runs on; None when it is
    not failed over here."""
    if app.kind is not AppKind.POSTGRESQL or app.state is not AppState.FAILED_OVER:
        return None
    with site.catalog.read() as session:
        for image in q.list_images(session, app=app.name, kind=ImageKind.FAILOVER):
            if image.state is ImageState.MOUNTED and image.mounted_host and image.mount_point:
                return image.mounted_host, image.mount_point
    return None


def start_dr_capture(site: Site, ctx: JobContext, app: App, where: tuple[str, str]) -> None:
    """Protect the DR copy as production is: its WAL (a new timeline since its promotion,
    with the timeline's history file) streamed by the DR host's agent with its own slot,
    stored here with the app's WAL. Started by the failover at once, so the stream begins
    in the segment of the promotion; the shipper keeps it up (and tries again if this
    failed)."""
    try:
        with site.wal_lock:
            pull(site, app, where)
    except TandemError as exc:
        ctx.log(f"the WAL of the DR copy of {app.name} is not streamed yet: {exc}", "warning")
        return
    ctx.log(f"the WAL of {app.name} is streamed from its DR copy on host {where[0]}")


def failover_ends(site: Site, ctx: JobContext, app_name: str, image: Image) -> None:
    """A failback withdraws the DR copy ``image`` of a PostgreSQL app: take its last WAL,
    stop its receiver and drop its slot first (best effort: the copy is going, and its
    receiver with it)."""
    with site.catalog.read() as session:
        app = q.get_app(session, name=app_name)
    if app.kind is not AppKind.POSTGRESQL or not image.mounted_host or not image.mount_point:
        return
    where = (image.mounted_host, image.mount_point)
    try:
        with site.wal_lock:
            with contextlib.suppress(TandemError):
                pull(site, app, where)
            with contextlib.suppress(TandemError):
                push(site, app, written_here=True)  # the last of it, home
            stop_streaming(site, app, where)
    except TandemError as exc:
        ctx.log(f"the WAL stream of the DR copy of {app.name} was not stopped: {exc}", "warning")


def replaced(site: Site, app: App) -> None:
    """Before a restore writes another state over ``app``'s cluster (a syncback from the DR
    site, on its own timeline): take what the host's receiver holds, then stop it, drop the
    slot and its folder. The receiver would otherwise resume from the old cluster's
    position, which the new one's history does not hold; the shipper starts a new stream
    at the new cluster's position once it runs (a new base image bridges the two)."""
    with site.wal_lock:
        with contextlib.suppress(TandemError):
            pull(site, app)  # its last WAL, when the old cluster ran until now
        stop_streaming(site, app)


class WalShipper:
    """The appliance's thread that keeps the WAL of its PostgreSQL apps flowing."""

    def __init__(self, site: Site, *, tick: float = TICK) -> None:
        self.site = site
        self.tick = tick
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned: dict[str, str] = {}
        self._dropped: set[str] = set()
        self._dr: dict[str, tuple[str, str]] = {}
        """Apps whose DR copy this shipper streams: (host, folder)."""
        self._push_after: dict[str, float] = {}
        """Apps whose DR WAL is not pushed home before this (monotonic) time."""

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="tandem-wal", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.run_once()
            except Exception:
                log.exception("WAL shipping failed; retrying at the next tick")

    def run_once(self) -> None:
        with self.site.catalog.read() as session:
            names = q.app_names(session, kind=AppKind.POSTGRESQL)
        for name in names:
            try:
                with self.site.wal_lock:
                    with self.site.catalog.read() as session:
                        app = q.get_app(session, name=name)  # as it is now, under the lock
                    self._step(app)
                self._warned.pop(name, None)
            except TandemError as exc:
                if self._warned.get(name) != exc.message:  # once per distinct reason
                    self._warned[name] = exc.message
                    log.warning("WAL of %s: %s", name, exc.message)

    def _step(self, app: App) -> None:
        where = dr_copy(self.site, app)
        if where is not None:  # failed over here: the DR copy's WAL, and home to production
            self._dr[app.name] = where
            pull(self.site, app, where)
            prune(self.site, app)
            if time.monotonic() >= self._push_after.get(app.name, 0.0):
                try:
                    push(self.site, app, written_here=True)
                except TandemError:  # production may be gone: not at every tick
                    self._push_after[app.name] = time.monotonic() + PUSH_RETRY
                    raise
            return
        if app.name in self._dr and app.state is not AppState.FAILBACK_PENDING:
            stop_streaming(self.site, app, self._dr[app.name])  # the failover ended
            del self._dr[app.name]
        if app.origin is None and app.state is AppState.MANAGED and not app.peer_active:
            self._dropped.discard(app.name)
            pull(self.site, app)
            if _mirrors(self.site, app):
                push(self.site, app)
        elif (
            app.origin is None and app.state is AppState.UNMANAGED and app.name not in self._dropped
        ):  # unprotected: no slot may keep WAL for it
            stop_streaming(self.site, app)
            self._dropped.add(app.name)
        prune(self.site, app)
