"""Point-in-time sources: what a capture reads instead of the live files.

The agent finds what the app's path sits on (``/proc/self/mountinfo``) and cuts, for the
app's ``ConsistencyMode``:

- ``auto`` and ``snapshot``:
  - a tree that is a btrfs subvolume (inode 256) whose parent folder is on the same mount →
    ``btrfs subvolume snapshot -r`` beside it, read, then deleted (``snapshot-btrfs``);
  - a tree on btrfs or XFS → ``cp -a --reflink=always`` into a hidden work folder on the same
    file system, its big files cloned before a piece at a time (``BIG_FILE``); then, with
    writes held (``fsfreeze``) only for an lstat walk of the live tree, every entry is
    compared with what it was when cloned (type, size, mtime, ctime, inode): all unchanged
    means every clone is the file at that instant (``reflink``), and what the clones hold
    that the held walk did not see (made and removed meanwhile) is removed.
    Regular files that changed since cloned are read then, while writes are still held,
    only where their extents no longer match their clone's (``storage.extents``; the whole
    file when the maps cannot tell), up to ``HELD_READ_MAX`` bytes, and written into their
    clones after; the hold grows with what changed, not with the files. Otherwise (more bytes,
    or folders changed) the changed entries are cloned again, writes released meanwhile,
    and the check repeats, at most ``CLONE_ATTEMPTS`` times. (Writes cannot be held around
    the cloning itself: a clone is a write, and blocks on a frozen file system.) The
    longest hold is reported. On the root file system, which is never frozen, the check
    runs with writes flowing. The hold counts from the start of the freeze, which itself
    holds writes while the file system writes back what it must (on XFS the metadata of the
    clones just made: 35–55 ms of a 50 ms hold on a loop device here). The clones kept from
    the last cut (below), when nothing changed them since, are this cut's starting copy:
    only the entries changed since are cloned into it (``_reuse_kept``);
  - a volume file on btrfs or XFS → a ``FICLONE`` clone beside it, read, then removed
    (``reflink``);
  - otherwise ``auto`` reads the live files (``crash-unsafe``: the capture verifies each is
    unchanged after reading), saying why; ``snapshot`` fails with PointInTimeUnavailable.
- ``freeze``: ``fsfreeze -f`` the mount for the whole capture and ``fsfreeze -u`` after, in a
  ``finally``, and by a watchdog after ``FREEZE_MAX`` seconds at the latest: a capture that
  outlives the watchdog fails (its files were no longer held). The root file system is
  never frozen (the agent and the host live on it). Reports how long writes were held.
- ``hooks`` and ``none``: the live files (the appliance runs hooks around the capture).

Right before a snapshot, a clone or a freeze, the file system is flushed (``syncfs``) with
writes flowing, so the commit or freeze that pauses the app has little left to write. The
cut reports when it began and how long it took (``cut_at``, ``cut_seconds``).

Work copies are named ``.tandem-pit-<random>`` beside the app's path (inside it when the
path is the root of its mount, and then left out of what is cloned) and are removed, also
when the capture fails — except a tree's snapshot or clones after a successful capture
whose caller sets ``keep`` (the image's manifest): that copy is renamed
``.tandem-pit-keep-<hash of the path>-<manifest>``, replacing the one kept before (one per
app), and the next capture whose base is that image gets it as ``previous``, so that
``capture_tree`` reads a changed file only where its extents left the kept copy's. A kept
copy holds the blocks the app has rewritten since (btrfs and XFS share the rest).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tandem.domain.consistency import ConsistencyMode, Cut
from tandem.errors import PointInTimeUnavailable, SourceChanged
from tandem.storage import extents

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)
_CLONE_RANGE = struct.Struct("qQQQ")  # src_fd, src_offset, src_length (0: to EOF), dest_offset
BIG_FILE = 64 * 1024 * 1024
"""A regular file at least this big is cloned a piece of ``CLONE_PIECE`` at a time, before
``cp`` clones the rest of the tree. A clone locks its file until it has remapped every
extent, and a file an application rewrote since the kept copy of the last capture shared
its extents is split by copy-on-write into as many extents as it had writes: on XFS a
640 MiB file after 20,000 random 8 KiB writes held 28,000 extents and one ``FICLONE`` of it
took 422 ms (55,000 extents, 762 ms, two captures later), all of it a stall for the app's
writes to that file. A piece holds the lock for its own extents only; the held check after
the cloning makes the pieces one instant, as it does for files cloned at different times."""
CLONE_PIECE = 4 * 1024 * 1024
FIFREEZE = 0xC0045877  # _IOWR('X', 119, int): what fsfreeze -f does, without a process
FITHAW = 0xC0045878  # _IOWR('X', 120, int)
REFLINK_FS = frozenset({"btrfs", "xfs"})
BTRFS_SUBVOLUME_INO = 256
WORK_PREFIX = ".tandem-pit-"
KEEP_PREFIX = WORK_PREFIX + "keep-"
CLONE_ATTEMPTS = 50
HELD_READ_MAX = 64 * 1024 * 1024
"""Bytes of changed files read while writes are held, rather than cloned again after."""
FREEZE_MAX = 30.0
COMMAND_TIMEOUT = 120.0
KEPT_WALK = ".walk"
"""Beside a tree's kept clones, ``<kept>.walk`` holds the live tree's walk at that cut, so
that the next capture clones only what changed since into the kept copy (``_reuse_kept``)."""
RACY_NS = 20_000_000
"""An entry whose ctime was this close to a walk (or after it) may have been changed again
within the same clock tick without its ctime moving (the "racily clean" entries of git's
index): the next capture clones it again rather than trust its unchanged stamp."""


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    source: str


@dataclass
class PointInTime:
    """What to read, and how it was cut."""

    path: str
    cut: Cut
    reason: str = ""
    recheck: bool = True
    """Whether ``path`` may still change (live files): the capture verifies after reading."""
    held_seconds: float | None = None
    """How long writes were held (freeze), set when the source is released."""
    previous: str | None = None
    """The previous cut of the same path, kept (``keep``) for the capture whose manifest is
    the base of this one: unchanged extents need not be read (``capture_tree``)."""
    keep: str | None = None
    """Set by the caller once the capture succeeded: the manifest (hex) to keep this cut
    for, in place of the previous one (btrfs snapshots and reflink clones of trees)."""
    held_read: int = 0
    """Bytes of changed files read while writes were held (reflink clones)."""
    cut_at: float | None = None
    """When making the point in time began (epoch seconds: the host's clock)."""
    cut_seconds: float | None = None
    """How long making it took: the window in which the app may have paused (a snapshot's
    commit, cloning and the held check; for ``freeze``, the whole capture)."""
    identity: dict[str, tuple[int, int]] | None = None
    """For a copy (reflink clones): each path's live (ctime_ns, inode), which the image
    records so that the next capture knows unchanged files (``capture_tree``)."""

    def as_dict(self) -> dict[str, object]:
        return {
            "consistency": self.cut.value,
            "consistency_reason": self.reason,
            "held_seconds": self.held_seconds,
            "cut_at": self.cut_at,
            "cut_seconds": self.cut_seconds,
            "held_read": self.held_read,
        }


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_of(path: str) -> Mount:
    """The mount ``path`` is on (the longest mount point that contains it)."""
    real = os.path.realpath(path)
    best: Mount | None = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            point = _unescape(left.split()[4])
            fstype, source = [*right.split(), "", ""][:2]
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            # Later lines stack over earlier ones at the same point.
            if inside and (best is None or len(point) >= len(best.point)):
                best = Mount(point, fstype, _unescape(source))
    return best or Mount("/", "", "")


def is_btrfs_subvolume(path: str) -> bool:
    return mount_of(path).fstype == "btrfs" and os.stat(path).st_ino == BTRFS_SUBVOLUME_INO


def _run(argv: list[str], what: str, path: str) -> None:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except FileNotFoundError as exc:
        raise PointInTimeUnavailable(
            path=path, reason=f"{argv[0]} is not installed ({what})"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise PointInTimeUnavailable(
            path=path, reason=f"{what} took longer than {COMMAND_TIMEOUT:.0f} s"
        ) from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise PointInTimeUnavailable(
            path=path, reason=f"{what} failed: {tail[-1] if tail else proc.returncode}"
        )


def _ioctl_mount(mount: Mount, request: int, what: str, path: str) -> None:
    """FIFREEZE or FITHAW on the file system mounted at ``mount``."""
    fd = os.open(mount.point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, request, 0)
    except OSError as exc:
        raise PointInTimeUnavailable(path=path, reason=f"{what} failed ({exc.strerror})") from exc
    finally:
        os.close(fd)


def freeze(mount: Mount, path: str) -> None:
    """Hold every write to ``mount`` (fsfreeze -f)."""
    _ioctl_mount(mount, FIFREEZE, f"freezing {mount.point}", path)


def thaw(mount: Mount, path: str) -> None:
    """Release the writes (fsfreeze -u)."""
    _ioctl_mount(mount, FITHAW, f"thawing {mount.point}", path)


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: str) -> None:
    """Write the dirty data of the file system ``path`` is on (``syncfs(2)``), best effort.

    Called, with writes flowing, right before a cut: what a snapshot's commit or a freeze
    must flush then is only what was written since, so the app's pause stays short."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        _libc.syncfs(fd)
    finally:
        os.close(fd)


def _work_name() -> str:
    return WORK_PREFIX + secrets.token_hex(6)


def _work_place(path: str, mount: Mount) -> tuple[str, str | None]:
    """Where a work copy of ``path`` goes on its file system: (work path, excluded name)."""
    parent = os.path.dirname(path.rstrip("/")) or "/"
    name = _work_name()
    if path.rstrip("/") != mount.point.rstrip("/") and mount_of(parent).point == mount.point:
        return os.path.join(parent, name), None
    return os.path.join(path, name), name  # the app's path is the mount's root


def _keep_stem(path: str) -> str:
    digest = hashlib.sha256(os.path.realpath(path).encode("utf-8", "surrogateescape"))
    return KEEP_PREFIX + digest.hexdigest()[:16] + "-"


def _kept(folder: str, path: str, manifest: str | None) -> str | None:
    """The cut of ``path`` kept in ``folder`` for the image ``manifest``, if there is one."""
    if not manifest or not all(c in "0123456789abcdef" for c in manifest):
        return None
    found = os.path.join(folder, _keep_stem(path) + manifest)
    return found if os.path.isdir(found) and not os.path.islink(found) else None


def _replace_kept(
    folder: str,
    path: str,
    cut: str,
    manifest: str,
    remove: Callable[[str], None],
    walk: tuple[dict[str, tuple[int, ...]], int] | None = None,
) -> bool:
    """Keep ``cut`` as ``path``'s previous cut for ``manifest``, removing the one kept
    before; False (nothing kept) when it cannot be renamed. ``walk`` (a tree's clones: the
    live walk at the cut and when it began, ns) is written beside it (``KEPT_WALK``)."""
    if not all(c in "0123456789abcdef" for c in manifest):
        return False
    stem = _keep_stem(path)
    name = stem + manifest
    kept = os.path.join(folder, name)
    try:
        os.rename(cut, kept)
    except OSError:
        return False
    if walk is not None:
        _write_walk(kept, *walk)
    old = [
        os.path.join(folder, o)
        for o in os.listdir(folder)
        if o.startswith(stem) and o not in (name, name + KEPT_WALK)
    ]
    _remove_later(old, remove)
    return True


def _remove_later(paths: list[str], remove: Callable[[str], None]) -> None:
    """Remove ``paths`` in the background: not on the capture's time (a copy left by a stop
    is removed at the next capture)."""

    def run() -> None:
        for path in paths:
            with contextlib.suppress(OSError, PointInTimeUnavailable):
                remove(path)

    if paths:
        threading.Thread(target=run, name="tandem-pit-remove", daemon=True).start()


def _write_walk(kept: str, walk: dict[str, tuple[int, ...]], walked_ns: int) -> None:
    """Write ``<kept>.walk``: the live walk the kept clones stand for, when it began, and the
    kept folder's ctime once renamed — nothing inside it changed after that (checked by
    ``_reuse_kept``). Without it (an error here), the next capture clones the whole tree."""
    with contextlib.suppress(OSError):
        doc = {
            "walked_ns": walked_ns,
            "kept_ctime_ns": os.lstat(kept).st_ctime_ns,
            "entries": {rel: list(key) for rel, key in walk.items() if len(key) == 5},
        }
        tmp = kept + KEPT_WALK + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.rename(tmp, kept + KEPT_WALK)


def _read_walk(kept: str) -> tuple[dict[str, tuple[int, ...]], int, int] | None:
    """The walk ``_write_walk`` kept beside ``kept``: (entries, walked_ns, kept_ctime_ns), or
    None when it is missing or not that shape. Entries need only be five values each: they
    are trusted only where they equal the kept copy's own entries (``_reuse_kept``)."""
    try:
        with open(kept + KEPT_WALK, encoding="utf-8") as f:
            doc = json.load(f)
        walked, ctime, raw = doc["walked_ns"], doc["kept_ctime_ns"], doc["entries"]
        if not (isinstance(walked, int) and isinstance(ctime, int) and isinstance(raw, dict)):
            return None
        entries = {r: tuple(k) for r, k in raw.items() if isinstance(k, list) and len(k) == 5}
        return (entries, walked, ctime) if len(entries) == len(raw) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _reuse_kept(
    folder: str, path: str, base: str | None, before: dict[str, tuple[int, ...]]
) -> tuple[str, list[str]] | None:
    """The kept clones of ``path``'s last cut (for ``base``) and the entries changed since,
    when cloning only those into it makes the tree as ``before`` saw it: the walk kept with
    it is there, nothing in it changed since it was kept (every entry as that walk recorded
    it, none changed after it was kept: ctime), and no changed file has several links (a
    clone of one alone would split the group). None: clone the whole tree.

    An entry is changed when its type, size, mtime, ctime or inode differ from the kept
    walk's, or when its ctime was within ``RACY_NS`` of that walk."""
    kept = _kept(folder, path, base)
    if kept is None:
        return None
    stored = _read_walk(kept)
    if stored is None:
        return None
    old, walked_ns, kept_ctime = stored
    inside = _lstat_tree(kept, None)
    if inside.keys() != old.keys():
        return None
    for rel, key in inside.items():
        was = old[rel]
        if (
            len(key) != 5
            or key[0] != was[0]
            or key[2] != was[2]
            or (key[1] != was[1] and not stat.S_ISDIR(key[0]))
            or key[3] > kept_ctime
        ):
            return None
    try:
        if os.lstat(kept).st_ctime_ns != kept_ctime:
            return None
    except OSError:
        return None
    racy = walked_ns - RACY_NS
    changed = [
        rel
        for rel in before.keys() | old.keys()
        if before.get(rel) != old.get(rel) or old[rel][3] >= racy
    ]
    for rel in changed:
        live = before.get(rel)
        if live is not None and len(live) == 5 and stat.S_ISREG(live[0]):
            try:
                if os.lstat(os.path.join(path, rel)).st_nlink > 1:
                    return None
            except FileNotFoundError:
                continue  # removed since: the held check sees it
    return kept, changed


