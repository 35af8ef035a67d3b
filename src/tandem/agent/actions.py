"""Host-side actions of the agent: capture to, and diff-restore from, an appliance.

Invariants
- Data is chunked, hashed and compressed here, at the source; only chunks the appliance's
  session lacks cross the wire (``RemotePool``), and nothing becomes an image until the
  manifest is committed through the session.
- Each action reports progress as events (dicts) through ``emit``; the HTTP layer streams
  them as NDJSON. ``emit`` raises ``JobCanceled`` once the appliance has gone away, so an
  abandoned action stops at its next progress report instead of running to the end.
- Hooks (start/stop scripts) are not run here: ``tandem.agent.hooks`` runs them, by name,
  from the agent's ``scripts/`` folder only.
- Materializing an image (``materialize``) checks every mount point against SPEC §2's rules
  and fetches the manifest before the disk is touched; when it fails or is abandoned later,
  what it created is removed before the error is reported (``mounts`` holds the rules, the
  registry and the removal).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tandem.agent import diskmount, fusemount, holders, mounts, pg, pit, vm
from tandem.domain.consistency import CUTS, ConsistencyMode, Cut
from tandem.errors import (
    DataInUse,
    DiskMountUnavailable,
    ImageKindDiffers,
    InvalidInput,
    MountPointNeeded,
    SourceUnreadable,
    TandemError,
    TargetInvalid,
)
from tandem.storage import targets, tree, volume
from tandem.storage.manifest import (
    TreeManifest,
    VolumeManifest,
    decode_manifest,
    store_manifest,
)
from tandem.transport.agent_api import (
    ApplianceSession,
    CaptureRequest,
    MaterializeRequest,
    MountAction,
    RefreshRequest,
    RestoreRequest,
    TargetCheckRequest,
    UnmaterializeRequest,
    VmRestoreRequest,
)
from tandem.transport.chunks import RemoteChunkSource, RemotePool, SessionClient
from tandem.transport.client import ApiClient

Emit = Callable[[dict[str, Any]], None]


def check_target(req: TargetCheckRequest) -> dict[str, Any]:
    """What is at ``req.path``, seen through the no-follow walk (``storage.targets``):
    ``{"exists", "empty", "kind", "usable"}`` where ``usable`` says whether a new copy of a
    ``req.kind`` image may be written there (``check_new``'s rule). A symlink or a file among
    the parent folders raises ``TargetInvalid``. Touches nothing."""
    state = targets.inspect(req.path)
    return {**state.as_dict(), "usable": _new_target_problem(state, req.kind) is None}


def _new_target_problem(state: targets.TargetState, kind: str) -> str | None:
    if not state.exists:
        return None
    if kind == "volume":
        return "it exists; a new copy never overwrites"
    if state.kind == "symlink":
        return "it is a symbolic link, which is not followed; give the real folder's path"
    if state.kind != "folder":
        return "it exists and is not an empty folder"
    if not state.empty:
        return "the folder is not empty; a new copy never overwrites"
    return None


def check_new(path: str, kind: str) -> None:
    """A new copy's target (a clone, a failback to a new location) must be missing (a
    volume) or missing or an empty folder (a tree), with no symlink in its path; raises
    ``TargetInvalid`` saying which rule it breaks otherwise."""
    problem = _new_target_problem(targets.inspect(path), kind)
    if problem is not None:
        raise TargetInvalid(path=path, reason=problem)


def refresh_layers(req: RefreshRequest, registry: mounts.Registry) -> dict[str, Any]:
    """Give every FUSE copy of ``req.image`` the new read session; ``refreshed`` counts
    them (0: the image is not presented through FUSE here)."""
    entry = registry.read().get(req.image) or {}
    layers = [r for r in entry.get("layers") or [] if isinstance(r, dict)]
    done = sum(fusemount.refresh(r, req.appliance.model_dump()) for r in layers)
    return {"image": req.image, "refreshed": done}


def _client(s: ApplianceSession) -> ApiClient:
    return ApiClient(s.url, s.token, s.fingerprint, what="appliance")


def _progress(emit: Emit) -> Callable[[int, int], None]:
    """A storage progress callback that emits at most one event per percent."""
    last = [-1]

    def progress(done: int, total: int) -> None:
        step = max(1, total // 100)
        if done // step != last[0] or done == total:
            last[0] = done // step
            emit({"event": "progress", "done": done, "total": total})

    return progress


def _fetch_manifest(client: ApiClient, session: str, manifest: str) -> Any:
    blob = SessionClient(client, session).manifest(manifest)
    return decode_manifest(blob, bytes.fromhex(manifest))


def capture(req: CaptureRequest, emit: Emit) -> dict[str, Any]:
    """Capture the app's data into the appliance session from a point in time of it
    (``agent.pit``); returns the final event, which says how the image was cut."""
    if req.kind == "vm":
        return _capture_vm(req, emit)
    path = Path(req.path)
    if req.kind == "postgresql":
        return _capture_postgresql(req, path, emit)
    if req.kind == "filesystem" and not path.is_dir():
        raise SourceUnreadable(path=str(path), reason="it is not a directory")
    if req.kind == "volume" and not path.exists():
        raise SourceUnreadable(path=str(path), reason="it does not exist")
    unchanged = _unchanged_volume(req, path, emit)
    if unchanged is not None:
        return unchanged
    before = volume.stamp_of(path) if req.kind == "volume" else None
    mode = ConsistencyMode(req.consistency)
    with pit.point_in_time(str(path), req.kind, mode, base=req.base) as cut:
        emit({"event": "log", "text": f"capturing from {cut.cut.value}: {cut.reason}"})
        if cut.previous is not None:
            emit({"event": "log", "text": "changed files are read only where their extents "
                  "left the previous capture's cut, kept since"})  # fmt: skip
        done = _capture_from(req, path, cut, emit)
        # Kept for the next capture, whose base is this image (a tree's snapshot/clones).
        cut.keep = str(done["manifest"])
    after = volume.stamp_of(path) if req.kind == "volume" else None
    return {
        **done,
        **cut.as_dict(),
        # What the volume file looked like while it held this image (unchanged through the
        # capture, else the capture failed): a later restore may start from it.
        "stamp": after.as_dict() if after is not None and after == before else None,
    }


def _capture_postgresql(req: CaptureRequest, path: Path, emit: Emit) -> dict[str, Any]:
    """A base image of a PostgreSQL cluster: its data directory read between
    ``pg_backup_start`` and ``pg_backup_stop`` held on one session, from a point in time of
    it when the host has one. Live files are read without the after-read check: the WAL
    from the backup's start to its stop point repairs what changed meanwhile (as with
    ``pg_basebackup``); the answer carries the backup's stop point and ``backup_label``."""
    mode = ConsistencyMode(req.consistency)
    if mode is ConsistencyMode.HOOKS:
        mode = ConsistencyMode.NONE  # the appliance ran the freeze hook around this
    with pg.base_backup(str(path), f"tandem {req.job}") as backup:
        emit({"event": "log", "text": f"base backup started at {backup.start_lsn}"})
        with pit.point_in_time(str(path), "filesystem", mode) as cut:
            if cut.cut is Cut.CRASH_UNSAFE:
                cut.cut, cut.reason = Cut.BASE_BACKUP, f"base backup: {cut.reason}"
                cut.recheck = False
            emit({"event": "log", "text": f"capturing from {cut.cut.value}: {cut.reason}"})
            done = _capture_from(req, path, cut, emit, leave_out=pg.not_recovered)
    emit({"event": "log", "text": f"base backup stopped at {backup.stop_lsn}"})
    return {**done, **cut.as_dict(), "stamp": None, "pg": backup.as_dict()}


