"""Image kinds and states.

Invariants
- ``SNAPSHOT`` and ``REPLICA`` images are immutable once recorded; the writable kinds
  (``TEST_FAILOVER``, ``FAILOVER``, ``MOUNT``) are virtual copies over a base image that
  never changes underneath them.
- A ``PROTECTIVE`` image is the restore point of a replica-style failback (SPEC §5); it
  exists only to make undo possible.
"""

from __future__ import annotations

from enum import StrEnum


class ImageKind(StrEnum):
    """What an image is; the values are the ``kind`` field of the image JSON (CLI.md)."""

    SNAPSHOT = "snapshot"
    REPLICA = "replica"
    TEST_FAILOVER = "test-failover"
    FAILOVER = "failover"
    SYNCBACK = "syncback"
    MOUNT = "mount"
    PROTECTIVE = "protective"


class ImageState(StrEnum):
    """The life of an image row: usable, presented to a host, or being removed."""

    READY = "ready"
    MOUNTED = "mounted"
    DELETING = "deleting"


WRITABLE_KINDS: frozenset[ImageKind] = frozenset(
    {ImageKind.TEST_FAILOVER, ImageKind.FAILOVER, ImageKind.MOUNT}
)
"""Kinds that are virtual copies a host may write to."""

FAILBACK_CLEANUP_KINDS: frozenset[ImageKind] = frozenset(
    {ImageKind.SYNCBACK, ImageKind.FAILOVER, ImageKind.TEST_FAILOVER}
)
"""Kinds that a snapshot-style failback deletes (SPEC §4 step 5)."""
