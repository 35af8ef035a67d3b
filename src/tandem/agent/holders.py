"""Which processes hold an application's data open: the "is the app still running?" check
a restore makes before it overwrites the data in place (SPEC §4.4: a non-VM app must be
stopped first).

A process holds a path when one of its open files, its working directory, its root or one
of its memory-mapped files is the path or lies under it. Linux only (``/proc``). Processes
whose ``/proc`` entries this agent may not read (another user's, when the agent does not
run as root) cannot be seen; the agent itself is never counted.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Holder:
    pid: int
    command: str
    path: str
    """One of the held paths (the first found)."""

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command}) has {self.path} open"


def _under(candidate: str, root: str) -> bool:
    return candidate == root or candidate.startswith(root.rstrip("/") + "/")


def _links(pid_dir: Path) -> list[str]:
    out = []
    for name in ("cwd", "root"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(pid_dir / name))
    try:
        fds = os.listdir(pid_dir / "fd")
    except OSError:
        fds = []
    for fd in fds:
        try:
            out.append(os.readlink(pid_dir / "fd" / fd))
        except OSError:
            continue
    try:
        with open(pid_dir / "maps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    out.append(parts[5].rstrip("\n"))
    except OSError:
        pass
    return out


def _command(pid_dir: Path) -> str:
    try:
        return (pid_dir / "comm").read_text().strip() or "?"
    except OSError:
        return "?"


def holders(path: Path | str, *, limit: int = 5) -> list[Holder]:
    """Up to ``limit`` processes (not this one) holding ``path`` or anything under it."""
    root = os.path.realpath(path)
    if root == "/":
        return []  # everything is under "/": the check would be meaningless
    me = os.getpid()
    found: list[Holder] = []
    try:
        pids = [int(p) for p in os.listdir(PROC) if p.isdigit()]
    except OSError:
        return []
    for pid in sorted(pids):
        if pid == me:
            continue
        pid_dir = PROC / str(pid)
        for link in _links(pid_dir):
            if link.endswith(" (deleted)"):
                link = link[: -len(" (deleted)")]
            # cwd and root of every process are "/" or above most paths: only count them
            # when they are inside the app's path.
            if _under(link, root):
                found.append(Holder(pid, _command(pid_dir), link))
                break
        if len(found) >= limit:
            break
    return found


def mounted_at(path: Path | str) -> list[str]:
    """Where a block device is mounted, from ``/proc/self/mountinfo``: a mounted file
    system holds its device without any process having it open."""
    target = os.path.realpath(path)
    if target == "/":
        return []
    found = []
    try:
        with open(PROC / "self" / "mountinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields, source = left.split(), right.split()
                if len(fields) < 5 or len(source) < 2:
                    continue
                point = fields[4].replace("\\040", " ")
                device = source[1]
                if device == target:
                    found.append(point)
    except OSError:
        return []
    return found
