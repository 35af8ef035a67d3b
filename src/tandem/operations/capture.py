"""Capture: a snapshot of an application, taken by its host's agent.

Flow (one lifecycle job per app, DESIGN "Finding what to send")
1. The job opens a *write session* on this appliance's pool whose writer registers the
   previous snapshot's manifest as its base (GC keeps what the agent reuses).
2. The host's agent reads the data, chunks, hashes and compresses it at the source, asks the
   session which chunks it lacks and sends only those, then commits the manifest through the
   session (after every chunk it names is durable).
3. The job records the ``snapshot`` image row in one transaction, then closes the session.
4. With a template's ``keep``, older snapshots are pruned and the pool is collected.
5. With a mirroring template and a paired peer, a ``replicate`` job is queued.

Consistency (``agent.pit``)
- The app's ``consistency`` mode is sent to the agent, which cuts a point in time of the
  data (btrfs snapshot, reflink clones, fsfreeze) or reads the live files and verifies each
  unchanged after reading; its answer says how, and the image records it (``Cut``).
- ``hooks``: the app's freeze hook runs before the agent reads and its thaw hook after, in a
  ``finally`` with a timeout, whatever happened in between; the image records ``hooks``.

Invariants
- Nothing half-captured becomes visible: without a committed manifest there is no image
  row, and closing the session discards the chunks that were sent but never named.
- An agent that cannot be reached fails the job with "host NAME unreachable at URL: ...";
  existing images are untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tandem.catalog import queries as q
from tandem.catalog.models import App, Job
from tandem.domain.consistency import CUTS, ConsistencyMode, Cut
from tandem.domain.hooks import Hook
from tandem.domain.images import ImageKind
from tandem.domain.lifecycle import AppKind, Operation, check_transition
from tandem.errors import LabelTooLong, PointInTimeUnavailable, RemoteError
from tandem.jobs.queue import submit_job
from tandem.jobs.runner import JobContext
from tandem.operations import hooks, images, peers, replicate, stamps
from tandem.operations.hosts import agent_for, app_host
from tandem.operations.jobparams import LabelParams
from tandem.operations.site import Site
from tandem.operations.spec import Spec
from tandem.operations.streams import follow
from tandem.transport.agent import AgentClient
from tandem.transport.agent_api import CaptureRequest
from tandem.transport.api import CaptureIn, checked
from tandem.transport.peer import PgBase

TYPE = "capture"
Params = LabelParams
MAX_LABEL = 128
THAW_TIMEOUT = 120.0
"""Seconds a thaw hook may take: the app is held until it has run."""


def check_label(label: str | None) -> str | None:
    if label is None or not label.strip():
        return None
    if len(label) > MAX_LABEL or "\x00" in label:
        raise LabelTooLong(limit=MAX_LABEL)
    return label


def submit_capture(
    site: Site, *, app: str, label: str | None = None, actor: str | None = None
) -> Job:
    """Queue a capture of ``app``; refused unless the lifecycle allows it now."""
    label = check_label(label)
    with site.catalog.begin() as session:
        row = q.get_app(session, name=app)
        check_transition(row.name, row.state, Operation.CAPTURE)
        app_host(session, row, action="capture")
        job = submit_job(
            session,
            type=TYPE,
            app=row.name,
            params=Params(label=label).stored(),
            lifecycle=True,
            actor=actor,
        )
    site.wake()
    return job


def run_capture(site: Site, ctx: JobContext, params: Params) -> dict[str, Any]:
    """The job handler."""
    name = ctx.job.app or ""
    with site.catalog.read() as session:
        app = q.get_app(session, name=name)
        check_transition(app.name, app.state, Operation.CAPTURE)
        host = app_host(session, app, action="capture")
        base = q.latest_image(session, app=app.name, kind=ImageKind.SNAPSHOT)
        template = q.get_template(session, name=app.template) if app.template else None
    base_id = bytes.fromhex(base.manifest) if base is not None else None
    if base_id is not None and not site.pool.has_manifest(base_id):
        ctx.log(f"the manifest of {base.id if base else '?'} is missing; capturing in full")
        base_id = None
    transfer, token = site.sessions.open(
        # Bulk ingest: what it stores leaves the page cache once durable.
        job_id=ctx.job.id,
        write=True,
        bases=[base_id] if base_id else [],
        cached=False,
    )
    mode = ConsistencyMode(app.consistency or ConsistencyMode.AUTO)
    try:
        what = f"domain {app.path}" if app.kind is AppKind.VM else app.path
        ctx.set_message(f"capturing {what} on host {host.name}")
        body = checked(
            CaptureRequest,
            kind=app.kind.value,
            path=app.path,
            base=base_id.hex() if base_id else None,
            job=ctx.job.id,
            appliance=site.session_ref(transfer.id, token),
            consistency=mode.value,
            base_stamp=_stamp_of_base(site, app, base_id),
        )
        with agent_for(host) as agent:
            if app.kind is AppKind.POSTGRESQL:
                # The slot first: the server keeps every segment from the backup's start.
                agent.pg_stream(app.name, app.path)
            if mode is ConsistencyMode.HOOKS:
                done = _capture_between_hooks(
                    ctx, app, agent, body, lambda: transfer.bytes_received
                )
            else:
                done = follow(
                    ctx, agent.capture(body), host=host.name, moved=lambda: transfer.bytes_received
                )
        if done.get("read_reason"):
            ctx.log(str(done["read_reason"]))  # a VM: incremental, or why everything was read
        cut = _cut_of(done, mode)
        if cut is not None:
            held = done.get("held_seconds")
            ctx.log(
                f"cut: {cut} ({done.get('consistency_reason') or 'as asked'})"
                + (f"; writes held {float(held):.3f} s" if held is not None else "")
            )
        manifest = bytes.fromhex(str(done.get("manifest", "")))
        if manifest not in transfer.committed:
            raise RemoteError(
                what="host",
                name=host.name,
                detail="its agent reported a manifest it did not commit to the session",
            )
        size = int(done.get("size") or 0)
        with site.gc_lock:
            with site.catalog.begin() as session:
                image = q.add_image(
                    session,
                    app=app.name,
                    kind=ImageKind.SNAPSHOT,
                    manifest=manifest.hex(),
                    size=size,
                    label=params.label,
                    parent_id=base.id if base is not None and base_id is not None else None,
                    consistency=cut,
                    pg=_pg_of(done) if app.kind is AppKind.POSTGRESQL else None,
                )
            # Only now may the writer go: the image row keeps its chunks alive from here on.
            site.sessions.close(transfer)
    finally:
        site.sessions.close(transfer)
    ctx.set_image(image.id)
    if app.kind is AppKind.VOLUME:
        stamps.record(site, app_id=app.id, manifest=manifest.hex(), stamp=done.get("stamp"))
    sent = transfer.bytes_received
    kind = {AppKind.VOLUME: "volume", AppKind.VM: "VM"}.get(app.kind, "file tree")
    read = int((done.get("stats") or {}).get("bytes_read") or 0)
    ctx.set_message(
        f"captured {image.id}: {_size(size)} {kind}, {_size(read)} read, {_size(sent)} sent"
        + (" (incremental)" if base_id else "")
        + (f"; {done['read_reason']}" if done.get("read_reason") else "")
    )
    pruned: list[str] = []
    if template is not None and template.keep:
        pruned = images.prune_snapshots(site, ctx, app=app.name, keep=template.keep)
    mirror_job = None
    if template is not None and template.mirror and peers.the_peer(site) is not None:
        if replicate.failed_over_at_peer(site, app.name):
            ctx.log("not mirrored: the app is failed over at the peer, whose copy is the writer")
        else:
            mirror_job = replicate.submit_replicate(site, app=app.name, actor="mirror").id
            ctx.log(f"mirroring to the peer in job {mirror_job}")
    return {
        "mirror_job": mirror_job,
        "image": image.id,
        "manifest": manifest.hex(),
        "size": size,
        "bytes_sent": sent,
        "incremental": bool(done.get("incremental", base_id is not None)),
        "bytes_read": read,
        "pruned": pruned,
        "stats": done.get("stats", {}),
        "consistency": cut,
        "consistency_reason": done.get("consistency_reason"),
        "held_seconds": done.get("held_seconds"),
        "cut_at": _number(done.get("cut_at")),
        "cut_seconds": _number(done.get("cut_seconds")),
        "held_read": _number(done.get("held_read")),
    }


def _number(value: object) -> float | None:
    """A number the agent reports (when the cut began, how long it took), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _pg_of(done: dict[str, Any]) -> dict[str, Any]:
    """The base backup the agent reports, checked (it is stored and sent to the peer)."""
    try:
        return PgBase.model_validate(done.get("pg")).model_dump(mode="json")
    except ValueError as exc:
        raise RemoteError(
            what="host", name="of the app", detail=f"its base backup report is invalid ({exc})"
        ) from exc


