"""The appliance daemon: its directory, and the parts that run together in one process.

On-disk layout (made by ``init``)::

    DIR/config.json   {"kind": "appliance", "name", "listen", "token_hash", "fingerprint",
                       "extra": {"catalog": URL or null, "nbd": "HOST:PORT",
                                 "nbd_tls": bool (optional),
                                 "workers": int (optional, WORKERS when missing),
                                 "heartbeat", "stale_after": seconds (optional),
                                 "join": DIR of the first process, "pool": its pool
                                 (a process made with ``init --join``)}}
    DIR/cert.pem      the self-signed certificate clients pin (DIR/key.pem: its key, 0600)
    DIR/catalog.db    the SQLite catalog, unless ``--catalog`` named another database
    DIR/pool/         the chunk pool

Invariants
- ``init`` stores the admin token only as a hash, in the catalog's tokens table (name
  ``admin``); the token itself is printed once.
- ``serve`` recovers jobs before it serves: a job left ``running`` by a killed appliance is
  failed with the reason (``tandem.jobs``) before anything new can start, so no job stays
  running after a kill -9. On a PostgreSQL catalog other processes may run jobs, so only
  jobs whose heartbeat is ``stale_after`` old (or whose process on this machine is gone)
  are orphans, recovered at start and at every heartbeat by whichever process looks first.
- Several processes, one appliance (PostgreSQL only): ``init DIR2 --join DIR1`` makes a
  process with DIR1's name, catalog and pool (on storage both reach) and its own address,
  certificate and admin token. Any process's API serves the whole appliance (one catalog);
  jobs go to whichever runner claims them (``FOR UPDATE SKIP LOCKED``), a joined one
  taking only ``JOINED_TYPES``; one scheduler and one garbage collection run at a time
  (catalog locks). The first process alone serves NBD exports and virtual copies. A
  SQLite catalog has one process: joining it is refused, as is serving a joined DIR on it.
- Chunks a killed capture sent but never named were never visible (the pool removes the
  ``tmp/`` files of dead writers when it opens) and are not part of any image.
- NBD listens on ``extra.nbd`` (``init --nbd-listen``; by default a free port on the API's
  host, fixed at init). A listener that is not on loopback always serves TLS (STARTTLS,
  with cert.pem/key.pem, which name the NBD host too); a loopback one serves plain unless
  ``extra.nbd_tls`` is true (``init --nbd-tls``).
- The job runner has ``extra.workers`` threads (``init --workers``); the scheduler keeps
  at most that many of its captures queued, so a backlog never floods the queue.
- The job runner, the scheduler and the HTTPS server run side by side; stopping (SIGTERM,
  SIGINT) stops the server, then the scheduler, then the runner (running jobs are
  interrupted and failed with the reason), then closes the catalog.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tandem.appliance.app import KIND, create_app
from tandem.appliance.nbd import NbdServer, is_loopback, tls_context
from tandem.appliance.pools import (
    CREDENTIALS,
    check_pool_arg,
    create_pool,
    open_pool,
    pool_field,
    pool_location,
)
from tandem.appliance.scheduler import Scheduler
from tandem.catalog import queries as q
from tandem.catalog.db import open_catalog
from tandem.domain.rules import Role
from tandem.errors import (
    AlreadyExists,
    CatalogNotShared,
    CatalogTaken,
    ConfigValueInvalid,
    InvalidInput,
    JoinInvalid,
    ListenInvalid,
    NbdListenUnreachable,
    OutOfRange,
)
from tandem.jobs.runner import JobRunner
from tandem.operations import capture, gc, images, replicate
from tandem.operations.handlers import job_handlers
from tandem.operations.present import restore_exports, restore_tree_sessions
from tandem.operations.sessions import SessionRegistry
from tandem.operations.site import Site
from tandem.operations.wal import WalShipper
from tandem.storage.manifest import freeze_heap
from tandem.storage.objstore import is_store_url
from tandem.transport.server import (
    DaemonConfig,
    bind,
    free_port,
    init_daemon_dir,
    load_daemon_dir,
    lock_daemon_dir,
    parse_listen,
    serve,
)

ADMIN_TOKEN = "admin"
WORKERS = 4
MAX_WORKERS = 64
HEARTBEAT = 5.0
"""Seconds between a runner's heartbeats (``extra.heartbeat``); a job whose heartbeat is
``extra.stale_after`` old (6 beats by default) is recovered by another process."""


JOINED_TYPES = frozenset({capture.TYPE, replicate.TYPE, gc.TYPE, images.DELETE_TYPE})
"""The jobs a joined process runs: those that need only the catalog, the pool and the
network. Presentations (NBD exports, virtual copies) stay with the first process."""


def _quietly(work: Callable[[Site], object], site: Site) -> None:
    """Run a start-up chore in the background: a failure is logged, never raised."""
    try:
        work(site)
    except Exception:
        logging.getLogger("tandem.appliance").exception("start-up chore %s failed", work)


def catalog_url(directory: Path, cfg: DaemonConfig) -> str:
    url = cfg.extra.get("catalog")
    return str(url) if url else f"sqlite:///{directory.resolve() / 'catalog.db'}"


def joined(cfg: DaemonConfig) -> bool:
    """Whether this appliance process was made with ``init --join`` (it is not the first)."""
    return bool(cfg.extra.get("join"))


def _is_sqlite(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] == "sqlite"


def _seconds(cfg: DaemonConfig, key: str) -> float | None:
    value = cfg.extra.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigValueInvalid(
            file="config.json", key=key, value=value, allowed="a positive number of seconds"
        )
    return float(value)


def join(
    directory: Path,
    first: Path,
    listen: str,
    *,
    name: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Create in ``directory`` another process of the appliance in ``first`` (same name,
    catalog and pool; its own address, certificate and admin token); returns
    ``{name, url, token, fingerprint}``. The catalog must be PostgreSQL."""
    check_workers(workers)
    try:
        base = load_daemon_dir(first, KIND)
    except InvalidInput as exc:
        raise JoinInvalid(
            first=first,
            reason=f"{first} {exc.fields.get('problem', exc.message)}",
            fix="Give the directory of the first appliance process, on storage both machines reach",
        ) from exc
    if name is not None and name != base.name:
        raise JoinInvalid(
            first=first,
            reason=f"that appliance is named {base.name!r}, not {name!r}",
            fix="Leave out --name (a joined process takes the appliance's name)",
        )
    if joined(base):
        raise JoinInvalid(
            first=first,
            reason=f"that process joined {base.extra['join']} itself",
            fix=f"Join the first appliance process instead (--join {base.extra['join']})",
        )
    url = catalog_url(first, base)
    if _is_sqlite(url):
        raise CatalogNotShared(directory=first, how="is to be joined")
    where = pool_location(first, base)
    on_store = is_store_url(where)
    if not on_store:
        where = str(Path(where).resolve())
    open_pool(first, base)  # reachable and a pool, before anything is made
    parse_listen(listen)  # a clear error before anything is made
    extra: dict[str, Any] = {"catalog": url, "pool": where, "join": str(first.resolve())}
    if workers is not None:
        extra["workers"] = workers
    for key in ("heartbeat", "stale_after"):
        if key in base.extra:
            extra[key] = base.extra[key]
    cfg, token = init_daemon_dir(directory, kind=KIND, name=base.name, listen=listen, extra=extra)
    try:
        if on_store:  # the same store, with the same credentials
            shutil.copyfile(first / CREDENTIALS, directory / CREDENTIALS)
            os.chmod(directory / CREDENTIALS, 0o600)
        with open_catalog(url) as opened, opened.begin() as session:
            q.add_token(
                session, name=f"{ADMIN_TOKEN}-{secrets.token_hex(4)}", token=token, role=Role.ADMIN
            )
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            (directory / "config.json").unlink()
        raise
    return {"name": cfg.name, "url": cfg.url, "token": token, "fingerprint": cfg.fingerprint}


