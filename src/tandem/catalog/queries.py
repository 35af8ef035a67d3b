"""Catalog queries: keyword-only functions over a ``Session``.

Invariants
- Functions never commit; they flush, so the caller's ``Catalog.begin()`` block is the unit
  of work and a failure leaves nothing behind.
- Duplicates are detected by the database (unique constraints), inside a savepoint, and
  raised as ``AlreadyExists``; the session stays usable after it.
- ``get_*`` raise ``NotFound`` whose message names the command that lists what exists.
- An app's state changes only through ``record_transition``, which checks the lifecycle
  table and stores the transition (from, to, operation, actor, epoch).
- Lists come in a stable order: names alphabetically, images and jobs newest first,
  transitions and log lines oldest first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import Select, String, delete, func, literal, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tandem.catalog.models import (
    App,
    Audit,
    Base,
    ConsoleSession,
    Host,
    Image,
    Job,
    JobLog,
    Peer,
    Setting,
    Template,
    Token,
    Transition,
    UTCDateTime,
    WalSegment,
    utcnow,
)
from tandem.domain.hooks import Hook
from tandem.domain.ids import new_app_id, new_image_id, validate_name
from tandem.domain.images import ImageKind, ImageState
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import (
    FENCING_OPERATIONS,
    AppFacts,
    AppKind,
    AppState,
    Operation,
    check_transition,
)
from tandem.domain.rules import Role
from tandem.errors import (
    AlreadyExists,
    AppHasImages,
    AppStillProtected,
    CursorStale,
    HostInUse,
    NotFound,
    OutOfRange,
    TemplateInUse,
)

R = TypeVar("R", bound=Base)


def _insert(session: Session, row: R, *, what: str, name: str) -> R:
    """Add ``row`` in a savepoint; a unique-constraint violation becomes ``AlreadyExists``."""
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError as exc:
        raise AlreadyExists(what=what, name=name) from exc
    return row


def _positive(value: int | None, what: str) -> int | None:
    if value is not None and value <= 0:
        raise OutOfRange(what=what, value=value, allowed="a positive number")
    return value


# --- hosts -------------------------------------------------------------------------------


def add_host(session: Session, *, name: str, url: str, token: str, fingerprint: str) -> Host:
    validate_name(name, "host name")
    return _insert(
        session,
        Host(name=name, url=url, token=token, fingerprint=fingerprint),
        what="host",
        name=name,
    )


def get_host(session: Session, *, name: str) -> Host:
    host = session.scalar(select(Host).where(Host.name == name))
    if host is None:
        raise NotFound(what="host", name=name, listing="hosts")
    return host


def list_hosts(session: Session) -> list[Host]:
    return list(session.scalars(select(Host).order_by(Host.name)))


def remove_host(session: Session, *, name: str) -> None:
    """Remove a host that no local app runs on and no image is mounted on."""
    host = get_host(session, name=name)
    apps = session.scalars(
        select(App.name).where(App.host == name, App.origin.is_(None)).order_by(App.name)
    ).all()
    if apps:
        raise HostInUse(
            host=name,
            holds="runs the applications",
            names=", ".join(apps),
            fix="Remove them first (`tandem app remove APP`), then the host",
        )
    mounted = session.scalars(select(Image.id).where(Image.mounted_host == name)).all()
    if mounted:
        raise HostInUse(
            host=name,
            holds="has mounted the images",
            names=", ".join(sorted(mounted)),
            fix="Unmount or delete them first (`tandem unmount IMAGE`), then remove the host",
        )
    session.delete(host)
    session.flush()


# --- templates ---------------------------------------------------------------------------


def add_template(
    session: Session,
    *,
    name: str,
    every_seconds: int | None = None,
    keep: int | None = None,
    mirror: bool = False,
    max_lag_seconds: int | None = None,
) -> Template:
    validate_name(name, "template name")
    row = Template(
        name=name,
        every_seconds=_positive(every_seconds, "the capture interval"),
        keep=_positive(keep, "the number of images to keep"),
        mirror=mirror,
        max_lag_seconds=_positive(max_lag_seconds, "the maximum lag"),
    )
    return _insert(session, row, what="template", name=name)


def get_template(session: Session, *, name: str) -> Template:
    template = session.scalar(select(Template).where(Template.name == name))
    if template is None:
        raise NotFound(what="template", name=name, listing="templates")
    return template


def list_templates(session: Session) -> list[Template]:
    return list(session.scalars(select(Template).order_by(Template.name)))


def remove_template(session: Session, *, name: str) -> None:
    """Remove a template that no app uses."""
    template = get_template(session, name=name)
    apps = session.scalars(select(App.name).where(App.template == name).order_by(App.name)).all()
    if apps:
        raise TemplateInUse(template=name, apps=", ".join(apps))
    session.delete(template)
    session.flush()


# --- apps ---------------------------------------------------------------------------------


def add_app(
    session: Session,
    *,
    name: str,
    kind: AppKind,
    host: str,
    path: str,
    hooks: Mapping[str, str | None] | None = None,
    origin: str | None = None,
    app_id: str | None = None,
    state: AppState = AppState.UNMANAGED,
    consistency: str = "auto",
) -> App:
    """Add an application. A local app's host must be registered here; a mirrored app
    (``origin`` names the appliance that owns it) keeps the other site's host name.
    ``hooks`` maps ``start``/``stop``/``freeze``/``thaw`` to script names (checked by the
    caller)."""
    validate_name(name, "application name")
    if origin is None:
        get_host(session, name=host)
    row = App(
        id=app_id or new_app_id(),
        name=name,
        kind=AppKind(kind),
        host=host,
        path=path,
        origin=origin,
        state=state,
        consistency=consistency,
    )
    for hook, script in (hooks or {}).items():
        setattr(row, _hook_column(hook), script or None)
    return _insert(session, row, what="application", name=name)


HOOKS = tuple(h.value for h in Hook)


def _hook_column(hook: str) -> str:
    if hook not in HOOKS:
        raise ValueError(f"no hook {hook!r}")
    return f"{hook}_hook"


def app_hooks(app: App) -> dict[str, str | None]:
    """The app's hook scripts by hook (``start``, ``stop``, ``freeze``, ``thaw``)."""
    return {hook: getattr(app, _hook_column(hook)) for hook in HOOKS}