def _set_aside(work: str, changed: list[str], prev: str) -> bool:
    """Move the clones of changed regular files out of ``work`` into ``prev`` (same relative
    paths): the previous cut of each, against which the capture reads only what changed
    (``capture_tree``'s ``previous``). True when any was moved."""
    moved = False
    for rel in changed:
        src = os.path.join(work, rel)
        try:
            if not stat.S_ISREG(os.lstat(src).st_mode):
                continue
            dst = os.path.join(prev, rel)
            os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
            os.rename(src, dst)
            moved = True
        except FileNotFoundError:
            continue
    return moved


def _drop_kept(path: str, mount: Mount) -> None:
    """Remove the copies kept for ``path``: its captures are no longer cut from snapshots or
    clones (its consistency changed), and one inside it must not be captured as its data."""
    whole = path.rstrip("/") == mount.point.rstrip("/")
    folder = path if whole else os.path.dirname(path.rstrip("/"))
    stem = _keep_stem(path)
    try:
        names = [n for n in os.listdir(folder) if n.startswith(stem)]
    except OSError:
        return
    for name in names:
        full = os.path.join(folder, name)
        with contextlib.suppress(OSError, PointInTimeUnavailable):
            if os.lstat(full).st_ino == BTRFS_SUBVOLUME_INO and mount.fstype == "btrfs":
                _delete_subvolume(full)
            else:
                _rmtree(full)


