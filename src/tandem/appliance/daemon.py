"""The appliance daemon: its directory, and the parts that run together in one process.

On-disk layout (made by ``init``)::

    DIR/config.json   {"kind": "appliance", "name", "listen", "token_hash", "fingerprint",
                       "extra": {"catalog": URL or null, "nbd": "HOST:PORT",
                                 "nbd_tls": bool (optional)}}
    DIR/cert.pem      the self-signed certificate clients pin (DIR/key.pem: its key, 0600)
    DIR/catalog.db    the SQLite catalog, unless ``--catalog`` named another database
    DIR/pool/         the chunk pool

Invariants
- ``init`` stores the admin token only as a hash, in the catalog's tokens table (name
  ``admin``); the token itself is printed once.
- ``serve`` recovers jobs before it serves: a job left ``running`` by a killed appliance is
  failed with the reason (``tandem.jobs``) before anything new can start, so no job stays
  running after a kill -9. Chunks a killed capture sent but never named were never visible
  (the pool empties its ``tmp/`` when it opens) and are not part of any image.
- NBD listens on ``extra.nbd`` (``init --nbd-listen``; by default a free port on the API's
  host, fixed at init). A listener that is not on loopback always serves TLS (STARTTLS,
  with cert.pem/key.pem, which name the NBD host too); a loopback one serves plain unless
  ``extra.nbd_tls`` is true (``init --nbd-tls``).
- The job runner, the scheduler and the HTTPS server run side by side; stopping (SIGTERM,
  SIGINT) stops the server, then the scheduler, then the runner (running jobs are
  interrupted and failed with the reason), then closes the catalog.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tandem.appliance.app import KIND, create_app
from tandem.appliance.nbd import NbdServer, is_loopback, tls_context
from tandem.appliance.scheduler import Scheduler
from tandem.catalog import queries as q
from tandem.catalog.db import open_catalog
from tandem.domain.rules import Role
from tandem.errors import AlreadyExists, InvalidInput
from tandem.jobs.runner import JobRunner
from tandem.operations.handlers import job_handlers
from tandem.operations.present import restore_exports, restore_tree_sessions
from tandem.operations.sessions import SessionRegistry
from tandem.operations.site import Site
from tandem.storage.pool import ChunkPool
from tandem.transport.server import (
    DaemonConfig,
    bind,
    init_daemon_dir,
    load_daemon_dir,
    lock_daemon_dir,
    parse_listen,
    serve,
)

ADMIN_TOKEN = "admin"
WORKERS = 4


def _quietly(work: Callable[[Site], object], site: Site) -> None:
    """Run a start-up chore in the background: a failure is logged, never raised."""
    try:
        work(site)
    except Exception:
        logging.getLogger("tandem.appliance").exception("start-up chore %s failed", work)


def catalog_url(directory: Path, cfg: DaemonConfig) -> str:
    url = cfg.extra.get("catalog")
    return str(url) if url else f"sqlite:///{directory.resolve() / 'catalog.db'}"


def init(
    directory: Path,
    name: str,
    listen: str,
    catalog: str | None,
    *,
    nbd_listen: str | None = None,
    nbd_tls: bool = False,
) -> dict[str, Any]:
    """Create an appliance in ``directory``; returns ``{name, url, token, fingerprint}``.

    ``nbd_listen`` (HOST:PORT) is where NBD exports are served; by default a free port on
    the API's host. ``nbd_tls`` asks for TLS on a loopback NBD listener too (any other
    address always has it)."""
    host, _ = parse_listen(listen)
    if nbd_listen is None:
        nbd_listen = f"{host}:{_free_port(host)}"
    else:
        nbd_host, _ = _parse_nbd_listen(nbd_listen)
        if _wildcard(nbd_host) and _wildcard(host):
            raise InvalidInput(
                detail=f"--nbd-listen {nbd_listen} and --listen {listen} name no address "
                "hosts can reach in export URIs; give --nbd-listen the appliance's address"
            )
    nbd_host, _ = _parse_nbd_listen(nbd_listen)
    extra: dict[str, Any] = {"catalog": catalog, "nbd": nbd_listen}
    if nbd_tls:
        extra["nbd_tls"] = True
    cfg, token = init_daemon_dir(
        directory, kind=KIND, name=name, listen=listen, extra=extra, hosts=(nbd_host,)
    )
    try:
        ChunkPool.create(directory / "pool")
        url = catalog_url(directory, cfg)
        with open_catalog(url) as opened, opened.begin() as session:
            try:
                q.add_token(session, name=ADMIN_TOKEN, token=token, role=Role.ADMIN)
            except AlreadyExists as exc:
                raise InvalidInput(
                    detail=f"the catalog {opened.url} already belongs to an appliance; "
                    "give an empty database to --catalog"
                ) from exc
            q.set_setting(session, key="name", value=name)
    except BaseException:
        # Leave no half-made appliance behind: without config.json the directory can be reused.
        with contextlib.suppress(FileNotFoundError):
            (directory / "config.json").unlink()
        raise
    return {"name": cfg.name, "url": cfg.url, "token": token, "fingerprint": cfg.fingerprint}


def _free_port(host: str) -> int:
    """A port free now, for the NBD server: fixed at init so export URIs survive restarts."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _parse_nbd_listen(listen: str) -> tuple[str, int]:
    try:
        return parse_listen(listen)
    except InvalidInput:
        raise InvalidInput(detail=f"--nbd-listen takes HOST:PORT, got {listen!r}") from None