def get_app(session: Session, *, name: str, for_update: bool = False) -> App:
    """The app called ``name``; ``for_update`` locks its row until the transaction ends."""
    query = select(App).where(App.name == name)
    if for_update:
        query = query.with_for_update()
    app = session.scalar(query)
    if app is None:
        raise NotFound(what="application", name=name, listing="apps")
    return app


def apps_query(*, after: str | None = None, limit: int | None = None) -> Select[App]:
    """Apps by name; ``after`` a name: those after it (a page's cursor)."""
    query = select(App)
    if after is not None:
        query = query.where(App.name > after)
    query = query.order_by(App.name)
    return query if limit is None else query.limit(limit)


def list_apps(session: Session, *, after: str | None = None, limit: int | None = None) -> list[App]:
    """Apps by name (a page of them with ``after``/``limit``)."""
    return list(session.scalars(apps_query(after=after, limit=limit)))


class ScheduledApp(NamedTuple):
    """What the scheduler needs of an app, each tick."""

    name: str
    template: str
    peer_active: bool
    last_capture: datetime | None
    last_replicated: datetime | None


def scheduled_apps(session: Session) -> list[ScheduledApp]:
    """The managed apps that follow a template, by name: the columns the scheduler reads
    each second, not ORM rows (a quarter of the CPU at 1,000 apps)."""
    query = (
        select(App.name, App.template, App.peer_active, App.last_capture, App.last_replicated)
        .where(App.state == AppState.MANAGED, App.template.is_not(None))
        .order_by(App.name)
    )
    return [
        ScheduledApp(name, template or "", peer_active, last_capture, last_replicated)
        for name, template, peer_active, last_capture, last_replicated in session.execute(query)
    ]


