"""Recovering a PostgreSQL app to a point in time: the step after presenting a base image.

The target is a time (``--time``, UTC unless it names its zone) or the end of the WAL held
(``--latest``). The base is the newest base image whose backup stopped at or before the
target and whose WAL runs without a gap from its start to the target; a target outside the
app's window is refused naming the window, and one past a WAL gap naming the gap.

Then: the base is presented (materialized at the host like a file-system image, without
what recovery never reads: ``pg_wal`` and the like, ``agent.pg.for_recovery``); the host's
agent writes the recovery settings and starts PostgreSQL with the host's binaries of the
cluster's major version, waits until it accepts connections, and reports the last replayed
commit's time (``pg_last_xact_replay_timestamp()``): the point reached, the achieved RPO.

WAL is fetched lazily: the run of segments from the base's first to the end of the unbroken
chain is the *plan*, but a segment is read here, verified and put in the copy's spool
(``tandem_wal/``) only when replay gets within ``PREFETCH`` segments of it (the agent
reports the segment PostgreSQL's restore_command waits for; see ``tandem.agent.pg``). So a
recovery to a time sends the WAL up to that time plus the window, not the WAL after it,
and replay starts after the first few segments rather than after all of them. For a
target time the last two segments of the plan are staged first: the agent reads the time
of the last commit held from them (a target past it is the end of the WAL). PostgreSQL is
started as soon as that is done; the first segments are sent while it starts, ``STAGERS``
at a time (``_Stager``).
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from time import monotonic
from typing import Any

from tandem.catalog import queries as q
from tandem.catalog.models import App, Host, Image
from tandem.domain import wal as wal_names
from tandem.domain.consistency import Cut
from tandem.domain.images import ImageKind
from tandem.domain.lifecycle import AppKind
from tandem.errors import (
    ImageNotOfApp,
    MountPointNeeded,
    RecoveryOptionsUnused,
    RecoveryOver,
    RecoveryPointUnavailable,
    RemoteError,
    SyncbackOfRunningDatabase,
    TandemError,
    TimeAndLatest,
    TimeInvalid,
    WalNotHome,
)
from tandem.jobs.runner import JobContext
from tandem.operations import present, wal
from tandem.operations.hosts import agent_for
from tandem.operations.site import Site
from tandem.storage.manifest import TreeManifest, load_manifest
from tandem.transport.agent import AgentClient
from tandem.transport.agent_api import RecoverRequest
from tandem.transport.api import PresentIn, checked
from tandem.transport.peer import PgBase

PREFETCH = max(1, int(os.environ.get("TANDEM_PG_PREFETCH", "4")))
"""Segments staged ahead of the one replay waits for."""
TAIL = 2
"""The plan's last segments, staged before PostgreSQL starts when the target is a time (the
agent reads the last commit held from them)."""
STAGERS = 2
"""Segments sent at once (reading one here overlaps writing another at the host)."""
WANTED_WAIT = 1.0
"""Seconds one ask for the segment replay waits for may wait for a change (a long poll)."""
ENDED_GRACE = 30.0
"""Seconds a recovery's answer may take once the agent stopped taking WAL for it."""


def parse_target(text: str | None, latest: bool, app: App) -> datetime | None:
    """The target time (aware, UTC) or None for the latest point; refuses options that do
    not apply."""
    if app.kind is not AppKind.POSTGRESQL:
        if text is not None or latest:
            raise RecoveryOptionsUnused(
                options="--time and --latest", app=app.name, kind=app.kind.value
            )
        return None
    if text is not None and latest:
        raise TimeAndLatest()
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise TimeInvalid(text=text) from exc
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _shown(when: datetime | None) -> str:
    return "the latest point" if when is None else when.isoformat(sep=" ")


@dataclass
class Plan:
    base: Image
    segments: list[str]
    window: wal.Window
    histories: list[str]
    """The history files of the timelines the segments follow (staged first: PostgreSQL
    reads them before any segment)."""


