"""Materialized images: an image's data placed at a mount point on this host, and taken away.

SPEC §2's mount-point rules, as enforced here
- A mount point is a full path: relative paths and ``..`` components are refused
  (``InvalidInput``) before anything is looked at; ``/`` itself is refused.
- An existing *empty* folder is used; a *missing* path is created (its parents too for the
  *specify* action; *keep-source-path* creates no parents: the app's original parent folder
  must exist). A file, a non-empty folder or a symlink at the mount point fails the job
  (``TargetInvalid`` naming the path and the rule) and nothing is touched. No symlink is
  followed, neither at the mount point nor in the folders above it: the path is walked from
  ``/`` with O_NOFOLLOW (``storage.targets``), missing folders are made with ``mkdirat`` in
  the folder just opened, and the image is written through that walk too.
- With ``volumes`` N > 1 the mount points are ``PATH_1`` … ``PATH_N``; every one is checked
  before the first is created.
- A volume image is written to ``<mount point>/volume.img`` (``VOLUME_FILE``); a file-tree
  image is the mount point's content. A missing mount point of a file tree on btrfs is made
  a subvolume (``BTRFS_IOC_SUBVOL_CREATE`` in the folder just opened): a copy the app then
  runs on at DR is captured (syncback) from a read-only snapshot, writes never held
  (``agent.pit``). It is removed as a folder is (``rmdir`` of an empty subvolume).

On-disk format: DIR/mounts.json (DIR is the agent's directory), one object::

    {IMAGE: {"image": IMAGE, "kind": "filesystem"|"volume", "action": ACTION,
             "manifest": HEX, "paths": [mount point, ...], "files": [volume.img path, ...],
             "created": [directory this agent made, ...]  (parents first),
             "kept": {pre-existing folder: {"mode": int, "uid": int, "gid": int}},
             "state": "materializing"|"ready", "time": "YYYY-MM-DDTHH:MM:SSZ",
             "presentation": "fuse", "layers": [{"dir", "pid", "path"}, ...]}}

(``presentation`` and ``layers`` only for a tree presented as a virtual copy, whose layer
and FUSE server ``agent.fusemount`` describes; removal unmounts them first.)

written atomically (temporary file, fsync, rename, fsync of DIR).

Invariants
- The entry is written (state ``materializing``) before the first directory is made and
  again after each one is made, so what an agent killed half-way had created is still
  known; ``unmaterialize`` removes it after a restart. A directory that could not be
  recorded before a crash is at worst left behind empty, never someone else's removed.
- Removal takes away exactly what a materialization created: a directory it made is removed
  with its content; a folder that existed before is emptied (it was empty) and given its
  mode and owner back, never removed; a parent it made is removed only when empty.
  Removal walks to every directory from ``/`` with ``O_NOFOLLOW`` (``storage.targets``) and
  removes folders through their parent's fd: no symlink is followed, above a mount point
  either.
- Mount points of two materializations never nest in each other (nor in DIR), so removing
  one never reaches into another.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.agent import diskmount, fusemount, pit
from tandem.errors import (
    AlreadyMaterialized,
    BeingMaterialized,
    MountPathInvalid,
    MountPointOverlaps,
    MountPointTaken,
    MountRegistryDamaged,
    NotFound,
    OutOfRange,
    TargetInvalid,
)
from tandem.storage import targets
from tandem.storage.fileio import write_durably

REGISTRY_FILE = "mounts.json"
VOLUME_FILE = "volume.img"
"""The file a volume image is materialized to, inside its mount point."""

MATERIALIZING = "materializing"
READY = "ready"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
BTRFS_IOC_SUBVOL_CREATE = 0x5000940E  # _IOW(0x94, 14, struct btrfs_ioctl_vol_args): 4096 bytes
_BTRFS_NAME_MAX = 4087  # btrfs_ioctl_vol_args.name is 4088 bytes, NUL included

# One agent process serves one directory; this lock orders every registry change in it.
_lock = threading.Lock()
_busy: set[str] = set()  # images whose materialization is running in this process


# --- paths and rules -------------------------------------------------------------------


def clean_path(path: str, what: str = "mount point") -> str:
    """``path`` normalised (``//`` and ``.`` folded, no trailing ``/``) if it is a safe full
    path; ``InvalidInput`` saying why otherwise."""
    if not path or "\x00" in path:
        raise MountPathInvalid(what=what, path=path, problem="is empty or holds a NUL byte")
    if not path.startswith("/"):
        raise MountPathInvalid(what=what, path=path, problem="is not a full path")
    if ".." in path.split("/"):
        raise MountPathInvalid(what=what, path=path, problem="contains a '..' component")
    clean = "/" + os.path.normpath(path).lstrip("/")
    if clean == "/":
        raise MountPathInvalid(what=what, path=path, problem="is the root folder /")
    return clean


def mount_points(base: str, volumes: int) -> list[str]:
    """The mount point of each volume: ``base`` alone, or ``base_1`` … ``base_N``."""
    if volumes < 1:
        raise OutOfRange(what="volumes", value=volumes, allowed="1 or more")
    return [base] if volumes == 1 else [f"{base}_{i}" for i in range(1, volumes + 1)]


def _refuse(path: str, reason: str, fix: str) -> TargetInvalid:
    return TargetInvalid(
        f"Cannot materialize the image at {path}: {reason}. A mount point must be an empty "
        f"folder or a missing path (a file or a non-empty folder fails the job); {fix}.",
        path=path,
        reason=reason,
    )


@dataclass
class Target:
    """A mount point that passed the rules: a missing path, or an existing empty folder."""

    path: str
    existed: bool
    owner: dict[str, int] | None = None  # mode, uid, gid of a pre-existing folder


def check_target(path: str, *, make_parents: bool) -> Target:
    """Apply SPEC §2's rules to ``path`` (a ``clean_path``) without changing anything."""
    try:
        targets.inspect(path)  # a symlink (or file) among the parents: never followed
    except TargetInvalid as exc:
        raise _refuse(path, str(exc.fields.get("reason")), "choose another mount point") from exc
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        _check_creatable(path, make_parents)
        return Target(path, existed=False)
    except NotADirectoryError as exc:
        raise _refuse(
            path, "a component of the path is a file", "choose another mount point"
        ) from exc
    except OSError as exc:
        raise _refuse(path, exc.strerror or str(exc), "choose another mount point") from exc
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(
            path,
            "it is a symbolic link, which is not followed",
            "give the real folder's path or choose another mount point",
        )
    if not stat.S_ISDIR(st.st_mode):
        kind = "a file" if stat.S_ISREG(st.st_mode) else "not a folder"
        raise _refuse(path, f"it is {kind}", "remove it or choose another mount point")
    try:
        entries = os.listdir(path)
    except OSError as exc:
        raise _refuse(path, exc.strerror or str(exc), "choose another mount point") from exc
    if entries:
        raise _refuse(
            path,
            f"it is a folder that is not empty ({len(entries)} entries)",
            "empty it or choose another mount point",
        )
    owner = {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
    return Target(path, existed=True, owner=owner)


def _check_creatable(path: str, make_parents: bool) -> None:
    """Raise ``TargetInvalid`` if the missing ``path`` cannot be made under the rules."""
    parent = os.path.dirname(path)
    if not make_parents:
        if not os.path.isdir(parent):
            state = "is not a folder" if os.path.lexists(parent) else "does not exist"
            raise _refuse(
                path,
                f"its parent folder {parent} {state} (keep-source-path puts the image at the "
                "application's original path and creates no parent folders)",
                f"create {parent} or use the specify action with a mount point",
            )
        return
    ancestor = parent
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise _refuse(path, f"{ancestor} is a file, not a folder", "choose another mount point")


def make_dirs(path: str, created: list[str], recorded: Callable[[], None]) -> None:
    """Create ``path`` and its missing parents (top-down), each with ``mkdirat`` in its parent
    opened without following a symlink (``targets.open_dir``). Each directory made is
    appended to ``created`` and ``recorded()`` is called at once, so a failure part-way (or a
    crash) still knows what to remove."""
    try:
        fd = targets.open_dir(path, create=True, created=created, on_create=recorded)
    except TargetInvalid as exc:
        raise _refuse(
            str(exc.fields.get("path", path)), str(exc.fields.get("reason")), "check the path"
        ) from exc
    os.close(fd)


def make_tree_root(path: str, created: list[str], recorded: Callable[[], None]) -> None:
    """``make_dirs`` for the mount point of a file tree: on btrfs the mount point itself is
    made a subvolume (in its parent, opened as ``make_dirs`` opens it), elsewhere a folder.
    A file system that refuses the subvolume gets a folder: the copy then has no snapshot,
    which costs a longer cut, not the job."""
    parent = os.path.dirname(path.rstrip("/")) or "/"
    if pit.mount_of(parent).fstype != "btrfs" or len(os.path.basename(path).encode()) > (
        _BTRFS_NAME_MAX
    ):
        make_dirs(path, created, recorded)
        return
    make_dirs(parent, created, recorded)
    fd, name = targets.open_parent(path)
    try:
        args = bytearray(4096)  # struct btrfs_ioctl_vol_args {__s64 fd; char name[4088];}
        encoded = name.encode()
        args[8 : 8 + len(encoded)] = encoded
        try:
            fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_CREATE, args, True)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise _refuse(path, "it appeared meanwhile", "run the job again") from exc
            os.mkdir(name, 0o700, dir_fd=fd)
        created.append(path)
        recorded()
    finally:
        os.close(fd)


def check_empty_folder(path: str) -> None:
    """Just before writing: ``path`` is still a real, empty folder (not swapped meanwhile)."""
    target = check_target(path, make_parents=False)
    if not target.existed:
        raise _refuse(path, "it vanished before the image was written", "run the job again")


# --- removal ------------------------------------------------------------------------------


def _open_dir(path: str) -> int | None:
    """An fd on the folder ``path``, walked from ``/`` without following a symlink
    (``targets``); None if it (or a folder above it) is missing."""
    try:
        state = targets.inspect(path)
        if not state.exists:
            return None
        if state.kind != "folder":
            raise TargetInvalid(path=path, reason=f"it is a {state.kind}")
        return targets.open_dir(path)
    except TargetInvalid as exc:
        raise TargetInvalid(
            f"Cannot remove the materialized image at {path}: it is no longer a folder "
            "reached without a symbolic link (a link or a file took its place, or the place "
            "of a folder above it) and will not be followed. Remove it by hand, then unmount "
            "again.",
            path=path,
            reason="not a folder",
        ) from exc


def _rmdir(path: str) -> None:
    """Remove the empty folder ``path`` through its parent, walked without following a
    symlink (a link among the parents raises ``TargetInvalid``, a missing one
    FileNotFoundError)."""
    parent = targets.inspect(os.path.dirname(path))
    if not parent.exists:
        raise FileNotFoundError(errno.ENOENT, "no such folder", path)
    fd, name = targets.open_parent(path)
    try:
        os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)


