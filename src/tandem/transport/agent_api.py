"""The wire contract of the host agent's API: the request bodies the appliance sends.

Both sides use these models: the agent's routes declare them (``agent/app.py``) and the
appliance's ``AgentClient`` (``transport/agent.py``) takes them, one per call, so a body
is checked before it is sent and again where it arrives. Every model forbids unknown
fields. Nothing here names a command to run: hooks are scripts of the agent's
``scripts/`` folder, by name (``RunRequest``).
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tandem.domain.consistency import MODES
from tandem.domain.hooks import (
    ENV_KEYS,
    MAX_HOOK_NAME,
    check_hook_env,
    hook_name_problem,
    is_hook_name,
)
from tandem.domain.vms import DOMAIN_NAME
from tandem.errors import TandemError

HEX_DIGEST = r"^[0-9a-f]{64}$"
IMAGE_KEY = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""An image id (``img_…``) or name: safe as a registry key and in messages."""
MAX_VOLUMES = 64
SEGMENT_SIZE = 16 * 1024 * 1024
WAL_NAME = r"^[0-9A-F]{24}$"
HISTORY_NAME = r"^[0-9A-F]{8}\.history$"
"""A timeline's history file: where it branched from its parents (after a promotion)."""
WAL_OR_HISTORY = r"^([0-9A-F]{24}|[0-9A-F]{8}\.history)$"
WAL_FILE = r"^([0-9A-F]{24}(\.partial)?|[0-9A-F]{8}\.history)$"
RUN = r"^[0-9a-f]{16}$"
"""One recovery's folder in a copy's spool (the appliance names it): a segment staged late,
or left in a copy captured later, is never read by another recovery."""
APP_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
PATH = r"^/[^\x00]*$"


class MountAction(StrEnum):
    """SPEC §2's mount actions for generic file-system apps."""

    KEEP_SOURCE_PATH = "keep-source-path"
    SPECIFY = "specify"
    MAP_ONLY = "map-only"


# --- chunks: capture, restore, presentation -------------------------------------------


class ApplianceSession(BaseModel):
    """How the agent reaches the job's session on the appliance."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://")
    fingerprint: str
    token: str
    session: str = Field(pattern=r"^[0-9a-f]{1,64}$")


class CaptureRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(pattern="^(filesystem|volume|postgresql|vm)$")
    path: str = Field(pattern=r"^[^\x00]+$")
    """The app's path; for a ``vm`` app, the libvirt domain's name (``agent.vm``)."""

    @model_validator(mode="after")
    def _path_fits_kind(self) -> CaptureRequest:
        if self.kind == "vm":
            if not re.match(DOMAIN_NAME, self.path):
                raise ValueError("a vm app's path is its libvirt domain name")
        elif not self.path.startswith("/"):
            raise ValueError("the path must be absolute")
        return self

    appliance: ApplianceSession
    base: str | None = Field(default=None, pattern=HEX_DIGEST)
    """Manifest id of the previous image, for an incremental capture."""
    job: str = ""
    consistency: str = Field(default="auto", pattern="^(" + "|".join(MODES) + ")$")
    """What the capture may be cut from (``agent.pit``)."""
    base_stamp: dict[str, int] | None = None
    """The volume file's ``SourceStamp`` when it held ``base``: if it still matches, the
    file is not read and ``base`` is committed again (``_unchanged_volume``)."""


class RestoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(pattern="^(filesystem|volume)$")
    path: str = Field(pattern=r"^/[^\x00]*$")
    manifest: str = Field(pattern=HEX_DIGEST)
    appliance: ApplianceSession
    job: str = ""
    new_only: bool = False
    """A clone: refuse unless the path is missing or an empty folder (never overwrite)."""
    base: str | None = Field(default=None, pattern=HEX_DIGEST)
    """Manifest of the image the volume held when ``stamp`` was taken (restore from base)."""
    stamp: dict[str, int] | None = None
    """The volume file's ``SourceStamp`` then: if it still matches, the target is not read."""
    rollforward: bool = False
    """A PostgreSQL base backup written in place, which the appliance recovers next: the
    path may take WAL and recovery settings (``/pg/spool``, ``/pg/recover``) until that
    recovery has run, as a presented copy does."""