def _unchanged_volume(req: CaptureRequest, path: Path, emit: Emit) -> dict[str, Any] | None:
    """The capture of a volume file untouched since it held ``req.base``, without reading
    it: same device, inode, size, mtime and ctime as ``req.base_stamp`` (a stamp is taken
    only when the mtime is not racy, ``volume.stamp_of``), before and after committing the
    base's manifest again. None when that cannot be shown: the caller reads the file."""
    if req.kind != "volume" or not (req.base and req.base_stamp):
        return None
    try:
        stamp = volume.SourceStamp.from_dict(req.base_stamp)
    except (KeyError, TypeError, ValueError):
        return None
    if not volume.unchanged_since(path, stamp):
        return None
    base_id = bytes.fromhex(req.base)
    with _client(req.appliance) as client:
        base = _fetch_manifest(client, req.appliance.session, req.base)
        if not isinstance(base, VolumeManifest) or base.size != stamp.size:
            return None
        pool = RemotePool(client, req.appliance.session, [base_id])
        with pool.writer() as writer:
            mid = store_manifest(writer, base)
        sent = writer.bytes_sent
    if mid != base_id or not volume.unchanged_since(path, stamp):
        return None  # changed meanwhile: read it (what was committed stays unused)
    emit({"event": "progress", "done": base.size, "total": base.size})
    cut = base.meta.get("consistency")
    stats = volume.CaptureStats(
        bytes_total=base.size,
        chunks=len(base.chunks),
        chunks_zero=sum(1 for c in base.chunks if c is None),
    )
    return {
        "event": "done",
        "manifest": mid.hex(),
        "size": base.size,
        "bytes_sent": sent,
        "stats": stats.as_dict(),
        "consistency": cut if cut in CUTS else None,
        "consistency_reason": "unchanged since the previous capture (same inode, size, mtime "
        "and ctime): its image is taken again without reading the volume",
        "held_seconds": None,
        "stamp": stamp.as_dict(),
    }


