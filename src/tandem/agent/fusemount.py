"""File-tree images presented as writable virtual copies: FUSE below, a copy-on-write layer
above, nothing copied up front.

A presented tree is two mounts on the host:
- **lower**: a read-only FUSE file system (pyfuse3) showing the image's manifest
  (``storage.treeview``). ``ls`` and ``stat`` answer from the manifest; a read fetches only
  the chunks it overlaps from the appliance's pool through the presentation's read session
  (each chunk verified against its id), kept in a bounded in-memory cache. Presenting a
  100 GB tree costs what a 10 MB one does: fetching its manifest.
- **the copy**: the kernel's overlay file system at the mount point, with the FUSE mount as
  its lower directory and the layer's ``upper/`` as its upper one. Writes, renames, unlink,
  mkdir, chmod, truncate, symlinks, hard links and fsync are the kernel's: a file is copied
  up whole on its first change; a deletion leaves a whiteout. What PostgreSQL and ordinary
  applications need works at the speed of the host's own disk.

Why a child process per mount, supervised by the agent (not a thread of the agent): the
applications using a presented copy must not lose their files because the agent restarts
(an upgrade, a crash). The FUSE server runs in its own session (``start_new_session``) and
outlives the agent; the registry (``agent.mounts``, ``DIR/mounts.json``) records its pid and
layer, so the restarted agent unmounts and removes it exactly as before. A thread would
take the lower file system down with the agent and leave the overlay returning EIO. When
the agent starts and finds a copy's mounts gone (the host rebooted) or its server dead, it
starts a server and mounts the overlay again over the same layer (``reattach``): what was
written stays the copy's.

On-disk format of a layer, ``DIR/layers/IMAGE[_N]/`` (DIR is the agent's directory) for a
test failover or a mount; for a **failover** copy, which the app serves from, the layer is
``<the mount point's folder>/.tandem-layer-IMAGE[_N]/``, on the file system the operator
chose for the app's writes (``DIR/layers/IMAGE[_N]`` is then a symbolic link to it)::

    config.json   what the FUSE server needs (0600: it holds the read session's token):
                  {"manifest": HEX, "appliance": {url, fingerprint, token, session},
                   "lower": PATH, "stats": PATH, "cache_bytes": N}; replaced atomically
                  with a new session when the appliance restarts (``refresh``), which
                  the server picks up at its next fetch
    lower/        the FUSE mount point (read-only view of the image)
    upper/        the copy-on-write layer: overlayfs's upper directory. A path present here
                  is the copy's version of it (a whole file once changed, a directory
                  holding changed entries); a character device 0:0 is a whiteout (the path
                  was deleted); a directory with the xattr ``trusted.overlay.opaque=y``
                  replaces the image's directory of that name entirely (removed and made
                  again); a directory with ``trusted.overlay.redirect=PATH`` is the image's
                  directory PATH renamed (the overlay is mounted ``redirect_dir=on``, so an
                  app may rename a folder; ``metacopy=off``: a changed file is whole here).
                  Everything not here is the image's, unchanged.
    work/         overlayfs's work directory (its atomic copy-up and rename staging)
    stats.json    {"fetched": bytes fetched from the appliance, "fetches", "hits", "held"}
    fuse.log      the FUSE server's messages
    cut-XXXX/     while a capture reads a cut of the copy (``point_in_time``): the cut of
                  the upper directory mounted read-only over ``lower/``; the cut itself
                  (``.tandem-pit-…``, a snapshot or reflink clones) is beside ``upper/``

Invariants
- Durability: the upper layer is an ordinary directory on the agent's disk, written by the
  kernel; an fsync (or fdatasync, O_SYNC) acknowledged through the copy is an fsync of the
  upper file, so it survives a crash. A full disk under the layer gives ENOSPC to the
  writer and loses no write that was acknowledged before.
- The image never changes: the lower mount is read-only and serves verified chunks only;
  a chunk that cannot be fetched or verified fails that read with EIO, never wrong bytes.
- Withdrawing unmounts the copy first; while a process still has a file or its working
  directory in it, the unmount is refused (Conflict naming the processes) and nothing is
  removed, so nobody's open file disappears under them. Then the FUSE mount is unmounted
  (``fusermount3 -u``), its server ends, and the layer is removed.
- A catch-up syncback (the app writing) reads the copy at one instant: its upper directory
  cut by ``agent.pit`` (reflink clones of ``upper`` with writes held for the check, which
  keep whiteouts and ``trusted.overlay.*`` xattrs) and mounted over the image, never the
  live files; with no cut (ext4, tmpfs) the copy is read and re-checked,
  so a write during the read fails the capture rather than tearing it (``point_in_time``).
- Syncback and capture read the copy at its mount point: files never changed are reported
  with the image's own size, mtime, ctime and inode number (overlayfs with ``xino=off``
  shows a lower file's inode number), so a capture against the image's manifest reuses them
  without reading, and reads only what changed (``storage.tree``); ``changed_paths`` lists
  the layer's changes directly.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tandem.agent import holders, pit
from tandem.domain.consistency import ConsistencyMode, Cut
from tandem.errors import CopyInUse, FuseUnavailable, TandemError
from tandem.storage.manifest import TreeManifest, decode_manifest
from tandem.storage.treeview import DEFAULT_CACHE, ROOT_INODE, ChunkCache, Node, TreeView
from tandem.transport.chunks import RemoteChunkSource, SessionClient
from tandem.transport.client import ApiClient

LAYERS = "layers"
BESIDE_PREFIX = ".tandem-layer-"
"""A failover copy's layer: ``<the mount point's folder>/.tandem-layer-IMAGE``."""
READY_TIMEOUT = 60.0
EXIT_TIMEOUT = 10.0
TTL = 300.0  # seconds the kernel may cache entries and attributes: the image never changes
FORBIDDEN_IN_OPTION = (",", ":", "\\", "\n")

log = logging.getLogger("tandem.fusemount")


class SessionRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://")
    fingerprint: str
    token: str
    session: str = Field(pattern=r"^[0-9a-f]{1,64}$")


class LayerConfig(BaseModel):
    """``config.json`` of a layer: what its FUSE server reads at start."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(pattern=r"^[0-9a-f]{64}$")
    appliance: SessionRef
    lower: str
    stats: str
    cache_bytes: int = Field(default=DEFAULT_CACHE, ge=0)