def plan(
    site: Site,
    app: App,
    target: datetime | None,
    image: str | None = None,
    *,
    syncback: bool = False,
) -> Plan:
    """The base image and WAL segments that reach ``target``; refused when none do.
    ``syncback``: ``image`` may be a catch-up syncback (a base backup of the DR copy)."""
    window = wal.window(site, app)
    held = wal.lineage(site, app)
    with site.catalog.read() as session:
        bases = wal.base_images(session, app)
        if syncback:
            bases += [i for i in q.list_images(session, app=app.name, kind=ImageKind.SYNCBACK)]
        if image is not None:
            bases = [b for b in bases if b.id == image and b.pg]
            if not bases:
                raise ImageNotOfApp(image=image, what="a base image", app=app.name)

    def refuse(reason: str) -> RecoveryPointUnavailable:
        return RecoveryPointUnavailable(
            app=app.name, target=_shown(target), reason=reason, window=window.shown()
        )

    if not bases:
        raise refuse("it has no base image here yet")
    if target is not None and window.start is not None and target < window.start:
        raise refuse("that is before its oldest base image was consistent")
    gaps = []
    for base in bases:
        if target is not None and wal.stop_time(base) > target:
            continue
        chain = wal.chain_of(base, held)
        if chain.end is None or (target is not None and chain.end < target):
            if chain.gap:
                gaps.append(chain.gap)
            continue
        if target is None and chain.gap is not None:
            gaps.append(chain.gap)  # a newer segment exists past a gap: not the latest
            continue
        # The whole run: a segment's "seen" bounds what was held *in all segments* then, so
        # commits before the target may lie in any segment up to the chain's end.
        return Plan(base, [seg.name for seg in chain.segments], window, held.history_names(chain))
    if gaps:
        raise refuse(f"the WAL held here has a gap at LSN {gaps[0]}; no point past it")
    raise refuse("the WAL held here does not reach it yet")


class _Stager:
    """Sends WAL segments into a recovery's spool on ``STAGERS`` connections at once, in the
    order asked: reading and verifying one here overlaps sending and writing another at the
    host. A send that failed is raised by the next ``check`` (or ``wait``)."""

    def __init__(
        self, site: Site, host: Host, path: str, run: str, rows: Mapping[str, Any]
    ) -> None:
        self.site, self.host, self.path, self.run, self.rows = site, host, path, run, rows
        self.staged: set[str] = set()
        self.moved = 0
        self._asked: set[str] = set()
        self._pending: list[Future[None]] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._clients: list[AgentClient] = []
        self._pool = ThreadPoolExecutor(STAGERS, thread_name_prefix="tandem-pg-stage")

    def _client(self) -> AgentClient:
        client: AgentClient | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = agent_for(self.host)
            with self._lock:
                self._clients.append(client)
        return client

    def _stage(self, name: str) -> None:
        data = wal.read_segment(self.site, self.rows[name])
        try:
            self._client().pg_spool(self.path, name, data, self.run)
        except RecoveryOver:
            return  # replay ended (promoted) while it travelled: not needed
        with self._lock:
            self.staged.add(name)
            self.moved += len(data)

    def send(self, name: str) -> Future[None] | None:
        """Queue ``name`` (once) for the spool; its future, or None when already asked."""
        if name in self._asked:
            return None
        self._asked.add(name)
        future = self._pool.submit(self._stage, name)
        self._pending.append(future)
        return future

    def check(self) -> None:
        """Raise the error of a send that failed; forget those that are done."""
        for future in [f for f in self._pending if f.done()]:
            self._pending.remove(future)
            future.result()

    def wait(self, futures: list[Future[None] | None]) -> None:
        for future in futures:
            if future is not None:
                future.result()
        self.check()

    def __enter__(self) -> _Stager:
        return self

    def __exit__(self, *_: object) -> None:
        # The copy is promoted (or failed): segments not yet sent are not needed any more.
        self._pool.shutdown(wait=True, cancel_futures=True)
        for client in self._clients:
            client.close()


