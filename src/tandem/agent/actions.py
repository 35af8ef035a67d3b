"""Host-side actions of the agent: capture to, and diff-restore from, an appliance.

Invariants
- Data is chunked, hashed and compressed here, at the source; only chunks the appliance's
  session lacks cross the wire (``RemotePool``), and nothing becomes an image until the
  manifest is committed through the session.
- Each action reports progress as events (dicts) through ``emit``; the HTTP layer streams
  them as NDJSON. ``emit`` raises ``JobCanceled`` once the appliance has gone away, so an
  abandoned action stops at its next progress report instead of running to the end.
- Start/stop commands run through ``/bin/sh`` in a session of their own, with a timeout; the
  agent reports the exit status and the tail of the output, the appliance decides.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tandem.errors import InvalidInput, SourceUnreadable, TandemError
from tandem.storage import tree, volume
from tandem.storage.manifest import TreeManifest, VolumeManifest, decode_manifest
from tandem.transport.chunks import RemoteChunkSource, RemotePool
from tandem.transport.client import ApiClient

Emit = Callable[[dict[str, Any]], None]

HEX_DIGEST = r"^[0-9a-f]{64}$"
OUTPUT_TAIL = 4000


class ApplianceSession(BaseModel):
    """How the agent reaches the job's session on the appliance."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(pattern=r"^https?://")
    fingerprint: str
    token: str
    session: str = Field(pattern=r"^[0-9a-f]{1,64}$")


class CaptureRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(pattern="^(filesystem|volume)$")
    path: str = Field(pattern=r"^/[^\x00]*$")
    appliance: ApplianceSession
    base: str | None = Field(default=None, pattern=HEX_DIGEST)
    """Manifest id of the previous image, for an incremental capture."""
    job: str = ""


class RestoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(pattern="^(filesystem|volume)$")
    path: str = Field(pattern=r"^/[^\x00]*$")
    manifest: str = Field(pattern=HEX_DIGEST)
    appliance: ApplianceSession
    job: str = ""


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command: str = Field(min_length=1, max_length=65536, pattern=r"^[^\x00]*$")
    timeout: float = Field(default=600.0, gt=0, le=86400)


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
    blob = client.request("GET", f"/api/v1/sessions/{session}/manifests/{manifest}", raw=True)
    return decode_manifest(blob, bytes.fromhex(manifest))


def capture(req: CaptureRequest, emit: Emit) -> dict[str, Any]:
    """Capture the app's data into the appliance session; returns the final event."""
    path = Path(req.path)
    meta = {"source": str(path), "host": os.uname().nodename}
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
                path,
                base=base,
                base_id=base_id,
                meta=meta,
                progress=progress,
            )
            size = manifest.size
        else:
            if not path.is_dir():
                raise SourceUnreadable(path=str(path), reason="it is not a directory")
            if not isinstance(base, TreeManifest):
                base, base_id = None, None
            mid, tree_manifest, stats = tree.capture_tree(
                pool,  # type: ignore[arg-type]  # RemotePool has the ChunkPool writer interface
                path,
                base=base,
                base_id=base_id,
                meta=meta,
                progress=progress,
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


def restore(req: RestoreRequest, emit: Emit) -> dict[str, Any]:
    """Diff-restore the image onto the app's path from the appliance session."""
    with _client(req.appliance) as client:
        manifest = _fetch_manifest(client, req.appliance.session, req.manifest)
        source = RemoteChunkSource(client, req.appliance.session)
        progress = _progress(emit)
        emit({"event": "progress", "done": 0, "total": manifest.size})
        if isinstance(manifest, VolumeManifest):
            if req.kind != "volume":
                raise InvalidInput(detail="a volume image cannot be restored onto a directory")
            stats = volume.restore_volume(source, manifest, req.path, progress=progress)
        else:
            if req.kind != "filesystem":
                raise InvalidInput(detail="a file-tree image cannot be restored onto a volume")
            stats = tree.restore_tree(source, manifest, req.path, progress=progress)
    return {
        "event": "done",
        "size": manifest.size,
        "bytes_received": source.bytes_received,
        "stats": stats.as_dict(),
    }


def run_command(req: RunRequest) -> dict[str, Any]:
    """Run an app's start/stop command through the shell; returns its exit and output."""
    if not req.command.strip():
        raise InvalidInput(detail="the command is empty")
    try:
        proc = subprocess.run(
            req.command,
            shell=True,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=req.timeout,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise TandemError(
            f"the command {shlex.quote(req.command)} did not finish within {req.timeout:.0f} s; "
            "make it finish sooner or raise its timeout"
        ) from exc
    except OSError as exc:
        raise TandemError(f"the command {shlex.quote(req.command)} could not run: {exc}") from exc
    return {
        "returncode": proc.returncode,
        "stdout": proc.stdout[-OUTPUT_TAIL:],
        "stderr": proc.stderr[-OUTPUT_TAIL:],
    }