def init(
    directory: Path,
    name: str,
    listen: str,
    catalog: str | None,
    *,
    nbd_listen: str | None = None,
    nbd_tls: bool = False,
    workers: int | None = None,
    pool: str | None = None,
) -> dict[str, Any]:
    """Create an appliance in ``directory``; returns ``{name, url, token, fingerprint}``.

    ``nbd_listen`` (HOST:PORT) is where NBD exports are served; by default a free port on
    the API's host. ``nbd_tls`` asks for TLS on a loopback NBD listener too (any other
    address always has it). ``workers``: the jobs run at once (default ``WORKERS``).
    ``pool``: a directory or ``s3://BUCKET[/PREFIX]?endpoint=URL`` (``appliance.pools``);
    default DIR/pool."""
    check_workers(workers)
    check_pool_arg(pool)  # a bad URL, wrong credentials: said before anything is made
    host, _ = parse_listen(listen)
    if nbd_listen is None:
        nbd_listen = f"{host}:{free_port(host)}"  # fixed at init: export URIs survive restarts
    else:
        nbd_host, _ = _parse_nbd_listen(nbd_listen)
        if _wildcard(nbd_host) and _wildcard(host):
            raise NbdListenUnreachable(nbd_listen=nbd_listen, listen=listen)
    nbd_host, _ = _parse_nbd_listen(nbd_listen)
    extra: dict[str, Any] = {"catalog": catalog, "nbd": nbd_listen}
    if nbd_tls:
        extra["nbd_tls"] = True
    if workers is not None:
        extra["workers"] = workers
    if pool is not None:
        extra["pool"] = pool_field(pool)
    cfg, token = init_daemon_dir(
        directory, kind=KIND, name=name, listen=listen, extra=extra, hosts=(nbd_host,)
    )
    try:
        create_pool(directory, pool)
        url = catalog_url(directory, cfg)
        with open_catalog(url) as opened, opened.begin() as session:
            try:
                q.add_token(session, name=ADMIN_TOKEN, token=token, role=Role.ADMIN)
            except AlreadyExists as exc:
                raise CatalogTaken(url=opened.url) from exc
            q.set_setting(session, key="name", value=name)
    except BaseException:
        # Leave no half-made appliance behind: without config.json the directory can be reused.
        with contextlib.suppress(FileNotFoundError):
            (directory / "config.json").unlink()
        raise
    return {"name": cfg.name, "url": cfg.url, "token": token, "fingerprint": cfg.fingerprint}


