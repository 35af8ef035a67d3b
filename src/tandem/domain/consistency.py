"""How a capture is cut: the mode an app asks for, and the cut an image records.

An app's ``--consistency`` (``ConsistencyMode``) says what its agent may use; the image
records what was used (``Cut``), so ``tandem images`` tells a crash-consistent snapshot from
live files read one after another.
"""

from __future__ import annotations

from enum import StrEnum


class ConsistencyMode(StrEnum):
    """What an app's captures may be cut from (``tandem app add|set --consistency``)."""

    AUTO = "auto"  # the best point-in-time source the host has, else live files (checked)
    SNAPSHOT = "snapshot"  # a btrfs snapshot or reflink clone, or fail
    FREEZE = "freeze"  # fsfreeze the file system for the whole capture
    HOOKS = "hooks"  # the app's freeze/thaw hooks around the capture
    NONE = "none"  # live files, each verified unchanged after it was read


class Cut(StrEnum):
    """How an image was cut (``images``' ``consistency``)."""

    SNAPSHOT_BTRFS = "snapshot-btrfs"  # a read-only btrfs snapshot: one instant, all files
    REFLINK = "reflink"  # reflink clones verified unchanged across the cloning: one instant
    FREEZE = "freeze"  # read while the file system was frozen: one instant
    HOOKS = "hooks"  # read while the app's freeze hook held it quiet
    CRASH_UNSAFE = "crash-unsafe"  # live files, each unchanged after reading: per file only
    OVERLAY = "overlay"  # a DR copy's overlay cut at one instant (writes held for the cut)
    BASE_BACKUP = "base-backup"  # live files between pg_backup_start/stop: the WAL repairs
    APP_CONSISTENT = "app-consistent"  # a VM's disks at one instant, guest agent froze the guest
    CRASH_CONSISTENT = "crash-consistent"  # a VM's disks at one instant, as after a power loss


CUTS = tuple(c.value for c in Cut)
MODES = tuple(m.value for m in ConsistencyMode)
