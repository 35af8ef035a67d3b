"""NBD server: volume images and virtual copies presented to hosts over the network.

The real NBD protocol (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md),
so qemu, libnbd tools (nbdinfo, nbdcopy, nbdfuse) and the kernel client use exports as is:

- Handshake: fixed newstyle. Options: NBD_OPT_EXPORT_NAME, NBD_OPT_INFO, NBD_OPT_GO (with
  NBD_INFO_EXPORT and, when asked, NBD_INFO_BLOCK_SIZE), NBD_OPT_LIST, NBD_OPT_ABORT,
  NBD_OPT_STRUCTURED_REPLY, and NBD_OPT_LIST/SET_META_CONTEXT with the one context served,
  ``base:allocation`` (id 1; selected for the export named in the option, which must match
  as the export does: a wrong secret is NBD_REP_ERR_UNKNOWN), and NBD_OPT_STARTTLS on a
  server given a TLS context (below). Anything else (extended headers…) is answered
  NBD_REP_ERR_UNSUP.
- Structured replies, once negotiated: a read is answered with one OFFSET_DATA chunk (its
  error with an ERROR chunk, never a simple reply), NBD_CMD_BLOCK_STATUS with one
  BLOCK_STATUS chunk; other commands keep simple replies, as the protocol allows.
  Block status says which ranges read as zeros (HOLE | ZERO: a virtual copy's clean blocks
  over all-zero extents of its base) and calls the rest data (flags 0, always safe), at
  most MAX_EXTENTS descriptors a reply (one with NBD_CMD_FLAG_REQ_ONE); without a selected
  context, or beyond the export's end, it is EINVAL.
- Transmission: NBD_CMD_READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS, DISC; the FUA
  flag is a flush after the write. Export flags: HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM |
  SEND_WRITE_ZEROES | CAN_MULTI_CONN (every connection shares one backend, so a flush on
  any connection covers writes completed on all), plus READ_ONLY for read-only exports.
- Errors are NBD errno values: EPERM (a write to a read-only export, or to a copy a
  failback froze), EINVAL (a read or trim outside the export, an unknown command), ENOSPC
  (a write outside the export, or the disk holding the overlay is full), ESHUTDOWN (the
  export is being removed), EIO (anything else, logged here).
- Requests on one connection run concurrently (at most MAX_INFLIGHT at a time) in a thread
  pool, replies go out as they complete: NBD matches them by handle. A read the backend
  can answer from memory (``read_nowait``: cached base blocks, dirty blocks in the page
  cache) and a small write it can do without waiting (``try_write``: block locks free, the
  base block decoded) are served on the event loop itself: for those a thread hand-off
  costs more than the work. Neither changes the durability contract: writes are durable
  at FLUSH (or with FUA, which always takes the pool), as on a disk with a write cache.
- Minimum block size 1: any alignment is valid, so an unaligned TRIM is carried out (as
  zeroing; the protocol lets TRIM do that), not refused.

Authentication: an export's name is a capability. ``add_export(name, …)`` makes a 256-bit
random secret (or takes the caller's, e.g. one kept in the catalog so that an export made
again after a restart keeps its URI), and clients must ask for ``NAME.SECRET`` — the URI
``add_export`` returns is ``nbd://HOST:PORT/NAME.SECRET``. (Not ``NAME?secret=…``: clients
read an NBD URI's query string as their own options.) The secret is compared in
constant time; a wrong secret and an unknown name get the same answer (NBD_REP_ERR_UNKNOWN,
or a hang-up for NBD_OPT_EXPORT_NAME), and NBD_OPT_LIST never lists an export that has a
secret. Plain export names (``secret=""``) exist only for a server on a loopback address:
``add_export`` refuses them on any other address and ``start()`` refuses to listen on one
while such an export exists. The secret protects against anyone who can reach the port;
it does not hide the traffic of a plain server.

TLS: a server given ``tls`` (an ``ssl.SSLContext``, server side: the appliance's own
certificate and key, the ones its HTTPS API serves and clients pin) requires TLS of every
client, as qemu and libnbd expect: before NBD_OPT_STARTTLS, every option but STARTTLS and
ABORT is answered NBD_REP_ERR_TLS_REQD (NBD_OPT_EXPORT_NAME, which has no error reply, is a
hang-up); STARTTLS is acknowledged, the TLS handshake runs on the same connection, and the
rest of the negotiation and the transmission run inside it. The handshake limits
(``handshake_timeout``, options per handshake, pending connections) count from the TCP
connection, so the TLS handshake is inside them. A server on an address that is not
loopback must have ``tls`` (``start()`` refuses otherwise); its URIs are
``nbds://HOST:PORT/NAME.SECRET``. A loopback server may stay plain.

Connection limits: an idle connection must never lock a valid client out. A client has
``handshake_timeout`` seconds (10 by default) from connecting to choosing an export, or it is
dropped. Connections still in their handshake are limited per address
(``max_pending_per_source``, 16) and in all (``max_pending``, 128); at either limit a new
connection is not refused but displaces the oldest unfinished one (of its own address, or of
the address holding most), so a client that completes its handshake at once always gets in,
however many idle connections came before it. ``max_connections`` (256) bounds the
established connections (those serving an export), checked when a client chooses its export.
``connection_stats()`` reports the counts.

The server runs its own asyncio event loop in a thread (``start()``/``stop()``), beside
uvicorn in the appliance process. ``remove_export`` disconnects the export's clients and
returns only when none of its requests is still running, so the caller may then close or
delete the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hmac
import ipaddress
import logging
import os
import re
import secrets
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

from tandem.errors import (
    AlreadyExists,
    CannotListen,
    Conflict,
    CopyFrozen,
    Forbidden,
    InvalidInput,
    NameInvalid,
    NbdNeedsTls,
    NotFound,
    PoolFull,
    TandemError,
)
from tandem.storage.manifest import VolumeManifest
from tandem.storage.overlay import ChunkCache, ImageReader
from tandem.storage.pool import ChunkPool
from tandem.transport.nbdproto import (  # noqa: F401  (re-exported: tests use them from here)
    ALLOCATION_ID,
    BASE_ALLOCATION,
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLAG_FUA,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    COMMAND_NAMES,
    EINVAL,
    EIO,
    ENOSPC,
    EPERM,
    ESHUTDOWN,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_CAN_MULTI_CONN,
    FLAG_FIXED_NEWSTYLE,
    FLAG_HAS_FLAGS,
    FLAG_NO_ZEROES,
    FLAG_READ_ONLY,
    FLAG_SEND_FLUSH,
    FLAG_SEND_FUA,
    FLAG_SEND_TRIM,
    FLAG_SEND_WRITE_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_EXTENTS,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_REPLY_MAGIC,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TLS_REQD,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_OFFSET_DATA,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    STRUCTURED_REPLY_MAGIC,
)
from tandem.transport.nbdproto import CHUNK as _CHUNK
from tandem.transport.nbdproto import DATA_CHUNK as _DATA_CHUNK
from tandem.transport.nbdproto import HELLO as _HELLO
from tandem.transport.nbdproto import OPT_REPLY as _OPT_REPLY
from tandem.transport.nbdproto import OPTION as _OPTION
from tandem.transport.nbdproto import REPLY as _REPLY
from tandem.transport.nbdproto import REQUEST as _REQUEST

log = logging.getLogger(__name__)

DEFAULT_PORT = 10809

# --- limits ---------------------------------------------------------------------------
MAX_PAYLOAD = 32 * 1024 * 1024  # the protocol's default maximum block size
PREFERRED_BLOCK = 64 * 1024  # an overlay block: smaller writes cost a read-modify-write
MAX_INFLIGHT = 16  # concurrent requests per connection
INLINE_WRITE = 2 * PREFERRED_BLOCK  # writes up to this size may be served on the event loop
INLINE_READ = 4 * 1024 * 1024  # … and reads up to this size (longer ones copy too much)
MAX_OPTION_LEN = 8192  # names are at most 4096 bytes; anything longer is hostile
MAX_OPTIONS = 32  # options per handshake
HANDSHAKE_TIMEOUT = 10.0  # seconds a client has from connecting to choosing an export
MAX_PENDING_PER_SOURCE = 16  # connections of one address still in their handshake
MAX_PENDING = 128  # connections of all addresses still in their handshake
READ_BUFFER = 4 * 1024 * 1024  # stream buffer: large writes arrive without stalls
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
SECRET_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")


class Backend(Protocol):
    """What an export serves: an Overlay, an ImageBackend, or anything alike."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...

    def trim(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...


# A backend may also offer (the server looks for them, all optional):
#   read_nowait(offset, length) -> bytes | None   a read answered from memory, else None
#   try_write(offset, data) -> bool                a small write done without waiting, else False
#   extents(offset, length) -> list[(length, zero)]  which ranges read as zeros (block status)


class ImageBackend:
    """A read-only backend over an immutable image (a replica presented as it is)."""

    def __init__(
        self, pool: ChunkPool, manifest: VolumeManifest, *, cache: ChunkCache | None = None
    ) -> None:
        self._reader = ImageReader(pool, manifest, cache)

    @property
    def size(self) -> int:
        return self._reader.size

    def read(self, offset: int, length: int) -> bytes:
        return self._reader.read(offset, length)

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        return self._reader.read_nowait(offset, length)

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        return self._reader.extents(offset, length)

    def _refuse(self) -> None:
        raise Forbidden("This image is read-only. Present a virtual copy of it to write to it.")

    def write(self, offset: int, data: bytes) -> None:
        self._refuse()

    def write_zeroes(self, offset: int, length: int) -> None:
        self._refuse()

    def trim(self, offset: int, length: int) -> None:
        self._refuse()

    def flush(self) -> None:
        return None


@dataclass(frozen=True)
class ExportInfo:
    name: str
    uri: str
    read_only: bool
    size: int
    connections: int


@dataclass(eq=False)
class _Export:
    name: str
    backend: Backend
    read_only: bool
    secret: str
    connections: set[_Connection] = field(default_factory=set)
    removed: bool = False

    @property
    def wire_name(self) -> str:
        return f"{self.name}.{self.secret}" if self.secret else self.name

    @property
    def flags(self) -> int:
        flags = (
            FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_CAN_MULTI_CONN
        )
        return flags | FLAG_READ_ONLY if self.read_only else flags


@dataclass(eq=False)
class _Connection:
    writer: asyncio.StreamWriter
    task: asyncio.Task[None] | None
    export: _Export | None = None
    source: str = ""
    pending: bool = True  # still in its handshake
    structured: bool = False  # NBD_OPT_STRUCTURED_REPLY negotiated
    meta_export: bytes | None = None  # the export base:allocation was selected for


@dataclass(frozen=True)
class ConnectionStats:
    """What the server holds now (``pending``: still in their handshake, by address in
    ``pending_by_source``; ``established``: serving an export) and has done since it started
    (``accepted`` connections, ``evicted`` ones dropped unfinished to make room)."""

    pending: int
    established: int
    accepted: int
    evicted: int
    pending_by_source: dict[str, int]


class _HangUp(Exception):
    """The protocol says to drop the connection."""


def is_loopback(host: str) -> bool:
    """True if every address ``host`` names is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def tls_context(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ssl.SSLContext:
    """The server side of NBD over TLS, with the appliance's certificate and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def nbd_errno(exc: BaseException) -> int:
    """The NBD error value a backend exception is reported as."""
    if isinstance(exc, InvalidInput):
        return EINVAL
    if isinstance(exc, PoolFull):
        return ENOSPC
    if isinstance(exc, Forbidden | CopyFrozen):
        return EPERM  # (a frozen copy is read-only while a failback checks or discards it)
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return ENOSPC
        if exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
            return EPERM
    return EIO


class NbdServer:
    """An NBD server on ``host:port`` (port 0: any free port, see ``port`` after start)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        advertise: str | None = None,
        max_connections: int = 256,
        workers: int | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_pending: int = MAX_PENDING,
        max_pending_per_source: int = MAX_PENDING_PER_SOURCE,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.tls = tls
        self._port = port
        self.advertise = advertise or host
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.max_pending = max(1, max_pending)
        self.max_pending_per_source = max(1, max_pending_per_source)
        self.workers = workers or min(32, 4 * (os.cpu_count() or 2))
        self.loopback = is_loopback(host)
        self._lock = threading.Lock()
        self._exports: dict[str, _Export] = {}
        self._conns: set[_Connection] = set()
        # Connections still in their handshake, oldest first: all of them, and per address.
        self._pending: dict[_Connection, None] = {}
        self._pending_by_source: dict[str, dict[_Connection, None]] = {}
        self._established = 0
        self._accepted = 0
        self._evicted = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def running(self) -> bool:
        return self._thread is not None

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Listen, serving from a thread of its own; returns once the port is bound."""
        if self._thread is not None:
            raise Conflict(detail="the NBD server is already running")
        if not self.loopback and self.tls is None:
            raise NbdNeedsTls(
                host=self.host,
                what="must use TLS",
                fix="Give the server the appliance's certificate (tls=), or listen on loopback",
            )
        if not self.loopback:
            with self._lock:
                open_exports = [e.name for e in self._exports.values() if not e.secret]
            if open_exports:
                raise NbdNeedsTls(
                    host=self.host,
                    what=f"serves no export without a secret ({', '.join(open_exports)} have none)",
                    fix="Give every export a secret",
                )
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, self.host, self._port, limit=READ_BUFFER)
                )
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            self._port = int(self._server.sockets[0].getsockname()[1])
            ready.set()
            loop.run_forever()

        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="nbd-io")
        self._loop = loop
        thread = threading.Thread(target=run, name=f"nbd-{self.host}:{self._port}", daemon=True)
        thread.start()
        ready.wait()
        if failure:
            thread.join()
            loop.close()
            self._executor.shutdown()
            self._loop = self._executor = None
            exc = failure[0]
            if isinstance(exc, OSError):
                raise CannotListen(
                    address=f"{self.host}:{self._port} (NBD)",
                    reason=exc.strerror or exc,
                    option='"nbd"',
                ) from exc
            raise exc
        self._thread = thread
        log.info("NBD server listening on %s:%d", self.host, self._port)

    def stop(self) -> None:
        """Disconnect every client, wait for running requests, stop listening; idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        if self._executor is not None:
            self._executor.shutdown()
        self._thread = self._loop = self._server = self._executor = None

    def __enter__(self) -> NbdServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- exports ------------------------------------------------------------------------

    def add_export(
        self, name: str, backend: Backend, read_only: bool = False, secret: str | None = None
    ) -> str:
        """Export ``backend`` as ``name``; returns the URI clients connect to.

        ``secret=None`` makes a random 256-bit secret (the default: the URI is then a
        capability); ``secret=""`` makes a plain name, allowed on a loopback server only.
        """
        if not NAME_RE.fullmatch(name):
            raise NameInvalid(
                what="export name",
                name=name,
                rule="1-64 letters, digits, '-' or '_', starting with a letter or digit",
            )
        if secret is None:
            secret = secrets.token_urlsafe(32)
        elif secret and not SECRET_RE.fullmatch(secret):
            raise InvalidInput(detail="an export secret is 16-128 letters, digits, '-' or '_'")
        elif not secret and not self.loopback:
            raise NbdNeedsTls(
                host=self.host,
                what="serves no export without a secret",
                fix="Leave the secret to be generated",
            )
        export = _Export(name, backend, read_only, secret)
        with self._lock:
            if name in self._exports:
                raise AlreadyExists(what="NBD export", name=name)
            self._exports[name] = export
        log.info("NBD export %s added (%s)", name, "read-only" if read_only else "writable")
        return self._uri(export)

    def remove_export(self, name: str) -> None:
        """Stop exporting ``name``: its clients are disconnected, its running requests end
        before this returns (then the backend may be closed)."""
        with self._lock:
            export = self._exports.pop(name, None)
            if export is None:
                raise NotFound(what="NBD export", name=name, listing="image list")
            export.removed = True
        loop = self._loop
        if loop is not None and self._thread is not None:
            if threading.current_thread() is self._thread:
                raise Conflict(detail="remove_export called from the NBD server's own thread")
            asyncio.run_coroutine_threadsafe(self._drop(export), loop).result()
        log.info("NBD export %s removed", name)

    def exports(self) -> list[ExportInfo]:
        with self._lock:
            current = sorted(self._exports.values(), key=lambda e: e.name)
        return [
            ExportInfo(e.name, self._uri(e), e.read_only, e.backend.size, len(e.connections))
            for e in current
        ]

    def connection_stats(self) -> ConnectionStats:
        """The connections held now and counted so far (see ``ConnectionStats``)."""
        with self._lock:
            return ConnectionStats(
                pending=len(self._pending),
                established=self._established,
                accepted=self._accepted,
                evicted=self._evicted,
                pending_by_source={k: len(v) for k, v in self._pending_by_source.items()},
            )

    def uri(self, name: str) -> str:
        with self._lock:
            export = self._exports.get(name)
        if export is None:
            raise NotFound(what="NBD export", name=name, listing="image list")
        return self._uri(export)

    def _uri(self, export: _Export) -> str:
        host = self.advertise
        if ":" in host:
            host = f"[{host}]"
        scheme = "nbds" if self.tls is not None else "nbd"
        return f"{scheme}://{host}:{self._port}/{export.wire_name}"

    def _match(self, wire: bytes) -> _Export | None:
        """The export a client asked for, if name and secret match (caller holds the lock)."""
        try:
            text = wire.decode("utf-8")
        except UnicodeDecodeError:
            return None
        name, sep, secret = text.partition(".")
        export = self._exports.get(name)
        if export is None:
            return None
        if export.secret:
            if not sep or not hmac.compare_digest(secret.encode(), export.secret.encode()):
                return None
        elif text != name:
            return None
        return export

    def _find(self, wire: bytes) -> _Export | None:
        with self._lock:
            return self._match(wire)

    def _attach(self, conn: _Connection, wire: bytes) -> _Export | None:
        """Like _find, and registers the connection with the export in the same step, so
        that remove_export either refuses it or disconnects it (loop thread)."""
        with self._lock:
            export = self._match(wire)
            if export is not None:
                conn.export = export
                export.connections.add(conn)
            return export

    # --- the event loop side ------------------------------------------------------------

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._disconnect(set(self._conns))
        if self._server is not None:
            await self._server.wait_closed()

    async def _drop(self, export: _Export) -> None:
        with self._lock:
            conns = set(export.connections)
        await self._disconnect(conns)

    async def _disconnect(self, conns: set[_Connection]) -> None:
        for conn in conns:
            conn.writer.transport.abort()
        tasks = [
            c.task for c in conns if c.task is not None and c.task is not asyncio.current_task()
        ]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _admit(self, conn: _Connection) -> None:
        """Count a new connection as pending; make room first by dropping the oldest pending
        connection of its address (at ``max_pending_per_source``), or of the address with
        most pending ones (at ``max_pending``). Idle connections thus never lock a client
        out: a new one displaces them (loop thread; the caller holds the lock)."""
        mine = self._pending_by_source.setdefault(conn.source, {})
        victim: _Connection | None = None
        if len(mine) >= self.max_pending_per_source:
            victim = next(iter(mine))
        elif len(self._pending) >= self.max_pending:
            busiest = max(self._pending_by_source.values(), key=len)
            victim = next(iter(busiest))
        if victim is not None:
            self._unpend(victim)
            self._evicted += 1
            victim.writer.transport.abort()
            log.debug("NBD: dropped an unfinished handshake from %s to make room", victim.source)
        self._pending[conn] = None
        mine[conn] = None
        self._accepted += 1

    def _unpend(self, conn: _Connection) -> None:
        """No longer count ``conn`` as pending (the caller holds the lock)."""
        if not conn.pending:
            return
        conn.pending = False
        self._pending.pop(conn, None)
        mine = self._pending_by_source.get(conn.source)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self._pending_by_source[conn.source]

    def _make_room(self) -> None:
        """Before a client attaches to an export: refuse it when ``max_connections`` are
        established already."""
        with self._lock:
            if self._established >= self.max_connections:
                log.warning("NBD: refusing a client: %d connections already", self._established)
                raise _HangUp("too many connections")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        conn = _Connection(writer, asyncio.current_task(), source=source)
        with self._lock:
            self._admit(conn)
        self._conns.add(conn)
        established = False
        try:
            export = await asyncio.wait_for(
                self._negotiate(conn, reader, writer), self.handshake_timeout
            )
            with self._lock:
                if not conn.pending:
                    raise _HangUp("dropped to make room")  # evicted as the handshake ended
                self._unpend(conn)
                if export is not None:
                    self._established += 1
                    established = True
            if export is not None:
                log.debug("NBD: %s connected to %s", peer, export.name)
                await self._transmit(conn, export, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, _HangUp, TimeoutError):
            pass
        except ssl.SSLError as exc:  # a client that does not trust us, or does not speak TLS
            log.debug("NBD: TLS with %s failed: %s", peer, exc)
        except Exception:
            log.exception("NBD: connection from %s failed", peer)
        finally:
            self._conns.discard(conn)
            with self._lock:
                self._unpend(conn)
                if established:
                    self._established -= 1
                if conn.export is not None:
                    conn.export.connections.discard(conn)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _negotiate(
        self, conn: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Export | None:
        writer.write(_HELLO.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        await writer.drain()
        (client_flags,) = struct.unpack(">I", await reader.readexactly(4))
        if client_flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            raise _HangUp("unknown client flags")
        no_zeroes = bool(client_flags & FLAG_C_NO_ZEROES)

        async def reply(option: int, kind: int, data: bytes = b"") -> None:
            writer.write(_OPT_REPLY.pack(OPT_REPLY_MAGIC, option, kind, len(data)) + data)
            await writer.drain()

        encrypted = False
        for _ in range(MAX_OPTIONS):
            magic, option, length = _OPTION.unpack(await reader.readexactly(_OPTION.size))
            if magic != IHAVEOPT or length > MAX_OPTION_LEN:
                raise _HangUp("bad option header")
            data = await reader.readexactly(length)
            if self.tls is not None and not encrypted and option != OPT_ABORT:
                if option == OPT_EXPORT_NAME:
                    raise _HangUp("NBD_OPT_EXPORT_NAME before STARTTLS")  # it has no error reply
                if option != OPT_STARTTLS:
                    await reply(option, REP_ERR_TLS_REQD, b"this server requires STARTTLS first")
                    continue
                if data:
                    await reply(option, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
                    continue
                await reply(option, REP_ACK)
                # The stream now runs over TLS; a failed TLS handshake is an SSLError (an
                # OSError), which ends the connection like any other.
                await writer.start_tls(self.tls)
                encrypted = True
                continue
            if option == OPT_STARTTLS and encrypted:
                await reply(option, REP_ERR_INVALID, b"TLS is already negotiated")
                continue
            if option == OPT_EXPORT_NAME:
                self._make_room()
                export = self._attach(conn, data)
                if export is None:
                    raise _HangUp("unknown export")  # the only refusal this option has
                if conn.meta_export is not None and self._find(conn.meta_export) is not export:
                    conn.meta_export = None  # selected for another export: none here
                pad = b"" if no_zeroes else bytes(124)
                writer.write(struct.pack(">QH", export.backend.size, export.flags) + pad)
                await writer.drain()
                return export
            if option == OPT_ABORT:
                await reply(option, REP_ACK)
                return None
            if option == OPT_LIST:
                if data:
                    await reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
                    continue
                with self._lock:
                    names = sorted(e.name for e in self._exports.values() if not e.secret)
                for name in names:  # exports with a secret are never listed
                    raw = name.encode()
                    await reply(option, REP_SERVER, struct.pack(">I", len(raw)) + raw)
                await reply(option, REP_ACK)
                continue
            if option in (OPT_INFO, OPT_GO):
                request = _parse_info_request(data)
                if request is None:
                    await reply(option, REP_ERR_INVALID, b"malformed request")
                    continue
                wire, infos = request
                if option == OPT_GO:
                    self._make_room()
                export = self._attach(conn, wire) if option == OPT_GO else self._find(wire)
                if export is None:
                    await reply(option, REP_ERR_UNKNOWN, b"no such export, or a wrong secret")
                    continue
                info = struct.pack(">HQH", INFO_EXPORT, export.backend.size, export.flags)
                await reply(option, REP_INFO, info)
                if INFO_BLOCK_SIZE in infos:
                    sizes = struct.pack(">HIII", INFO_BLOCK_SIZE, 1, PREFERRED_BLOCK, MAX_PAYLOAD)
                    await reply(option, REP_INFO, sizes)
                await reply(option, REP_ACK)
                if option == OPT_GO:
                    if conn.meta_export is not None and self._find(conn.meta_export) is not export:
                        conn.meta_export = None  # selected for another export: none here
                    return export
                continue
            if option == OPT_STRUCTURED_REPLY:
                if data:
                    await reply(option, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
                    continue
                conn.structured = True
                await reply(option, REP_ACK)
                continue
            if option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                if not conn.structured:
                    await reply(option, REP_ERR_INVALID, b"negotiate structured replies first")
                    continue
                meta = _parse_meta_request(data)
                if meta is None:
                    await reply(option, REP_ERR_INVALID, b"malformed request")
                    continue
                wire, queries = meta
                if self._find(wire) is None:
                    await reply(option, REP_ERR_UNKNOWN, b"no such export, or a wrong secret")
                    continue
                chosen = _allocation_asked(queries, listing=option == OPT_LIST_META_CONTEXT)
                if option == OPT_SET_META_CONTEXT:
                    conn.meta_export = wire if chosen else None
                if chosen:
                    ctx = struct.pack(">I", ALLOCATION_ID if option == OPT_SET_META_CONTEXT else 0)
                    await reply(option, REP_META_CONTEXT, ctx + BASE_ALLOCATION.encode())
                await reply(option, REP_ACK)
                continue
            await reply(option, REP_ERR_UNSUP, b"option not supported by this server")
        raise _HangUp("too many options")

    async def _transmit(
        self,
        conn: _Connection,
        export: _Export,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        slots = asyncio.Semaphore(MAX_INFLIGHT)
        running: set[asyncio.Task[None]] = set()
        backend = export.backend
        read_nowait: Callable[[int, int], bytes | None] | None = getattr(
            backend, "read_nowait", None
        )
        try_write: Callable[[int, bytes], bool] | None = getattr(backend, "try_write", None)
        size = backend.size
        try:
            while True:
                await slots.acquire()
                header = await reader.readexactly(_REQUEST.size)
                magic, flags, command, handle, offset, length = _REQUEST.unpack(header)
                if magic != REQUEST_MAGIC:
                    raise _HangUp("bad request magic")
                if (
                    command == CMD_READ
                    and read_nowait is not None
                    and length <= INLINE_READ
                    and offset + length <= size
                    and not export.removed
                ):
                    # Answered here when the data is in memory: a thread hand-off costs
                    # more than such a read. Anything else (or an error) takes the pool.
                    try:
                        data = read_nowait(offset, length)
                    except Exception:
                        data = None
                    if data is not None:
                        slots.release()
                        writer.write(_data_reply(conn.structured, handle, offset, data))
                        if writer.transport.get_write_buffer_size() > READ_BUFFER:
                            await writer.drain()
                        continue
                payload = b""
                if command == CMD_WRITE:
                    if length > MAX_PAYLOAD:
                        raise _HangUp("write larger than the maximum payload")
                    payload = await reader.readexactly(length)
                    if (
                        try_write is not None
                        and length <= INLINE_WRITE
                        and not flags & CMD_FLAG_FUA
                        and not export.read_only
                        and offset + length <= size
                        and not export.removed
                    ):
                        # A small write to the page cache costs less than a thread
                        # hand-off; one that would wait on a lock or the base takes the pool.
                        try:
                            done = try_write(offset, payload)
                        except Exception:
                            done = False  # the pool's attempt reports the error
                        if done:
                            slots.release()
                            writer.write(_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle))
                            if writer.transport.get_write_buffer_size() > READ_BUFFER:
                                await writer.drain()
                            continue
                if command == CMD_DISC:
                    return  # after the requests in flight are answered (finally)
                task = asyncio.create_task(
                    self._serve(
                        conn, export, writer, flags, command, handle, offset, length, payload
                    )
                )
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _: slots.release())
        finally:
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _serve(
        self,
        conn: _Connection,
        export: _Export,
        writer: asyncio.StreamWriter,
        flags: int,
        command: int,
        handle: int,
        offset: int,
        length: int,
        payload: bytes,
    ) -> None:
        allocation = conn.meta_export is not None
        error, data = await self._execute(
            export, flags, command, offset, length, payload, allocation
        )
        if writer.is_closing():
            return
        try:
            if error and command == CMD_READ and conn.structured:
                # (a structured client gets no simple reply to a read, not even an error)
                writer.write(_error_chunk(handle, error))
            elif error:
                writer.write(_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle))
            elif command == CMD_READ:
                writer.write(_data_reply(conn.structured, handle, offset, data))
            elif command == CMD_BLOCK_STATUS:
                head = _CHUNK.pack(
                    STRUCTURED_REPLY_MAGIC,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_BLOCK_STATUS,
                    handle,
                    len(data),
                )
                writer.write(head + data)
            else:
                writer.write(_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle))
            await writer.drain()
        except (ConnectionError, RuntimeError):
            pass  # the client went away; the connection's reader notices

    async def _execute(
        self,
        export: _Export,
        flags: int,
        command: int,
        offset: int,
        length: int,
        payload: bytes,
        allocation: bool = False,
    ) -> tuple[int, bytes]:
        backend = export.backend
        size = backend.size
        inside = offset + length <= size
        fua = bool(flags & CMD_FLAG_FUA)
        op: Callable[[], bytes | None]
        if command == CMD_READ:
            if length > MAX_PAYLOAD or not inside:
                return EINVAL, b""
            op = functools.partial(backend.read, offset, length)
        elif command == CMD_FLUSH:
            op = backend.flush
        elif command == CMD_BLOCK_STATUS:
            if not allocation or not inside or length == 0:
                return EINVAL, b""  # (no context selected: the protocol's answer too)
            op = functools.partial(
                _block_status, backend, offset, length, bool(flags & CMD_FLAG_REQ_ONE)
            )
        elif command in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            if export.read_only:
                return EPERM, b""
            if not inside:
                return (EINVAL if command == CMD_TRIM else ENOSPC), b""
            op = _mutation(backend, command, offset, length, payload, fua)
        else:
            return EINVAL, b""
        if export.removed:
            return ESHUTDOWN, b""
        assert self._executor is not None
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, op)
        except Exception as exc:
            code = nbd_errno(exc)
            if code == EIO:
                log.error(
                    "NBD %s: %s of %d bytes at %d: %s",
                    export.name,
                    COMMAND_NAMES.get(command, command),
                    length,
                    offset,
                    exc,
                    exc_info=not isinstance(exc, TandemError | OSError),
                )
            return code, b""
        if command == CMD_READ:
            if result is None or len(result) != length:
                log.error("NBD %s: backend returned a short read at %d", export.name, offset)
                return EIO, b""
            return 0, result
        if command == CMD_BLOCK_STATUS and result is not None:
            return 0, result
        return 0, b""


def _data_reply(structured: bool, handle: int, offset: int, data: bytes) -> bytes:
    """A successful read's reply: simple, or one OFFSET_DATA chunk marked done."""
    if not structured:
        return _REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle) + data
    head = _DATA_CHUNK.pack(
        STRUCTURED_REPLY_MAGIC,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        handle,
        8 + len(data),
        offset,
    )
    return head + data


