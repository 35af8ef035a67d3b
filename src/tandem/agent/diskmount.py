"""A VM image's disks mounted as file systems on this host (``presentation`` ``disks``).

A VM image is presented by the appliance as one NBD export, its disks end to end
(``storage.vmimage``). To mount their file systems here, without copying anything:
1. ``nbdfuse`` shows the export as one file, ``DIR/disks/IMAGE/export`` (DIR: the agent's
   directory); writes go through it into the image's virtual copy at the appliance. An
   ``nbds://`` export is read through a ``qemu-nbd`` that nbdfuse starts as the TLS client,
   trusting the appliance certificate the request carried (pinned; ``agent.vm.trust_appliance``).
2. Each disk gets a loop device over its slice of that file (``losetup --offset
   --sizelimit``). A slice whose ``blkid`` says file system is mounted as it is; one that
   holds a partition table (``partx``) gets a loop over its first partition instead; any
   other fails the job naming the disk.
3. Disk *i* is mounted at mount point *i* (``agent.mounts.mount_points``: ``PATH`` for one
   disk, ``PATH_1`` … ``PATH_N`` for several).

Registry (``agent.mounts``, the entry's ``disks`` object, written after each step so an
agent killed half-way knows what to take down)::

    {"dir": DIR/disks/IMAGE, "pid": nbdfuse pid, "loops": ["/dev/loopN", ...],
     "mounted": [mount point, ...]}

Taking down (``detach_entry``): every mount point is checked for processes using it first
(a refusal leaves everything in place), then unmounted, the loops detached, the FUSE file
unmounted (nbdfuse then exits) and its folder removed. A mount point that is still a mount
after that is never emptied: ``remove_materialized`` clears folders only after this.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tandem.agent import holders
from tandem.errors import (
    CopyInUse,
    DiskHasNoFileSystem,
    DiskMountFailed,
    InvalidInput,
    LoopDeviceUnavailable,
    NbdExportUnreachable,
    NotHypervisor,
    UnmountFailed,
)

EXPORT_FILE = "export"
READY_TIMEOUT = 30.0
"""Seconds nbdfuse has to show the export before the presentation fails."""
POLL = 0.1
SECTOR = 512


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    except FileNotFoundError as exc:
        raise NotHypervisor(
            reason=f"{argv[0]} is not installed on this host, so a VM's disks cannot be "
            "mounted as file systems (install Debian's nbdfuse and util-linux)"
        ) from exc


def unavailable() -> str | None:
    """Why this host cannot mount a VM image's disks (None when it can)."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing on this host (load the fuse module: modprobe fuse)"
    for tool, package in (
        ("nbdfuse", "nbdfuse"),
        ("fusermount3", "fuse3"),
        ("losetup", "mount"),
        ("blkid", "util-linux"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} is missing on this host (install Debian's {package})"
    return None


def _source(uri: str, tls: Path | None) -> list[str]:
    """What nbdfuse reads: the plain export's URI, or for an ``nbds://`` one a ``qemu-nbd``
    it starts (socket activation) as the TLS client, trusting folder ``tls``'s
    ``ca-cert.pem`` (libnbd refuses a URI naming a local certificate folder)."""
    if tls is None:
        return [uri]
    parts = urlsplit(uri)
    if not parts.hostname or not parts.port:
        raise InvalidInput(detail=f"{uri!r} is not an nbds://HOST:PORT/EXPORT URI")
    opts = ",".join(
        [
            "driver=nbd",
            "server.type=inet",
            f"server.host={parts.hostname}",
            f"server.port={parts.port}",
            f"export={parts.path.lstrip('/')}",
            "tls-creds=tls0",
        ]
    )
    return [
        "[",
        "qemu-nbd",
        "--object",
        f"tls-creds-x509,id=tls0,dir={tls},endpoint=client",
        "--image-opts",
        opts,
        "]",
    ]


def _start_nbdfuse(folder: Path, uri: str, tls: Path | None = None) -> int:
    """Show export ``uri`` as ``folder/export`` (over TLS trusting folder ``tls``); returns
    nbdfuse's pid once it serves."""
    folder.mkdir(parents=True, exist_ok=True)
    pidfile = folder.parent / f"{folder.name}.pid"
    pidfile.unlink(missing_ok=True)
    log = folder.parent / f"{folder.name}.log"
    with open(log, "ab") as out:
        child = subprocess.Popen(
            ["nbdfuse", "-P", str(pidfile), str(folder / EXPORT_FILE), *_source(uri, tls)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # it outlives a request; unmounting the file ends it
        )
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if pidfile.exists() and pidfile.read_text().strip():
            pidfile.unlink(missing_ok=True)
            return child.pid
        if child.poll() is not None:
            said = log.read_text(errors="replace").strip().splitlines()
            raise NbdExportUnreachable(
                how="could not reach (nbdfuse)",
                reason=said[-1] if said else f"exit {child.returncode}",
            )
        time.sleep(POLL)
    child.kill()
    child.wait()
    raise NbdExportUnreachable(
        how="did not see (nbdfuse)", reason=f"not shown within {READY_TIMEOUT:g} s"
    )


def _loop(file: Path, offset: int, size: int) -> str:
    done = _run(
        [
            "losetup",
            "--find",
            "--show",
            "--offset",
            str(offset),
            "--sizelimit",
            str(size),
            str(file),
        ]
    )
    if done.returncode != 0:
        raise LoopDeviceUnavailable(reason=done.stderr.strip())
    return done.stdout.strip()


def _probe(device: str) -> dict[str, str]:
    """What ``blkid`` finds on ``device``: ``TYPE`` (a file system) or ``PTTYPE``."""
    done = _run(["blkid", "-p", "-o", "export", device])
    found = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        found[key.strip()] = value.strip()
    return found


def _first_partition(device: str) -> tuple[int, int] | None:
    """(start, size) in bytes of the first partition on ``device``; None without one."""
    done = _run(["partx", "--show", "--bytes", "-g", "-o", "NR,START,SECTORS", device])
    rows = []
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
    if not rows:
        return None
    _, start, sectors = min(rows)
    return start * SECTOR, sectors * SECTOR


def _detach_loop(device: str) -> None:
    _run(["losetup", "--detach", device])


def present_disks(
    *,
    image: str,
    uri: str,
    disks: list[dict[str, Any]],
    paths: list[str],
    folder: Path,
    recorded: Callable[[dict[str, Any]], None],
    tls: Path | None = None,
) -> list[dict[str, Any]]:
    """Mount disk *i* of the export ``uri`` at ``paths[i]`` (empty folders); ``recorded``
    is given the ``disks`` registry object after each step. Returns what each disk is
    (target, mount point, file system, partition). Raises leaving the record to undo."""
    if len(paths) != len(disks):
        raise InvalidInput(
            detail=f"{len(disks)} disk(s) need as many mount points, not {len(paths)}"
        )
    state: dict[str, Any] = {"dir": str(folder), "pid": None, "loops": [], "mounted": []}
    recorded(state)
    state["pid"] = _start_nbdfuse(folder, uri, tls)
    recorded(state)
    file = folder / EXPORT_FILE
    shown = []
    for disk, path in zip(disks, paths, strict=True):
        target, offset, size = str(disk["target"]), int(disk["offset"]), int(disk["size"])
        device = _loop(file, offset, size)
        state["loops"].append(device)
        recorded(state)
        found = _probe(device)
        partition = None
        if not found.get("TYPE") and found.get("PTTYPE"):
            first = _first_partition(device)
            if first is not None:
                start, length = first
                partition = 1
                inner = _loop(file, offset + start, min(length, size - start))
                state["loops"].append(inner)
                recorded(state)
                device, found = inner, _probe(inner)
        fstype = found.get("TYPE", "")
        if not fstype or found.get("USAGE", "filesystem") != "filesystem":
            what = (
                f"its first partition holds {fstype or 'nothing'}"
                if partition
                else (f"it holds {fstype or 'no file system and no partition table'}")
            )
            raise DiskHasNoFileSystem(disk=target, image=image, what=what)
        options = ["-o", "nouuid"] if fstype == "xfs" else []  # production may be mounted here
        done = _run(["mount", "-t", fstype, *options, device, path])
        if done.returncode != 0:
            raise DiskMountFailed(
                disk=target, image=image, fstype=fstype, path=path, reason=done.stderr.strip()
            )
        state["mounted"].append(path)
        recorded(state)
        shown.append({"target": target, "path": path, "type": fstype, "partition": partition})
    return shown


def _is_mount(path: str) -> bool:
    with contextlib.suppress(OSError):
        return os.path.ismount(path)
    return False


def detach_entry(entry: dict[str, Any]) -> None:
    """Take down the ``disks`` of a registry entry (see the module's docstring)."""
    state = entry.get("disks")
    if not isinstance(state, dict):
        return
    mounted = [str(p) for p in state.get("mounted") or [] if _is_mount(str(p))]
    for path in mounted:
        users = holders.holders(path)
        if users:
            raise CopyInUse(what="disk mounted", path=path, users="; ".join(str(h) for h in users))
    for path in mounted:
        done = _run(["umount", path])
        if done.returncode != 0 and _is_mount(path):
            raise UnmountFailed(what="disk mounted", path=path, reason=done.stderr.strip())
    for device in reversed([str(d) for d in state.get("loops") or []]):
        _detach_loop(device)
    folder = str(state.get("dir") or "")
    if folder:
        if _is_mount(folder):
            done = _run(["fusermount3", "-u", folder])
            if done.returncode != 0:
                _run(["umount", "-l", folder])
        pid = state.get("pid")
        if isinstance(pid, int) and pid > 0:
            _wait_gone(pid)
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    """nbdfuse exits once its file is unmounted; one that does not is ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped when this agent started it
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"nbdfuse" not in fh.read():
                    return  # exited (a zombie has no command line), or someone else's pid
        except OSError:
            return
        time.sleep(POLL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
