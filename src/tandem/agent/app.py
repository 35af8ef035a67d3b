"""The host agent's HTTP API (FastAPI). Routes are thin: parse, call an action, stream.

Invariants
- Every route but ``/health`` needs the agent's bearer token (made at ``init``, stored
  hashed in DIR/config.json).
- ``/api/v1/capture`` and ``/api/v1/restore`` answer 200 at once and then stream NDJSON
  events (``progress``..., then one ``done`` or ``error``). The action runs in a thread of
  its own; when the appliance disconnects, the action is told to stop (its next ``emit``
  raises) rather than carrying on for nobody.
- ``/api/v1/materialize`` streams the same way; ``/api/v1/unmaterialize``,
  ``/api/v1/layers/refresh`` (a new read session for an image's FUSE copies) and
  ``/api/v1/mounts`` answer JSON, as does ``/api/v1/target/check`` (what is at a path where
  a new copy would be written; see ``actions.check_target``). Materializations are recorded
  in DIR/mounts.json (see ``tandem.agent.mounts``), so an app made without its directory
  cannot materialize.
- ``/api/v1/vms`` lists the libvirt domains of a hypervisor host, ``/api/v1/vms/resources``
  its storage pools and networks; ``/api/v1/vms/define`` and ``/api/v1/vms/remove`` define a
  new VM over an appliance's NBD export and remove it (``tandem.agent.vm``);
  ``/api/v1/vms/define-empty`` defines a powered-off one on new, empty pool volumes (a
  failback ``--target new`` writes the image into them);
  ``/api/v1/vms/define-copy`` streams the copy of its disks into a pool, then defines it;
  ``/api/v1/vms/restore`` restores a VM image onto a domain in place, ``/api/v1/vms/power``
  starts or stops one.
  ``/api/v1/info`` says whether the host is a hypervisor; an agent without libvirt serves
  everything else.
- ``/api/v1/run`` runs a hook script, by name, from DIR/scripts only (``tandem.agent.hooks``);
  ``init`` creates that folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.responses import StreamingResponse

from tandem import __version__
from tandem.agent import actions, hooks, mounts, pg, pit, vm
from tandem.errors import (
    AgentWithoutDirectory,
    JobCanceled,
    NotPresentedHere,
    TandemError,
    Unauthorized,
)
from tandem.transport.agent_api import (
    CaptureRequest,
    DefineRequest,
    EmptyDomainRequest,
    KeptRequest,
    MaterializeRequest,
    PgRunRequest,
    PowerRequest,
    ProbeRequest,
    RecoverRequest,
    RefreshRequest,
    RemoveRequest,
    RestoreRequest,
    RunRequest,
    SpoolRequest,
    StreamRequest,
    TakeOverRequest,
    TargetCheckRequest,
    UnmaterializeRequest,
    VmRestoreRequest,
    WalAck,
    WalRead,
    WantedRequest,
)
from tandem.transport.server import (
    DaemonConfig,
    init_daemon_dir,
    install_error_handlers,
    load_daemon_dir,
    lock_daemon_dir,
    serve,
    token_matches,
)

KIND = "agent"


def _stream(job: str, work: Callable[[actions.Emit], dict[str, Any]]) -> StreamingResponse:
    """Run ``work`` in a thread and stream its events as NDJSON; errors become an event.

    Each event is handed to the event loop as it is emitted (no polling), so the appliance
    learns of the end of a short action at once."""
    gone = threading.Event()

    async def body() -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def put(event: dict[str, Any] | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(events.put_nowait, event)

        def emit(event: dict[str, Any]) -> None:
            if gone.is_set():
                raise JobCanceled(job=job or "(unnamed)")
            put(event)

        def run() -> None:
            try:
                put(work(emit))
            except TandemError as exc:
                put({"event": "error", "error": exc.code, "message": exc.message})
            except Exception as exc:  # reported to the appliance, which fails the job
                put({"event": "error", "error": "TandemError", "message": f"agent: {exc!r}"})
            finally:
                put(None)

        # Started here, not before: if the response is never sent, no work is done.
        threading.Thread(target=run, name=f"agent-{job or 'action'}", daemon=True).start()
        try:
            while True:
                event = await events.get()
                if event is None:
                    return
                yield (json.dumps(event) + "\n").encode()
        finally:
            # Reached on completion and when the appliance disconnects (the generator is
            # closed); in the second case the action still runs and must stop.
            gone.set()

    return StreamingResponse(body(), media_type="application/x-ndjson")


def create_app(cfg: DaemonConfig, directory: Path | None = None) -> FastAPI:
    """The agent's API; ``directory`` (the agent's DIR) holds the mount registry."""
    app = FastAPI(title=f"tandem agent {cfg.name}", version=__version__)
    install_error_handlers(app)
    registry = mounts.Registry(directory) if directory is not None else None
    if registry is not None:
        # FUSE copies whose mounts a reboot (or a dead server) took away come back.
        threading.Thread(target=registry.reattach_layers, name="reattach", daemon=True).start()
    scripts = directory / hooks.SCRIPTS if directory is not None else None
    receivers = pg.Receivers(directory) if directory is not None else None
    rolling: set[str] = set()
    """Paths a restore just wrote a PostgreSQL base backup to, to be recovered in place."""
    app.state.receivers = receivers

    def wal_receivers() -> pg.Receivers:
        if receivers is None:
            raise AgentWithoutDirectory(what="WAL is received")
        return receivers

    def mount_registry() -> mounts.Registry:
        if registry is None:
            raise AgentWithoutDirectory(what="mounts.json is kept")
        return registry

    def auth(authorization: Annotated[str | None, Header()] = None) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(
                "No agent token was sent. Pass the token `tandem agent init` printed."
            )
        if not token_matches(token, cfg.token_hash):
            raise Unauthorized(
                "The agent token is wrong. Pass the token `tandem agent init` printed."
            )

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "kind": KIND, "name": cfg.name, "version": __version__}

    @app.get("/api/v1/info", dependencies=[Depends(auth)])
    def info() -> dict[str, Any]:
        return {
            "name": cfg.name,
            "hostname": os.uname().nodename,
            "version": __version__,
            **vm.hypervisor(),
        }

    @app.get("/api/v1/vms", dependencies=[Depends(auth)])
    def vms() -> dict[str, Any]:
        return {"domains": vm.list_domains()}

    @app.get("/api/v1/vms/resources", dependencies=[Depends(auth)])
    def vm_resources() -> dict[str, Any]:
        return vm.resources()

    @app.post("/api/v1/vms/define", dependencies=[Depends(auth)])
    def define_vm(req: DefineRequest) -> dict[str, Any]:
        return vm.define(req, directory)

    @app.post("/api/v1/vms/define-copy", dependencies=[Depends(auth)])
    def define_vm_copy(req: DefineRequest) -> StreamingResponse:
        def work(emit: actions.Emit) -> dict[str, Any]:
            return {"event": "done", **vm.define_copy(req, emit, directory)}

        return _stream(req.name, work)

    @app.post("/api/v1/vms/define-empty", dependencies=[Depends(auth)])
    def define_empty_vm(req: EmptyDomainRequest) -> dict[str, Any]:
        return vm.define_empty(req)

    @app.post("/api/v1/vms/remove", dependencies=[Depends(auth)])
    def remove_vm(req: RemoveRequest) -> dict[str, Any]:
        return vm.remove(req.name)

    @app.post("/api/v1/vms/take-over", dependencies=[Depends(auth)])
    def take_over_vm(req: TakeOverRequest) -> dict[str, Any]:
        return vm.take_over(req, directory)

    @app.post("/api/v1/vms/give-back", dependencies=[Depends(auth)])
    def give_back_vm(req: RemoveRequest) -> dict[str, Any]:
        return vm.give_back(req.name)

    @app.post("/api/v1/capture", dependencies=[Depends(auth)])
    def capture(req: CaptureRequest) -> StreamingResponse:
        return _stream(req.job, lambda emit: actions.capture(req, emit, registry))

    @app.post("/api/v1/restore", dependencies=[Depends(auth)])
    def restore(req: RestoreRequest) -> StreamingResponse:
        def work(emit: actions.Emit) -> dict[str, Any]:
            rolling.discard(req.path)  # the data is about to change: no recovery meanwhile
            done = actions.restore(req, emit)
            if req.rollforward:
                rolling.add(req.path)
            return done

        return _stream(req.job, work)

    @app.post("/api/v1/vms/power", dependencies=[Depends(auth)])
    def power_vm(req: PowerRequest) -> dict[str, Any]:
        return vm.power(req)

    @app.post("/api/v1/vms/restore", dependencies=[Depends(auth)])
    def restore_vm(req: VmRestoreRequest) -> StreamingResponse:
        return _stream(req.job, lambda emit: actions.restore_vm(req, emit))

    @app.post("/api/v1/materialize", dependencies=[Depends(auth)])
    def materialize(req: MaterializeRequest) -> StreamingResponse:
        reg = mount_registry()
        return _stream(req.job, lambda emit: actions.materialize(req, reg, emit))

    @app.post("/api/v1/unmaterialize", dependencies=[Depends(auth)])
    def unmaterialize(req: UnmaterializeRequest) -> dict[str, Any]:
        return actions.unmaterialize(req, mount_registry())

    @app.post("/api/v1/layers/refresh", dependencies=[Depends(auth)])
    def refresh_layers(req: RefreshRequest) -> dict[str, Any]:
        return actions.refresh_layers(req, mount_registry())

    @app.get("/api/v1/mounts", dependencies=[Depends(auth)])
    def list_mounts() -> dict[str, Any]:
        return mount_registry().read()

    @app.post("/api/v1/target/check", dependencies=[Depends(auth)])
    def check_target(req: TargetCheckRequest) -> dict[str, Any]:
        return actions.check_target(req)

    # --- PostgreSQL (``tandem.agent.pg``) ---------------------------------------------

    @app.post("/api/v1/pg/probe", dependencies=[Depends(auth)])
    def pg_probe(req: ProbeRequest) -> dict[str, Any]:
        return pg.probe(req)

    @app.post("/api/v1/pg/stream", dependencies=[Depends(auth)])
    def pg_stream(req: StreamRequest) -> dict[str, Any]:
        return wal_receivers().ensure(req)

    @app.post("/api/v1/kept/drop", dependencies=[Depends(auth)])
    def drop_kept(req: KeptRequest) -> dict[str, Any]:
        pit.drop_kept(mounts.clean_path(req.path, "app path"))
        return {"dropped": True}

    @app.post("/api/v1/pg/drop", dependencies=[Depends(auth)])
    def pg_drop(req: StreamRequest) -> dict[str, Any]:
        return wal_receivers().drop(req)

    @app.get("/api/v1/pg/wal/{app_name}", dependencies=[Depends(auth)])
    def pg_wal_list(app_name: str) -> dict[str, Any]:
        return wal_receivers().listing(WalAck(app=app_name).app)

    @app.post("/api/v1/pg/wal/read", dependencies=[Depends(auth)])
    def pg_wal_read(req: WalRead) -> Response:
        return Response(wal_receivers().read(req), media_type="application/octet-stream")

    @app.post("/api/v1/pg/wal/ack", dependencies=[Depends(auth)])
    def pg_wal_ack(req: WalAck) -> dict[str, Any]:
        return wal_receivers().ack(req)

    def presented(path: str) -> None:
        """WAL and recovery settings go only into a copy this agent materialized, or a base
        backup it just restored in place for the appliance to recover."""
        held = {str(p) for e in mount_registry().read().values() for p in e.get("paths", [])}
        if path not in held and path not in rolling:
            raise NotPresentedHere(path=path)

    @app.put("/api/v1/pg/spool", dependencies=[Depends(auth)])
    async def pg_spool(
        path: str, name: str, request: Request, run: str | None = None
    ) -> dict[str, Any]:
        req = SpoolRequest(path=path, name=name, run=run)
        presented(req.path)
        data = await request.body()
        return await asyncio.to_thread(pg.spool_wal, req, data)

    @app.post("/api/v1/pg/spool/wanted", dependencies=[Depends(auth)])
    def pg_spool_wanted(req: WantedRequest) -> dict[str, Any]:
        presented(req.path)
        return pg.spool_wanted(req)

    @app.post("/api/v1/pg/recover", dependencies=[Depends(auth)])
    def pg_recover(req: RecoverRequest) -> dict[str, Any]:
        presented(req.path)
        try:
            return pg.recover(req)
        finally:
            if req.stop:  # recovered in place (or failed): restore it again to retry
                rolling.discard(req.path)

    @app.post("/api/v1/pg/stop", dependencies=[Depends(auth)])
    def pg_stop(req: PgRunRequest) -> dict[str, Any]:
        return {"stopped": pg.stop_copy(req.path)}

    @app.post("/api/v1/pg/start", dependencies=[Depends(auth)])
    def pg_start(req: PgRunRequest) -> dict[str, Any]:
        presented(req.path)
        return pg.start_copy(req)

    @app.post("/api/v1/run", dependencies=[Depends(auth)])
    def run(req: RunRequest) -> dict[str, Any]:
        if scripts is None:
            raise AgentWithoutDirectory(what="its scripts/ folder holds the hooks")
        return hooks.run_hook(req, scripts)

    return app


def init(directory: Path, name: str, listen: str) -> dict[str, Any]:
    """Create an agent in ``directory`` (with its empty ``scripts/`` folder for hooks);
    returns ``{name, url, token, fingerprint, scripts}``."""
    cfg, token = init_daemon_dir(directory, kind=KIND, name=name, listen=listen)
    folder = hooks.init_folder(directory)
    return {
        "name": cfg.name,
        "url": cfg.url,
        "token": token,
        "fingerprint": cfg.fingerprint,
        "scripts": str(folder),
    }


def run_forever(directory: Path) -> None:
    """Serve the agent in ``directory`` until SIGTERM/SIGINT."""
    cfg = load_daemon_dir(directory, KIND)
    lock = lock_daemon_dir(directory, KIND)
    if not (directory / hooks.SCRIPTS).exists():
        hooks.init_folder(directory)  # an agent made before hooks were scripts
    app = create_app(cfg, directory)
    try:
        serve(app, cfg, directory)
    finally:
        app.state.receivers.stop_all()
        os.close(lock)
