"""The appliance as operations see it: its identity, catalog, pool and transfer sessions.

Invariants
- One ``Site`` per appliance process; operations receive it explicitly (no globals).
- ``gc_lock`` orders pool garbage collection against the end of a capture: a capture records
  its image row and only then closes its session (unregistering its pool writer) while
  holding the lock, and a collection reads the live manifests from the catalog and then the
  active writers while holding it. So a collection never sees a capture's writer gone but
  its image missing. The sweep runs after, without the lock (``storage.gc``): whatever a
  writer writes or reuses from then on is newer than the collection's cut-off.
- ``wake`` tells the job runner that a job was queued (a no-op when no runner runs, as in
  unit tests that only submit); ``ended`` is the runner's signal of job ends (never
  notified without a runner: waiters then fall back on re-reading the catalog).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tandem.catalog.db import Catalog
from tandem.jobs.runner import JobSignal
from tandem.operations.sessions import SessionRegistry
from tandem.storage.overlay import Overlay
from tandem.storage.pool import ChunkPool
from tandem.transport.agent_api import ApplianceSession


class Presenter(Protocol):
    """What presenting a volume image needs of the NBD server (appliance.nbd.NbdServer)."""

    def add_export(
        self, name: str, backend: Any, read_only: bool = False, secret: str | None = None
    ) -> str: ...

    def remove_export(self, name: str) -> None: ...


def _nothing() -> None:
    return None


def _never() -> bool:
    return False


@dataclass
class Site:
    """Everything an operation needs of this appliance."""

    name: str
    url: str
    """The URL agents and peers reach this appliance at (sent to them for transfers)."""
    fingerprint: str
    """The SHA-256 of this appliance's certificate, which agents and peers pin."""
    catalog: Catalog
    pool: ChunkPool
    sessions: SessionRegistry
    gc_lock: threading.Lock = field(default_factory=threading.Lock)
    wal_lock: threading.Lock = field(default_factory=threading.Lock)
    """Held by the WAL shipper while it acts on an app's stream, and by what stops the
    stream for good (removing the app): a receiver is never restarted behind a drop."""
    wake: Callable[[], None] = _nothing
    ended: JobSignal = field(default_factory=JobSignal)
    presenter: Presenter | None = None
    """The NBD server volume images are exported by (None: NBD is off)."""
    overlays: dict[str, Overlay] = field(default_factory=dict)
    """Open virtual copies by image id (their NBD exports write into them)."""
    runner_id: str | None = None
    """The id of this process's job runner (the ``runner`` of the jobs it runs)."""
    scheduling: Callable[[], bool] = _never
    certificate: str = ""
    """This appliance's certificate (PEM): a hypervisor host reaching an ``nbds://`` export
    trusts exactly it, sent with the request (pinned, never fetched from the network)."""
    """Whether this process runs the capture schedule now (one process per catalog does)."""

    def session_ref(self, session_id: str, token: str) -> ApplianceSession:
        """How an agent reaches a transfer session of this appliance (the ``appliance``
        field of every agent request that moves chunks)."""
        return ApplianceSession(
            url=self.url, fingerprint=self.fingerprint, token=token, session=session_id
        )

    @property
    def overlays_dir(self) -> Path:
        return self.pool.root.parent / "overlays"