def drop_kept(path: str) -> None:
    """Remove the copies kept for ``path`` (a tree whose copy is being removed, as a DR copy
    at failback): they would outlive it, holding its blocks."""
    with contextlib.suppress(OSError):
        _drop_kept(path, mount_of(path))


# --- the cuts -------------------------------------------------------------------------


def _rmtree(folder: str) -> None:
    """Remove a kept copy: ``rm`` does it off the agent's interpreter (a copy of a large
    tree is thousands of unlinks, which in Python would hold the GIL from the next capture)."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            ["rm", "-rf", "--one-file-system", "--", folder],
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    shutil.rmtree(folder, ignore_errors=True)  # what rm left, or all of it without rm


def _delete_subvolume(snap: str) -> None:
    _run(["btrfs", "subvolume", "delete", snap], "btrfs subvolume delete", snap)


@contextlib.contextmanager
def _btrfs_snapshot(path: str, base: str | None) -> Iterator[PointInTime]:
    folder = os.path.dirname(path.rstrip("/"))
    snap = os.path.join(folder, _work_name())
    # The snapshot commits a transaction that flushes every dirty page first: flushed now,
    # while the app writes on, the commit has little left to flush.
    syncfs(path)
    t0, at = time.monotonic(), time.time()
    _run(["btrfs", "subvolume", "snapshot", "-r", path, snap], "btrfs subvolume snapshot", path)
    pit = PointInTime(snap, Cut.SNAPSHOT_BTRFS, "a read-only btrfs snapshot", recheck=False)
    pit.cut_at, pit.cut_seconds = at, time.monotonic() - t0
    pit.previous = _kept(folder, path, base)
    try:
        yield pit
    finally:
        if not (pit.keep and _replace_kept(folder, path, snap, pit.keep, _delete_subvolume)):
            _run(["btrfs", "subvolume", "delete", snap], "btrfs subvolume delete", path)


def _lstat_tree(root: str, exclude: str | None) -> dict[str, tuple[int, ...]]:
    """Every entry under ``root`` (by relative path) with what says it changed: type, size,
    mtime, ctime, inode. With ``exclude`` (the work copy is inside ``root``), work copies
    at the top are left out. Runs while writes are held: one ``scandir`` per folder and no
    path arithmetic beyond joining, so the hold stays short."""
    out: dict[str, tuple[int, ...]] = {}
    stack = [("", root)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        try:
            it = os.scandir(abs_dir)
        except OSError:
            continue  # vanished or unreadable, as os.walk: the parent's entry says it changed
        with it:
            for de in it:
                name = de.name
                if not rel_dir and exclude is not None and name.startswith(WORK_PREFIX):
                    continue
                rel = rel_dir + name
                try:
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    out[rel] = (-1,)
                    continue
                mode = st.st_mode
                out[rel] = (
                    stat.S_IFMT(mode),
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ctime_ns,
                    st.st_ino,
                )
                if stat.S_ISDIR(mode):
                    stack.append((rel + "/", f"{abs_dir}/{name}"))
    return out


def _cp(sources: list[str], dest: str, path: str, *, keep_existing: bool = False) -> None:
    """``cp -a`` with reflinks; ``keep_existing`` leaves files already in ``dest`` as they
    are (``-n``: the big files cloned before, see ``_clone_big_files``)."""
    flags = ["-n"] if keep_existing else []
    _run(
        ["cp", "-a", "--reflink=always", *flags, "--", *sources, dest],
        "cloning with reflinks",
        path,
    )


def _clone_big_files(path: str, work: str, walk: dict[str, tuple[int, ...]]) -> None:
    """Clone the tree's big regular files into ``work`` a piece at a time (``BIG_FILE``),
    folders made as needed (``cp -a`` gives them their attributes when it merges the rest
    in). A file with several links is left to ``cp``, which keeps them linked."""
    for rel, key in walk.items():
        if len(key) != 5 or not stat.S_ISREG(key[0]) or key[1] < BIG_FILE:
            continue
        src, dst = os.path.join(path, rel), os.path.join(work, rel)
        try:
            if os.lstat(src).st_nlink > 1:
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            _clone_file(src, dst, path)
        except OSError:  # gone or replaced since the walk: left to cp, and to the check
            with contextlib.suppress(OSError):
                os.unlink(dst)


def _remove(entry: str) -> None:
    if os.path.isdir(entry) and not os.path.islink(entry):
        shutil.rmtree(entry)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry)


def _prune(work: str, rel_dir: str, now: dict[str, tuple[int, ...]]) -> None:
    """Remove from the clone of folder ``rel_dir`` ("" for the root, else ending in "/")
    what the live tree did not hold at ``now``: a file made after the walk before the
    cloning and removed before the check (a temporary file, the old name of a renamed one)
    is in neither walk, only in the clones; its folder's changed mtime says where."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(os.path.join(work, rel_dir)):
            if rel_dir + name not in now:
                _remove(os.path.join(work, rel_dir, name))