def _wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "[::]")


def nbd_server(cfg: DaemonConfig, directory: Path) -> NbdServer:
    """The NBD server of the appliance: TLS with its own certificate off loopback (or when
    asked for), plain on loopback. URIs name the NBD host, or the API's for a wildcard."""
    listen = str(cfg.extra.get("nbd") or f"{cfg.host}:0")
    host, port = parse_listen(listen)
    host = host.strip("[]")
    advertise = cfg.url.split("//", 1)[1].rsplit(":", 1)[0] if _wildcard(host) else host
    tls = None
    if cfg.extra.get("nbd_tls") or not is_loopback(host):
        tls = tls_context(directory / "cert.pem", directory / "key.pem")
    return NbdServer(host, port, advertise=advertise, tls=tls)


class Appliance:
    """One appliance's parts: catalog, pool, sessions, job runner, scheduler and API."""

    def __init__(
        self, directory: Path, *, workers: int = WORKERS, scheduler_tick: float = 1.0
    ) -> None:
        self.directory = directory
        self.config = load_daemon_dir(directory, KIND)
        self.catalog = open_catalog(catalog_url(directory, self.config))
        try:
            pool = ChunkPool(directory / "pool")
        except BaseException:
            self.catalog.close()
            raise
        self.site = Site(
            name=self.config.name,
            url=self.config.url,
            fingerprint=self.config.fingerprint,
            catalog=self.catalog,
            pool=pool,
            sessions=SessionRegistry(pool),
        )
        self.nbd = nbd_server(self.config, directory)
        self.site.presenter = self.nbd
        self.runner = JobRunner(self.catalog, job_handlers(self.site), workers=workers)
        self.site.wake = self.runner.wake
        self.scheduler = Scheduler(self.site, tick=scheduler_tick)
        self.app = create_app(self.site)

    def start(self) -> None:
        """Serve NBD exports again, recover interrupted jobs, then start the runner and the
        scheduler."""
        self.nbd.start()
        restore_exports(self.site)
        # Trees presented through FUSE read through sessions the last process held; their
        # hosts get new ones once this one serves (it calls the hosts: not on the way up).
        threading.Thread(
            target=_quietly, args=(restore_tree_sessions, self.site), daemon=True
        ).start()
        self.runner.start()
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        self.runner.stop()
        if self.nbd.running:
            self.nbd.stop()
        for overlay in list(self.site.overlays.values()):
            overlay.close()
        self.site.overlays.clear()
        self.catalog.close()


def run_forever(directory: Path) -> None:
    """Serve the appliance in ``directory`` until SIGTERM/SIGINT.

    The directory lock and the listening socket come first: a second `serve` of the same
    appliance, or one whose address is taken, stops before it could recover (fail) the jobs
    of the appliance that is running.
    """
    cfg = load_daemon_dir(directory, KIND)
    lock = lock_daemon_dir(directory, KIND)
    try:
        sock = bind(cfg)
        try:
            appliance = Appliance(directory)
            appliance.start()
            try:
                serve(appliance.app, appliance.config, directory, sock)
            finally:
                appliance.stop()
        finally:
            sock.close()
    finally:
        os.close(lock)