@dataclass
class _Level:
    fd: int
    names: Iterator[str]
    name: str  # its name in the parent folder


def _clear(root_fd: int) -> list[str]:
    """Remove everything inside the folder open as ``root_fd``; returns the top-level names.

    Iterative, so a deep tree cannot exhaust the recursion limit. Subfolders are opened
    relative to their parent with O_NOFOLLOW and made writable first (an image may hold
    read-only folders, whose entries could not be unlinked otherwise).
    """
    top = sorted(os.listdir(root_fd))
    stack = [_Level(root_fd, iter(top), "")]
    try:
        while stack:
            level = stack[-1]
            name = next(level.names, None)
            if name is None:
                stack.pop()
                if stack:
                    os.close(level.fd)
                    os.rmdir(level.name, dir_fd=stack[-1].fd)
                continue
            st = os.stat(name, dir_fd=level.fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=level.fd)
                continue
            sub = _Level(os.open(name, _DIR_FLAGS, dir_fd=level.fd), iter(()), name)
            stack.append(sub)  # before anything else, so the finally below closes it
            os.fchmod(sub.fd, 0o700)
            sub.names = iter(os.listdir(sub.fd))
    finally:
        for level in stack[1:]:
            os.close(level.fd)
    return top


def _restore_owner(fd: int, owner: dict[str, Any]) -> None:
    """Give a pre-existing folder back the mode and owner it had (the image's root had
    changed them)."""
    with contextlib.suppress(KeyError, TypeError, ValueError):
        os.fchmod(fd, int(owner["mode"]) & 0o7777)
        st = os.fstat(fd)
        uid, gid = int(owner["uid"]), int(owner["gid"])
        if (st.st_uid, st.st_gid) != (uid, gid):
            with contextlib.suppress(PermissionError):
                os.fchown(fd, uid, gid)


