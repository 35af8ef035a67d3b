"""The catalog's tables, as SQLAlchemy 2 typed ORM classes.

Invariants
- Every timestamp is timezone-aware UTC in Python. SQLite stores it as naive UTC text, and
  PostgreSQL as ``timestamptz``; ``UTCDateTime`` converts at the boundary and refuses naive
  datetimes, so local time never leaks in.
- Enumerated columns store the enum's string value (``VARCHAR(32)``, no native enum types),
  so adding a member needs no migration.
- Names are unique per table; the ``id`` of apps, images and jobs is a prefixed random id
  (``tandem.domain.ids``).
- At most one *lifecycle* job per app is queued or running: a partial unique index enforces
  it in the database itself, so two concurrent submits cannot both succeed.
- ``jobs.app``, ``jobs.image``, ``images.source_image_id`` and ``apps.host`` / ``apps.template``
  are plain names, not foreign keys: job history outlives apps and images, a replica's source
  image lives in the peer's catalog, and a mirrored app's host is registered at the other site.
- The schema is created and upgraded only by the Alembic migrations in ``migrations/``; a test
  checks that they produce exactly these tables.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from tandem.domain.images import ImageKind, ImageState
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppKind, AppState, Operation
from tandem.domain.rules import Role

NAME = 64
ID = 16
HOOK = 128
"""A hook script's name (``tandem.domain.hooks``)."""
HEX_DIGEST = 64