class TargetCheckRequest(BaseModel):
    """Ask what is at a path where an image is about to be written as a new app."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(pattern="^(filesystem|volume)$")
    path: str = Field(min_length=2, max_length=4096, pattern=r"^/[^\x00]*$")


class MaterializeRequest(BaseModel):
    """Present an image on this host by writing it at a mount point (SPEC §2)."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(pattern="^(filesystem|volume)$")
    manifest: str = Field(pattern=HEX_DIGEST)
    appliance: ApplianceSession | None = None
    """The read session to fetch from; needed unless the action is map-only."""
    image: str = Field(pattern=IMAGE_KEY)
    action: MountAction = MountAction.SPECIFY
    mount_point: str | None = Field(default=None, max_length=4096)
    """The mount point for the specify action (ignored by the other actions)."""
    source_path: str = Field(default="", max_length=4096)
    """The application's original path: the mount point of keep-source-path."""
    volumes: int = Field(default=1, ge=1, le=MAX_VOLUMES)
    job: str = ""
    presentation: str = Field(default="copy", pattern="^(copy|fuse|disks)$")
    """``copy`` writes the whole image at the mount point; ``fuse`` presents a file-tree
    image as a writable virtual copy (``agent.fusemount``), fetching only what is read;
    ``disks`` mounts the file system of each disk of a VM image's export (``nbd_uri``,
    ``disks``) at its own mount point (``agent.diskmount``)."""
    recovering: bool = False
    """The image is a PostgreSQL base backup presented to be recovered (a ``copy``): what
    its recovery never reads (``pg_wal`` and the like, ``agent.pg.for_recovery``) is not
    written, and the file system is not flushed after (PostgreSQL fsyncs every file of the
    copy before it replays)."""
    nbd_uri: str | None = Field(default=None, pattern=r"^nbds?://[^\s]+$")
    disks: list[dict[str, Any]] | None = Field(default=None, min_length=1, max_length=64)
    """``disks``: where each disk lies in the export (target, offset, size)."""
    nbd_ca: str | None = Field(default=None, min_length=1, max_length=16_000)
    nbd_fingerprint: str | None = Field(default=None, pattern=HEX_DIGEST)


class RefreshRequest(BaseModel):
    """A new read session for the FUSE copies of ``image`` (the appliance restarted)."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(pattern=IMAGE_KEY)
    appliance: ApplianceSession


class UnmaterializeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(pattern=IMAGE_KEY)


# --- PostgreSQL (agent/pg.py) ---------------------------------------------------------


class ProbeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    app: str = Field(pattern=APP_NAME)
    path: str = Field(pattern=PATH, max_length=4096)


class StreamRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    app: str = Field(pattern=APP_NAME)
    path: str = Field(pattern=PATH, max_length=4096)


class PgRunRequest(BaseModel):
    """Stop the PostgreSQL running on the cluster at ``path``, or start a presented copy
    again (``port``, ``socket_dir``: where it listened before)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(pattern=PATH, max_length=4096)
    port: int | None = Field(default=None, ge=1024, le=65535)
    socket_dir: str | None = Field(default=None, pattern=PATH, max_length=1024)


class WalRead(BaseModel):
    model_config = ConfigDict(extra="forbid")

    app: str = Field(pattern=APP_NAME)
    name: str = Field(pattern=WAL_FILE)
    offset: int = Field(ge=0, le=SEGMENT_SIZE)


class WalFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=WAL_FILE)
    size: int = Field(ge=0, le=SEGMENT_SIZE)


class WalListing(BaseModel):
    """The agent's answer for an app's WAL: the files its receiver holds, and ``seen``: the
    newest moment every commit acknowledged before it is in them (None: not known yet)."""

    model_config = ConfigDict(extra="forbid")

    files: list[WalFile] = Field(max_length=65536)
    seen: AwareDatetime | None
    running: bool


