"""The peer API: what one site's appliance may ask of the other's, as typed calls.

The other site is a *peer*, not an admin (DESIGN, "Trust"). Its token can only:
- send replicas of the apps it protects (they become mirror records here: name, kind, the
  peer's app id and its origin; nothing else), and syncbacks of the apps this site protects;
- read the state of those apps (the replicas held, the last restore);
- tell this site that an app failed over there (this site then stops mirroring it), hand
  the writer epoch back after a failback, and *request* the steps of a replica-style
  failback this site agreed to (``failback_check``): stop/start of the app, apply an image,
  undo. This site carries them out with its own catalog: its host, its path, its hooks.

Nothing in a request names a host to act on, a path to write or a command to run: the one
location a peer sends (``ReplicationOpen.production``) is shown, never acted on, and the
failback target's host and path are only a key into the receiving site's own catalog.

Invariants
- One method of ``PeerClient`` per allowed call; each request and answer is a pydantic
  model that forbids unknown fields (the server uses the same models, so any other shape is
  refused with 422 before an operation runs).
- Ids and names are validated by pattern (the shapes of ``domain.ids``); path segments are
  quoted by ``transport.client.api_path``, as every client quotes them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from tandem.domain.consistency import Cut
from tandem.domain.ids import ID_LENGTH, NAME_PATTERN
from tandem.domain.lifecycle import AppKind
from tandem.domain.vms import DOMAIN_NAME
from tandem.transport.client import ApiClient, api_path

ID_PATTERN = rf"^[a-z]+_[a-z2-7]{{{ID_LENGTH}}}$"
HEX_DIGEST = r"^[0-9a-f]{64}$"
SESSION_PATTERN = r"^[0-9a-f]{1,64}$"

Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
AnyId = Annotated[str, Field(pattern=ID_PATTERN, max_length=16)]
Digest = Annotated[str, Field(pattern=HEX_DIGEST)]
FullPath = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^/[^\x00]*$")]
DomainName = Annotated[str, Field(pattern=DOMAIN_NAME)]
AppPath = FullPath | DomainName
"""An app's path, or a vm app's libvirt domain name."""
SessionId = Annotated[str, Field(pattern=SESSION_PATTERN)]
Secret = Annotated[str, Field(min_length=1, max_length=512)]


class Wire(BaseModel):
    """Every peer request and answer: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


# --- replication and syncback ------------------------------------------------------------


class MirroredApp(Wire):
    """The app a replica belongs to, as the receiver records it: nothing it could act on."""

    id: AnyId
    name: Name
    kind: AppKind


class Location(Wire):
    """Where the app runs at production: shown at the DR site, never acted on there."""

    host: Name
    path: AppPath
    """The app's path, or a vm app's libvirt domain name."""