def _capture_vm(req: CaptureRequest, emit: Emit) -> dict[str, Any]:
    """Capture the libvirt domain ``req.path`` (checkpoint + pull-mode backup, ``agent.vm``)."""
    with _client(req.appliance) as client:
        base_id = bytes.fromhex(req.base) if req.base else None
        base = _fetch_manifest(client, req.appliance.session, req.base) if req.base else None
        if not isinstance(base, VolumeManifest):
            base, base_id = None, None
        pool = RemotePool(client, req.appliance.session, [base_id] if base_id else [])
        emit({"event": "progress", "done": 0, "total": 0})
        done = vm.capture(req.path, req.job, base, pool, base_id, emit, _progress(emit))
        sent = pool.last_writer.bytes_sent if pool.last_writer else 0
    return {"event": "done", **done, "bytes_sent": sent, "stamp": None}


def _capture_from(
    req: CaptureRequest,
    path: Path,
    cut: pit.PointInTime,
    emit: Emit,
    leave_out: Callable[[str], bool] | None = None,
) -> dict[str, Any]:
    """Capture ``cut`` (``path`` itself, or a point in time of it) as ``path``'s image;
    a tree without the paths ``leave_out`` names (``tree.capture_tree``)."""
    source = Path(cut.path)
    meta = {"source": str(path), "host": os.uname().nodename, "consistency": cut.cut.value}
    with _client(req.appliance) as client:
        base_id = bytes.fromhex(req.base) if req.base else None
        base = _fetch_manifest(client, req.appliance.session, req.base) if req.base else None
        pool = RemotePool(client, req.appliance.session, [base_id] if base_id else [])
        progress = _progress(emit)
        emit({"event": "progress", "done": 0, "total": 0})
        if req.kind == "volume":
            if not isinstance(base, VolumeManifest):
                base, base_id = None, None
            mid, manifest, stats = volume.capture_volume(
                pool,  # type: ignore[arg-type]  # RemotePool has the ChunkPool writer interface
                source,
                base=base,
                base_id=base_id,
                meta=meta,
                progress=progress,
            )
            size = manifest.size
        else:
            if not isinstance(base, TreeManifest):
                base, base_id = None, None
            mid, tree_manifest, stats = tree.capture_tree(
                pool,  # type: ignore[arg-type]  # RemotePool has the ChunkPool writer interface
                source,
                base=base,
                base_id=base_id,
                meta=meta,
                progress=progress,
                recheck=cut.recheck,
                identity=cut.identity,
                torn_ok=cut.cut is Cut.BASE_BACKUP,
                previous=cut.previous if base is not None else None,
                leave_out=leave_out,
            )
            size = tree_manifest.size
        sent = pool.last_writer.bytes_sent if pool.last_writer else 0
    return {
        "event": "done",
        "manifest": mid.hex(),
        "size": size,
        "bytes_sent": sent,
        "stats": stats.as_dict(),
    }


def _check_not_in_use(path: str) -> None:
    """Refuse to write data in place while a process holds it (SPEC §4.4)."""
    found = holders.holders(path)
    mounted = holders.mounted_at(path)
    if not found and not mounted:
        return
    what = "; ".join([str(h) for h in found] + [f"it is mounted at {m}" for m in mounted])
    raise DataInUse(path=path, users=what)