def _error_chunk(handle: int, error: int) -> bytes:
    """A structured ERROR chunk (no message), marked done."""
    body = struct.pack(">IH", error, 0)
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6) + body


def _block_status(backend: Backend, offset: int, length: int, req_one: bool) -> bytes:
    """The base:allocation payload for a range: context id, then (length, flags) descriptors.
    A range the backend knows reads as zeros is a hole; anything else is data (flags 0,
    always a safe answer)."""
    extents_of: Callable[[int, int], list[tuple[int, bool]]] | None = getattr(
        backend, "extents", None
    )
    extents = extents_of(offset, length) if extents_of is not None else [(length, False)]
    parts = [struct.pack(">I", ALLOCATION_ID)]
    for n, zero in extents[: 1 if req_one else MAX_EXTENTS]:
        parts.append(struct.pack(">II", n, STATE_HOLE | STATE_ZERO if zero else 0))
    return b"".join(parts)


def _parse_meta_request(data: bytes) -> tuple[bytes, list[bytes]] | None:
    """(export name, queries) of an NBD_OPT_LIST/SET_META_CONTEXT payload; None if malformed."""
    if len(data) < 8:
        return None
    (name_len,) = struct.unpack_from(">I", data)
    pos = 4 + name_len
    if pos + 4 > len(data):
        return None
    name = data[4:pos]
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        if pos + 4 > len(data):
            return None
        (n,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + n > len(data):
            return None
        queries.append(data[pos : pos + n])
        pos += n
    if pos != len(data):
        return None
    return name, queries


def _allocation_asked(queries: list[bytes], *, listing: bool) -> bool:
    """Whether the queries select base:allocation (for a listing, no query means all)."""
    if not queries:
        return listing
    return any(q in (b"base:", BASE_ALLOCATION.encode()) for q in queries)


def _mutation(
    backend: Backend, command: int, offset: int, length: int, payload: bytes, fua: bool
) -> Callable[[], None]:
    def run() -> None:
        if command == CMD_WRITE:
            backend.write(offset, payload)
        elif command == CMD_WRITE_ZEROES:
            backend.write_zeroes(offset, length)
        else:
            backend.trim(offset, length)
        if fua:
            backend.flush()

    return run


def _parse_info_request(data: bytes) -> tuple[bytes, set[int]] | None:
    """(export name, requested info types) of an NBD_OPT_INFO/GO payload; None if malformed."""
    if len(data) < 6:
        return None
    (name_len,) = struct.unpack_from(">I", data)
    if 4 + name_len + 2 > len(data):
        return None
    name = data[4 : 4 + name_len]
    (count,) = struct.unpack_from(">H", data, 4 + name_len)
    rest = data[4 + name_len + 2 :]
    if len(rest) != 2 * count:
        return None
    return name, set(struct.unpack(f">{count}H", rest))


__all__ = [
    "DEFAULT_PORT",
    "Backend",
    "ExportInfo",
    "ImageBackend",
    "NbdServer",
    "is_loopback",
    "nbd_errno",
]