def _reclone(path: str, work: str, changed: list[str], now: dict[str, tuple[int, ...]]) -> None:
    """Bring the clones of ``changed`` entries in line with the live tree (after ``now``)."""
    done: list[str] = []
    for rel in sorted(changed):  # parents first
        if any(rel.startswith(d + "/") for d in done):
            continue  # inside a folder cloned whole just now
        src, dst = os.path.join(path, rel), os.path.join(work, rel)
        key = now.get(rel)
        if key is None or key == (-1,):
            _remove(dst)
            continue
        if stat.S_ISDIR(key[0]) and os.path.isdir(dst) and not os.path.islink(dst):
            with contextlib.suppress(FileNotFoundError):  # only its own metadata changed
                st = os.lstat(src)
                os.chown(dst, st.st_uid, st.st_gid)
                os.chmod(dst, stat.S_IMODE(st.st_mode))
                _copy_xattrs(src, dst)  # a folder made again may be opaque now (overlayfs)
            _prune(work, rel + "/", now)
            continue
        _remove(dst)
        if stat.S_ISREG(key[0]):
            with contextlib.suppress(FileNotFoundError):  # removed since: the next check sees
                _clone_file(src, dst, path)
            continue
        try:
            _cp([src], dst, path)
        except PointInTimeUnavailable:
            if os.path.lexists(src):
                raise
            continue  # removed since: the next check sees it gone
        if stat.S_ISDIR(key[0]):
            done.append(rel)