def restore(req: RestoreRequest, emit: Emit) -> dict[str, Any]:
    """Diff-restore the image onto the app's path from the appliance session."""
    if req.new_only:
        check_new(req.path, req.kind)
    else:
        _check_not_in_use(req.path)
    sealed, base = None, None
    with _client(req.appliance) as client:
        manifest = _fetch_manifest(client, req.appliance.session, req.manifest)
        source = RemoteChunkSource(client, req.appliance.session)
        progress = _progress(emit)
        emit({"event": "progress", "done": 0, "total": manifest.size})
        if isinstance(manifest, VolumeManifest):
            if req.kind != "volume":
                raise ImageKindDiffers(
                    image=f"with manifest {req.manifest}",
                    have="a volume image",
                    how="be restored onto a directory",
                    fix="Restore it onto a volume app's block device or file",
                )
            base = _known_base(client, req)
            stats = volume.restore_volume(source, manifest, req.path, base=base, progress=progress)
            sealed = volume.seal(req.path)
        else:
            if req.kind != "filesystem":
                raise ImageKindDiffers(
                    image=f"with manifest {req.manifest}",
                    have="a file-tree image",
                    how="be restored onto a volume",
                    fix="Restore it onto a file-system app's folder",
                )
            stats = tree.restore_tree(source, manifest, req.path, progress=progress)
    return {
        "event": "done",
        "size": manifest.size,
        "bytes_received": source.bytes_received,
        "stats": stats.as_dict(),
        "from_base": req.base if base is not None else None,
        "stamp": sealed.as_dict() if sealed is not None else None,
    }


def restore_vm(req: VmRestoreRequest, emit: Emit) -> dict[str, Any]:
    """Restore the VM image onto the domain from the appliance session (``agent.vm``)."""
    with _client(req.appliance) as client:
        manifest = _fetch_manifest(client, req.appliance.session, req.manifest)
        if not isinstance(manifest, VolumeManifest):
            raise ImageKindDiffers(
                image=req.image,
                have="a file-tree image",
                how="be restored onto a VM",
                fix="Restore an image of a vm app (`tandem images APP`)",
            )
        source = RemoteChunkSource(client, req.appliance.session)
        emit({"event": "progress", "done": 0, "total": manifest.size})
        done = vm.restore(
            req.domain,
            req.image,
            manifest,
            source,
            emit,
            _progress(emit),
            power_on=req.power_on,
            shutdown_timeout=req.shutdown_timeout,
            definition=req.definition,
        )
    return {**done, "bytes_received": source.bytes_received}


def _known_base(client: ApiClient, req: RestoreRequest) -> VolumeManifest | None:
    """The image the target volume still holds, when its stamp says it is untouched."""
    if not (req.base and req.stamp) or req.new_only:
        return None
    try:
        stamp = volume.SourceStamp.from_dict(req.stamp)
    except (KeyError, TypeError, ValueError):
        return None
    if not volume.unchanged_since(req.path, stamp):
        return None  # written since (or another file): compare the whole target
    base = _fetch_manifest(client, req.appliance.session, req.base)
    return base if isinstance(base, VolumeManifest) else None


def _mount_base(req: MaterializeRequest) -> str | None:
    """The (clean) mount point the action names; None for map-only. Touches nothing."""
    if req.action is MountAction.MAP_ONLY:
        if req.kind != "volume":
            raise ImageKindDiffers(
                image=req.image,
                have="a file-system image",
                how="be presented map-only (a volume without mounting a file system)",
                fix="Use the keep-source-path or specify action",
            )
        return None
    if req.action is MountAction.SPECIFY:
        if not req.mount_point:
            raise MountPointNeeded(what="the specify action")
        return mounts.clean_path(req.mount_point, "mount point")
    if not req.source_path:
        raise InvalidInput(detail="keep-source-path needs the application's source path")
    return mounts.clean_path(req.source_path, "source path")


def _sum_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total


