"""File trees, diff-restore: an image onto a directory, writing only what differs.

File contents are cut by FastCDC (min 256 KiB, average 1 MiB, max 4 MiB), so an insertion
moves no chunk boundary but the ones next to it; a file of at most 256 KiB is one chunk. Holes
of sparse files become ``(None, length)`` items: never read, never stored. The manifest format
is in ``manifest.py``.

Restore invariants
- The whole manifest is validated before the target is touched: safe relative paths, no
  duplicates, every parent a directory listed earlier (so no entry lies under a symlink of the
  image), hard links only to files listed earlier. A violation raises UnsafePath.
- The target root is reached from ``/`` one component at a time with O_NOFOLLOW
  (``targets.open_dir``): a symlink in its path, or in its place, is refused before anything
  is read or written, so a swapped-in link never leads a restore (or its deletion of
  extraneous entries) into another folder. Missing folders of the path are made the same way.
- Every path is reached through directory fds opened with O_NOFOLLOW from the target root,
  and files are opened with O_NOFOLLOW (new ones with O_EXCL): nothing is written through a
  symlink. Whatever is in the way of an entry (a symlink where the image has a file, a file
  where it has a directory...) is removed first.
- A regular file is patched in place only when all its links are inside the target and in the
  same link group of the image; otherwise it is replaced, so no data outside the target (or
  in another file of the image) changes.
- A file's mtime is set only once its content is complete: an interrupted restore leaves
  files whose mtime differs, which the next diff-restore rewrites. Chunk data is verified by
  the source before it is written.
- Directory modes, owners and mtimes are applied last, deepest first.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tandem.errors import (
    ManifestInvalid,
    TargetInvalid,
    UnsafePath,
)
from tandem.storage import targets
from tandem.storage.digest import SUB_BLOCK, hash_object
from tandem.storage.fileio import fallocate, pipelined, pwrite_all
from tandem.storage.manifest import (
    DIR,
    FIFO,
    FILE,
    HARDLINK,
    SYMLINK,
    TreeEntry,
    TreeManifest,
    check_relpath,
    gc_paused,
)
from tandem.storage.pool import start_writeback, syncfs
from tandem.storage.tree_capture import BATCH_BYTES, CDC_MAX, INFLIGHT_BYTES
from tandem.storage.volume import (
    ChunkSource,
    Progress,
    RestoreStats,
    default_workers,
)

RESTORE_BATCH_FILES = 64

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _O_CLOEXEC
_FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


# --- restore ------------------------------------------------------------------------------

_FRESH = "fresh"  # create the file (nothing is in its place)
_PATCH = "patch"  # rewrite the chunks that differ in the existing file
_META = "meta"  # content matches; only mode or owner differ


@dataclass
class _Plan:
    """What the manifest asks for, checked before anything is written."""

    by_path: dict[str, TreeEntry]
    dirs: set[str]
    group: dict[str, frozenset[str]]  # file or hard-link path -> every path of its link group


def _plan_restore(manifest: TreeManifest) -> _Plan:
    by_path: dict[str, TreeEntry] = {}
    dirs = {""}
    members: dict[str, list[str]] = {}
    for e in manifest.entries:
        check_relpath(e.path)
        if e.path in by_path:
            raise UnsafePath(path=e.path, reason="it is listed twice")
        parent = e.path.rpartition("/")[0]
        if parent not in dirs:
            # Also what stops 'a' -> '/elsewhere' followed by 'a/evil': 'a' is no directory.
            raise UnsafePath(
                path=e.path, reason=f"its parent {parent!r} is not a directory listed before it"
            )
        if e.type == DIR:
            dirs.add(e.path)
        elif e.type == FILE:
            if sum(n for _, n in e.chunks) != e.size:
                raise ManifestInvalid(
                    digest="(in memory)", reason=f"chunk lengths of {e.path!r} miss its size"
                )
            members[e.path] = [e.path]
        elif e.type == HARDLINK:
            head = by_path.get(e.target)
            if head is None or head.type != FILE:
                raise UnsafePath(
                    path=e.path,
                    reason=f"it is a hard link to {e.target!r}, not to a file listed before it",
                )
            members[e.target].append(e.path)
        elif e.type == SYMLINK:
            if not e.target or "\x00" in e.target:
                raise UnsafePath(path=e.path, reason="its symlink target is empty or has a NUL")
        elif e.type != FIFO:
            raise ManifestInvalid(digest="(in memory)", reason=f"unknown entry type {e.type!r}")
        by_path[e.path] = e
    group: dict[str, frozenset[str]] = {}
    for paths in members.values():
        frozen = frozenset(paths)
        for p in paths:
            group[p] = frozen
    return _Plan(by_path, dirs, group)


def _open_subdir(parent_fd: int, name: str, shown: str) -> int:
    try:
        return os.open(name, _O_DIR, dir_fd=parent_fd)
    except OSError as exc:
        raise TargetInvalid(
            path=shown,
            reason=f"it cannot be opened as a directory without following symlinks "
            f"({exc.strerror or exc})",
        ) from exc


def _open_dir_path(root_fd: int, root: str, rel: str) -> int:
    """A new fd for directory ``rel``, walked from the root one component at a time."""
    fd = os.dup(root_fd)
    if not rel:
        return fd
    try:
        for name in rel.split("/"):
            nxt = _open_subdir(fd, name, f"{root}/{rel}")
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Dirs:
    """Cached directory fds in the target, opened with O_NOFOLLOW (main thread only).

    An fd from ``fd()`` is valid until the next call: a later one may close it.
    """

    def __init__(self, root_fd: int, root: str, capacity: int = 64) -> None:
        self.root_fd, self.root, self.capacity = root_fd, root, capacity
        self._cache: OrderedDict[str, int] = OrderedDict()

    def fd(self, rel: str) -> int:
        if not rel:
            return self.root_fd
        fd = self._cache.get(rel)
        if fd is not None:
            self._cache.move_to_end(rel)
            return fd
        parent, _, name = rel.rpartition("/")
        fd = _open_subdir(self.fd(parent), name, f"{self.root}/{rel}")
        self._cache[rel] = fd
        while len(self._cache) > self.capacity:
            os.close(self._cache.popitem(last=False)[1])
        return fd

    def parent_of(self, rel: str) -> tuple[int, str]:
        """(fd of the parent directory, last component) of ``rel``."""
        parent, _, name = rel.rpartition("/")
        return self.fd(parent), name

    def forget(self, rel: str) -> None:
        """Drop cached fds of ``rel`` and below (it is being removed)."""
        for key in [k for k in self._cache if k == rel or k.startswith(rel + "/")]:
            os.close(self._cache.pop(key))

    def close(self) -> None:
        while self._cache:
            os.close(self._cache.popitem()[1])


def _scan_target(root_fd: int, root: str, descend: set[str]) -> dict[str, os.stat_result]:
    """lstat of what is in the target, descending only into real directories of ``descend``
    (anything else in the way is removed whole, so its content does not matter). Reads
    through fds from ``root_fd`` (O_NOFOLLOW), never through the path."""
    found: dict[str, os.stat_result] = {}
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        prefix = f"{rel_dir}/" if rel_dir else ""
        try:
            fd = _open_dir_path(root_fd, root, rel_dir)
        except TargetInvalid:
            if rel_dir:
                continue  # vanished or replaced since its parent was read: removed whole
            raise
        try:
            with os.scandir(fd) as it:
                for de in it:
                    rel = prefix + de.name
                    try:
                        st = de.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    found[rel] = st
                    if stat.S_ISDIR(st.st_mode) and rel in descend:
                        stack.append(rel)
        except OSError as exc:
            raise TargetInvalid(path=f"{root}/{rel_dir}", reason=exc.strerror or str(exc)) from exc
        finally:
            os.close(fd)
    return found


def _punch_hole(fd: int, offset: int, length: int) -> int:
    """Make [offset, offset+length) read as zeros without allocating; returns bytes changed."""
    try:
        data_at = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return 0  # no data from here on: already a hole
        data_at = offset
    if data_at >= offset + length:
        return 0
    if not fallocate(fd, _FALLOC_PUNCH, offset, length):
        # No hole punching on this file system: write the zeros.
        zeros = bytes(min(length, CDC_MAX))
        for off in range(offset, offset + length, len(zeros)):
            pwrite_all(fd, zeros[: min(len(zeros), offset + length - off)], off)
    return length


@dataclass
class _FileItem:
    entry: TreeEntry
    how: str
    st: os.stat_result | None  # what the scan found in its place (kept), else None


@dataclass
class _Moved:
    total: int = 0
    compared: int = 0
    fetched: int = 0
    written: int = 0


class _Restore:
    def __init__(
        self,
        source: ChunkSource,
        manifest: TreeManifest,
        plan: _Plan,
        root: str,
        root_fd: int,
        verify_content: bool,
    ) -> None:
        self.source = source
        self.manifest = manifest
        self.plan = plan
        self.root = root
        self.root_fd = root_fd
        self.dirs = _Dirs(root_fd, root)
        self.verify_content = verify_content
        self.is_root = os.geteuid() == 0
        self.chown_denied = False

    # --- metadata -----------------------------------------------------------------------

    def _wants_chown(self, e: TreeEntry, st: os.stat_result | None) -> bool:
        if st is not None and (st.st_uid, st.st_gid) == (e.uid, e.gid):
            return False
        if st is None and not self.is_root and (e.uid, e.gid) == (os.geteuid(), os.getegid()):
            return False
        return self.is_root or not self.chown_denied

    def _chown(self, do: Callable[[], None]) -> bool:
        try:
            do()
        except PermissionError:
            if self.is_root:
                raise
            self.chown_denied = True  # not root: owners cannot be given away; keep going
            return False
        return True

    def apply_meta(self, fd: int, e: TreeEntry, st: os.stat_result | None) -> None:
        """Owner, mode and mtime of an open file, fifo or directory (owner first: chown
        clears set-id bits)."""
        chowned = self._wants_chown(e, st) and self._chown(lambda: os.fchown(fd, e.uid, e.gid))
        if chowned or st is None or stat.S_IMODE(st.st_mode) != e.mode:
            os.fchmod(fd, e.mode)
        if st is None or st.st_mtime_ns != e.mtime_ns:
            os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))

    # --- files (in workers) -------------------------------------------------------------

    def fetch(self, digest: bytes, length: int) -> bytes:
        data = self.source.get(digest)  # verified against the digest by the source
        if len(data) != length:
            raise ManifestInvalid(
                digest="(in memory)",
                reason=f"chunk {digest.hex()} holds {len(data)} bytes, the manifest says {length}",
            )
        return data

    def fetch_many(self, wanted: list[tuple[bytes, int]]) -> dict[bytes, bytes]:
        """Chunks ``(digest, length)`` read in one batched request (every block verified by
        the source against the chunk id) instead of one request each; {} for fewer than two
        (``fetch`` reads one as well)."""
        unique = dict(wanted)
        if len(unique) < 2:
            return {}
        wants = [(d, list(range(-(-n // SUB_BLOCK)))) for d, n in unique.items()]
        got = self.source.read_blocks_many(wants)
        return {d: b"".join(blocks) for (d, _), blocks in zip(wants, got, strict=True)}

    def take(self, held: dict[bytes, bytes], digest: bytes, length: int) -> bytes:
        data = held.get(digest)
        if data is None:
            return self.fetch(digest, length)
        if len(data) != length:
            raise ManifestInvalid(
                digest="(in memory)",
                reason=f"chunk {digest.hex()} holds {len(data)} bytes, the manifest says {length}",
            )
        return data

    def restore_batch(self, rel_dir: str, items: list[_FileItem]) -> _Moved:
        moved = _Moved()
        # The new small files of a folder (a database's relations, a source tree) are mostly
        # one chunk each: fetch them together, not one round trip per file.
        small = [
            (d, n)
            for item in items
            if item.how == _FRESH
            for d, n in item.entry.chunks
            if d is not None
        ]
        held = self.fetch_many(small) if sum(n for _, n in small) <= BATCH_BYTES else {}
        dfd = _open_dir_path(self.root_fd, self.root, rel_dir)
        try:
            for item in items:
                name = item.entry.path.rpartition("/")[2]
                try:
                    self.restore_file(dfd, name, item, moved, held)
                except OSError as exc:
                    raise TargetInvalid(
                        path=f"{self.root}/{item.entry.path}", reason=exc.strerror or str(exc)
                    ) from exc
                moved.total += item.entry.size
        finally:
            os.close(dfd)
        return moved

    def restore_file(
        self,
        dfd: int,
        name: str,
        item: _FileItem,
        moved: _Moved,
        held: dict[bytes, bytes] | None = None,
    ) -> None:
        """Write one file of the batch; ``held``: chunks of it already fetched."""
        e = item.entry
        if item.how != _FRESH:
            # O_NONBLOCK: should a fifo have taken the file's place, do not hang on it.
            flags = os.O_NOFOLLOW | os.O_NONBLOCK | _O_CLOEXEC
            flags |= os.O_RDONLY if item.how == _META else os.O_RDWR
            try:
                fd = os.open(name, flags, dir_fd=dfd)
            except PermissionError:
                if self.is_root:
                    raise
                os.unlink(name, dir_fd=dfd)  # read-only file and we are not root: replace it
                item = _FileItem(e, _FRESH, None)
            else:
                try:
                    st = os.fstat(fd)
                    expected_ino = item.st.st_ino if item.st is not None else st.st_ino
                    if not stat.S_ISREG(st.st_mode) or st.st_ino != expected_ino:
                        raise TargetInvalid(
                            path=f"{self.root}/{e.path}", reason="it changed during the restore"
                        )
                    if item.how == _PATCH:
                        self._patch(fd, e, st.st_size, moved)
                        st = os.fstat(fd)
                    self.apply_meta(fd, e, st)
                finally:
                    os.close(fd)
                return
        fresh_flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_CLOEXEC
        fd = os.open(name, fresh_flags, 0o600, dir_fd=dfd)
        try:
            off = end = 0
            held = held or {}
            for k, (digest, n) in enumerate(e.chunks):
                if digest is not None:
                    if digest not in held:  # a big file: its next chunks, BATCH_BYTES at once
                        held = self.fetch_many(_next_chunks(e.chunks, k))
                    data = self.take(held, digest, n)
                    pwrite_all(fd, data, off)
                    # The disk writes while the next chunks come: the final syncfs (or, for
                    # a copy PostgreSQL recovers, its fsync of every file) finds it done.
                    start_writeback(fd, off, n)
                    moved.fetched += n
                    moved.written += n
                    end = off + n
                off += n
            if end < e.size:  # trailing hole: only the size is set, nothing allocated
                os.ftruncate(fd, e.size)
            self.apply_meta(fd, e, None)
        finally:
            os.close(fd)

    def _patch(self, fd: int, e: TreeEntry, old_size: int, moved: _Moved) -> None:
        """Rewrite only what differs: whole chunks compared by digest, then 64 KiB blocks."""
        if old_size != e.size:
            os.ftruncate(fd, e.size)
        valid = min(old_size, e.size)  # bytes of old content still there
        off = 0
        for digest, n in e.chunks:
            if digest is None:
                if off < valid:
                    moved.written += _punch_hole(fd, off, min(n, valid - off))
            elif off + n > valid:  # (partly) beyond the old content: nothing to compare
                pwrite_all(fd, self.fetch(digest, n), off)
                moved.fetched += n
                moved.written += n
            else:
                current = os.pread(fd, n, off)
                moved.compared += len(current)
                now, have = hash_object(current)
                if now != digest:
                    self._patch_chunk(fd, digest, n, off, have, moved)
            off += n

    def _patch_chunk(
        self, fd: int, digest: bytes, n: int, off: int, have: list[bytes], moved: _Moved
    ) -> None:
        """Write the blocks of chunk ``digest`` that differ from ``have`` (the block digests
        of what the file holds there). The source verifies its block digests against the id
        and each block against its digest, so the result is exact without a re-read."""
        want = self.source.sub_digests(digest)
        differ = [j for j, (a, b) in enumerate(zip(want, have, strict=False)) if a != b]
        if len(want) == len(have) == -(-n // SUB_BLOCK) and len(differ) < len(want):
            blocks = self.source.read_blocks(digest, differ)
            for j, block in zip(differ, blocks, strict=True):
                if len(block) != min(SUB_BLOCK, n - j * SUB_BLOCK):
                    break  # not this chunk's shape: take it whole
                pwrite_all(fd, block, off + j * SUB_BLOCK)
                moved.fetched += len(block)
                moved.written += len(block)
            else:
                return
        pwrite_all(fd, self.fetch(digest, n), off)
        moved.fetched += n
        moved.written += n

    # --- the phases ---------------------------------------------------------------------

    def run(
        self,
        workers: int | None,
        progress: Progress | None,
        delete_extraneous: bool,
        sync: bool = True,
    ) -> _Moved:
        found = _scan_target(self.root_fd, self.root, self.plan.dirs)
        # All target paths of each multiply-linked inode, to tell whether patching in place
        # could change a file outside the target or outside the entry's link group.
        links: dict[tuple[int, int], list[str]] = {}
        for rel, lst in found.items():
            if stat.S_ISREG(lst.st_mode) and lst.st_nlink > 1:
                links.setdefault((lst.st_dev, lst.st_ino), []).append(rel)

        doomed: list[tuple[str, os.stat_result]] = []
        kept: dict[str, os.stat_result] = {}
        files: list[_FileItem] = []
        done = 0
        for e in self.manifest.entries:
            st = found.get(e.path)
            if st is not None:
                if self._fits(e, st, links):
                    kept[e.path] = st
                else:
                    doomed.append((e.path, st))
                    st = None
            if e.type == FILE:
                item = self._file_item(e, st)
                if item is None:
                    done += e.size
                else:
                    files.append(item)
        if delete_extraneous:
            doomed.extend((rel, lst) for rel, lst in found.items() if rel not in self.plan.by_path)

        total = self.manifest.size
        if progress:
            progress(done, total)
        self._make_writable(kept)
        for rel, st in doomed:
            self._remove(rel, st)
        for e in self.manifest.entries:
            if e.type == DIR and e.path not in kept:
                pfd, name = self.dirs.parent_of(e.path)
                os.mkdir(name, 0o700, dir_fd=pfd)  # its own mode comes last
            elif e.type == SYMLINK:
                self._symlink(e, kept.get(e.path))
            elif e.type == FIFO:
                self._fifo(e, kept.get(e.path))

        moved = _Moved()
        w = workers or default_workers()
        with ThreadPoolExecutor(w) as ex:
            for part in pipelined(ex, self._file_jobs(files), 4 * w, INFLIGHT_BYTES):
                moved.compared += part.compared
                moved.fetched += part.fetched
                moved.written += part.written
                done += part.total
                if progress:
                    progress(done, total)

        for e in self.manifest.entries:
            if e.type == HARDLINK:
                self._hardlink(e)
        for e in reversed(self.manifest.entries):  # children before their parents
            if e.type == DIR:
                fd = self.dirs.fd(e.path)
                self.apply_meta(fd, e, os.fstat(fd))  # not the scan's: children changed since
        self._root_meta()
        if sync:
            syncfs(self.root_fd)
        return moved

    def _fits(
        self, e: TreeEntry, st: os.stat_result, links: dict[tuple[int, int], list[str]]
    ) -> bool:
        """Whether what the target holds at ``e.path`` can stay (possibly patched)."""
        mode = st.st_mode
        if e.type == DIR:
            return stat.S_ISDIR(mode)
        if e.type == FIFO:
            return stat.S_ISFIFO(mode)
        if e.type == SYMLINK:
            if not stat.S_ISLNK(mode):
                return False
            try:
                pfd, name = self.dirs.parent_of(e.path)
                return os.readlink(name, dir_fd=pfd) == e.target
            except (OSError, TargetInvalid):
                return False
        if not stat.S_ISREG(mode):
            return False
        if e.type == HARDLINK:
            return True  # relinked in the last phase unless already the right inode
        if st.st_nlink == 1:
            return True
        paths = links.get((st.st_dev, st.st_ino), [])
        return len(paths) == st.st_nlink and set(paths) <= self.plan.group[e.path]

    def _file_item(self, e: TreeEntry, st: os.stat_result | None) -> _FileItem | None:
        if st is None:
            return _FileItem(e, _FRESH, None)
        same = st.st_size == e.size and st.st_mtime_ns == e.mtime_ns
        if not same or self.verify_content:
            return _FileItem(e, _PATCH, st)
        if stat.S_IMODE(st.st_mode) != e.mode or (
            (st.st_uid, st.st_gid) != (e.uid, e.gid) and (self.is_root or not self.chown_denied)
        ):
            return _FileItem(e, _META, st)
        return None

    def _file_jobs(self, items: list[_FileItem]) -> Iterator[tuple[Callable[[], _Moved], int]]:
        batch: list[_FileItem] = []
        parent = ""
        size = 0
        for item in items:
            p = item.entry.path.rpartition("/")[0]
            if batch and (p != parent or len(batch) >= RESTORE_BATCH_FILES or size >= BATCH_BYTES):
                yield partial(self.restore_batch, parent, batch), 0
                batch, size = [], 0
            parent = p
            batch.append(item)
            size += item.entry.size
        if batch:
            yield partial(self.restore_batch, parent, batch), 0

    def _make_writable(self, kept: dict[str, os.stat_result]) -> None:
        """Not root: give existing directories u+rwx until their own mode is set at the end."""
        if self.is_root:
            return
        for rel, st in kept.items():
            if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o700 != 0o700:
                os.fchmod(self.dirs.fd(rel), stat.S_IMODE(st.st_mode) | 0o700)
        st = os.fstat(self.root_fd)
        if st.st_mode & 0o700 != 0o700:
            os.fchmod(self.root_fd, stat.S_IMODE(st.st_mode) | 0o700)

    def _remove(self, rel: str, st: os.stat_result) -> None:
        pfd, name = self.dirs.parent_of(rel)
        try:
            if stat.S_ISDIR(st.st_mode):
                self.dirs.forget(rel)
                shutil.rmtree(name, dir_fd=pfd)  # fd-based, does not follow symlinks
            else:
                os.unlink(name, dir_fd=pfd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise TargetInvalid(
                path=f"{self.root}/{rel}", reason=f"cannot remove it: {exc.strerror or exc}"
            ) from exc

    def _symlink(self, e: TreeEntry, st: os.stat_result | None) -> None:
        pfd, name = self.dirs.parent_of(e.path)
        if st is None:
            os.symlink(e.target, name, dir_fd=pfd)
        if self._wants_chown(e, st):
            self._chown(lambda: os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False))
        if st is None or st.st_mtime_ns != e.mtime_ns:
            os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def _fifo(self, e: TreeEntry, st: os.stat_result | None) -> None:
        pfd, name = self.dirs.parent_of(e.path)
        if st is None:
            os.mkfifo(name, 0o600, dir_fd=pfd)
        # O_NONBLOCK: opening a fifo for reading must not wait for a writer.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | _O_CLOEXEC, dir_fd=pfd)
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise TargetInvalid(path=f"{self.root}/{e.path}", reason="it is not a fifo")
            self.apply_meta(fd, e, st)
        finally:
            os.close(fd)

    def _hardlink(self, e: TreeEntry) -> None:
        head_dir, _, head_name = e.target.rpartition("/")
        hfd = _open_dir_path(self.root_fd, self.root, head_dir)
        try:
            head = os.stat(head_name, dir_fd=hfd, follow_symlinks=False)
            pfd, name = self.dirs.parent_of(e.path)
            try:
                cur = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                cur = None
            if cur is not None:
                if (cur.st_dev, cur.st_ino) == (head.st_dev, head.st_ino):
                    return
                os.unlink(name, dir_fd=pfd)
            os.link(head_name, name, src_dir_fd=hfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(hfd)

    def _root_meta(self) -> None:
        info = self.manifest.meta.get("root")
        if not isinstance(info, dict):
            return
        values = [info.get(k) for k in ("mode", "uid", "gid", "mtime_ns")]
        if not all(isinstance(v, int) for v in values):
            return
        mode, uid, gid, mtime = (int(v) for v in values)  # type: ignore[arg-type]
        e = TreeEntry("", DIR, mode & 0o7777, uid, gid, mtime)
        self.apply_meta(self.root_fd, e, os.fstat(self.root_fd))

    def close(self) -> None:
        self.dirs.close()


def _open_target_root(target: str) -> int:
    """The target folder, walked from / without following a symlink (the root of the target
    included) and made, with its missing parents, if missing (``targets.open_dir``). Never
    ``/`` itself: deleting what the image lacks would empty the host."""
    if not targets.components(target):
        raise TargetInvalid(path=target, reason="it is the root folder /; give a folder below it")
    return targets.open_dir(target, create=True)


def _next_chunks(chunks: list[tuple[bytes | None, int]], first: int) -> list[tuple[bytes, int]]:
    """The stored chunks from ``first`` on, as many as fit in ``BATCH_BYTES`` (one at least)."""
    out: list[tuple[bytes, int]] = []
    size = 0
    for digest, n in chunks[first:]:
        if digest is None:
            continue
        if out and size + n > BATCH_BYTES:
            break
        out.append((digest, n))
        size += n
    return out


@gc_paused()
def restore_tree(
    source: ChunkSource,
    manifest: TreeManifest,
    target: Path | str,
    *,
    workers: int | None = None,
    progress: Progress | None = None,
    delete_extraneous: bool = True,
    verify_content: bool = False,
    sync: bool = True,
) -> RestoreStats:
    """Make the tree at ``target`` equal to the image, writing only what differs.

    A file whose type, size and mtime match is taken as unchanged (``verify_content`` hashes
    it anyway); a changed file is patched chunk by chunk. Entries the image lacks are removed
    unless ``delete_extraneous`` is false. A missing target is created; a symlink in the
    target's path is refused (``TargetInvalid``), never followed. Raises UnsafePath
    (before anything is written) for a manifest that would escape the target, TargetInvalid
    for a target that cannot be written, ChunkMissing or ChunkCorrupt for bad source data.
    ``sync``: flush the target's file system at the end (``syncfs``); False only where the
    user of the tree flushes it itself before relying on it.
    """
    t0 = time.monotonic()
    plan = _plan_restore(manifest)
    root = os.path.abspath(os.fspath(target))
    root_fd = _open_target_root(root)
    restore = _Restore(source, manifest, plan, root, root_fd, verify_content)
    try:
        try:
            moved = restore.run(workers, progress, delete_extraneous, sync)
        except OSError as exc:
            raise TargetInvalid(path=root, reason=exc.strerror or str(exc)) from exc
    finally:
        restore.close()
        os.close(root_fd)
    return RestoreStats(
        bytes_total=manifest.size,
        bytes_compared=moved.compared,
        bytes_written=moved.written,
        bytes_fetched=moved.fetched,
        seconds=time.monotonic() - t0,
    )


__all__ = ["restore_tree"]