class PgBase(Wire):
    """A PostgreSQL base image's backup: where its recovery starts and must reach."""

    start_lsn: str = Field(pattern=r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$")
    start_time: str = Field(max_length=64)
    start_wal: str = Field(pattern=r"^[0-9A-F]{24}$")
    timeline: int = Field(ge=1)
    stop_lsn: str = Field(pattern=r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$")
    stop_time: str = Field(max_length=64)
    backup_label: str = Field(min_length=1, max_length=8192)
    tablespace_map: str = Field(default="", max_length=65536)


class WalPush(Wire):
    """Bytes of one WAL segment of an app this site mirrors, from ``offset`` on: the
    receiver appends them to what it holds (which must reach ``offset``) and checks the
    whole against ``digest`` (BLAKE3-256 of bytes 0…offset+len)."""

    name: str = Field(pattern=r"^([0-9A-F]{24}|[0-9A-F]{8}\.history)$")
    """A segment, or a timeline's history file."""
    offset: int = Field(ge=0, le=16 * 1024 * 1024)
    data: str = Field(max_length=23 * 1024 * 1024)
    """Base64."""
    complete: bool
    digest: Digest
    seen: datetime


class WalHeld(Wire):
    """How many bytes of the segment the receiver holds now."""

    name: str
    size: int


class ImageOffer(Wire):
    id: AnyId
    created: datetime
    label: str | None = Field(default=None, max_length=128)
    size: int = Field(ge=0)
    manifest: Digest
    consistency: Cut | None = None
    """How the image was cut (None: not recorded); a replica keeps it."""
    pg: PgBase | None = None
    """A PostgreSQL base image's backup (None: not one)."""


class ReplicationOpen(Wire):
    app: MirroredApp
    image: ImageOffer
    epoch: int = Field(ge=1)
    keep: int | None = Field(default=None, ge=1)
    production: Location | None = None
    """For display at the DR site only (``tandem apps`` there)."""


class SyncbackOpen(Wire):
    app: Name
    image: ImageOffer | None = None
    """The image, when it is captured already; else it comes with the commit (a syncback
    whose chunks are sent while it is captured)."""
    bases: list[AnyId] = Field(default_factory=list, max_length=8)
    epoch: int = Field(ge=1)


class Opened(Wire):
    """A write session opened for a transfer (``present``: the image is already held)."""

    status: Literal["open", "present"] = "open"
    session: SessionId | None = None
    token: Secret | None = None
    base: Digest | None = None


class Commit(Wire):
    token: Secret


class SyncbackCommit(Commit):
    image: ImageOffer | None = None
    """The image, if the session was opened without it (see ``SyncbackOpen``)."""


class Committed(Wire):
    image: AnyId
    app: Name


class ReplicasHeld(Wire):
    images: list[AnyId]
    newest_created: datetime | None
    epoch: int | None


# --- state and failback ------------------------------------------------------------------


class Epoch(Wire):
    epoch: int = Field(ge=1)


class FailedOver(Wire):
    """Production's answer to "the app failed over at the peer"."""

    app: Name
    peer_active: bool


class Resumed(Wire):
    """Production's answer to the epoch handed back: mirroring resumes from ``location``."""

    app: Name
    epoch: int
    known: bool
    location: Location | None = None


class Restored(Wire):
    image: AnyId | None


FailbackTarget = Literal["original", "restored", "new"]


class FailbackCheck(Wire):
    """The DR site asks production to agree to a replica-style failback onto ``target``.
    ``host``/``path`` (restored, new) only look up an app production's operators
    registered there: the DR site cannot name a place to write."""

    target: FailbackTarget
    host: Name | None = None
    path: AppPath | None = None
    """A full path, or for a VM a libvirt domain name (checked against the app's kind)."""
    epoch: int = Field(ge=1)
    pool: DomainName | None = None
    """A VM with target ``new``: a storage pool of production's host for the new domain."""


class FailbackAgreed(Wire):
    app: Name
    target: FailbackTarget
    host: Name
    path: AppPath
    target_app: Name | None = None


class Command(Wire):
    which: Literal["stop", "start"]
    shutdown_timeout: float | None = Field(default=None, ge=0, le=3600)
    """A VM's stop: seconds its graceful shutdown may take before it is powered off."""


class CommandRan(Wire):
    ran: bool


class Apply(Wire):
    image: AnyId


class Undone(Wire):
    app: Name
    host: Name
    path: AppPath


class PeerJob(Wire):
    id: AnyId
    status: str
    message: str = ""


M = TypeVar("M", bound=BaseModel)


class PeerClient:
    """The calls this appliance may make to its peer, one method each."""

    PREFIX = "/api/v1/peer"

    def __init__(self, api: ApiClient) -> None:
        self._api = api
        self.name = api.name

    def close(self) -> None:
        self._api.close()

    def __enter__(self) -> PeerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str, answer: type[M]) -> M:
        return answer.model_validate(self._api.get(self.PREFIX + path))

    def _post(self, path: str, body: BaseModel, answer: type[M]) -> M:
        doc = self._api.post(self.PREFIX + path, body.model_dump(mode="json"))
        return answer.model_validate(doc)

    def _app(self, app: str, tail: str) -> str:
        return api_path("/apps", app, tail)

    # replication (production → DR)
    def replicas(self, app: str) -> ReplicasHeld:
        return self._get(self._app(app, "replicas"), ReplicasHeld)

    def open_replication(self, body: ReplicationOpen) -> Opened:
        return self._post("/replications", body, Opened)

    def commit_replication(self, session: str, token: str) -> Committed:
        path = api_path("/replications", session, "commit")
        return self._post(path, Commit(token=token), Committed)

    def push_wal(self, app: str, body: WalPush) -> WalHeld:
        return self._post(self._app(app, "wal"), body, WalHeld)

    # syncback (DR → production)
    def open_syncback(self, body: SyncbackOpen) -> Opened:
        return self._post("/syncbacks", body, Opened)

    def commit_syncback(
        self, session: str, token: str, image: ImageOffer | None = None
    ) -> Committed:
        body = SyncbackCommit(token=token, image=image)
        return self._post(api_path("/syncbacks", session, "commit"), body, Committed)

    # state (DR → production)
    def restored(self, app: str) -> Restored:
        return self._get(self._app(app, "restored"), Restored)

    def failed_over(self, app: str, epoch: int) -> FailedOver:
        return self._post(self._app(app, "failed-over"), Epoch(epoch=epoch), FailedOver)

    def resume(self, app: str, epoch: int) -> Resumed:
        return self._post(self._app(app, "resume"), Epoch(epoch=epoch), Resumed)

    # replica-style failback steps (DR → production), in the order a failback makes them
    def failback_check(self, app: str, body: FailbackCheck) -> FailbackAgreed:
        return self._post(self._app(app, "failback-check"), body, FailbackAgreed)

    def command(
        self, app: str, which: Literal["stop", "start"], shutdown_timeout: float | None = None
    ) -> CommandRan:
        body = Command(which=which, shutdown_timeout=shutdown_timeout)
        return self._post(self._app(app, "command"), body, CommandRan)

    def apply(self, app: str, image: str) -> PeerJob:
        return self._post(self._app(app, "apply"), Apply(image=image), PeerJob)

    def failback_undo(self, app: str) -> Undone:
        return self._post(self._app(app, "failback-undo"), Wire(), Undone)

    def job(self, job_id: str) -> PeerJob:
        return self._get(api_path("/jobs", job_id), PeerJob)