def _stamp_of_base(site: Site, app: App, base_id: bytes | None) -> dict[str, Any] | None:
    """The volume file's stamp when it held the base image (``stamps``), for the agent to
    skip reading a file untouched since; None for trees and when unknown."""
    if app.kind is not AppKind.VOLUME or base_id is None:
        return None
    known = stamps.known(site, app_id=app.id)
    return known[1] if known is not None and known[0] == base_id.hex() else None


def _cut_of(done: dict[str, Any], mode: ConsistencyMode) -> str | None:
    """How the agent says it cut the image (None from an agent that does not say)."""
    cut = done.get("consistency")
    if cut not in CUTS:
        return None
    if mode is ConsistencyMode.HOOKS and cut == Cut.CRASH_UNSAFE:
        return Cut.HOOKS.value  # read live while the freeze hook held the app quiet
    return str(cut)


def _capture_between_hooks(
    ctx: JobContext, app: App, agent: AgentClient, body: CaptureRequest, moved: Callable[[], int]
) -> dict[str, Any]:
    """The agent's capture between the app's freeze and thaw hooks (thaw always runs)."""
    if hooks.script_for(app, Hook.FREEZE) is None:
        raise PointInTimeUnavailable(
            path=app.path,
            reason="its --consistency is hooks but it has no freeze hook; give it one with "
            "`tandem app set APP --freeze SCRIPT --thaw SCRIPT`",
        )
    hooks.run_hook(agent, app, Hook.FREEZE, operation=TYPE, path=app.path, ctx=ctx)
    try:
        return follow(ctx, agent.capture(body), host=agent.name, moved=moved)
    finally:
        hooks.run_hook(
            agent, app, Hook.THAW, operation=TYPE, path=app.path, ctx=ctx, timeout=THAW_TIMEOUT
        )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def submit(site: Site, app: str, body: CaptureIn | None, actor: str | None = None) -> Job:
    """``submit_capture`` from the API's request."""
    return submit_capture(site, app=app, label=body.label if body else None, actor=actor)


SPEC = Spec(
    name="capture",
    job_type=TYPE,
    params=Params,
    run=run_capture,
    route="POST /apps/{name}/capture",
    submit=submit,
    subject="app",
    lifecycle=Operation.CAPTURE,
    request=CaptureIn,
    title="Capture now",
)