E = TypeVar("E", bound=enum.Enum)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only clock the catalog uses)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to the catalog; use UTC")
        value = value.astimezone(UTC)
        # SQLite has no time zones: store naive UTC and restore the zone on the way out.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class EnumText(TypeDecorator[E], Generic[E]):
    """An enum stored as its string value in a ``VARCHAR(32)``."""

    impl = String(32)
    cache_ok = True

    def __init__(self, enum_cls: type[E]) -> None:
        super().__init__()
        self.enum_cls = enum_cls

    def process_bind_param(self, value: E | str | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        member = value if isinstance(value, self.enum_cls) else self.enum_cls(value)
        return str(member.value)

    def process_result_value(self, value: Any | None, dialect: Dialect) -> E | None:
        return None if value is None else self.enum_cls(value)

    @property
    def python_type(self) -> type[E]:
        return self.enum_cls


NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Host(Base):
    """A machine with a host agent, registered with this appliance."""

    __tablename__ = "hosts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME), unique=True)
    url: Mapped[str] = mapped_column(Text)
    token: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(128))
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Template(Base):
    """What to capture, how often, how long to keep, whether to mirror to the peer, and
    ``max_lag_seconds``: the recovery point age past which its apps are *at risk*."""

    __tablename__ = "templates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME), unique=True)
    every_seconds: Mapped[int | None] = mapped_column(Integer)
    keep: Mapped[int | None] = mapped_column(Integer)
    mirror: Mapped[bool] = mapped_column(Boolean, default=False)
    max_lag_seconds: Mapped[int | None] = mapped_column(Integer)
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class App(Base):
    """A protected application and where it is in the lifecycle.

    ``*_hook`` name scripts in the host agent's ``scripts/`` folder, never commands.
    ``origin`` is the appliance that owns production (NULL: this one); ``writer_epoch`` is the
    fencing epoch, raised by each failover. A *mirror record* (``origin`` set) holds only what
    the peer may define: name, kind, the peer's app id; its ``host``/``path`` are production's,
    shown for information and never acted on here (``operations.hosts.app_host``), and its
    start/stop commands, if any, were set by this site's operators. ``peer_active`` (an app
    of this site): it is failed over at the peer, whose copy is the writer; mirroring stops
    and the peer may request the failback steps this site agrees to. ``last_capture`` /
    ``last_replicated`` are the creation times of the newest snapshot / replica, from which
    the lag (RPO) is computed.
    """

    __tablename__ = "apps"

    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME), unique=True)
    kind: Mapped[AppKind] = mapped_column(EnumText(AppKind))
    host: Mapped[str] = mapped_column(String(NAME))
    path: Mapped[str] = mapped_column(Text)
    start_hook: Mapped[str | None] = mapped_column(String(HOOK))
    stop_hook: Mapped[str | None] = mapped_column(String(HOOK))
    freeze_hook: Mapped[str | None] = mapped_column(String(HOOK))
    thaw_hook: Mapped[str | None] = mapped_column(String(HOOK))
    template: Mapped[str | None] = mapped_column(String(NAME))
    state: Mapped[AppState] = mapped_column(EnumText(AppState), default=AppState.UNMANAGED)
    writer_epoch: Mapped[int] = mapped_column(Integer, default=1)
    origin: Mapped[str | None] = mapped_column(String(NAME))
    peer_active: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    consistency: Mapped[str] = mapped_column(String(16), default="auto", server_default="auto")
    """What its captures may be cut from (``domain.consistency.ConsistencyMode``)."""
    last_capture: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_replicated: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Image(Base):
    """A point-in-time copy of an app held by this appliance.

    ``parent_id`` is the lineage inside this catalog (the previous image of a chain, or the
    base of a virtual copy); ``source_image_id`` names the image this one was made from, which
    may live in the peer's catalog (a replica's snapshot), hence no foreign key.
    """

    __tablename__ = "images"
    __table_args__ = (
        # The images of an app newest first, and their pages (catalog.queries.images_query).
        Index("ix_images_app_id_created_id", "app_id", "created", "id"),
        # Those of one kind (retention's OFFSET keep, the newest snapshot): the kind filtered
        # in the index, not by reading every row the app has.
        Index("ix_images_app_id_kind_created_id", "app_id", "kind", "created", "id"),
        # The distinct live manifests garbage collection reads, from the index alone.
        Index("ix_images_manifest", "manifest"),
    )

    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    app_id: Mapped[str] = mapped_column(ForeignKey("apps.id", ondelete="RESTRICT"))
    kind: Mapped[ImageKind] = mapped_column(EnumText(ImageKind))
    label: Mapped[str | None] = mapped_column(String(128))
    manifest: Mapped[str] = mapped_column(String(HEX_DIGEST))
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    origin: Mapped[str | None] = mapped_column(String(NAME))
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"))
    source_image_id: Mapped[str | None] = mapped_column(String(ID))
    state: Mapped[ImageState] = mapped_column(EnumText(ImageState), default=ImageState.READY)
    mounted_host: Mapped[str | None] = mapped_column(String(NAME))
    mount_point: Mapped[str | None] = mapped_column(Text)
    nbd_export: Mapped[str | None] = mapped_column(String(128))
    vm_name: Mapped[str | None] = mapped_column(String(64))
    """The new VM a presented VM image was defined as on ``mounted_host`` (withdrawing the
    image destroys and undefines it)."""
    vm_hosts: Mapped[list[str] | None] = mapped_column(JSON)
    """The other hosts ``vm_name`` is defined on, powered off (a failover ``--hosts``)."""
    vm_existing: Mapped[bool] = mapped_column(Boolean, default=False)
    """``vm_name`` is an existing domain of the host (``--vm``), not one tandem defined:
    withdrawing gives it its own definition back instead of removing it."""
    protective: Mapped[bool] = mapped_column(Boolean, default=False)
    epoch: Mapped[int] = mapped_column(Integer, default=1)
    consistency: Mapped[str | None] = mapped_column(String(32))
    """How a snapshot was cut (``domain.consistency.Cut``); None: not recorded (older)."""
    pg: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """A PostgreSQL base image's backup: start/stop LSN and time, timeline, the
    ``backup_label`` and ``tablespace_map`` a copy starts recovery from (None: not one)."""

    app: Mapped[App] = relationship(lazy="joined", innerjoin=True)
    """The app the image belongs to (loaded with the image; its ``name`` is the JSON ``app``)."""


