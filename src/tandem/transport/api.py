"""The wire contract of the appliance API: request bodies and the documents it answers with.

Both sides use these models: the routes declare them (they are the OpenAPI document) and
the typed client (``transport/client.py``) sends and parses them. They know no catalog,
no operation and no caller: documents are read from catalog rows by attribute
(``from_attributes``), and what a document computes (a name through a relation, an age, a
redaction for the caller) is filled by the route layer's adapter, ``appliance/documents.py``.

Invariants
- Field names are the operator contract of CLI.md: a job has at least ``id, type, app,
  status, message, bytes_total, bytes_sent, started, finished``; an image ``id, kind, app,
  created, label``; an app ``name, kind, host, state, template``. Fields are only added.
- Request bodies forbid unknown fields and bound every string and number, so bad input is
  a 422 naming the field, never a 5xx from the database.
- Secrets never leave: a host's agent token is write-only; an API token is shown once, in
  the answer that creates it.
- Capabilities are not data: an NBD export's URI (it holds the export's secret; whoever has
  it reads and writes the presented copy) is never in an image document (``nbd_uri`` is
  null there; ``nbd_exported`` says whether there is one). It is shown in the answer of the
  audited ``POST /images/{id}/export`` (operators) and in the ``result`` of the job that
  made it, to the token that started that job and to admins; anyone else reads null.
- Timestamps are ISO 8601 in UTC.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from tandem.domain.consistency import ConsistencyMode
from tandem.domain.hooks import HOOK_NAME, MAX_HOOK_NAME, hook_name_problem, is_hook_name
from tandem.domain.ids import IMAGE_ID_PATTERN, NAME_PATTERN
from tandem.domain.images import ImageKind, ImageState
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppKind, AppState
from tandem.domain.paths import CanonicalPath
from tandem.domain.rules import Role
from tandem.domain.vms import DOMAIN_NAME
from tandem.errors import InvalidInput

NAME = NAME_PATTERN
NO_NUL = r"^[^\x00]*$"
HOOK_OR_EMPTY = r"^$|" + HOOK_NAME


def _hook_name(value: str | None) -> str | None:
    if value and not is_hook_name(value):
        raise PydanticCustomError("hook_name", hook_name_problem(value, "the script"))
    return value


HookName = Annotated[
    str | None,
    Field(
        default=None,
        max_length=MAX_HOOK_NAME,
        description='The name of a script in the host agent\'s scripts/ folder ("" removes).',
        json_schema_extra={"pattern": HOOK_OR_EMPTY},
    ),
    AfterValidator(_hook_name),
]


# Every model here defers building its validator to first use (``defer_build``): a `tandem`
# command uses one or two of them, and building all of them at import was most of the CLI's
# start-up. The daemons build them when they register their routes.


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)


B = TypeVar("B", bound=BaseModel)


def checked(model: type[B], **fields: Any) -> B:
    """``model`` built from ``fields`` where a caller builds a request; a bad field is an
    ``InvalidInput`` naming it, as the server's answer would (nothing is sent)."""
    try:
        return model(**fields)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise InvalidInput(detail="; ".join(problems) or "invalid request") from None


class Document(BaseModel):
    """An answer of the API; read from a catalog row's attributes where names agree."""

    model_config = ConfigDict(from_attributes=True, defer_build=True)


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
    max_lag: str | None = Field(
        default=None,
        max_length=32,
        description="RPO such as 15m past which its apps are shown at risk.",
    )


class AppIn(Body):
    name: str = Field(pattern=NAME)
    host: str = Field(pattern=NAME)
    kind: AppKind
    path: CanonicalPath | None = None
    domain: str | None = Field(
        default=None,
        pattern=DOMAIN_NAME,
        description="For a vm app: the libvirt domain on the host (`tandem vms --host H`).",
    )
    start: HookName = None
    stop: HookName = None
    freeze: HookName = None
    thaw: HookName = None
    consistency: ConsistencyMode = Field(
        default=ConsistencyMode.AUTO,
        description="What captures may be cut from: auto (the best point-in-time source the "
        "host has), snapshot, freeze, hooks or none (live files, checked after reading).",
    )

    def hooks(self) -> dict[str, str | None]:
        return {"start": self.start, "stop": self.stop, "freeze": self.freeze, "thaw": self.thaw}