# --- the FUSE server (runs in the child process) ---------------------------------------------


def _operations(view: TreeView) -> Any:
    """The pyfuse3 Operations over ``view`` (made here so only the child imports pyfuse3)."""
    import pyfuse3
    import trio

    def attrs(node: Node) -> pyfuse3.EntryAttributes:
        e = node.entry
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.generation = 0
        a.entry_timeout = TTL
        a.attr_timeout = TTL
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = e.uid
        a.st_gid = e.gid
        a.st_rdev = 0
        a.st_size = node.size
        a.st_blksize = 65536
        a.st_blocks = sum(n for d, n in e.chunks if d is not None) // 512 if e.chunks else 0
        a.st_atime_ns = e.mtime_ns
        a.st_mtime_ns = e.mtime_ns
        a.st_ctime_ns = e.ctime_ns or e.mtime_ns
        return a

    def found(inode: int) -> Node:
        node = view.node(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    class Ops(pyfuse3.Operations):  # type: ignore[misc]
        async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
            node = view.lookup(parent_inode, name)
            if node is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return attrs(node)

        async def getattr(self, inode: int, ctx: Any = None) -> Any:
            return attrs(found(inode))

        async def readlink(self, inode: int, ctx: Any) -> bytes:
            return found(inode).entry.target.encode("utf-8", "surrogateescape")

        async def opendir(self, inode: int, ctx: Any) -> int:
            if not found(inode).is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            for i, (name, node) in enumerate(view.listing(fh)):
                if i < start_id:
                    continue
                if not pyfuse3.readdir_reply(token, name, attrs(node), i + 1):
                    break

        async def releasedir(self, fh: int) -> None:
            return None

        async def open(self, inode: int, flags: int, ctx: Any) -> Any:
            node = found(inode)
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise pyfuse3.FUSEError(errno.EROFS)
            if node.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            try:
                data: bytes = await trio.to_thread.run_sync(view.read, fh, off, size)
            except Exception as exc:  # a chunk not fetched or not verified: never wrong bytes
                log.error("read of inode %d at %d failed: %r", fh, off, exc)
                raise pyfuse3.FUSEError(errno.EIO) from exc
            return data

        async def release(self, fh: int) -> None:
            return None

        async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
            raise pyfuse3.FUSEError(errno.ENODATA)

        async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
            return []

        async def statfs(self, ctx: Any) -> Any:
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = 65536
            total = sum(n.size for n in view.nodes.values())
            s.f_blocks = total // 65536 + 1
            s.f_bfree = s.f_bavail = 0
            s.f_files = len(view.nodes)
            s.f_ffree = s.f_favail = 0
            s.f_namemax = 255
            return s

    return Ops()


class _Stats:
    """Writes the cache's counters to ``stats.json`` (atomically) after each fetch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()

    def write(self, cache: ChunkCache) -> None:
        doc = {
            "fetched": cache.fetched,
            "fetches": cache.fetches,
            "hits": cache.hits,
            "held": cache.held,
        }
        with self.lock:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.path)


class _Reader:
    """The appliance's read session, as ``config.json`` names it now: when the agent writes
    a new session there (the appliance restarted and opened another, ``refresh``), the next
    fetch uses it."""

    def __init__(self, path: Path, cfg: LayerConfig) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.stamp = os.stat(path).st_mtime_ns
        self._open(cfg)

    def _open(self, cfg: LayerConfig) -> None:
        s = cfg.appliance
        self.client = ApiClient(s.url, s.token, s.fingerprint, what="appliance")
        self.session = s.session
        self.source = RemoteChunkSource(self.client, s.session)

    def _current(self) -> RemoteChunkSource:
        with self.lock:
            stamp = os.stat(self.path).st_mtime_ns
            if stamp != self.stamp:
                cfg = LayerConfig.model_validate_json(self.path.read_text())
                old = self.client
                self._open(cfg)
                self.stamp = stamp
                old.close()
                log.info("read session now %s", self.session)
            return self.source

    def manifest(self, mid: str) -> TreeManifest:
        source = self._current()
        blob = SessionClient(source.client, self.session).manifest(mid)
        manifest = decode_manifest(blob, bytes.fromhex(mid))
        if not isinstance(manifest, TreeManifest):
            raise TandemError(f"manifest {mid} is not a file-tree image")
        return manifest

    def get(self, digest: bytes) -> bytes:
        return self._current().get(digest)

    def close(self) -> None:
        self.client.close()


def serve(config_path: Path) -> None:
    """The FUSE server's main: mount the image at ``lower`` and serve until unmounted."""
    import pyfuse3
    import trio

    cfg = LayerConfig.model_validate_json(config_path.read_text())
    reader = _Reader(config_path, cfg)
    manifest = reader.manifest(cfg.manifest)
    stats = _Stats(Path(cfg.stats))
    cache = ChunkCache(reader.get, cfg.cache_bytes)
    view = TreeView(manifest, cache)
    original_get = cache.get

    def counted(digest: bytes) -> bytes:
        before = cache.fetches
        data = original_get(digest)
        if cache.fetches != before:
            stats.write(cache)
        return data

    cache.get = counted  # type: ignore[method-assign]
    stats.write(cache)
    _give_root_its_attributes(Path(cfg.lower).parent, view)
    options = set(pyfuse3.default_options)
    options |= {"fsname=tandem", "subtype=tandem", "ro", "allow_other"}
    pyfuse3.init(_operations(view), cfg.lower, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)
        reader.close()


def _give_root_its_attributes(layer: Path, view: TreeView) -> None:
    """The copy's root takes its mode and owner from the upper directory (overlayfs), so
    give the upper directory the image root's, once, before the first mount: a PostgreSQL
    data directory must stay 0700 and its owner's. Later changes made through the copy stay."""
    marker = layer / "root-set"
    if marker.exists():
        return
    root = view.nodes[ROOT_INODE].entry
    upper = layer / "upper"
    os.chown(upper, root.uid, root.gid)
    os.chmod(upper, root.mode & 0o7777)
    marker.touch()


# --- attach and detach (run in the agent) ------------------------------------------------------

_children: dict[int, subprocess.Popen[bytes]] = {}
_children_lock = threading.Lock()


def layers_dir(directory: Path) -> Path:
    return directory / LAYERS


def _beside(mount_point: str, name: str) -> Path:
    return Path(os.path.dirname(mount_point.rstrip("/")) or "/") / f"{BESIDE_PREFIX}{name}"


def _is_mount(path: str) -> bool:
    with contextlib.suppress(OSError):
        return os.path.ismount(path)
    return False


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def _tool_missing(tool: str, package: str) -> FuseUnavailable:
    return FuseUnavailable(
        reason=f"{tool} is not installed", fix=f"install Debian's {package} on the host"
    )


def _log_tail(layer: Path) -> str:
    with contextlib.suppress(OSError):
        lines = (layer / "fuse.log").read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""
    return ""


def unavailable() -> str | None:
    """Why this host cannot present a file tree through FUSE (then a presentation is a full
    copy, and the job says why), or None when it can: ``/dev/fuse``, ``fusermount3`` and
    pyfuse3 (the ``fuse`` extra, which builds against Debian's libfuse3-dev) are all here."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing on this host (load the fuse module: modprobe fuse)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing on this host (install Debian's fuse3)"
    if importlib.util.find_spec("pyfuse3") is None:
        return (
            "the agent lacks pyfuse3 (install libfuse3-dev and pkg-config, then the agent's "
            "`fuse` extra: pip install 'tandem[fuse]')"
        )
    return None


def unfit_beside(mount_point: str) -> str | None:
    """Why a failover copy's layer cannot go beside ``mount_point`` (the overlay's mount
    options cannot name its folder), or None."""
    folder = str(_beside(mount_point, "x").parent)
    if any(c in folder for c in FORBIDDEN_IN_OPTION):
        return (
            f"the folder {folder} has a ',', ':' or '\\' in its path, which the overlay's "
            "mount options cannot carry"
        )
    return None


def attach(
    directory: Path,
    name: str,
    manifest: str,
    appliance: dict[str, str],
    mount_point: str,
    *,
    cache_bytes: int = DEFAULT_CACHE,
    recorded: Callable[[dict[str, Any]], None] = lambda record: None,
    beside: bool = False,
) -> dict[str, Any]:
    """Present tree image ``manifest`` at ``mount_point`` (an empty folder): start its FUSE
    server on ``DIR/layers/NAME/lower`` and mount the overlay there. Returns the layer's
    registry record ``{"dir", "pid", "path"}``; on failure everything is taken down again.
    ``recorded(record)`` is called before the server starts and again once its pid is
    known, so an agent killed half-way has the layer in its registry and unmount finds it.

    ``beside`` (a failover copy, which the app serves from): the layer goes beside the
    mount point, ``<its folder>/.tandem-layer-NAME``, on the file system the operator chose
    for the app's writes: a catch-up syncback cuts it (``point_in_time``) as a capture cuts
    a tree on that file system. ``DIR/layers/NAME`` is then a symbolic link to it
    (``release_all``)."""
    if not os.path.exists("/dev/fuse"):
        raise FuseUnavailable(
            reason="/dev/fuse is missing", fix="load the fuse module (modprobe fuse)"
        )
    if shutil.which("fusermount3") is None:
        raise _tool_missing("fusermount3", "fuse3")
    link = layers_dir(directory) / name
    layer = _beside(mount_point, name) if beside else link
    if any(c in str(layer) for c in FORBIDDEN_IN_OPTION):
        raise FuseUnavailable(
            reason=f"the layer's folder {layer} has a ',', ':' or '\\' in its path, "
            "which the overlay mount options cannot carry",
            fix="move the agent to a plain path" if not beside else "choose another mount point",
        )
    _remove_layer(layer)  # a leftover of a crash before it was recorded
    if beside:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
    for sub in ("lower", "upper", "work"):
        (layer / sub).mkdir(parents=True, mode=0o700)
    os.chmod(layer, 0o700)
    os.chmod(layer / "upper", 0o755)
    if beside:
        link.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.symlink(layer, link)
    cfg = LayerConfig(
        manifest=manifest,
        appliance=SessionRef(**appliance),
        lower=str(layer / "lower"),
        stats=str(layer / "stats.json"),
        cache_bytes=cache_bytes,
    )
    fd = os.open(layer / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(cfg.model_dump_json())
    record: dict[str, Any] = {"dir": str(layer), "pid": 0, "path": mount_point}
    if beside:
        record["link"] = str(link)
    recorded(record)
    try:
        record["pid"] = _start_server(layer, name).pid
        recorded(record)
        _mount_overlay(layer, name, mount_point)
    except BaseException:
        with contextlib.suppress(Exception):
            detach(record, force=True)
        raise
    return record


def _start_server(layer: Path, name: str) -> subprocess.Popen[bytes]:
    """Start the FUSE server of ``layer`` and wait until its view is mounted."""
    with open(layer / "fuse.log", "ab") as logf:
        child = subprocess.Popen(
            [sys.executable, "-m", "tandem.agent.fusemount", str(layer / "config.json")],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives an agent restart (module docstring)
            close_fds=True,
        )
    with _children_lock:
        _children[child.pid] = child
    deadline = time.monotonic() + READY_TIMEOUT
    while not _is_mount(str(layer / "lower")):
        if child.poll() is not None:
            raise FuseUnavailable(
                reason=f"the FUSE server of {name} ended at start ({_log_tail(layer)})",
                fix=f"fix what {layer / 'fuse.log'} says",
            )
        if time.monotonic() > deadline:
            raise FuseUnavailable(
                reason=f"the FUSE server of {name} did not mount within {READY_TIMEOUT:.0f} s",
                fix=f"fix what {layer / 'fuse.log'} says",
            )
        time.sleep(0.02)
    return child


def _mount_overlay(layer: Path, name: str, mount_point: str) -> None:
    options = (
        f"lowerdir={layer / 'lower'},upperdir={layer / 'upper'},workdir={layer / 'work'},"
        "xino=off,redirect_dir=on,metacopy=off"
    )
    done = _run(["mount", "-t", "overlay", f"tandem-{name}", "-o", options, mount_point])
    if done.returncode != 0:
        raise FuseUnavailable(
            reason=f"mounting the copy-on-write layer at {mount_point} failed "
            f"({done.stderr.strip() or done.returncode})",
            fix="give the host's kernel overlayfs (modprobe overlay)",
        )


def _view_alive(lower: str) -> bool:
    """Whether the FUSE view at ``lower`` is mounted and answers (a dead server's does not:
    ENOTCONN)."""
    if not _is_mount(lower):
        return False
    try:
        os.stat(lower)
    except OSError:
        return False
    return True


def reattach(record: dict[str, Any]) -> dict[str, Any] | None:
    """At agent start: bring back a presented copy whose mounts are gone (the host
    rebooted) or whose FUSE server died, over the layer it had, so what was written stays
    the copy's. Returns the updated record (a new pid), or None when nothing was needed or
    the layer is gone. A copy whose overlay still stands on a dead view is replaced only
    when no process uses it (its open files cannot be carried over)."""
    layer = Path(str(record.get("dir", "")))
    path = str(record.get("path", ""))
    if not (layer / "config.json").is_file() or not (layer / "upper").is_dir():
        return None
    lower = str(layer / "lower")
    if _view_alive(lower) and _is_mount(path):
        return None
    if _is_mount(path):
        if holders.holders(path):
            log.warning("the copy at %s lost its FUSE server but is in use; unmount it", path)
            return None
        _run(["umount", "-l", path])
    if _is_mount(lower):
        _run(["fusermount3", "-u", "-z", lower])
    name = layer.name
    pid = int(record.get("pid") or 0)
    if pid > 0 and _is_our_server(pid, layer):
        _end_server(pid)
    _forget(pid)
    work = layer / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700)
    child = _start_server(layer, name)
    try:
        _mount_overlay(layer, name, path)
    except BaseException:
        _run(["fusermount3", "-u", "-z", lower])
        _end_server(child.pid)
        raise
    return {**record, "pid": child.pid}


def _unmount_copy(path: str, force: bool) -> None:
    if not _is_mount(path):
        return
    done = _run(["umount", path])
    if done.returncode == 0:
        return
    users = holders.holders(path)
    if force or not users:
        lazy = _run(["umount", "-l", path])
        if lazy.returncode == 0:
            return
    who = "; ".join(str(h) for h in users) or done.stderr.strip()
    raise CopyInUse(what="presented copy", path=path, users=who)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _end_server(pid: int) -> None:
    """Wait for the FUSE server ``pid`` to end (it does once unmounted); then insist."""
    with _children_lock:
        child = _children.pop(pid, None)
    deadline = time.monotonic() + EXIT_TIMEOUT
    for sig in (0, signal.SIGTERM, signal.SIGKILL):
        if sig:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        while time.monotonic() < deadline:
            if child is not None:
                if child.poll() is not None:
                    return
            elif not _alive(pid):
                return
            time.sleep(0.02)
        deadline = time.monotonic() + EXIT_TIMEOUT


def _forget(pid: int) -> None:
    """Reap a server this process started that has ended (a killed one is a zombie)."""
    with _children_lock:
        child = _children.pop(pid, None)
    if child is not None and child.poll() is None:
        with _children_lock:
            _children[pid] = child  # still running: keep it to reap later


def _is_our_server(pid: int, layer: Path) -> bool:
    """Whether ``pid`` is still the FUSE server of ``layer`` (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(layer / "config.json").encode() in cmdline


def detach(record: dict[str, Any], *, force: bool = False) -> None:
    """Take down one presented copy: unmount the overlay (refused while in use unless
    ``force``), unmount the FUSE view, end its server, remove the layer."""
    layer = Path(str(record["dir"]))
    _unmount_copy(str(record["path"]), force)
    lower = str(layer / "lower")
    if _is_mount(lower):
        done = _run(["fusermount3", "-u", lower])
        if done.returncode != 0:
            _run(["fusermount3", "-u", "-z", lower])
    pid = int(record.get("pid") or 0)
    if pid > 0 and _is_our_server(pid, layer):
        _end_server(pid)
    _forget(pid)
    _remove_layer(layer)
    if record.get("link"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(record["link"]))


def _remove_layer(layer: Path) -> None:
    """Remove a layer's folder, with what a cut left in it after a crash (a mounted view, a
    read-only btrfs snapshot)."""
    if not layer.is_dir() or layer.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            if layer.is_symlink():
                os.unlink(layer)
        return
    for leftover in layer.glob(pit.WORK_PREFIX + "*"):
        if leftover.is_dir() and os.lstat(leftover).st_ino == pit.BTRFS_SUBVOLUME_INO:
            _run(["btrfs", "subvolume", "delete", str(leftover)])
    for view in layer.glob("cut-*"):
        if _is_mount(str(view)):
            _run(["umount", "-l", str(view)])
    shutil.rmtree(layer, ignore_errors=True)


def refresh(record: dict[str, Any], appliance: dict[str, str]) -> bool:
    """Point the FUSE server of ``record`` at a new read session (the appliance restarted:
    its sessions are gone); written atomically, read by the server at its next fetch.
    False when the layer is gone."""
    path = Path(str(record["dir"])) / "config.json"
    try:
        cfg = LayerConfig.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return False
    cfg.appliance = SessionRef(**appliance)
    tmp = path.with_name("config.json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(cfg.model_dump_json())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return True


def detach_entry(entry: dict[str, Any]) -> None:
    """Take down every presented copy of a registry entry (``agent.mounts``); first checks
    that none is in use, so a refusal leaves all of them in place."""
    records = [r for r in entry.get("layers") or [] if isinstance(r, dict)]
    for record in records:
        path = str(record.get("path", ""))
        if _is_mount(path) and holders.holders(path):
            _unmount_copy(path, force=False)  # raises Conflict naming who holds it
    for record in records:
        detach(record)


def read_stats(record: dict[str, Any]) -> dict[str, Any]:
    """The FUSE server's counters (``stats.json``), or {} before it wrote them."""
    try:
        doc = json.loads((Path(str(record["dir"])) / "stats.json").read_text())
    except (OSError, ValueError, KeyError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _overlays_over(lower: str) -> list[str]:
    """Mount points of overlays whose lower directory is ``lower`` (``/proc/self/mountinfo``)."""
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields, source = left.split(), right.split()
            if len(fields) < 5 or len(source) < 3 or source[0] != "overlay":
                continue
            if f"lowerdir={lower}," in source[2] + ",":
                found.append(fields[4].replace("\\040", " "))
    return found


def _servers_of(config: Path) -> list[int]:
    """Pids of the FUSE servers started with ``config``."""
    pids = []
    wanted = str(config).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"tandem.agent.fusemount" in argv and wanted in argv:
                pids.append(int(proc.name))
    return pids


def release_all(directory: Path) -> list[str]:
    """Take down every presented copy of the agent in ``directory`` at once, in use or not
    (lazy unmounts), and end their FUSE servers: for decommissioning a host or ending a
    lab, when the agent does not run. The registry keeps its entries; unmounting them
    later through the agent removes the rest. Returns the mount points released."""
    released: list[str] = []
    root = layers_dir(directory)
    if not root.is_dir():
        return released
    for entry in sorted(p for p in root.iterdir() if p.is_dir()):
        layer = entry.resolve() if entry.is_symlink() else entry  # a failover copy's
        lower = str(layer / "lower")
        for point in _overlays_over(lower):
            if _run(["umount", "-l", point]).returncode == 0:
                released.append(point)
        if _is_mount(lower):
            _run(["fusermount3", "-u", "-z", lower])
        for pid in _servers_of(layer / "config.json"):
            _end_server(pid)
        _remove_layer(layer)
        _remove_layer(entry)
    with _children_lock:
        started = list(_children)
    for pid in started:
        _forget(pid)  # servers of this process that ended: reaped
    return released


# --- a point in time of a presented copy (a catch-up syncback while the app writes) ---------


def _mount_view(top: Path, lower: Path, view: Path) -> None:
    """Mount, read-only at ``view``, the copy as ``top`` (a cut of its upper directory)
    shows it over the image: overlayfs honours the whiteouts and opaque directories of a
    lower layer as of an upper one."""
    options = f"ro,lowerdir={top}:{lower},xino=off,redirect_dir=follow"
    name = f"tandem-cut-{view.parent.name}"
    done = _run(["mount", "-t", "overlay", name, "-o", options, str(view)])
    if done.returncode != 0:
        raise FuseUnavailable(
            reason=f"mounting the cut of the copy at {view} failed "
            f"({done.stderr.strip() or done.returncode})",
            fix="give the host's kernel overlayfs (modprobe overlay)",
        )


def _unmount_view(view: Path) -> None:
    if _is_mount(str(view)) and _run(["umount", str(view)]).returncode != 0:
        _run(["umount", "-l", str(view)])
    with contextlib.suppress(OSError):
        view.rmdir()


@contextlib.contextmanager
def point_in_time(record: dict[str, Any], mode: ConsistencyMode) -> Iterator[pit.PointInTime]:
    """What a capture of the presented copy ``record`` reads, under ``mode``: the copy at
    one instant, while the app may go on writing through it.

    Only the copy-on-write directory changes (the image below never does), so that is what
    is cut, by ``agent.pit`` as it cuts a tree that is not a subvolume (``auto``,
    ``snapshot``): on btrfs or XFS, reflink clones checked unchanged while writes to its
    file system are held for the instant of an lstat walk (whiteouts and
    ``trusted.overlay.*`` xattrs are cloned with the rest). The cut, mounted read-only over
    the FUSE view of the image, is the copy at that instant; a capture against the image
    reads only files the cut holds. Where the upper directory has no cut (``auto`` on ext4,
    the agent's own disk), the copy itself is read and re-checked, and a file that changed
    fails the capture (never a torn image); ``freeze`` holds writes to the upper
    directory's file system while the copy is read; ``none``/``hooks`` read the copy live.
    The cut is never kept for the
    next capture (``PointInTime.keep`` is ignored): its paths are not the copy's."""
    layer = Path(str(record["dir"]))
    path = str(record["path"])
    upper = layer / "upper"
    if mode in (ConsistencyMode.NONE, ConsistencyMode.HOOKS):
        with pit.point_in_time(path, "filesystem", mode) as cut:
            yield cut
        return
    if mode is ConsistencyMode.FREEZE:
        with pit.point_in_time(str(upper), "filesystem", mode) as cut:
            cut.path = path
            cut.reason = f"{cut.reason}: the copy's layer, read through the copy"
            yield cut
        return
    # Never a btrfs snapshot, which is no instant of what the app wrote: it holds what was
    # flushed at its commit, so an earlier write may be missing while a later one is in.
    with pit.point_in_time(str(upper), "filesystem", mode) as cut:
        try:
            if cut.cut is Cut.CRASH_UNSAFE:
                cut.path = path  # no cut of the layer: the copy, read and re-checked
                cut.reason = f"{cut.reason} (the copy's layer)"
                yield cut
                return
            top = Path(cut.path)
            view = layer / f"cut-{secrets.token_hex(4)}"
            view.mkdir(mode=0o700)
            try:
                _mount_view(top, layer / "lower", view)
                cut.path = str(view)
                cut.reason = f"{cut.reason} of the copy's layer, over the image"
                yield cut
            finally:
                _unmount_view(view)
        finally:
            cut.keep = None


# --- the layer, read as a list of changes ------------------------------------------------------


def changed_paths(upper: Path) -> tuple[list[str], list[str]]:
    """What the copy changed, from its layer alone: (paths written or made, paths deleted).
    A directory made opaque counts as written (its old content is gone). Proportional to
    the changes, not to the image."""
    written: list[str] = []
    deleted: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        base = upper / rel if rel else upper
        with os.scandir(base) as it:
            for item in it:
                path = f"{rel}/{item.name}" if rel else item.name
                st = item.stat(follow_symlinks=False)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    deleted.append(path)
                    continue
                written.append(path)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(path)
    return sorted(written), sorted(deleted)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tandem.agent.fusemount LAYER/config.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(Path(args[0]))
    except TandemError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