def recover(
    site: Site,
    ctx: JobContext,
    *,
    app: App,
    host: Host,
    chosen: Plan,
    path: str,
    target: datetime | None,
    port: int | None,
    verify: bool = False,
    stop: bool = False,
) -> dict[str, Any]:
    """Start the presented copy at ``path`` on ``host`` recovered to ``target``, staging its
    WAL ahead of replay (see the module's docstring). ``stop``: shut it down once promoted
    (a restore in place: the app's start hook starts it as production)."""
    pg = chosen.base.pg or {}
    with site.catalog.read() as session:
        rows = {s.name: s for s in q.list_wal_segments(session, app_id=app.id)}
    plan_ = chosen.segments
    order = {name: i for i, name in enumerate(plan_)}
    outcome: dict[str, Any] = {}
    run = secrets.token_hex(8)  # this recovery's spool folder at the host
    body = checked(
        RecoverRequest,
        path=path,
        run=run,
        backup_label=pg["backup_label"],
        tablespace_map=pg.get("tablespace_map") or "",
        target_time=target,
        port=port,
        verify=verify,
        segments=[*chosen.histories, *plan_],
        stop=stop,
    )

    def start() -> None:
        try:
            with agent_for(host) as starter:
                outcome["done"] = starter.pg_recover(body)
        except BaseException as exc:  # handed to the job's thread below
            outcome["error"] = exc

    t0 = monotonic()
    with agent_for(host) as agent, _Stager(site, host, path, run, rows) as stager:
        for name in chosen.histories:  # read first, and tiny
            agent.pg_spool(path, name, wal.read_segment(site, rows[name]), run)
        if target is not None:  # the agent reads the last commit held from them first
            stager.wait([stager.send(name) for name in plan_[-TAIL:]])
        ctx.log(
            f"staged {len(stager.staged)} WAL segment(s) of {len(plan_)} before starting "
            f"PostgreSQL in {monotonic() - t0:.2f} s"
        )
        ctx.set_message(f"recovering {app.name} to {_shown(target)} on host {host.name}")
        starter = threading.Thread(target=start, name="tandem-pg-recover", daemon=True)
        starter.start()
        for name in plan_[:PREFETCH]:  # replay asks for the first at once: no waiting for it
            stager.send(name)
        wanted: str | None = None
        nxt = min(len(plan_), PREFETCH)
        while starter.is_alive():
            try:
                stager.check()
                wanted = agent.pg_spool_wanted(path, wanted, WANTED_WAIT, run)
            except TandemError:
                # The recovery may have just ended: a copy recovered in place is no longer
                # one the agent takes WAL for once its answer is on its way. Its answer
                # decides; a send that failed while it still runs is the job's error.
                starter.join(ENDED_GRACE)
                if starter.is_alive():
                    raise
                break
            if wanted is None or wanted not in order:
                continue
            upto = min(len(plan_), order[wanted] + 1 + PREFETCH)
            nxt = max(nxt, order[wanted])
            while nxt < upto:
                stager.send(plan_[nxt])
                nxt += 1
            ctx.set_message(
                f"replaying WAL {order[wanted] + 1}/{len(plan_)} of {app.name} on host "
                f"{host.name} ({len(stager.staged)} sent)"
            )
        starter.join()
        staged, moved = len(stager.staged), stager.moved
    if "error" in outcome:
        raise outcome["error"]
    done: dict[str, Any] = outcome["done"]
    reached = done.get("reached")
    ctx.log(
        f"PostgreSQL {done.get('major')} recovered from base {chosen.base.id} with "
        f"{staged} of the {len(plan_)} WAL segment(s) held to "
        f"{reached or 'the base alone'} in "
        f"{done.get('seconds')} s (replay waited {done.get('wal_wait_seconds', 0)} s for WAL); "
        f"port {done.get('port')}, socket {done.get('socket_dir')}"
    )
    amcheck = done.get("amcheck")
    if isinstance(amcheck, dict):
        ctx.log(
            f"pg_amcheck: {'no corruption found' if amcheck.get('ok') else 'FAILED'} in "
            f"{amcheck.get('seconds')} s",
            "info" if amcheck.get("ok") else "warning",
        )
    return {
        "amcheck": amcheck,
        "recovered_to": reached,
        "target": target.isoformat() if target is not None else "latest",
        "port": done.get("port"),
        "socket_dir": done.get("socket_dir"),
        "base": chosen.base.id,
        "base_stop_lsn": pg.get("stop_lsn"),
        "wal_segments": len(plan_),
        "wal_segments_fetched": staged,
        "wal_bytes": moved,
        "recovery_seconds": done.get("seconds"),
        "wal_wait_seconds": done.get("wal_wait_seconds"),
        "window": chosen.window.as_dict(),
    }