class AppHooksIn(Body):
    """Hook scripts by name; fields left out stay as they are, an empty string removes one."""

    start: HookName = None
    stop: HookName = None
    freeze: HookName = None
    thaw: HookName = None
    consistency: ConsistencyMode | None = None
    """Left out: unchanged."""

    def hooks(self) -> dict[str, str | None]:
        """The hooks the request names (sent, even if empty)."""
        return {k: getattr(self, k) for k in self.model_fields_set if k != "consistency"}


class ProtectIn(Body):
    template: str = Field(pattern=NAME)


class VmTargetIn(Body):
    """Mixin of the presentations that can run a vm app's image as a VM (test-failover,
    failover, mount): a new VM (its ``network``, datastore ``pool``, ``power_on``) or an
    existing domain (``vm``, its ``shutdown_timeout``, the typed ``confirm``).

    A model lists its own fields in a base after this one (``PresentIn(VmTargetIn,
    _PresentFields)``): pydantic puts the fields of later bases first, so the schema keeps
    its order (the request's own fields, then these)."""

    network: str | None = Field(
        default=None, pattern=DOMAIN_NAME, description="The new VM's libvirt network."
    )
    pool: str | None = Field(
        default=None,
        pattern=DOMAIN_NAME,
        description="The new VM's datastore: a storage pool of the host (active).",
    )
    power_on: bool = False
    vm: str | None = Field(
        default=None,
        pattern=DOMAIN_NAME,
        description="A vm app: an existing domain of the host to run the image as (powered "
        'off, its disks replaced by the export; needs the confirmation "REPLACE VM").',
    )
    shutdown_timeout: float | None = Field(
        default=None,
        ge=0,
        le=3600,
        description="With vm: seconds its graceful shutdown may take before it is powered off.",
    )
    confirm: list[str] = Field(default_factory=list, max_length=8)


class _PresentFields(Body):
    host: str = Field(min_length=1, max_length=64)
    image: str | None = Field(default=None, max_length=64, pattern=IMAGE_ID_PATTERN)
    mount_point: str | None = Field(default=None, max_length=4096)
    action: str | None = Field(default=None, max_length=32)
    time: str | None = Field(
        default=None, max_length=64, description="A PostgreSQL app: the time to recover to."
    )
    latest: bool = Field(default=False, description="A PostgreSQL app: the newest WAL held.")
    port: int | None = Field(
        default=None, ge=1024, le=65535, description="A PostgreSQL app: the port to start on."
    )
    verify: bool = Field(
        default=False, description="A PostgreSQL app: run pg_amcheck on the recovered copy."
    )
    new_vm: str | None = Field(
        default=None, pattern=DOMAIN_NAME, description="A vm app: the new VM to define."
    )


# A test-failover (a failover: FailoverIn): where and how to present. No docstring: it
# would become the schema's description.
class PresentIn(VmTargetIn, _PresentFields):
    pass


class FailoverIn(PresentIn):
    confirm: list[str] = Field(default_factory=list, max_length=8)
    label: str | None = Field(default=None, max_length=128)
    hosts: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None,
        max_length=64,
        description="A vm app: other hypervisor hosts to define the failed-over VM on.",
    )
    all_hosts: bool = Field(
        default=False, description="A vm app: define it on every hypervisor host of this site."
    )


class _MountFields(Body):
    host: str = Field(min_length=1, max_length=64)
    mount_point: str | None = Field(default=None, max_length=4096)
    action: str | None = Field(default=None, max_length=32)
    time: str | None = Field(
        default=None, max_length=64, description="A PostgreSQL base: recover to this time."
    )
    latest: bool = Field(default=False, description="A PostgreSQL base: recover to its end.")
    port: int | None = Field(
        default=None, ge=1024, le=65535, description="A PostgreSQL app: the port to start on."
    )
    new_vm: str | None = Field(
        default=None, pattern=DOMAIN_NAME, description="A vm app's image: a new VM to define."
    )


class MountIn(VmTargetIn, _MountFields):  # a mount of an image (no docstring, as PresentIn)
    pass


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
    shutdown_timeout: float | None = Field(default=None, ge=0, le=3600)
    """A VM: seconds each graceful shutdown may take before the VM is powered off."""
    pool: str | None = Field(default=None, pattern=DOMAIN_NAME)
    """A VM with --target new: the production host's storage pool its disks are made in."""


class CommitFailbackIn(Body):
    force: bool = False
    """Commit although the DR copy was written after the protective snapshot."""