def app_names(session: Session, *, kind: AppKind) -> list[str]:
    """The names of the apps of ``kind``: what a loop over one kind reads each tick, not
    every app's row."""
    return list(session.scalars(select(App.name).where(App.kind == kind).order_by(App.name)))


def app_settings(session: Session, *, prefix: str, by_id: bool = False) -> dict[str, str]:
    """Per-app settings stored under ``(prefix + app name)[:64]`` (``by_id``: the app's id
    instead of its name), by app name, in one query (a primary-key lookup per app)."""
    key = func.substr(literal(prefix, String) + (App.id if by_id else App.name), 1, 64)
    rows = session.execute(select(App.name, Setting.value).join(Setting, Setting.key == key))
    return {name: value for name, value in rows}


def list_local_apps_on_host(session: Session, *, host: str) -> list[App]:
    """This site's own apps on ``host`` (mirror records, whose ``origin`` is a peer, name the
    other site's hosts and are left out)."""
    query = select(App).where(App.host == host, App.origin.is_(None)).order_by(App.name)
    return list(session.scalars(query))


def set_app_template(session: Session, *, name: str, template: str | None) -> App:
    """Point an app at a template (``None``: none). The state changes via ``record_transition``."""
    app = get_app(session, name=name)
    if template is not None:
        get_template(session, name=template)
    app.template = template
    session.flush()
    return app


def set_app_hooks(session: Session, *, name: str, hooks: Mapping[str, str | None]) -> App:
    """Change some of an app's hook scripts (keys ``start``, ``stop``, ``freeze``, ``thaw``;
    ``None`` removes one; keys left out stay as they are)."""
    app = get_app(session, name=name, for_update=True)
    for hook, script in hooks.items():
        setattr(app, _hook_column(hook), script or None)
    session.flush()
    return app


def set_app_consistency(session: Session, *, name: str, consistency: str) -> App:
    """Set what an app's captures may be cut from (a ``ConsistencyMode`` value)."""
    app = get_app(session, name=name, for_update=True)
    app.consistency = consistency
    session.flush()
    return app


def set_writer_epoch(session: Session, *, name: str, epoch: int) -> App:
    """Adopt a higher writer epoch learned from the peer; an epoch never goes down."""
    app = get_app(session, name=name, for_update=True)
    app.writer_epoch = max(app.writer_epoch, epoch)
    session.flush()
    return app


def mark_replicated(session: Session, *, name: str, at: datetime) -> App:
    """Record that a capture made at ``at`` reached the peer (the lag is measured from it)."""
    app = get_app(session, name=name)
    if app.last_replicated is None or at > app.last_replicated:
        app.last_replicated = at
    session.flush()
    return app


def remove_app(session: Session, *, name: str) -> None:
    """Remove an unmanaged app that has no images left (its transitions go with it)."""
    app = get_app(session, name=name)
    remove_app_check(session, app=app)
    session.delete(app)
    session.flush()


def remove_app_check(session: Session, *, app: App) -> None:
    """Refuse to remove an app that is managed or still has images."""
    name = app.name
    if app.state is not AppState.UNMANAGED:
        raise AppStillProtected(app=name, state=app.state.value)
    count = session.scalar(select(func.count()).select_from(Image).where(Image.app_id == app.id))
    if count:
        raise AppHasImages(app=name, count=count)


def record_transition(
    session: Session,
    *,
    app: str,
    operation: Operation,
    actor: str | None = None,
    job: str | None = None,
    facts: AppFacts | None = None,
) -> Transition:
    """Move ``app`` through ``operation`` per the lifecycle table and store the step.

    Raises ``InvalidTransition`` (or ``TransitionRefused`` when ``facts`` are given and a
    guard refuses). Fencing operations raise the app's writer epoch; the stored epoch is the
    one in force after the transition.
    """
    row = get_app(session, name=app, for_update=True)
    target = check_transition(row.name, row.state, operation, facts)
    if operation in FENCING_OPERATIONS:
        row.writer_epoch += 1
    step = Transition(
        app_id=row.id,
        from_state=row.state,
        to_state=target,
        operation=operation,
        actor=actor,
        job=job,
        epoch=row.writer_epoch,
        ts=utcnow(),
    )
    row.state = target
    session.add(step)
    session.flush()
    return step


