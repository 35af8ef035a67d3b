"""File trees: capture and diff-restore of directory trees, and manifest diffs.

File contents are cut by FastCDC (min 256 KiB, average 1 MiB, max 4 MiB), so an insertion
moves no chunk boundary but the ones next to it; a file of at most 256 KiB is one chunk. Holes
of sparse files become ``(None, length)`` items: never read, never stored. The manifest format
is in ``manifest.py``.

The work is in three modules: ``tree_capture`` (reading a tree at the source into a
pool), ``tree_restore`` (diff-restore onto a directory) and ``tree_diff`` (comparing two
manifests); each states its invariants. This module is their public face.
"""

from __future__ import annotations

from tandem.storage.tree_capture import capture_tree
from tandem.storage.tree_diff import TreeDiff, diff_trees
from tandem.storage.tree_restore import restore_tree

__all__ = ["TreeDiff", "capture_tree", "diff_trees", "restore_tree"]
