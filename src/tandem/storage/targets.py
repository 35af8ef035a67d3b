"""Opening the targets of restores, clones and materializations without following symlinks.

A target path names where an image is written on a host. Whoever can write in one of its
parent folders could swap a component for a symbolic link, and a restore that followed it
would overwrite (and, deleting extraneous entries, empty) whatever folder the link points
to. So a target is never reached through its path as a whole:

- The path is walked from ``/`` one component at a time, each opened relative to the one
  before with ``openat(…, O_NOFOLLOW | O_DIRECTORY)``. A symbolic link anywhere in it (the
  root of the target included) is refused (``TargetInvalid`` naming the component), as is a
  component that is not a folder.
- A missing component the operation may create is made with ``mkdirat`` in the folder just
  opened and then opened the same way, so a link swapped in after the ``mkdir`` is refused
  too. ``created`` receives each folder made, parents first, as it is made.
- ``..`` is refused; empty and ``.`` components are skipped (paths the appliance sends are
  canonical already, see ``domain.paths``; this only reads older catalog entries kindly).
- A file target (a volume) is opened with ``O_NOFOLLOW`` in its parent's fd; one opened
  for writing that has other names (hard links) is refused, since writing it in place
  would change the file it is linked to.
- Everything afterwards works from the fds returned here, never from the path again.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from tandem.errors import TargetInvalid

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
DIR_MODE = 0o777  # less the umask, as mkdir(1) makes them; a restore sets the image's mode


def components(path: str) -> list[str]:
    """The names of an absolute ``path``; refuses relative paths and ``.``/``..``."""
    if not path.startswith("/") or "\x00" in path:
        raise TargetInvalid(path=path, reason="it is not an absolute path; give a full path")
    names = [n for n in path.split("/") if n not in ("", ".")]
    if ".." in names:
        raise TargetInvalid(path=path, reason="it holds a '..' component; give the path without it")
    return names


def _refusal(shown: str, name: str, parent: int, exc: OSError) -> TargetInvalid:
    """A TargetInvalid saying why component ``name`` (under fd ``parent``) cannot be opened."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        reason = (
            f"a component of the path is a symbolic link ({shown}), which is not followed; "
            "give the path of the real folder, or replace the link with a folder"
        )
    elif st is not None and stat.S_ISREG(st.st_mode):
        reason = f"a component of the path is a file ({shown}); remove it or choose another path"
    elif st is not None and not stat.S_ISDIR(st.st_mode):
        reason = f"a component of the path is not a folder ({shown}); choose another path"
    else:
        reason = f"{shown} cannot be opened ({exc.strerror or exc}); check the path"
    return TargetInvalid(path=shown, reason=reason)


def _open_in(parent: int, name: str, shown: str) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        raise _refusal(shown, name, parent, exc) from exc


def _walk(
    names: list[str],
    create: bool,
    created: list[str] | None,
    on_create: Callable[[], None] | None,
) -> int | None:
    """The fd of folder ``/names…`` (see ``open_dir``); None if a component is missing and
    ``create`` is off."""
    fd = os.open("/", DIR_FLAGS)
    shown = ""
    try:
        for name in names:
            shown += "/" + name
            try:
                nxt = os.open(name, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    return None
                try:
                    os.mkdir(name, DIR_MODE, dir_fd=fd)
                except FileExistsError:
                    pass  # made meanwhile: opened (and checked) below like any other
                except OSError as exc:
                    raise TargetInvalid(
                        path=shown,
                        reason=f"{shown} cannot be created ({exc.strerror or exc}); check the path",
                    ) from exc
                else:
                    if created is not None:
                        created.append(shown)
                    if on_create is not None:
                        on_create()
                nxt = _open_in(fd, name, shown)
            except OSError as exc:
                raise _refusal(shown, name, fd, exc) from exc
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_dir(
    path: str,
    *,
    create: bool = False,
    created: list[str] | None = None,
    on_create: Callable[[], None] | None = None,
) -> int:
    """An fd on the folder ``path``, walked from ``/`` without following any symlink.

    With ``create``, missing folders are made (``mkdirat``, then opened the same way); each
    one made is appended to ``created`` and ``on_create()`` is called right after, so a
    caller that records them knows what to remove after a failure. Raises ``TargetInvalid``
    for a symlink or a non-folder in the path, or a missing folder without ``create``.
    """
    fd = _walk(components(path), create, created, on_create)
    if fd is None:
        raise TargetInvalid(
            path=path, reason=f"{path} or one of its parents does not exist; check the path"
        )
    return fd


def open_parent(path: str, *, create: bool = False) -> tuple[int, str]:
    """(fd of the parent folder of ``path``, walked as by ``open_dir``; the last name)."""
    names = components(path)
    if not names:
        raise TargetInvalid(path=path, reason="it is the root folder /; give a path below it")
    return open_dir("/" + "/".join(names[:-1]), create=create), names[-1]


def open_file(path: str, flags: int, mode: int = 0o600) -> int:
    """Open the file ``path`` with ``flags`` | O_NOFOLLOW in its parent, walked as by
    ``open_dir`` (the parent must exist); a symlink at ``path`` is refused."""
    parent, name = open_parent(path)
    try:
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise TargetInvalid(
                    path=path,
                    reason=f"{path} is a symbolic link, which is not followed; give the path "
                    "of the real file",
                ) from exc
            raise TargetInvalid(path=path, reason=exc.strerror or str(exc)) from exc
    finally:
        os.close(parent)
    st = os.fstat(fd)
    if flags & (os.O_WRONLY | os.O_RDWR) and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        os.close(fd)
        raise TargetInvalid(
            path=path,
            reason=f"{path} is a hard link ({st.st_nlink} names): writing it would change the "
            "file under its other names too; remove the other names, or give another path",
        )
    return fd


@dataclass(frozen=True)
class TargetState:
    """What is at a target path now: ``kind`` is ``missing``, ``folder``, ``file``,
    ``device``, ``symlink`` or ``other``; ``empty`` is meaningful for a folder."""

    exists: bool
    empty: bool
    kind: str

    def as_dict(self) -> dict[str, object]:
        return {"exists": self.exists, "empty": self.empty, "kind": self.kind}


def inspect(path: str) -> TargetState:
    """What is at ``path``, looked at through the no-follow walk (touches nothing). A missing
    parent folder makes the target missing; a symlink or file among the parents raises
    ``TargetInvalid``."""
    names = components(path)
    if not names:
        raise TargetInvalid(path=path, reason="it is the root folder /; give a path below it")
    parent = _walk(names[:-1], False, None, None)
    if parent is None:
        return TargetState(exists=False, empty=True, kind="missing")
    name = names[-1]
    try:
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return TargetState(exists=False, empty=True, kind="missing")
        if stat.S_ISLNK(st.st_mode):
            return TargetState(exists=True, empty=False, kind="symlink")
        if stat.S_ISDIR(st.st_mode):
            fd = _open_in(parent, name, path)
            try:
                empty = not os.listdir(fd)
            finally:
                os.close(fd)
            return TargetState(exists=True, empty=empty, kind="folder")
        if stat.S_ISREG(st.st_mode):
            return TargetState(exists=True, empty=st.st_size == 0, kind="file")
        if stat.S_ISBLK(st.st_mode):
            return TargetState(exists=True, empty=False, kind="device")
        return TargetState(exists=True, empty=False, kind="other")
    finally:
        os.close(parent)