class CaptureIn(Body):
    label: str | None = Field(default=None, max_length=128, pattern=NO_NUL)


class RestoreIn(Body):
    image: str = Field(max_length=64, pattern=IMAGE_ID_PATTERN)
    confirm: list[str] = Field(
        default_factory=list,
        max_length=16,
        description='The typed confirmations "DATA LOSS" and "OVERWRITE OTHER APPS".',
    )
    power_on: bool = False
    """A VM: start it once restored (it is powered off by the restore)."""
    shutdown_timeout: float | None = Field(default=None, ge=0, le=3600)
    """A VM: seconds its graceful shutdown may take before it is powered off."""
    time: str | None = Field(
        default=None,
        max_length=64,
        description="A catch-up syncback of a PostgreSQL app: roll it forward to this time.",
    )
    latest: bool = Field(
        default=False,
        description="A catch-up syncback of a PostgreSQL app: roll it forward to the newest "
        "WAL held (the default).",
    )


class PairIn(Body):
    url: str = Field(min_length=8, max_length=2048)
    token: str = Field(min_length=1, max_length=512)
    fingerprint: str = Field(min_length=64, max_length=128)
    bandwidth: int | None = Field(default=None, ge=0, description="bytes per second, 0: no cap")


class AcceptIn(Body):
    name: str = Field(min_length=1, max_length=64)
    url: str = Field(min_length=8, max_length=2048)
    token: str = Field(min_length=1, max_length=512)
    fingerprint: str = Field(min_length=64, max_length=128)


class PeerOut(Document):
    name: str
    url: str
    fingerprint: str


# --- answers ----------------------------------------------------------------------------


CAPABILITY_KEYS = frozenset({"nbd_uri"})
"""Keys of a job's result that hold capabilities, not data (see the invariants)."""


_NBD_SECRET = re.compile(r"(nbds?://[^\s/]+/[^\s/.]+)\.[A-Za-z0-9_-]+")


def hide_secrets(text: str) -> str:
    """``text`` with the secret of any NBD export URI in it blanked (messages and log lines
    are data anyone may read; a URI an error echoed must not turn them into capabilities)."""
    return _NBD_SECRET.sub(r"\1.(secret hidden)", text)


