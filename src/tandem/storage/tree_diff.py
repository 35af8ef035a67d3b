"""File trees, manifest diff: what changed between two images, from their manifests alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tandem.storage.manifest import (
    FILE,
    HARDLINK,
    SYMLINK,
    TreeEntry,
    TreeManifest,
)

# --- manifest diff ------------------------------------------------------------------------


@dataclass
class TreeDiff:
    """How ``new`` differs from ``old``, from the manifests alone."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # content (or type) differs
    metadata_changed: list[str] = field(default_factory=list)  # mode, owner or mtime only
    changed_bytes: int = 0  # plaintext of the distinct chunks of ``new`` that ``old`` lacks

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.metadata_changed)


def _content(e: TreeEntry) -> tuple[Any, ...]:
    if e.type == FILE:
        return (e.type, e.size, e.chunks)
    if e.type in (SYMLINK, HARDLINK):
        return (e.type, e.target)
    return (e.type,)


def diff_trees(old: TreeManifest, new: TreeManifest) -> TreeDiff:
    diff = TreeDiff()
    old_by = {e.path: e for e in old.entries}
    known = old.chunk_ids()
    counted: set[bytes] = set()
    for e in new.entries:
        o = old_by.pop(e.path, None)
        if o is None:
            diff.added.append(e.path)
        elif _content(o) != _content(e):
            diff.changed.append(e.path)
        elif (o.mode, o.uid, o.gid, o.mtime_ns) != (e.mode, e.uid, e.gid, e.mtime_ns):
            diff.metadata_changed.append(e.path)
        for d, n in e.chunks:
            if d is not None and d not in known and d not in counted:
                counted.add(d)
                diff.changed_bytes += n
    diff.removed = list(old_by)  # what is left; dicts keep the old manifest's order
    return diff


__all__ = ["TreeDiff", "diff_trees"]