# --- the step shared by test failover, failover and mount ----------------------------------


def requested(
    site: Site, app: App, asked: PresentIn, image: str | None
) -> tuple[str | None, dict[str, Any]]:
    """At submit (test failover, failover): a database's base image that reaches the target
    ``asked`` names (refused outside the window) and the job parameters of its recovery; any
    other app's ``image`` as given and no parameters (refused when a database option is
    given)."""
    port, verify = asked.port, asked.verify
    target = parse_target(asked.time, asked.latest, app)
    if app.kind is not AppKind.POSTGRESQL:
        if port is not None or verify:
            raise RecoveryOptionsUnused(
                options="--port and --verify", app=app.name, kind=app.kind.value
            )
        return image, {}
    base = plan(site, app, target, image).base.id
    return base, {"time": target.isoformat() if target else None, "port": port, "verify": verify}


@dataclass(frozen=True)
class Recovery:
    """What a job's parameters ask: the plan that reaches the target, and the target."""

    plan: Plan
    target: datetime | None

    @property
    def base(self) -> Image:
        return self.plan.base


def asked(site: Site, app: App, time: str | None, image: str | None = None) -> Recovery:
    """The recovery a job's parameters ask for (``time``; none: the latest), planned again
    when the job runs: the WAL held may have moved since it was submitted."""
    target = parse_target(time, time is None, app)
    return Recovery(plan(site, app, target, image), target)


def present_copy(
    site: Site,
    ctx: JobContext,
    recovery: Recovery | None,
    *,
    image_id: str,
    base: Image,
    app: App,
    host: Host,
    params: present.PresentParams,
    verify: bool = False,
    vm_hosts: list[Host] | None = None,
    layer_beside: bool = False,
) -> tuple[present.Presented, dict[str, Any]]:
    """Present ``base`` as ``image_id`` at ``host`` and, when ``recovery`` is asked, recover
    the database into it: the step test failover, failover and mount share. What was
    presented, and the recovery's outcome (empty without one). ``layer_beside``: see
    ``present.present`` (failover)."""
    shown = present.present(
        site,
        ctx,
        image_id=image_id,
        base=base,
        app=app,
        host=host,
        action=params.action,
        mount_point=params.mount_point,
        new_vm=params.vm(),
        vm_hosts=vm_hosts or [],
        recovering=recovery is not None,
        layer_beside=layer_beside,
    )
    if recovery is None:
        return shown, {}
    recovered = recover_presented(
        site,
        ctx,
        recovery,
        image_id=image_id,
        shown=shown,
        app=app,
        host=host,
        port=params.port,
        verify=verify,
    )
    return shown, recovered


def recover_presented(
    site: Site,
    ctx: JobContext,
    recovery: Recovery,
    *,
    image_id: str,
    shown: present.Presented,
    app: App,
    host: Host,
    port: int | None,
    verify: bool,
) -> dict[str, Any]:
    """Recover into the copy just presented as ``image_id`` (no row yet); when that fails the
    presentation is withdrawn, so the failed job leaves nothing behind."""
    try:
        if not shown.paths:
            raise MountPointNeeded(what="a recovered database")
        return recover(
            site,
            ctx,
            app=app,
            host=host,
            chosen=recovery.plan,
            path=shown.paths[0],
            target=recovery.target,
            port=port,
            verify=verify,
        )
    except BaseException:
        present.withdraw_unrecorded(site, image_id, host)
        raise


def note(recovered: Mapping[str, Any]) -> str:
    """The end of a job's message when a database was recovered."""
    if not recovered:
        return ""
    return (
        f"; PostgreSQL recovered to {recovered.get('recovered_to')} on port {recovered.get('port')}"
    )


# --- home again: what a syncback of a database may be restored from -----------------------

ONE_INSTANT = (Cut.SNAPSHOT_BTRFS.value, Cut.REFLINK.value, Cut.FREEZE.value, Cut.HOOKS.value)
"""Cuts that read every file at one instant: a running cluster read so is crash-consistent
(its own pg_wal replays it), as after a power loss."""