def redact_capabilities(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """``result`` with every capability replaced by null."""
    if result is None:
        return None
    return {k: (None if k in CAPABILITY_KEYS else v) for k, v in result.items()}


class JobOut(Document):
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
    runner: str | None = None
    """The runner (appliance process) that claimed the job last."""
    attempts: int = 0
    result: dict[str, Any] | None
    """What the job made; capabilities in it (``nbd_uri``) only for the job's starter and
    admins, null for anyone else."""


class JobAnswer(Document):
    """What an operation answers: the job it queued."""

    job: JobOut


class JobLogOut(Document):
    ts: datetime
    level: str
    text: str


PG_FILES = ("backup_label", "tablespace_map")


class ImageOut(Document):
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
    """Null: the NBD export is a capability (it holds the secret), shown only by
    ``POST /api/v1/images/{id}/export``."""
    nbd_exported: bool = False
    """Whether the image is presented as an NBD export (ask for it with ``export``)."""
    consistency: str | None = None
    """How the image was cut: ``snapshot-btrfs``, ``reflink``, ``freeze``, ``hooks``,
    ``base-backup`` (a PostgreSQL base image: its WAL makes it consistent), ``overlay`` (a
    syncback of a DR copy's overlay, cut at one instant) or ``crash-unsafe`` (live files,
    each unchanged after reading: consistent per file, not across files); null when not
    recorded."""
    pg: dict[str, Any] | None = None
    """A PostgreSQL base image's backup: start/stop LSN and time, timeline."""
    window: dict[str, Any] | None = None
    """For a PostgreSQL app: what it can be recovered to at this appliance, ``start`` (the
    oldest base's stop time) → ``end`` (the newest WAL seen with no gap), and ``gap``."""


class ExportOut(Document):
    """A presented image's NBD export: a capability, shown on an audited request only."""

    image: str
    nbd_uri: str
    nbd_fingerprint: str | None = None
    """For an ``nbds://`` export (NBD over TLS): the fingerprint of the certificate the NBD
    server presents, for the host to pin; null for a plain loopback export."""


class VerifyOut(Document):
    image: str
    app: str
    manifest: str
    ok: bool
    chunks: int
    bytes: int
    missing: list[str]
    bad: list[dict[str, str]]


class AppOut(Document):
    id: str
    name: str
    kind: AppKind
    host: str
    path: str
    state: AppState
    template: str | None
    start: str | None
    stop: str | None
    freeze: str | None = None
    thaw: str | None = None
    """Hooks: names of scripts in the host agent's scripts/ folder."""
    epoch: int
    origin: str | None
    """The appliance that owns production (a mirror record here: host and path are shown,
    never acted on); None: an app of this site."""
    peer_active: bool = False
    """An app of this site that is failed over at the peer (not mirrored meanwhile)."""
    consistency: str = "auto"
    """What its captures may be cut from (``--consistency``)."""
    created: datetime
    last_capture: datetime | None
    lag_seconds: float | None
    """Seconds since the newest snapshot was taken (the recovery point's age)."""
    last_replicated: datetime | None
    replication_lag_seconds: float | None
    """Seconds since the newest snapshot that reached the peer was taken (achieved RPO)."""
    failback_downtime_seconds: float | None = None
    """The latest failback's downtime: DR app stopped → production app started."""
    rpo_seconds: float | None = None
    """The achieved RPO the risk is judged on: ``lag_seconds``, or for a mirrored template
    ``replication_lag_seconds``."""
    max_lag_seconds: int | None = None
    """The template's ``--max-lag`` (None: no limit)."""
    at_risk: bool = False
    """The achieved RPO passed the template's ``--max-lag`` (``operations.apps.risk_of``)."""
    failed_over_at: str | None = None
    """The peer's name when ``peer_active``."""


class TransitionOut(Document):
    ts: datetime
    from_state: AppState
    to_state: AppState
    operation: str
    actor: str | None
    job: str | None
    epoch: int


class HostOut(Document):
    name: str
    url: str
    fingerprint: str
    created: datetime


class TemplateOut(Document):
    name: str
    every: str | None
    every_seconds: int | None
    keep: int | None
    mirror: bool
    max_lag: str | None = None
    max_lag_seconds: int | None = None
    created: datetime


class TokenOut(Document):
    name: str
    role: Role
    created: datetime


class TokenCreated(TokenOut):
    token: str
    """The secret: shown in this answer only."""


class AuditOut(Document):
    ts: datetime
    actor: str | None
    role: str | None
    method: str
    path: str
    status: int


class InfoOut(Document):
    name: str
    kind: str
    version: str
    url: str
    fingerprint: str
    you: str
    role: Role
    runner: str | None = None
    """The job runner of the process that answered (several may share one catalog)."""
    scheduling: bool = False
    """Whether the process that answered runs the capture schedule now."""


class Deleted(Document):
    deleted: str
    note: str | None = None
    """What was left behind and how to remove it by hand, if anything."""


class GcIn(BaseModel):
    """Change when garbage collection runs by itself, and how long job rows are kept."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    after_deletions: int | None = Field(default=None, ge=1, le=10_000_000)
    """Collect once this many images were deleted since the last collection."""
    every_seconds: int | None = Field(default=None, ge=60, le=365 * 86_400)
    """Collect when this long passed since the last collection and images were deleted."""
    keep_job_days: int | None = Field(default=None, ge=1, le=36_500)
    """Delete job rows that ended more than this many days ago."""
    full_every_seconds: int | None = Field(default=None, ge=3600, le=365 * 86_400)
    """Make a full collection (which also finds what no image ever named) this often; the
    others count only what changed."""


class GcOut(Document):
    """Garbage collection: what waits for it, its last run, its settings."""

    pending_deletions: int
    unfinished: bool
    """A collection was stopped midway; the next one resumes it."""
    last_finished: int | None
    """Unix time the last collection finished."""
    job: str | None
    """The collection job queued or running now."""
    after_deletions: int
    every_seconds: int
    keep_job_days: int
    full_every_seconds: int


def build_models() -> None:
    """Build every model's validator now rather than at first use (``defer_build`` above),
    and stop deferring. The appliance calls it before it declares its routes: FastAPI
    builds its own adapters of the body models at declaration, where it silences pydantic's
    warnings about its annotations; deferred, they would build when the OpenAPI document is
    first asked for, warnings and all."""
    for value in list(globals().values()):
        if (
            isinstance(value, type)
            and issubclass(value, BaseModel)
            and value.__module__ == __name__
        ):
            value.model_config["defer_build"] = False
            value.model_rebuild()
