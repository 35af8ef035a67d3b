"""The appliance as operations see it: its identity, catalog, pool and transfer sessions.

Invariants
- One ``Site`` per appliance process; operations receive it explicitly (no globals).
- ``gc_lock`` orders pool garbage collection against the end of a capture: a capture records
  its image row and only then closes its session (unregistering its pool writer) while
  holding the lock, and a collection reads the live manifests from the catalog and sweeps
  while holding it. So a sweep never sees a capture's writer gone but its image missing.
- ``wake`` tells the job runner that a job was queued (a no-op when no runner runs, as in
  unit tests that only submit).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem.catalog.db import Catalog
from tandem.operations.sessions import SessionRegistry
from tandem.storage.pool import ChunkPool


def _nothing() -> None:
    return None


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
    wake: Callable[[], None] = _nothing