def materialize(req: MaterializeRequest, registry: mounts.Registry, emit: Emit) -> dict[str, Any]:
    """Write the image at its mount point(s) under SPEC §2's rules; returns the final event.

    A file-tree image becomes the content of each mount point; a volume image is written to
    ``<mount point>/volume.img``. With ``volumes`` N > 1, each of ``PATH_1`` … ``PATH_N``
    receives the image. map-only records the image and writes nothing.
    """
    entry: dict[str, Any] = {
        "image": req.image,
        "kind": req.kind,
        "action": req.action.value,
        "manifest": req.manifest,
        "paths": [],
        "files": [],
        "created": [],
        "kept": {},
        "state": mounts.MATERIALIZING,
        "time": mounts.now(),
    }
    base = _mount_base(req)
    if base is None:
        registry.begin(entry)
        registry.finish(req.image, state=mounts.READY)
        return {
            "event": "done",
            "image": req.image,
            "paths": [],
            "files": [],
            "size": 0,
            "bytes_sent": 0,
            "stats": {},
        }
    if req.presentation == "disks":
        return _present_disks(req, registry, base, entry)
    specify = req.action is MountAction.SPECIFY
    targets = [
        mounts.check_target(path, make_parents=specify)
        for path in mounts.mount_points(base, req.volumes)
    ]
    if req.appliance is None:
        raise InvalidInput(detail=f"the {req.action.value} action needs the appliance session")
    paths = [t.path for t in targets]
    volume_image = req.kind == "volume"
    files = [os.path.join(p, mounts.VOLUME_FILE) for p in paths] if volume_image else []
    with _client(req.appliance) as client:
        manifest = _fetch_manifest(client, req.appliance.session, req.manifest)
        if isinstance(manifest, VolumeManifest) != volume_image:
            what = "a volume" if isinstance(manifest, VolumeManifest) else "a file-tree"
            raise ImageKindDiffers(
                image=f"with manifest {req.manifest}",
                have=f"{what} image",
                how=f"be presented as {req.kind}",
                fix="Send the image's own kind",
            )
        entry.update(paths=paths, files=files, kept={t.path: t.owner for t in targets if t.existed})
        registry.begin(entry)
        try:
            created: list[str] = []

            def recorded() -> None:
                registry.update(req.image, created=created)

            fuse = req.presentation == "fuse" and not volume_image
            if fuse and (missing := fusemount.unavailable()) is not None:
                emit({"event": "log", "text": f"a full copy, not a virtual one: {missing}"})
                fuse = False
            for target in targets:
                if target.existed:
                    continue
                if volume_image or fuse:  # a FUSE copy is mounted over a plain folder
                    mounts.make_dirs(target.path, created, recorded)
                else:  # on btrfs a subvolume: the copy can be cut from a snapshot
                    mounts.make_tree_root(target.path, created, recorded)
            if fuse:
                return _present_fuse(req, registry, paths, manifest.size, emit)
            if req.recovering and isinstance(manifest, TreeManifest):
                manifest = pg.for_recovery(manifest)
            source = RemoteChunkSource(client, req.appliance.session)
            progress = _progress(emit)
            total = manifest.size * len(paths)
            emit({"event": "progress", "done": 0, "total": total})
            parts = []
            for i, path in enumerate(paths):
                mounts.check_empty_folder(path)
                offset = i * manifest.size

                def step(done: int, _: int, offset: int = offset) -> None:
                    progress(offset + done, total)

                if isinstance(manifest, VolumeManifest):
                    stats = volume.restore_volume(source, manifest, files[i], progress=step)
                else:
                    # PostgreSQL flushes every file of a base backup it recovers before
                    # replaying (SyncDataDirectory): syncfs would flush it (and whatever
                    # else the file system holds dirty) once more, first.
                    stats = tree.restore_tree(
                        source, manifest, path, progress=step, sync=not req.recovering
                    )
                parts.append(stats.as_dict())
            registry.finish(req.image, state=mounts.READY, time=mounts.now())
        except BaseException as exc:
            _undo(registry, req.image, exc)
            raise
    return {
        "event": "done",
        "image": req.image,
        "paths": paths,
        "files": files,
        "size": manifest.size,
        "bytes_sent": source.bytes_received,
        "stats": _sum_stats(parts),
    }