def _copy_xattrs(src: str, dst: str) -> None:
    """Give ``dst`` exactly the extended attributes of ``src`` (as ``cp -a`` clones them):
    an overlayfs layer says with them which folders are opaque or renamed."""
    try:
        names = set(os.listxattr(src, follow_symlinks=False))
        had = set(os.listxattr(dst, follow_symlinks=False))
    except OSError:
        return  # the file system keeps none
    for name in had - names:
        with contextlib.suppress(OSError):
            os.removexattr(dst, name, follow_symlinks=False)
    for name in names:
        with contextlib.suppress(OSError):
            value = os.getxattr(src, name, follow_symlinks=False)
            os.setxattr(dst, name, value, follow_symlinks=False)


def _clone_fd(sfd: int, dst: str, path: str, what: str) -> int:
    """Create ``dst`` as a reflink clone of the open file ``sfd``; returns its fd (the
    caller closes it). ``what`` names the source in the refusal."""
    dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.ioctl(dfd, FICLONE, sfd)
    except OSError as exc:
        os.close(dfd)
        raise PointInTimeUnavailable(
            path=path, reason=f"the file system would not clone {what} ({exc.strerror})"
        ) from exc
    return dfd


def _clone_in_pieces(sfd: int, dst: str, size: int) -> int:
    """Create ``dst`` as a clone of the open file ``sfd`` made ``CLONE_PIECE`` at a time (see
    ``BIG_FILE``), the last piece to the file's end; returns its fd. Raises OSError."""
    dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        for offset in range(0, size, CLONE_PIECE):
            length = 0 if offset + CLONE_PIECE >= size else CLONE_PIECE
            _clone_piece(dfd, sfd, offset, length)
    except OSError:
        os.close(dfd)
        os.unlink(dst)
        raise
    return dfd