def remove_materialized(entry: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Remove what the materialization ``entry`` describes; returns (removed, kept).

    ``removed``: the directories removed with their content, and the entries emptied out of
    pre-existing folders. ``kept``: the pre-existing folders (emptied), and parents this
    agent made that now hold something else. Every mount point is opened (and a symlink or
    file in its place refused) before anything is removed.
    """
    if entry.get("layers"):  # a virtual copy (agent.fusemount): unmounted before emptied
        fusemount.detach_entry(entry)
    if entry.get("disks"):  # a VM's disks mounted (agent.diskmount): unmounted first too
        diskmount.detach_entry(entry)
    paths = [clean_path(str(p)) for p in entry.get("paths") or []]
    created = [clean_path(str(p)) for p in entry.get("created") or []]
    owners: dict[str, Any] = dict(entry.get("kept") or {})
    removed: list[str] = []
    kept: list[str] = []
    fds: dict[str, int] = {}
    for path in paths:
        if path in created or path in owners:
            pit.drop_kept(path)  # a syncback's kept snapshot or clones beside the copy
    try:
        for path in paths:
            # A mount point neither made nor found empty by this agent is not its to touch
            # (an agent killed between mkdir and recording it): leave it alone.
            if path in created or path in owners:
                fd = _open_dir(path)
                if fd is not None:
                    fds[path] = fd
        for path, fd in fds.items():
            os.fchmod(fd, 0o700)
            names = _clear(fd)
            if path in created:
                _rmdir(path)
                removed.append(path)
            else:
                _restore_owner(fd, owners[path])
                removed += [os.path.join(path, name) for name in names]
                kept.append(path)
    finally:
        for fd in fds.values():
            os.close(fd)
    parents = set(created) - set(paths)
    for directory in sorted(parents, key=lambda d: d.count("/"), reverse=True):
        try:
            _rmdir(directory)  # only when empty; never follows a symlink
        except FileNotFoundError:
            continue
        except (OSError, TargetInvalid):
            kept.append(directory)
            continue
        removed.append(directory)
    return removed, kept


# --- the registry ---------------------------------------------------------------------------


def _nested(a: str, b: str) -> bool:
    """Whether one of two clean paths is the other or inside it."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Registry:
    """DIR/mounts.json: every materialization on this host, so unmount works after a restart."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / REGISTRY_FILE

    def _key(self, image: str) -> str:
        return f"{self.path}\x00{image}"

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise MountRegistryDamaged(path=self.path, problem=f"cannot be read ({exc})") from exc
        if not isinstance(raw, dict) or not all(isinstance(e, dict) for e in raw.values()):
            raise MountRegistryDamaged(path=self.path, problem="is not a JSON object of entries")
        return raw

    def _save(self, data: dict[str, dict[str, Any]]) -> None:
        write_durably(self.path, json.dumps(data, indent=2, sort_keys=True).encode(), 0o600)

    def read(self) -> dict[str, dict[str, Any]]:
        """The whole registry: image id → entry (see the module docstring)."""
        with _lock:
            return self._load()

    def begin(self, entry: dict[str, Any]) -> None:
        """Record a materialization about to start (before anything is created); refused
        when the image is materialized already or a mount point nests in another one's."""
        image = str(entry["image"])
        home = os.path.realpath(self.directory)
        with _lock:
            data = self._load()
            if image in data or self._key(image) in _busy:
                where = ", ".join(data.get(image, {}).get("paths") or []) or "no path (map-only)"
                raise AlreadyMaterialized(image=image, where=where)
            for path in entry["paths"]:
                if _nested(path, home) or _nested(os.path.realpath(path), home):
                    raise MountPointOverlaps(path=path, other=f"the agent's own directory {home}")
                for other, existing in data.items():
                    for used in existing.get("paths") or []:
                        if _nested(path, str(used)):
                            raise MountPointTaken(path=path, used=used, image=other)
            data[image] = entry
            self._save(data)
            _busy.add(self._key(image))

    def update(self, image: str, **fields: Any) -> None:
        with _lock:
            data = self._load()
            data[image].update(fields)
            self._save(data)

    def finish(self, image: str, **fields: Any) -> None:
        """The materialization succeeded: store its final fields."""
        try:
            self.update(image, **fields)
        finally:
            with _lock:
                _busy.discard(self._key(image))

    def abandon(self, image: str) -> None:
        """The materialization failed: remove what it created and forget it. If removing
        fails, the entry stays (unmount can finish the work) and the error is raised."""
        try:
            with _lock:
                data = self._load()
                entry = data.get(image)
                if entry is None:
                    return
                remove_materialized(entry)
                del data[image]
                self._save(data)
        finally:
            with _lock:
                _busy.discard(self._key(image))

    def reattach_layers(self) -> list[str]:
        """At agent start: bring back the FUSE copies whose mounts are gone (a reboot) or
        whose server died (``fusemount.reattach``); returns the images brought back."""
        back: list[str] = []
        with _lock:
            data = self._load()
            for image, entry in data.items():
                if entry.get("state") != READY or self._key(image) in _busy:
                    continue
                layers = [r for r in entry.get("layers") or [] if isinstance(r, dict)]
                for i, record in enumerate(layers):
                    try:
                        new = fusemount.reattach(record)
                    except Exception:
                        logging.getLogger("tandem.agent").exception(
                            "could not bring back the copy of %s at %s", image, record.get("path")
                        )
                        continue
                    if new is not None:
                        layers[i] = new
                        entry["layers"] = layers
                        back.append(image)
            if back:
                self._save(data)
        return back

    def remove(self, image: str) -> dict[str, Any]:
        """Unmount: remove exactly what ``image``'s materialization created, then forget it."""
        with _lock:
            data = self._load()
            entry = data.get(image)
            if entry is None:
                raise NotFound(
                    f"Image {image!r} is not materialized on this host, so there is nothing to "
                    "unmount. GET /api/v1/mounts on the agent lists what is."
                )
            if self._key(image) in _busy:
                raise BeingMaterialized(image=image)
            removed, kept = remove_materialized(entry)
            del data[image]
            self._save(data)
        return {"image": image, "removed": removed, "kept": kept}