def list_transitions(session: Session, *, app: str) -> list[Transition]:
    row = get_app(session, name=app)
    query = select(Transition).where(Transition.app_id == row.id)
    return list(session.scalars(query.order_by(Transition.ts, Transition.id)))


# --- images -------------------------------------------------------------------------------


def add_image(
    session: Session,
    *,
    app: str,
    kind: ImageKind,
    manifest: str,
    size: int = 0,
    label: str | None = None,
    origin: str | None = None,
    parent_id: str | None = None,
    source_image_id: str | None = None,
    protective: bool = False,
    epoch: int | None = None,
    image_id: str | None = None,
    created: datetime | None = None,
    state: ImageState = ImageState.READY,
    consistency: str | None = None,
    pg: dict[str, Any] | None = None,
) -> Image:
    """Record an image whose data is already durable (the manifest is committed last).

    ``epoch`` defaults to the app's writer epoch. A snapshot moves the app's
    ``last_capture`` forward; a replica moves ``last_replicated`` forward.
    """
    row = get_app(session, name=app)
    if parent_id is not None:
        get_image(session, image_id=parent_id)
    image = Image(
        id=image_id or new_image_id(),
        app=row,
        kind=ImageKind(kind),
        label=label,
        manifest=manifest,
        size=size,
        created=created or utcnow(),
        origin=origin,
        parent_id=parent_id,
        source_image_id=source_image_id,
        protective=protective or kind is ImageKind.PROTECTIVE,
        epoch=row.writer_epoch if epoch is None else epoch,
        state=state,
        consistency=consistency,
        pg=pg,
    )
    _insert(session, image, what="image", name=image.id)
    created_at = image.created
    if kind is ImageKind.SNAPSHOT and (row.last_capture is None or created_at > row.last_capture):
        row.last_capture = created_at
    if kind is ImageKind.REPLICA and (
        row.last_replicated is None or created_at > row.last_replicated
    ):
        row.last_replicated = created_at
    session.flush()
    return image


def get_image(session: Session, *, image_id: str) -> Image:
    image = session.get(Image, image_id)
    if image is None:
        raise NotFound(what="image", name=image_id, listing="images APP")
    return image


def images_query(
    *,
    app_id: str,
    kind: ImageKind | Sequence[ImageKind] | None = None,
    after: Image | None = None,
    limit: int | None = None,
) -> Select[Image]:
    """The app's images, newest first; ``after``: those older than that one (a cursor)."""
    query = select(Image).where(Image.app_id == app_id)
    if isinstance(kind, ImageKind):
        query = query.where(Image.kind == kind)
    elif kind is not None:
        query = query.where(Image.kind.in_(list(kind)))
    if after is not None:
        query = query.where(_older(Image.created, Image.id, after.created, after.id))
    query = query.order_by(Image.created.desc(), Image.id.desc())
    return query if limit is None else query.limit(limit)


def _older(created: Any, id_: Any, at: datetime, after_id: str) -> Any:
    """Rows after (``at``, ``after_id``) in newest-first order; one index range on
    (..., created, id)."""
    return tuple_(created, id_) < tuple_(literal(at, UTCDateTime()), literal(after_id, String))


def list_images(
    session: Session,
    *,
    app: str,
    kind: ImageKind | Sequence[ImageKind] | None = None,
    after: str | None = None,
    limit: int | None = None,
) -> list[Image]:
    """The app's images, newest first, optionally only of the given kind(s); ``after`` (an
    image id of the app) and ``limit`` make a page."""
    row = get_app(session, name=app)
    cursor = None
    if after is not None:
        cursor = session.get(Image, after)
        if cursor is None or cursor.app_id != row.id:
            raise CursorStale(after=after, what=f"image of {app!r}")
    query = images_query(app_id=row.id, kind=kind, after=cursor, limit=limit)
    return list(session.scalars(query))