def _clone_piece(dfd: int, sfd: int, offset: int, length: int) -> None:
    fcntl.ioctl(dfd, FICLONERANGE, _CLONE_RANGE.pack(sfd, offset, length, offset))


def _clone_file(src: str, dst: str, path: str) -> None:
    """A reflink clone of one regular file with its mode, owner and times (as ``cp -a``),
    without a process per file: re-cloning must be quick for the next check to settle. A
    big file is cloned a piece at a time (``BIG_FILE``); whole if the pieces fail (the file
    shrank meanwhile)."""
    sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(sfd)
        dfd = -1
        if st.st_size >= BIG_FILE:
            with contextlib.suppress(OSError):
                dfd = _clone_in_pieces(sfd, dst, st.st_size)
        if dfd < 0:
            dfd = _clone_fd(sfd, dst, path, src)
        try:
            os.fchown(dfd, st.st_uid, st.st_gid)
            os.fchmod(dfd, stat.S_IMODE(st.st_mode))
            os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(dfd)
        _copy_xattrs(src, dst)
    finally:
        os.close(sfd)


@dataclass
class _Held:
    """What a changed file held at the cut: its stat, and either its whole content
    (``whole``) or the ranges that differ from its clone, each with its bytes."""

    st: os.stat_result
    ranges: list[tuple[int, bytes]]
    whole: bool


def _pread_all(fd: int, start: int, end: int) -> bytes:
    chunks, pos = [], start
    while pos < end:
        piece = os.pread(fd, min(8 << 20, end - pos), pos)
        if not piece:
            break
        chunks.append(piece)
        pos += len(piece)
    return b"".join(chunks)