def running_kind(app: App, host: Host, path: str) -> str | None:
    """What a syncback captures the DR copy at ``path`` as: a running database
    (``postgresql``: a base backup, ``pg_backup_start``/``stop`` on the DR cluster, its
    files read live and repaired by the WAL, so a catch-up syncback works while it writes),
    else None (a stopped cluster is read as the files it is)."""
    if app.kind is not AppKind.POSTGRESQL:
        return None
    try:
        with agent_for(host) as agent:
            agent.pg_probe(app.name, path)
    except TandemError:
        return None  # not running (or not fit to stream): read as files
    return AppKind.POSTGRESQL.value


def base_of(done: Mapping[str, Any]) -> dict[str, Any]:
    """The base backup an agent's capture reports, checked (it is stored and sent home)."""
    try:
        return PgBase.model_validate(done.get("pg")).model_dump(mode="json")
    except ValueError as exc:
        raise RemoteError(
            what="host", name="of the DR copy", detail=f"its base backup report is invalid ({exc})"
        ) from exc


def rolls_forward(app: App, image: Image) -> bool:
    """Whether restoring ``image`` onto ``app`` is a roll-forward: a catch-up syncback of a
    database (a base backup of the running DR copy), written in place and then recovered
    with the DR copy's WAL that production holds (pushed home by the DR site)."""
    return app.kind is AppKind.POSTGRESQL and image.kind is ImageKind.SYNCBACK and bool(image.pg)


def check_consistent(site: Site, app: App, image: Image) -> None:
    """A base backup is a cluster only once its WAL is replayed to the backup's end
    (``stop_lsn``): refused, naming the first segment not held, when the WAL held here
    stops short of it."""
    pg = image.pg or {}
    stop = wal_names.parse_lsn(str(pg["stop_lsn"]))
    chain = wal.chain_of(image, wal.lineage(site, app))
    reached = max((s.start_lsn + s.size for s in chain.segments), default=-1)
    if reached >= stop:
        return
    if chain.segments:
        last = chain.segments[-1]
        missing = (
            wal_names.segment_name(last.timeline, last.start_lsn + wal_names.SEGMENT)
            if last.complete
            else f"{last.name} (held up to LSN {wal_names.format_lsn(reached)})"
        )
    else:
        missing = wal_names.segment_name(
            int(pg["timeline"]), wal_names.parse_lsn(str(pg["start_lsn"]))
        )
    raise WalNotHome(image=image.id, app=app.name, lsn=str(pg["stop_lsn"]), segment=missing)


def rollforward(site: Site, app: App, image: Image, target: datetime | None) -> Plan:
    """The recovery of the catch-up syncback ``image`` to ``target`` (None: the newest WAL
    held): refused when its WAL does not reach consistency here, or when ``target`` is
    before it does."""
    check_consistent(site, app, image)
    if target is not None and target < wal.stop_time(image):
        raise RecoveryPointUnavailable(
            app=app.name,
            target=_shown(target),
            reason=f"syncback {image.id} is consistent only from "
            f"{wal.stop_time(image).isoformat(sep=' ', timespec='seconds')}, when its base "
            "backup ended",
            window=wal.window(site, app).shown(),
        )
    return plan(site, app, target, image.id, syncback=True)


def check_restorable(site: Site, app: App, image: Image) -> None:
    """A syncback of a PostgreSQL app taken while the database ran at the DR site from
    files read one by one is torn: refused, naming the final syncback (the database stopped
    first) as the one to restore. A cut at one instant, or a database stopped, is
    restorable; so is a base backup (a catch-up syncback), rolled forward with its WAL
    (``rollforward``)."""
    if app.kind is not AppKind.POSTGRESQL or image.kind is not ImageKind.SYNCBACK:
        return
    if image.pg or image.consistency in ONE_INSTANT:
        return
    manifest = load_manifest(site.pool, bytes.fromhex(image.manifest))
    if isinstance(manifest, TreeManifest) and any(
        e.path == "postmaster.pid" for e in manifest.entries
    ):
        raise SyncbackOfRunningDatabase(
            image=image.id,
            app=app.name,
            how=f"from files read one by one ({image.consistency or 'no cut'})",
        )