def latest_image(session: Session, *, app: str, kind: ImageKind) -> Image | None:
    """The app's newest usable image of ``kind`` (one being deleted does not count); one
    indexed row, however many images the app has."""
    row = get_app(session, name=app)
    query = images_query(app_id=row.id, kind=kind).where(Image.state != ImageState.DELETING)
    return session.scalar(query.limit(1))


def images_beyond(session: Session, *, app: str, kind: ImageKind, keep: int) -> list[Image]:
    """The app's images of ``kind`` after its ``keep`` newest (what retention removes),
    without loading the ones it keeps."""
    row = get_app(session, name=app)
    return list(session.scalars(images_query(app_id=row.id, kind=kind).offset(keep)))


def list_images_on_host(session: Session, *, host: str) -> list[Image]:
    """Images presented to ``host`` (any app), newest first."""
    query = select(Image).where(Image.mounted_host == host)
    return list(session.scalars(query.order_by(Image.created.desc(), Image.id.desc())))


def list_images_of_kind(session: Session, *, kind: ImageKind) -> list[Image]:
    """Every image of ``kind`` on this appliance (any app), newest first."""
    query = select(Image).where(Image.kind == kind)
    return list(session.scalars(query.order_by(Image.created.desc(), Image.id.desc())))


def set_image_state(
    session: Session,
    *,
    image_id: str,
    state: ImageState,
    mounted_host: str | None = None,
    mount_point: str | None = None,
    nbd_export: str | None = None,
    vm_name: str | None = None,
    vm_hosts: list[str] | None = None,
    vm_existing: bool = False,
) -> Image:
    """Set an image's state; the presentation fields are kept only while it is mounted."""
    image = get_image(session, image_id=image_id)
    image.state = state
    mounted = state is ImageState.MOUNTED
    image.mounted_host = mounted_host if mounted else None
    image.mount_point = mount_point if mounted else None
    image.nbd_export = nbd_export if mounted else None
    image.vm_name = vm_name if mounted else None
    image.vm_hosts = vm_hosts if mounted and vm_hosts else None
    image.vm_existing = bool(vm_existing and mounted)
    session.flush()
    return image


GC_DELETED_KEY = "gc.deleted"
"""The number of image rows ever deleted here: garbage collection compares it with the
count it last collected after, to run only when something may have become garbage."""


def delete_image(session: Session, *, image_id: str) -> None:
    """Remove an image's row; images naming it as parent keep existing (parent set NULL).
    Its chunks stay in the pool until the next garbage collection (counted in
    ``GC_DELETED_KEY``, in the same transaction)."""
    image = get_image(session, image_id=image_id)
    session.delete(image)
    row = session.get(Setting, GC_DELETED_KEY)
    if row is None:
        session.add(Setting(key=GC_DELETED_KEY, value="1"))
    else:
        row.value = str(int(row.value or 0) + 1)
    session.flush()


def live_manifests(session: Session) -> set[str]:
    """The manifest ids (hex) of every image in the catalog, of any kind and app."""
    return set(session.scalars(select(Image.manifest).distinct()))


# --- jobs (read side; the queue is tandem.jobs.queue) -------------------------------------