def _differs(fd: int, st: os.stat_result, clone: str) -> list[tuple[int, int]] | None:
    """The ranges of the live file (open as ``fd``) that may differ from its clone, from
    both extent maps (``storage.extents``; writes are held, so nothing is dirty and the
    maps are not synced); None when they cannot tell."""
    try:
        cfd = os.open(clone, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        cst = os.fstat(cfd)
        if not stat.S_ISREG(cst.st_mode) or cst.st_dev != st.st_dev:
            return None
        return extents.changed_ranges(fd, st.st_size, cfd, cst.st_size, sync=False)
    finally:
        os.close(cfd)


def _read_held(
    path: str, work: str, changed: list[str], now: dict[str, tuple[int, ...]]
) -> dict[str, _Held] | None:
    """What the changed regular files hold, read while writes are held: only the ranges
    where a file's extents differ from its clone's (a clone shares every extent it was not
    written in since), the whole file when the extent maps cannot tell. None when there are
    too many bytes (or entries that are not regular files) to hold writes for."""
    for rel in changed:
        key = now.get(rel)
        if key is not None and key != (-1,) and not stat.S_ISREG(key[0]):
            return None
    total = 0
    out: dict[str, _Held] = {}
    for rel in changed:
        key = now.get(rel)
        if key is None or key == (-1,):
            continue  # removed: nothing to read
        fd = os.open(os.path.join(path, rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            ranges = _differs(fd, st, os.path.join(work, rel))
            whole = ranges is None
            todo = [(0, st.st_size)] if ranges is None else ranges
            total += sum(end - start for start, end in todo)
            if total > HELD_READ_MAX:
                return None
            out[rel] = _Held(st, [(s, _pread_all(fd, s, e)) for s, e in todo], whole)
        finally:
            os.close(fd)
    return out


def _write_read(work: str, read: dict[str, _Held]) -> None:
    """Put what was read at the cut into the clones (mode, owner and times kept): a whole
    file in place of its clone, changed ranges into it."""
    for rel, held in read.items():
        dst, st = os.path.join(work, rel), held.st
        if held.whole:
            _remove(dst)
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        else:
            fd = os.open(dst, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for offset, data in held.ranges:
                view, pos = memoryview(data), offset
                while view:
                    n = os.pwrite(fd, view, pos)
                    view, pos = view[n:], pos + n
            os.ftruncate(fd, st.st_size)
            os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fd)


def _set_dir_times(work: str, now: dict[str, tuple[int, ...]]) -> None:
    """Folders' mtimes as the live tree had them at the cut (re-cloning changed them)."""
    for rel, key in now.items():
        if len(key) == 5 and stat.S_ISDIR(key[0]):
            os.utime(os.path.join(work, rel), ns=(key[2], key[2]), follow_symlinks=False)


@contextlib.contextmanager
def _reflink_tree(path: str, mount: Mount, base: str | None) -> Iterator[PointInTime]:
    """Clone the tree, then check it against the live tree while writes are held for the
    instant of an lstat walk (``fsfreeze``; not on the root file system, where the check
    runs unfrozen): an entry unchanged since it was cloned, for all entries, makes the
    clones the live tree at that instant. Entries that changed are cloned again and the
    check repeats, at most ``CLONE_ATTEMPTS`` times.

    With the clones kept for ``base`` (the last cut) and reusable (``_reuse_kept``), they
    become this cut's work copy and only what changed since is cloned into it: a cut costs
    the walks and the changed files, not a clone of every file (nor the freeze the
    writeback of every clone's metadata). The clones they replace are set aside as the
    previous cut the capture reads changed files against."""
    work, exclude = _work_place(path, mount)
    folder = os.path.dirname(work)
    hold = mount.point != "/"
    held = 0.0
    held_read = 0
    pit: PointInTime | None = None
    prev: str | None = None
    walk: tuple[dict[str, tuple[int, ...]], int] | None = None
    try:
        # A clone first writes the file's dirty pages, with the file locked; a freeze, all
        # of the file system's: flushed beforehand, with writes flowing, little is left.
        if hold:
            syncfs(path)
        t_cut, at = time.monotonic(), time.time()
        before = _lstat_tree(path, exclude)
        reuse = _reuse_kept(folder, path, base, before)
        if reuse is not None:
            kept, changed = reuse
            os.rename(kept, work)
            with contextlib.suppress(OSError):
                os.unlink(kept + KEPT_WALK)
            prev = work + "-prev"
            if not _set_aside(work, changed, prev):
                prev = None
            _reclone(path, work, changed, before)
        else:
            os.mkdir(work, 0o700)
            names = [
                os.path.join(path, n)
                for n in os.listdir(path)
                if exclude is None or not n.startswith(WORK_PREFIX)
            ]
            if names:
                _clone_big_files(path, work, before)
                _cp(names, work + "/", path, keep_existing=True)
        for attempt in range(CLONE_ATTEMPTS):
            if hold:
                syncfs(path)
            # Writes are held from the moment the freeze begins: it first waits for the
            # file system to write back what it must (XFS: the metadata of every clone and
            # copy-on-write since its last freeze), which is most of the hold.
            t0, walked_ns = time.monotonic(), time.time_ns()
            if hold:
                freeze(mount, path)
            read: dict[str, _Held] | None = None
            try:
                now = _lstat_tree(path, exclude)
                changed = [r for r in before.keys() | now.keys() if before.get(r) != now.get(r)]
                if hold and changed:
                    # Writers queue while held and rush in at the thaw, so a file written
                    # on every commit (a WAL) would change again before it is re-cloned:
                    # a few changed files are read now instead, at the cut.
                    read = _read_held(path, work, changed, now)
            finally:
                if hold:
                    thaw(mount, path)
                held = max(held, time.monotonic() - t0)
            if read is not None:
                held_read += sum(len(d) for h in read.values() for _, d in h.ranges)
                _reclone(path, work, [r for r in changed if r not in read], now)
                _write_read(work, read)
                changed = []
            if not changed:
                _prune(work, "", now)  # the root's mtime is not in the walks
                st = os.stat(path)  # the root's own metadata, which the image records
                os.chmod(work, stat.S_IMODE(st.st_mode))
                os.chown(work, st.st_uid, st.st_gid)
                _set_dir_times(work, now)
                os.utime(work, ns=(st.st_atime_ns, st.st_mtime_ns))
                why = "reflink clones, unchanged since cloned" + (
                    f" when writes to {mount.point} were held" if hold else ""
                )
                if reuse is not None:
                    why += (
                        f"; the last cut's clones with the {len(reuse[1])} entries changed "
                        "since cloned again"
                    )
                if attempt:
                    why += f" (files that changed meanwhile re-cloned {attempt} times)"
                identity = {rel: (k[3], k[4]) for rel, k in now.items() if len(k) == 5}
                pit = PointInTime(work, Cut.REFLINK, why, recheck=False, identity=identity)
                pit.held_seconds = held if hold else None
                pit.held_read = held_read
                pit.previous = prev if reuse is not None else _kept(folder, path, base)
                pit.cut_at, pit.cut_seconds = at, time.monotonic() - t_cut
                walk = (now, walked_ns)
                yield pit
                return
            _reclone(path, work, changed, now)
            before = now
        shown = ", ".join(sorted(changed)[:5]) + (", …" if len(changed) > 5 else "")
        raise SourceChanged(
            path=path,
            reason=f"files kept changing while they were cloned ({CLONE_ATTEMPTS} checks; last "
            f"{shown}); put the data on a btrfs subvolume for a snapshot, or use freeze/thaw "
            "hooks",
        )
    finally:
        if not (
            pit and pit.keep and _replace_kept(folder, path, work, pit.keep, _rmtree, walk=walk)
        ):
            shutil.rmtree(work, ignore_errors=True)
        if prev is not None:
            _remove_later([prev], _rmtree)


@contextlib.contextmanager
def _reflink_file(path: str) -> Iterator[PointInTime]:
    clone = os.path.join(os.path.dirname(path), _work_name())
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fdatasync(src)  # the clone writes the dirty pages first, with the file locked
        t0, at = time.monotonic(), time.time()
        os.close(_clone_fd(src, clone, path, "it"))
        pit = PointInTime(clone, Cut.REFLINK, "a reflink clone of the volume file", recheck=False)
        pit.cut_at, pit.cut_seconds = at, time.monotonic() - t0
        yield pit
    finally:
        os.close(src)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(clone)


@contextlib.contextmanager
def _frozen(path: str, mount: Mount) -> Iterator[PointInTime]:
    if mount.point == "/":
        raise PointInTimeUnavailable(
            path=path,
            reason="it is on the root file system, which is never frozen (the host runs on it)",
        )
    lock = threading.Lock()
    thawed = [False]

    def release() -> None:
        with lock:
            if not thawed[0]:
                thawed[0] = True
                thaw(mount, path)

    syncfs(path)
    at, t0 = time.time(), time.monotonic()  # writes are held from when the freeze begins
    freeze(mount, path)
    watchdog = threading.Timer(FREEZE_MAX, release)
    watchdog.daemon = True
    watchdog.start()
    pit = PointInTime(path, Cut.FREEZE, f"writes to {mount.point} held during the capture")
    pit.cut_at = at
    try:
        yield pit
        if time.monotonic() - t0 >= FREEZE_MAX:
            raise SourceChanged(
                path=path,
                reason=f"the capture took longer than the {FREEZE_MAX:.0f} s writes may be "
                "held; use a point-in-time source or hooks",
            )
    finally:
        watchdog.cancel()
        release()
        pit.held_seconds = pit.cut_seconds = time.monotonic() - t0


@contextlib.contextmanager
def _live(path: str, reason: str) -> Iterator[PointInTime]:
    yield PointInTime(path, Cut.CRASH_UNSAFE, reason)


def _no_pit(path: str, kind: str, mount: Mount) -> str | None:
    """Why ``path`` has no point-in-time source; None when it has one."""
    fs = mount.fstype or "an unknown file system"
    if kind == "volume":
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "it is a block device, which neither snapshots nor reflinks here"
        if mount.fstype not in REFLINK_FS:
            return f"it is on {fs} at {mount.point}, which cannot reflink a file"
        return None
    if mount.fstype not in REFLINK_FS:
        return f"it is on {fs} at {mount.point}, which can neither snapshot nor reflink"
    return None


@contextlib.contextmanager
def point_in_time(
    path: str, kind: str, mode: ConsistencyMode, base: str | None = None
) -> Iterator[PointInTime]:
    """What to capture ``path`` (a ``filesystem`` or ``volume`` app) from, under ``mode``;
    the source is released (snapshot deleted, clones removed, file system thawed) on exit,
    unless the caller set its ``keep`` (a tree's snapshot or clones): it is then kept as
    the previous cut, found again as ``previous`` by the capture whose ``base`` is that
    manifest."""
    mount = mount_of(path)
    if mode in (ConsistencyMode.NONE, ConsistencyMode.HOOKS):
        if kind == "filesystem":
            _drop_kept(path, mount)
        with _live(path, f"--consistency {mode.value}: live files") as pit:
            yield pit
        return
    if mode is ConsistencyMode.FREEZE:
        if kind == "filesystem":
            _drop_kept(path, mount)  # before the freeze, which would hold the removal
        with _frozen(path, mount) as pit:
            yield pit
        return
    reason = _no_pit(path, kind, mount)
    if reason is not None:
        if mode is ConsistencyMode.SNAPSHOT:
            raise PointInTimeUnavailable(path=path, reason=reason)
        if kind == "filesystem":
            _drop_kept(path, mount)
        with _live(path, f"no point-in-time source: {reason}") as pit:
            yield pit
        return
    source: contextlib.AbstractContextManager[PointInTime]
    if kind == "volume":
        source = _reflink_file(path)
    elif (
        is_btrfs_subvolume(path)
        and mount_of(os.path.dirname(path.rstrip("/")) or "/").point == mount.point
    ):
        source = _btrfs_snapshot(path, base)
    else:
        source = _reflink_tree(path, mount, base)
    with source as pit:
        yield pit