def check_workers(workers: int | None) -> None:
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise OutOfRange(
            what="--workers",
            value=workers,
            allowed=f"1 to {MAX_WORKERS} (jobs run at once; a capture mostly waits on its "
            "agent, so a few per core are fine)",
        )


def configured_workers(cfg: DaemonConfig) -> int:
    """The runner's worker count from ``extra.workers`` (``WORKERS`` when missing)."""
    value = cfg.extra.get("workers")
    if value is None:
        return WORKERS
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_WORKERS:
        raise ConfigValueInvalid(
            file="config.json",
            key="workers",
            value=value,
            allowed=f"a number from 1 to {MAX_WORKERS}",
        )
    return value


def _parse_nbd_listen(listen: str) -> tuple[str, int]:
    try:
        return parse_listen(listen)
    except InvalidInput:
        raise ListenInvalid(option="--nbd-listen", value=listen) from None


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
        self, directory: Path, *, workers: int | None = None, scheduler_tick: float = 1.0
    ) -> None:
        self.directory = directory
        self.config = load_daemon_dir(directory, KIND)
        workers = configured_workers(self.config) if workers is None else workers
        url = catalog_url(directory, self.config)
        self.joined = joined(self.config)
        if self.joined and _is_sqlite(url):
            raise CatalogNotShared(directory=directory, how="joins another appliance process")
        heartbeat = _seconds(self.config, "heartbeat") or HEARTBEAT
        stale_after = _seconds(self.config, "stale_after")
        self.catalog = open_catalog(url)
        try:
            pool = open_pool(directory, self.config)
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
            certificate=(directory / "cert.pem").read_text(),
        )
        handlers = job_handlers(self.site)
        if self.joined:
            # A joined process serves no NBD exports (nor the virtual copies behind them):
            # its server is never started, and its runner takes no presentation jobs.
            self.nbd = NbdServer(self.config.host, 0)
            handlers = {t: h for t, h in handlers.items() if t in JOINED_TYPES}
        else:
            self.nbd = nbd_server(self.config, directory)
            self.site.presenter = self.nbd
        # On PostgreSQL other processes may share the catalog: a running job is an orphan
        # only when its heartbeat is stale (or its process, on this machine, is gone).
        self.runner = JobRunner(
            self.catalog,
            handlers,
            workers=workers,
            heartbeat_interval=heartbeat,
            exclusive=self.catalog.dialect != "postgresql",
            stale_after=stale_after,
        )
        self.site.wake = self.runner.wake
        self.site.ended = self.runner.ended
        self.site.runner_id = self.runner.runner_id
        self.scheduler = Scheduler(self.site, tick=scheduler_tick, capacity=workers)
        scheduler = self.scheduler
        self.site.scheduling = lambda: scheduler.leading
        self.wal = WalShipper(self.site)
        self.app = create_app(self.site)

    def start(self) -> None:
        """Serve NBD exports again, recover interrupted jobs, then start the runner and the
        scheduler."""
        if not self.joined:
            self.nbd.start()
            restore_exports(self.site)
            # Trees presented through FUSE read through sessions the last process held; their
            # hosts get new ones once this one serves (it calls the hosts: not on the way up).
            threading.Thread(
                target=_quietly, args=(restore_tree_sessions, self.site), daemon=True
            ).start()
        self.runner.start()
        self.scheduler.start()
        if not self.joined:
            # One shipper per appliance: two would pull the same hosts and append to the
            # same WAL files (beside the shared pool); a joined process only reads them.
            self.wal.start()

    def stop(self) -> None:
        self.wal.stop()
        self.scheduler.stop()
        self.runner.stop()
        if self.nbd.running:
            self.nbd.stop()
        for overlay in list(self.site.overlays.values()):
            overlay.close()
        self.site.overlays.clear()
        self.catalog.close()


def settle_heap() -> None:
    """Leave what start-up made out of the garbage collector's full passes.

    The process holds some 180,000 objects from start-up (FastAPI, SQLAlchemy, pydantic
    schemas) for as long as it lives. A full collection walks them all, about 0.1 s of a
    core holding the GIL, and a request that builds a long list (``GET /apps`` at 1,000
    apps) promotes enough objects to set one off every few requests: that pause was the
    list routes' p99. Frozen, they are never walked again (objects made later still are)."""
    freeze_heap()


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
            settle_heap()
            try:
                serve(appliance.app, appliance.config, directory, sock)
            finally:
                appliance.stop()
        finally:
            sock.close()
    finally:
        os.close(lock)
