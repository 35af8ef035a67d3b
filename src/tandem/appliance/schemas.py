"""The JSON of the appliance API: request bodies and the documents it answers with.

Invariants
- Field names are the operator contract of CLI.md: a job has at least ``id, type, app,
  status, message, bytes_total, bytes_sent, started, finished``; an image ``id, kind, app,
  created, label``; an app ``name, kind, host, state, template``. Fields are only added.
- Request bodies forbid unknown fields and bound every string and number, so bad input is
  a 422 naming the field, never a 5xx from the database.
- Secrets never leave: a host's agent token is write-only; an API token is shown once, in
  the answer that creates it.
- Timestamps are ISO 8601 in UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tandem.catalog.models import App, Audit, Host, Image, Job, JobLog, Template, Token, Transition
from tandem.domain.images import ImageKind, ImageState
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppKind, AppState
from tandem.domain.rules import Role

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
NO_NUL = r"^[^\x00]*$"


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- requests ---------------------------------------------------------------------------


class TokenIn(Body):
    name: str = Field(pattern=NAME, description="A name for the token (who or what uses it).")
    role: Role


class HostIn(Body):
    name: str = Field(pattern=NAME)
    url: str = Field(pattern=r"^https://[^\s\x00]{1,2000}$", description="The agent's URL.")
    token: str = Field(min_length=1, max_length=512, pattern=r"^[!-~]+$")
    fingerprint: str = Field(
        pattern=r"^([0-9A-Fa-f]{2}:?){31}[0-9A-Fa-f]{2}$",
        description="SHA-256 of the agent's certificate, as `tandem agent init` printed it.",
    )


class TemplateIn(Body):
    name: str = Field(pattern=NAME)
    every: str | None = Field(
        default=None, max_length=32, description="Capture interval such as 30s, 15m, 1h."
    )
    keep: int | None = Field(default=None, ge=1, le=100_000, description="Snapshots to keep.")
    mirror: bool = False


class AppIn(Body):
    name: str = Field(pattern=NAME)
    host: str = Field(pattern=NAME)
    kind: AppKind
    path: str = Field(min_length=2, max_length=4096, pattern=r"^/[^\x00]*$")
    start: str | None = Field(default=None, max_length=4096, pattern=NO_NUL)
    stop: str | None = Field(default=None, max_length=4096, pattern=NO_NUL)


class AppCommandsIn(Body):
    """Fields left out stay as they are; an empty string removes the command."""

    start: str | None = Field(default=None, max_length=4096, pattern=NO_NUL)
    stop: str | None = Field(default=None, max_length=4096, pattern=NO_NUL)


class ProtectIn(Body):
    template: str = Field(pattern=NAME)


class PresentIn(Body):
    host: str = Field(min_length=1, max_length=64)
    image: str | None = Field(default=None, max_length=64)
    mount_point: str | None = Field(default=None, max_length=4096)
    action: str | None = Field(default=None, max_length=32)


class FailoverIn(PresentIn):
    confirm: list[str] = Field(default_factory=list, max_length=8)
    label: str | None = Field(default=None, max_length=128)


class MountIn(Body):
    host: str = Field(min_length=1, max_length=64)
    mount_point: str | None = Field(default=None, max_length=4096)
    action: str | None = Field(default=None, max_length=32)


class CloneIn(Body):
    host: str = Field(min_length=1, max_length=64)
    path: str = Field(min_length=1, max_length=4096)
    name: str | None = Field(default=None, max_length=64)


class FailbackIn(Body):
    force: bool = False
    target: str | None = Field(default=None, max_length=16)
    """original, restored or new: the replica style (SPEC 5); none: the snapshot style."""
    host: str | None = Field(default=None, max_length=64)
    path: str | None = Field(default=None, max_length=4096)
    power_on: bool = False


class CommitFailbackIn(Body):
    force: bool = False
    """Commit although the DR copy was written after the protective snapshot."""


class CaptureIn(Body):
    label: str | None = Field(default=None, max_length=128, pattern=NO_NUL)


class RestoreIn(Body):
    image: str = Field(max_length=64, pattern=NO_NUL)
    confirm: list[str] = Field(
        default_factory=list,
        max_length=16,
        description='The typed confirmations "DATA LOSS" and "OVERWRITE OTHER APPS".',
    )


# --- answers ----------------------------------------------------------------------------


def _age(ts: datetime | None, now: datetime) -> float | None:
    return None if ts is None else round(max(0.0, (now - ts).total_seconds()), 3)


class JobOut(BaseModel):
    id: str
    type: str
    app: str | None
    status: JobStatus
    message: str
    image: str | None
    bytes_total: int
    bytes_done: int
    bytes_sent: int
    created: datetime
    started: datetime | None
    finished: datetime | None
    actor: str | None
    cancel_requested: bool
    result: dict[str, Any] | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(
            id=job.id,
            type=job.type,
            app=job.app,
            status=job.status,
            message=job.message,
            image=job.image,
            bytes_total=job.bytes_total,
            bytes_done=job.bytes_done,
            bytes_sent=job.bytes_sent,
            created=job.created,
            started=job.started,
            finished=job.finished,
            actor=job.actor,
            cancel_requested=job.cancel_requested,
            result=job.result,
        )


class JobAnswer(BaseModel):
    """What an operation answers: the job it queued."""

    job: JobOut


class JobLogOut(BaseModel):
    ts: datetime
    level: str
    text: str

    @classmethod
    def of(cls, line: JobLog) -> JobLogOut:
        return cls(ts=line.ts, level=line.level, text=line.text)


class ImageOut(BaseModel):
    id: str
    kind: ImageKind
    app: str
    created: datetime
    label: str | None
    size: int
    manifest: str
    origin: str | None
    state: ImageState
    parent: str | None
    epoch: int
    mounted_host: str | None
    mount_point: str | None
    nbd_uri: str | None
    """For a presented volume image: the NBD export (a capability: it holds the secret)."""

    @classmethod
    def of(cls, image: Image) -> ImageOut:
        return cls(
            id=image.id,
            kind=image.kind,
            app=image.app.name,
            created=image.created,
            label=image.label,
            size=image.size,
            manifest=image.manifest,
            origin=image.origin,
            state=image.state,
            parent=image.parent_id,
            epoch=image.epoch,
            mounted_host=image.mounted_host,
            mount_point=image.mount_point,
            nbd_uri=image.nbd_export,
        )


class VerifyOut(BaseModel):
    image: str
    app: str
    manifest: str
    ok: bool
    chunks: int
    bytes: int
    missing: list[str]
    bad: list[dict[str, str]]


class AppOut(BaseModel):
    id: str
    name: str
    kind: AppKind
    host: str
    path: str
    state: AppState
    template: str | None
    start: str | None
    stop: str | None
    epoch: int
    origin: str | None
    """The appliance that owns production (a mirror record here: host and path are shown,
    never acted on); None: an app of this site."""
    peer_active: bool = False
    """An app of this site that is failed over at the peer (not mirrored meanwhile)."""
    created: datetime
    last_capture: datetime | None
    lag_seconds: float | None
    """Seconds since the newest snapshot was taken (the recovery point's age)."""
    last_replicated: datetime | None
    replication_lag_seconds: float | None
    """Seconds since the newest snapshot that reached the peer was taken (achieved RPO)."""
    failback_downtime_seconds: float | None = None
    """The latest failback's downtime: DR app stopped → production app started."""

    @classmethod
    def of(cls, app: App, now: datetime | None = None, downtime: float | None = None) -> AppOut:
        return cls(
            id=app.id,
            name=app.name,
            kind=app.kind,
            host=app.host,
            path=app.path,
            state=app.state,
            template=app.template,
            start=app.start_cmd,
            stop=app.stop_cmd,
            epoch=app.writer_epoch,
            origin=app.origin,
            peer_active=app.peer_active,
            created=app.created,
            last_capture=app.last_capture,
            lag_seconds=_age(app.last_capture, now or datetime.now(UTC)),
            last_replicated=app.last_replicated,
            replication_lag_seconds=_age(app.last_replicated, now or datetime.now(UTC)),
            failback_downtime_seconds=downtime,
        )


class TransitionOut(BaseModel):
    ts: datetime
    from_state: AppState
    to_state: AppState
    operation: str
    actor: str | None
    job: str | None
    epoch: int

    @classmethod
    def of(cls, row: Transition) -> TransitionOut:
        return cls(
            ts=row.ts,
            from_state=row.from_state,
            to_state=row.to_state,
            operation=row.operation.value,
            actor=row.actor,
            job=row.job,
            epoch=row.epoch,
        )


class HostOut(BaseModel):
    name: str
    url: str
    fingerprint: str
    created: datetime

    @classmethod
    def of(cls, host: Host) -> HostOut:
        return cls(name=host.name, url=host.url, fingerprint=host.fingerprint, created=host.created)


class TemplateOut(BaseModel):
    name: str
    every: str | None
    every_seconds: int | None
    keep: int | None
    mirror: bool
    created: datetime

    @classmethod
    def of(cls, template: Template, every: str | None) -> TemplateOut:
        return cls(
            name=template.name,
            every=every,
            every_seconds=template.every_seconds,
            keep=template.keep,
            mirror=template.mirror,
            created=template.created,
        )


class TokenOut(BaseModel):
    name: str
    role: Role
    created: datetime

    @classmethod
    def of(cls, row: Token) -> TokenOut:
        return cls(name=row.name, role=row.role, created=row.created)


class TokenCreated(TokenOut):
    token: str
    """The secret: shown in this answer only."""


class AuditOut(BaseModel):
    ts: datetime
    actor: str | None
    role: str | None
    method: str
    path: str
    status: int

    @classmethod
    def of(cls, row: Audit) -> AuditOut:
        return cls(
            ts=row.ts,
            actor=row.actor,
            role=row.role,
            method=row.method,
            path=row.path,
            status=row.status,
        )


class InfoOut(BaseModel):
    name: str
    kind: str
    version: str
    url: str
    fingerprint: str
    you: str
    role: Role


class Deleted(BaseModel):
    deleted: str
