"""Server-side plumbing shared by the appliance and the agent daemons.

One exception handler turns every error into ``{"error": CODE, "message": TEXT}`` with the
error's HTTP status (routes never build error responses). Tokens are random and stored only
as SHA-256 hashes. Daemons serve HTTPS with the certificate made at ``init``.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import importlib
import json
import logging
import os
import secrets
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.domain.ids import validate_name
from tandem.errors import (
    AlreadyRunning,
    CannotListen,
    DaemonDirInvalid,
    InvalidInput,
    ListenInvalid,
    TandemError,
)
from tandem.storage.fileio import write_durably
from tandem.transport.tls import make_self_signed

log = logging.getLogger("tandem")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, token_hash: str) -> bool:
    return hmac.compare_digest(hash_token(token), token_hash)


def error_response(exc: TandemError) -> JSONResponse:
    return JSONResponse(
        status_code=exc.http_status, content={"error": exc.code, "message": exc.message}
    )


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
        parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TandemError)
    async def _tandem(_: Request, exc: TandemError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(InvalidInput(detail=_validation_message(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own answers (no such path, wrong method): say what was asked.
        code = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "InvalidInput"}
        messages = {
            404: f"there is no API path {request.url.path}; see /openapi.json",
            405: f"{request.method} is not allowed on {request.url.path}; see /openapi.json",
        }
        return JSONResponse(
            status_code=exc.status_code,
            content={
                "error": code.get(exc.status_code, "TandemError"),
                "message": messages.get(exc.status_code, str(exc.detail)),
            },
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s", "".join(traceback.format_exception(exc)))
        return JSONResponse(
            status_code=500,
            content={"error": "TandemError", "message": f"internal error: {exc!r}"},
        )


@dataclass
class DaemonConfig:
    """What ``init`` writes to DIR/config.json for a daemon (appliance or agent)."""

    kind: str
    name: str
    listen: str
    token_hash: str
    fingerprint: str
    extra: dict[str, Any]

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0] or "127.0.0.1"

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"https://{host}:{self.port}"


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ListenInvalid(option="--listen", value=listen)
    return host or "127.0.0.1", int(port)


PICKED_PORTS_FROM = 10000  # above the usual services' ports


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing uses now, for a server to bind later (written into a config).

    Picked below the kernel's ephemeral range: a port from ``bind(port 0)`` is one the kernel
    may hand the next outgoing connection of any process, which then holds it when the
    server binds. Ports below the range are never handed out, so only another explicit
    choice can collide. Picked with the system's randomness (test runners reseed
    ``random`` alike in every worker)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low = _ephemeral_low()
    for _ in range(64 if low - PICKED_PORTS_FROM > 1000 else 0):
        port = PICKED_PORTS_FROM + secrets.randbelow(low - PICKED_PORTS_FROM)
        with socket.socket(family) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        if _hold(port):
            return port
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


PORT_HOLD_SECONDS = 3600.0
"""How long a picked port stays held for the server it was picked for (machine-wide)."""


def _hold(port: int) -> bool:
    """Hold ``port`` for ``PORT_HOLD_SECONDS``, for every process of this machine: it was
    picked free but is bound only later, by a server started from a config, and another
    process's pick meanwhile (``appliance init`` choosing its NBD port while a test harness
    or an operator chooses an agent's) must not be the same port. A mark file per port in
    the temporary folder; False: held by another pick. Where no mark can be made (a folder
    not writable), the bind check alone decides."""
    folder = Path(tempfile.gettempdir()) / "tandem-ports"
    try:
        folder.mkdir(exist_ok=True)
        if folder.stat().st_uid == os.geteuid():
            folder.chmod(0o1777)  # any user's picks, as in /tmp itself
    except OSError:
        return True
    mark = folder / str(port)
    try:
        os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        pass
    except OSError:
        return True
    try:
        if time.time() - mark.stat().st_mtime < PORT_HOLD_SECONDS:
            return False
        os.utime(mark)  # an old hold: its server bound the port long ago, or never will
        return True
    except OSError:
        return False


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def init_daemon_dir(
    directory: Path,
    *,
    kind: str,
    name: str,
    listen: str,
    extra: dict[str, Any] | None = None,
    hosts: tuple[str, ...] = (),
) -> tuple[DaemonConfig, str]:
    """Create DIR with a certificate and an admin token; returns (config, token). The
    certificate names the listen host and ``hosts`` (other addresses the daemon serves on)."""
    validate_name(name, f"{kind} name")
    host, _ = parse_listen(listen)
    cfg_path = directory / "config.json"
    if cfg_path.exists():
        raise DaemonDirInvalid(
            directory=directory, problem=f"already holds a {kind}", fix="Give another directory"
        )
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    fingerprint = make_self_signed(
        directory / "cert.pem", directory / "key.pem", name, [host, *hosts]
    )
    token = new_token()
    cfg = DaemonConfig(kind, name, listen, hash_token(token), fingerprint, extra or {})
    # Durably (the token's hash and the pinned certificate's fingerprint are in it): a crash
    # right after init must not leave an empty config.json.
    write_durably(cfg_path, json.dumps(cfg.__dict__, indent=2).encode(), mode=0o600)
    return cfg, token


def load_daemon_dir(directory: Path, kind: str) -> DaemonConfig:
    try:
        raw = json.loads((directory / "config.json").read_text())
    except FileNotFoundError as exc:
        raise DaemonDirInvalid(
            directory=directory,
            problem=f"is not a {kind} directory",
            fix=f"Create it with `tandem {kind} init {directory}`",
        ) from exc
    if raw.get("kind") != kind:
        raise DaemonDirInvalid(
            directory=directory,
            problem=f"holds a {raw.get('kind')}, not a {kind}",
            fix=f"Give the directory of a {kind}",
        )
    return DaemonConfig(**raw)


def bind(cfg: DaemonConfig) -> socket.socket:
    """The daemon's listening socket; a taken or impossible address is a one-line error."""
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((cfg.host, cfg.port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise CannotListen(
            address=cfg.listen, reason=exc.strerror or exc, option='"listen"'
        ) from exc
    sock.set_inheritable(True)
    return sock


def lock_daemon_dir(directory: Path, kind: str) -> int:
    """Hold DIR/daemon.lock for the life of the process (returns its fd); a second daemon
    on the same directory is refused, since it would take the first one's jobs for orphans."""
    fd = os.open(directory / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(kind=kind, directory=directory, pid=holder) from exc
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def serve(
    app: FastAPI, cfg: DaemonConfig, directory: Path, sock: socket.socket | None = None
) -> None:
    """Run ``app`` over HTTPS until SIGTERM/SIGINT (on ``sock`` if given, else bind now)."""
    sock = sock or bind(cfg)
    # A daemon's jobs call other daemons (the agent sends chunks to the appliance, which
    # drives agents and peers): httpx imports its transport on first use, so load it now,
    # not in the first job an operator waits for (a fraction of a second).
    importlib.import_module("httpcore")
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        ssl_certfile=str(directory / "cert.pem"),
        ssl_keyfile=str(directory / "key.pem"),
        log_level=os.environ.get("TANDEM_LOG_LEVEL", "warning"),
        timeout_graceful_shutdown=5,
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