def get_job(session: Session, *, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(what="job", name=job_id, listing="jobs")
    return job


def jobs_query(
    *,
    app: str | None = None,
    status: JobStatus | Sequence[JobStatus] | None = None,
    after: Job | None = None,
    limit: int = 100,
) -> Select[Job]:
    """Jobs newest first, optionally of one app and/or status(es); ``after``: those older
    than that job (a cursor)."""
    query = select(Job)
    if app is not None:
        query = query.where(Job.app == app)
    if isinstance(status, JobStatus):
        query = query.where(Job.status == status)
    elif status is not None:
        query = query.where(Job.status.in_(list(status)))
    if after is not None:
        query = query.where(_older(Job.created, Job.id, after.created, after.id))
    return query.order_by(Job.created.desc(), Job.id.desc()).limit(limit)


def list_jobs(
    session: Session,
    *,
    app: str | None = None,
    status: JobStatus | Sequence[JobStatus] | None = None,
    after: str | None = None,
    limit: int = 100,
) -> list[Job]:
    """Jobs newest first, optionally of one app and/or status(es); ``after`` (a job id) and
    ``limit`` make a page."""
    cursor = None
    if after is not None:
        cursor = session.get(Job, after)
        if cursor is None:
            raise CursorStale(after=after, what="job")
    query = jobs_query(app=app, status=status, after=cursor, limit=limit)
    return list(session.scalars(query))


def add_job_log(session: Session, *, job_id: str, text: str, level: str = "info") -> JobLog:
    line = JobLog(job_id=job_id, text=text, level=level, ts=utcnow())
    session.add(line)
    session.flush()
    return line


def list_job_log(session: Session, *, job_id: str) -> list[JobLog]:
    query = select(JobLog).where(JobLog.job_id == job_id)
    return list(session.scalars(query.order_by(JobLog.ts, JobLog.id)))


# --- tokens ---------------------------------------------------------------------------------


def hash_token(token: str) -> str:
    """The SHA-256 (hex) under which a token is stored; the token itself never is."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def add_token(session: Session, *, name: str, token: str, role: Role) -> Token:
    validate_name(name, "token name")
    row = Token(name=name, token_sha256=hash_token(token), role=Role(role))
    return _insert(session, row, what="token", name=name)


def find_token(session: Session, *, token: str) -> Token | None:
    """The token row matching a presented bearer token, or ``None``."""
    return find_token_by_digest(session, sha256=hash_token(token))


def find_token_by_digest(session: Session, *, sha256: str) -> Token | None:
    """The token row stored under ``sha256`` (a console session names its token so)."""
    return session.scalar(select(Token).where(Token.token_sha256 == sha256))


def list_tokens(session: Session) -> list[Token]:
    return list(session.scalars(select(Token).order_by(Token.name)))


def remove_token(session: Session, *, name: str) -> None:
    result = session.execute(delete(Token).where(Token.name == name))
    if not getattr(result, "rowcount", 0):
        raise NotFound(what="token", name=name, listing="tokens")


# --- console sessions ----------------------------------------------------------------------


def add_console_session(
    session: Session, *, session_id: str, token: Token, expires: datetime
) -> ConsoleSession:
    """Record a signed-in console session (the id itself is never stored, its SHA-256 is)."""
    row = ConsoleSession(id_sha256=hash_token(session_id), token_id=token.id, expires=expires)
    session.add(row)
    session.flush()
    return row


def find_console_session(session: Session, *, session_id: str) -> ConsoleSession | None:
    """The console session a cookie names (with its token), or ``None``."""
    return session.get(ConsoleSession, hash_token(session_id))


def remove_console_session(session: Session, *, session_id: str) -> bool:
    """End a console session (sign-out); whether there was one."""
    query = delete(ConsoleSession).where(ConsoleSession.id_sha256 == hash_token(session_id))
    return bool(getattr(session.execute(query), "rowcount", 0))


def purge_console_sessions(session: Session, *, now: datetime) -> int:
    """Delete the sessions that expired before ``now``; how many."""
    query = delete(ConsoleSession).where(ConsoleSession.expires < now)
    return int(getattr(session.execute(query), "rowcount", 0) or 0)


# --- peers -----------------------------------------------------------------------------------


def add_peer(session: Session, *, name: str, url: str, token: str, fingerprint: str) -> Peer:
    validate_name(name, "appliance name")
    return _insert(
        session,
        Peer(name=name, url=url, token=token, fingerprint=fingerprint),
        what="peer",
        name=name,
    )


def get_peer(session: Session, *, name: str) -> Peer:
    peer = session.scalar(select(Peer).where(Peer.name == name))
    if peer is None:
        raise NotFound(what="peer", name=name, listing="peers")
    return peer


def list_peers(session: Session) -> list[Peer]:
    return list(session.scalars(select(Peer).order_by(Peer.name)))


def remove_peer(session: Session, *, name: str) -> None:
    session.delete(get_peer(session, name=name))
    session.flush()


# --- settings and audit ------------------------------------------------------------------------


def get_setting(session: Session, *, key: str) -> str | None:
    row = session.get(Setting, key)
    return None if row is None else row.value


def set_setting(session: Session, *, key: str, value: str) -> None:
    row = session.get(Setting, key)
    if row is None:
        session.add(Setting(key=key, value=value))
    else:
        row.value = value
    session.flush()


def add_audit(
    session: Session,
    *,
    actor: str | None,
    role: str | None,
    method: str,
    path: str,
    status: int,
    detail: dict[str, Any] | None = None,
) -> Audit:
    row = Audit(
        actor=actor,
        role=role,
        method=method,
        path=path,
        status=status,
        detail=detail,
        ts=utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def list_audit(session: Session, *, limit: int = 100) -> list[Audit]:
    """The newest audit records first."""
    query = select(Audit).order_by(Audit.ts.desc(), Audit.id.desc()).limit(limit)
    return list(session.scalars(query))


# --- WAL segments (PostgreSQL apps) ------------------------------------------------------


def list_wal_segments(session: Session, *, app_id: str) -> list[WalSegment]:
    """The WAL segments held for an app, oldest first."""
    query = select(WalSegment).where(WalSegment.app_id == app_id)
    return list(session.scalars(query.order_by(WalSegment.timeline, WalSegment.start_lsn)))


WAL_HELD_BATCH = 500
"""App ids per query of ``wal_held_until`` (SQLite caps the parameters of one statement)."""


def wal_held_query(app_ids: Sequence[str], *, mirrored: bool) -> Select[str, datetime | None]:
    """Per app of ``app_ids``, the newest ``seen`` of the WAL segments it holds bytes of
    (``mirrored``: the newest point the peer was sent with segments it holds whole): an
    index search per app."""
    seen = WalSegment.mirrored_seen if mirrored else WalSegment.seen
    query = select(WalSegment.app_id, func.max(seen))
    query = query.where(WalSegment.app_id.in_(app_ids), WalSegment.size > 0)
    if mirrored:
        query = query.where(WalSegment.mirrored >= WalSegment.size)
    return query.group_by(WalSegment.app_id)


def wal_held_until(
    session: Session, *, app_ids: Sequence[str], mirrored: bool
) -> dict[str, datetime]:
    """``wal_held_query`` answered: by app id, for the apps holding any (one query per
    ``WAL_HELD_BATCH`` apps, never one per app)."""
    held: dict[str, datetime] = {}
    for start in range(0, len(app_ids), WAL_HELD_BATCH):
        batch = app_ids[start : start + WAL_HELD_BATCH]
        for app_id, seen in session.execute(wal_held_query(batch, mirrored=mirrored)):
            if seen is not None:  # the peer holds its bytes but was never told a point
                held[app_id] = seen
    return held


def get_wal_segment(session: Session, *, app_id: str, name: str) -> WalSegment | None:
    query = select(WalSegment).where(WalSegment.app_id == app_id, WalSegment.name == name)
    return session.scalars(query).first()


def put_wal_segment(
    session: Session,
    *,
    app_id: str,
    name: str,
    timeline: int,
    start_lsn: int,
    size: int,
    complete: bool,
    digest: str,
    seen: datetime,
) -> WalSegment:
    """Record (or move forward) what is held of one segment."""
    row = get_wal_segment(session, app_id=app_id, name=name)
    if row is None:
        row = WalSegment(
            app_id=app_id, name=name, timeline=timeline, start_lsn=start_lsn, mirrored=0
        )
        session.add(row)
    row.size, row.complete, row.digest, row.seen = size, complete, digest, seen
    session.flush()
    return row


def delete_wal_segments(session: Session, *, app_id: str, names: Iterable[str]) -> None:
    wanted = list(names)
    if wanted:
        session.execute(
            delete(WalSegment).where(WalSegment.app_id == app_id, WalSegment.name.in_(wanted))
        )