class WalAck(BaseModel):
    model_config = ConfigDict(extra="forbid")

    app: str = Field(pattern=APP_NAME)
    names: list[str] = Field(default_factory=list, max_length=4096)


class SpoolRequest(BaseModel):
    """One WAL segment for the recovery of the copy at ``path`` (its bytes: the body)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(pattern=PATH, max_length=4096)
    name: str = Field(pattern=WAL_OR_HISTORY)
    run: str | None = Field(default=None, pattern=RUN)


class RecoverRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(pattern=PATH, max_length=4096)
    run: str | None = Field(default=None, pattern=RUN)
    """The spool folder of this recovery (``tandem_wal/RUN``), the one segments were staged
    in; other folders there (an earlier recovery's, carried in the image) are removed."""
    backup_label: str = Field(min_length=1, max_length=8192)
    tablespace_map: str = Field(default="", max_length=65536)
    target_time: datetime | None = None
    """None: recover to the end of the WAL given (latest)."""
    port: int | None = Field(default=None, ge=1024, le=65535)
    socket_dir: str | None = Field(default=None, pattern=PATH, max_length=1024)
    verify: bool = False
    """Run ``pg_amcheck`` (heap and every B-tree index) on the started copy."""
    stop: bool = False
    """Shut the server down once promoted (a restore in place at production: the app's own
    start hook starts it there)."""
    segments: list[str] = Field(default_factory=list, max_length=1_000_000)
    """The segments the appliance holds for this recovery, in order; the restore_command
    waits for these to be staged and fails at once for any other name. Empty: the ones
    already staged in the spool."""

    @field_validator("segments")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not re.fullmatch(WAL_OR_HISTORY, name):
                raise ValueError(f"{name[:40]!r} is not a WAL segment or history file name")
        return names


class WantedRequest(BaseModel):
    """Which segment the recovery of the copy at ``path`` waits for; waits up to ``wait``
    seconds for it to differ from ``after``."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(pattern=PATH, max_length=4096)
    after: str | None = Field(default=None, pattern=WAL_NAME)
    run: str | None = Field(default=None, pattern=RUN)
    wait: float = Field(default=0.0, ge=0.0, le=10.0)


# --- virtual machines (agent/vm.py) ---------------------------------------------------


class DefineRequest(BaseModel):
    """Define a new domain from a VM image's XML, its disks on the appliance's export."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=DOMAIN_NAME)
    xml: str = Field(min_length=1, max_length=1_000_000)
    disks: list[dict[str, Any]] = Field(min_length=1, max_length=64)
    nbd_uri: str = Field(pattern=r"^nbds?://[^\s]+$")
    source_domain: str = Field(default="", max_length=64)
    source_uuid: str = Field(default="", max_length=64)
    keep_identity: bool = False
    network: str | None = Field(default=None, pattern=DOMAIN_NAME)
    power_on: bool = False
    pool: str | None = Field(default=None, pattern=DOMAIN_NAME)
    """The new VM's datastore: an active storage pool of the host."""
    copy_disks: bool = False
    """Copy each disk into a qcow2 volume of ``pool`` and run from those (``--action copy``)."""
    nbd_ca: str | None = Field(default=None, min_length=1, max_length=16_000)
    """The appliance's certificate (PEM) the host trusts for an ``nbds://`` export: sent with
    the request, pinned by ``nbd_fingerprint``; never fetched from the network."""
    nbd_fingerprint: str | None = Field(default=None, pattern=HEX_DIGEST)

    @model_validator(mode="after")
    def _tls_needs_the_certificate(self) -> DefineRequest:
        tls = self.nbd_uri.startswith("nbds://")
        if tls != (self.nbd_ca is not None) or tls != (self.nbd_fingerprint is not None):
            raise ValueError(
                "an nbds:// export comes with nbd_ca and nbd_fingerprint (the appliance's "
                "certificate and its SHA-256), a plain nbd:// one with neither"
            )
        return self


class EmptyDisk(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str = Field(pattern=r"^[a-z]{1,8}[0-9a-z]{0,8}$")
    size: int = Field(gt=0, le=1 << 50)


class EmptyDomainRequest(BaseModel):
    """Define a new, powered-off domain from a VM image's XML on new, empty qcow2 volumes of
    a storage pool of the host (a failback ``--target new`` then writes the image into
    them): a fresh UUID, the captured NICs and MACs (``agent.vm.define_empty``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=DOMAIN_NAME)
    xml: str = Field(min_length=1, max_length=1_000_000)
    disks: list[EmptyDisk] = Field(min_length=1, max_length=64)
    pool: str = Field(pattern=DOMAIN_NAME)
    source_domain: str = Field(default="", max_length=64)


class TakeOverRequest(BaseModel):
    """Make an existing domain of the host the target of a VM image (``agent.vm.take_over``):
    powered off, its disks replaced by slices of the appliance's export, its own definition
    kept in its metadata until ``give_back``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=DOMAIN_NAME)
    image: str = Field(pattern=IMAGE_KEY)
    disks: list[dict[str, Any]] = Field(min_length=1, max_length=64)
    nbd_uri: str = Field(pattern=r"^nbds?://[^\s]+$")
    source_domain: str = Field(default="", max_length=64)
    source_uuid: str = Field(default="", max_length=64)
    power_on: bool = False
    shutdown_timeout: float = Field(default=120.0, ge=0, le=3600)
    nbd_ca: str | None = Field(default=None, min_length=1, max_length=16_000)
    nbd_fingerprint: str | None = Field(default=None, pattern=HEX_DIGEST)

    @model_validator(mode="after")
    def _tls_needs_the_certificate(self) -> TakeOverRequest:
        tls = self.nbd_uri.startswith("nbds://")
        if tls != (self.nbd_ca is not None) or tls != (self.nbd_fingerprint is not None):
            raise ValueError(
                "an nbds:// export comes with nbd_ca and nbd_fingerprint (the appliance's "
                "certificate and its SHA-256), a plain nbd:// one with neither"
            )
        return self


class RemoveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=DOMAIN_NAME)