def _present_disks(
    req: MaterializeRequest, registry: mounts.Registry, base: str, entry: dict[str, Any]
) -> dict[str, Any]:
    """Mount the file system of each disk of a VM image's export at its own mount point
    (``PATH`` for one disk, ``PATH_1`` … for several; ``agent.diskmount``)."""
    if not req.nbd_uri or not req.disks:
        raise InvalidInput(detail="the disks presentation needs the export (nbd_uri) and disks")
    if (missing := diskmount.unavailable()) is not None:
        raise DiskMountUnavailable(reason=missing)
    tls = None
    if req.nbd_uri.startswith("nbds://"):
        if req.nbd_ca is None or req.nbd_fingerprint is None:
            raise InvalidInput(detail="an nbds:// export comes with nbd_ca and nbd_fingerprint")
        tls = vm.trust_appliance(vm.tls_folder(registry.directory), req.nbd_ca, req.nbd_fingerprint)
    targets = [
        mounts.check_target(path, make_parents=True)
        for path in mounts.mount_points(base, len(req.disks))
    ]
    paths = [t.path for t in targets]
    entry.update(paths=paths, kept={t.path: t.owner for t in targets if t.existed})
    registry.begin(entry)
    try:
        created: list[str] = []

        def recorded() -> None:
            registry.update(req.image, created=created)

        for target in targets:
            if not target.existed:
                mounts.make_dirs(target.path, created, recorded)
            mounts.check_empty_folder(target.path)
        shown = diskmount.present_disks(
            image=req.image,
            uri=req.nbd_uri,
            disks=req.disks,
            paths=paths,
            folder=registry.directory / "disks" / req.image,
            recorded=lambda state: registry.update(req.image, disks=state),
            tls=tls,
        )
        registry.finish(req.image, state=mounts.READY, time=mounts.now())
    except BaseException as exc:
        _undo(registry, req.image, exc)
        raise
    return {
        "event": "done",
        "image": req.image,
        "paths": paths,
        "files": [],
        "disks": shown,
        "size": sum(int(d["size"]) for d in req.disks),
        "bytes_sent": 0,
        "stats": {},
    }


def _present_fuse(
    req: MaterializeRequest,
    registry: mounts.Registry,
    paths: list[str],
    size: int,
    emit: Emit,
) -> dict[str, Any]:
    """Present the tree at each of ``paths`` as a virtual copy (``agent.fusemount``); each
    layer is recorded as soon as it exists, so unmount finds it after a crash too."""
    assert req.appliance is not None
    emit({"event": "progress", "done": 0, "total": len(paths)})
    layers: list[dict[str, Any]] = []
    for i, path in enumerate(paths):
        mounts.check_empty_folder(path)
        name = req.image if len(paths) == 1 else f"{req.image}_{i + 1}"

        def recorded(record: dict[str, Any]) -> None:
            # ``layers`` holds the copies made before this one (appended once it is up).
            registry.update(req.image, layers=[*layers, record], presentation="fuse")

        layers.append(
            fusemount.attach(
                registry.directory,
                name,
                req.manifest,
                req.appliance.model_dump(),
                path,
                recorded=recorded,
            )
        )
        emit({"event": "progress", "done": i + 1, "total": len(paths)})
    registry.finish(req.image, state=mounts.READY, time=mounts.now())
    fetched = sum(int(fusemount.read_stats(r).get("fetched") or 0) for r in layers)
    return {
        "event": "done",
        "image": req.image,
        "paths": paths,
        "files": [],
        "size": size,
        "bytes_sent": fetched,
        "presentation": "fuse",
        "layers": [r["dir"] for r in layers],
        "stats": {},
    }


def _undo(registry: mounts.Registry, image: str, exc: BaseException) -> None:
    """Remove what a failed materialization created; if that fails too, say so."""
    try:
        registry.abandon(image)
    except Exception as cleanup:
        why = cleanup.message if isinstance(cleanup, TandemError) else repr(cleanup)
        first = exc.message if isinstance(exc, TandemError) else repr(exc)
        cls = type(exc) if isinstance(exc, TandemError) else TandemError
        raise cls(
            f"{first}; removing what the materialization had created failed too ({why}). "
            f"Unmount image {image} to finish the clean-up"
        ) from exc


def unmaterialize(req: UnmaterializeRequest, registry: mounts.Registry) -> dict[str, Any]:
    """Remove exactly what ``req.image``'s materialization created; forget it. A PostgreSQL
    started on the copy (a recovered database) is stopped first."""
    entry = registry.read().get(req.image) or {}
    for path in entry.get("paths", []):
        pg.stop_copy(str(path))
    return registry.remove(req.image)