class WalSegment(Base):
    """One WAL segment of a PostgreSQL app held by this appliance (``operations.wal``).

    ``name`` is the server's file name (timeline, segment number); ``size`` is how many of
    its bytes are held (less than a segment while it is being written: ``complete`` false);
    ``digest`` is the BLAKE3-256 of those bytes, checked on every read; ``seen`` is when the
    host's receiver had written what is held (every commit it holds is older)."""

    __tablename__ = "wal_segments"
    __table_args__ = (Index("uq_wal_segments_app_id_name", "app_id", "name", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    app_id: Mapped[str] = mapped_column(ForeignKey("apps.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(24))
    timeline: Mapped[int] = mapped_column(Integer)
    start_lsn: Mapped[int] = mapped_column(BigInteger)
    size: Mapped[int] = mapped_column(Integer, default=0)
    complete: Mapped[bool] = mapped_column(Boolean, default=False)
    digest: Mapped[str] = mapped_column(String(HEX_DIGEST))
    seen: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    mirrored: Mapped[int] = mapped_column(Integer, default=0)
    """Bytes of it the peer acknowledged holding."""
    mirrored_seen: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    """The ``seen`` the peer was last sent with it (None: never sent)."""


class Job(Base):
    """One operation, its status, progress and outcome (the Monitor's rows)."""

    __tablename__ = "jobs"
    __table_args__ = (
        # The Monitor's orders and filters, each with the id that breaks ties (its cursor).
        Index("ix_jobs_created_id", "created", "id"),
        Index("ix_jobs_status_created_id", "status", "created", "id"),
        Index("ix_jobs_app_created_id", "app", "created", "id"),
        # Job retention deletes by end time.
        Index("ix_jobs_finished", "finished"),
        Index(
            "uq_jobs_one_lifecycle_per_app",
            "app",
            unique=True,
            sqlite_where=text("lifecycle AND status IN ('queued', 'running')"),
            postgresql_where=text("lifecycle AND status IN ('queued', 'running')"),
        ),
    )

    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    app: Mapped[str | None] = mapped_column(String(NAME))
    image: Mapped[str | None] = mapped_column(String(ID))
    status: Mapped[JobStatus] = mapped_column(EnumText(JobStatus), default=JobStatus.QUEUED)
    lifecycle: Mapped[bool] = mapped_column(Boolean, default=False)
    message: Mapped[str] = mapped_column(Text, default="")
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_sent: Mapped[int] = mapped_column(BigInteger, default=0)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    actor: Mapped[str | None] = mapped_column(String(NAME))
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat: Mapped[datetime | None] = mapped_column(UTCDateTime)
    runner: Mapped[str | None] = mapped_column(String(NAME))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)


class JobLog(Base):
    """A line of a job's log."""

    __tablename__ = "job_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="info")
    text: Mapped[str] = mapped_column(Text)


class Audit(Base):
    """One state-changing API call: who, what, and how it ended."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor: Mapped[str | None] = mapped_column(String(NAME))
    role: Mapped[str | None] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[int] = mapped_column(Integer)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Transition(Base):
    """One step of an app's lifecycle (DESIGN: every transition is stored)."""

    __tablename__ = "transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    app_id: Mapped[str] = mapped_column(ForeignKey("apps.id", ondelete="CASCADE"), index=True)
    from_state: Mapped[AppState] = mapped_column(EnumText(AppState))
    to_state: Mapped[AppState] = mapped_column(EnumText(AppState))
    operation: Mapped[Operation] = mapped_column(EnumText(Operation))
    actor: Mapped[str | None] = mapped_column(String(NAME))
    job: Mapped[str | None] = mapped_column(String(ID))
    epoch: Mapped[int] = mapped_column(Integer)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Token(Base):
    """An API bearer token; only its SHA-256 is stored."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(HEX_DIGEST), unique=True)
    role: Mapped[Role] = mapped_column(EnumText(Role))
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ConsoleSession(Base):
    """A signed-in console session: the cookie is a random id, stored only as its SHA-256.

    Signing out deletes the row, so the cookie is refused from then on; deleting the token
    deletes its sessions (foreign key, cascade); expired rows are purged at sign-in.
    """

    __tablename__ = "console_sessions"

    id_sha256: Mapped[str] = mapped_column(String(HEX_DIGEST), primary_key=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("tokens.id", ondelete="CASCADE"), index=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    token: Mapped[Token] = relationship(lazy="joined")


class Peer(Base):
    """The appliance at the other site (pinned by its certificate fingerprint)."""

    __tablename__ = "peers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME), unique=True)
    url: Mapped[str] = mapped_column(Text)
    token: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(128))
    created: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Setting(Base):
    """A key/value setting of this appliance (its name, format version...)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