class PowerRequest(BaseModel):
    """Power a domain of the host on, or off (graceful within ``timeout`` s, then destroy)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=DOMAIN_NAME)
    on: bool
    timeout: float = Field(default=120.0, ge=0, le=3600)


class VmRestoreRequest(BaseModel):
    """Restore a VM image onto a libvirt domain of the host, in place (``agent.vm.restore``)."""

    model_config = ConfigDict(extra="forbid")

    domain: str = Field(pattern=DOMAIN_NAME)
    image: str = Field(pattern=IMAGE_KEY)
    manifest: str = Field(pattern=HEX_DIGEST)
    appliance: ApplianceSession
    job: str = ""
    power_on: bool = False
    shutdown_timeout: float = Field(default=120.0, ge=0, le=3600)
    definition: str | None = Field(default=None, max_length=1_000_000)
    """The domain XML to define the domain from if it is gone: the appliance's own capture
    of it (``operations.restore.own_domain_xml``), never the image's, which may come from
    the other site."""


# --- hooks (agent/hooks.py) -----------------------------------------------------------


def _script_name(value: str) -> str:
    if not is_hook_name(value):
        raise PydanticCustomError("hook_name", hook_name_problem(value, "script"))
    return value


def _env(value: dict[str, str]) -> dict[str, str]:
    try:
        return check_hook_env(value)
    except TandemError as exc:
        raise PydanticCustomError("hook_env", str(exc.fields.get("detail", exc.message))) from None


class RunRequest(BaseModel):
    """Run the hook script ``script`` of the scripts folder with ``env`` added."""

    model_config = ConfigDict(extra="forbid")

    script: Annotated[str, Field(max_length=MAX_HOOK_NAME), AfterValidator(_script_name)]
    env: Annotated[
        dict[str, str], Field(default_factory=dict, max_length=len(ENV_KEYS)), AfterValidator(_env)
    ]
    timeout: float = Field(default=600.0, gt=0, le=86400)
