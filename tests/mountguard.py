"""A test leaves nothing mounted in its own ``tmp_path``.

A mount left behind outlives the test's daemons: a loop device over a FUSE file whose
server is gone makes every later ``mkfs.btrfs`` on the machine fail ("cannot check mount
status … Transport endpoint is not connected"), so one leak fails unrelated tests far
away. The guard names the test that leaked, and takes the leak down (lazily, deepest
first, then the loop devices it was on) so that nothing else is failed by it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def _unescape(field: str) -> str:
    """/proc/self/mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mounted_under(folder: Path) -> list[tuple[str, str]]:
    """(mount point, source) of every mount at or under ``folder``, deepest last."""
    root = str(folder.resolve())
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            point = _unescape(fields[4])
            source = _unescape(fields[fields.index("-") + 2])
            if point == root or point.startswith(root + "/"):
                found.append((point, source))
    return found


def take_down(mounts: list[tuple[str, str]]) -> None:
    """Lazily unmount ``mounts`` (deepest first), then detach the loop devices under them."""
    for point, _ in sorted(mounts, key=lambda m: m[0].count("/"), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    for _, source in mounts:
        if source.startswith("/dev/loop"):
            subprocess.run(["losetup", "--detach", source], capture_output=True, check=False)
