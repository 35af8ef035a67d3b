"""A compact NBD client: what reading a libvirt pull-mode backup export, and writing a
powered-off VM's disk through ``qemu-nbd`` (a restore), need.

Protocol (``transport.nbdproto``; proto.md): fixed newstyle handshake, NBD_OPT_STRUCTURED_REPLY,
NBD_OPT_SET_META_CONTEXT (``base:allocation`` and, for an incremental backup, qemu's
``qemu:dirty-bitmap:backup-<disk>``), NBD_OPT_GO; then NBD_CMD_READ, NBD_CMD_BLOCK_STATUS,
NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES and NBD_CMD_FLUSH, one request at a time, over a unix
socket (libvirt's ``<server transport='unix'>``) or TCP.

Invariants
- Nothing from the server is trusted: every length is bounded, a reply must carry the
  handle that was sent, a read must return exactly the bytes asked for (data chunks and hole
  chunks covering the range, nothing outside it) and block-status extents must lie inside
  the export; anything else raises ``NbdProtocolError``.
- ``extents(context)`` returns (offset, length, flags) runs covering [0, size) exactly.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from types import TracebackType

from tandem.errors import TandemError
from tandem.transport import nbdproto as p

MAX_READ = 32 * 1024 * 1024
MAX_REPLY = MAX_READ + 64
STATUS_SPAN = 1 << 30
"""Bytes asked about in one block-status request (the server may answer fewer)."""
DIRTY = 1 << 0
"""The one flag of a ``qemu:dirty-bitmap:`` context: the extent changed."""


class NbdProtocolError(TandemError):
    """The NBD server at {where} broke the protocol: {detail}. Check that it is qemu's or
    libvirt's export and run the operation again."""

    http_status = 502


class NbdClient:
    """One connection to one export (``size``, ``contexts``: name -> id)."""

    def __init__(
        self,
        *,
        export: str,
        unix: str | None = None,
        tcp: tuple[str, int] | None = None,
        contexts: list[str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        if unix is None and tcp is None:
            raise ValueError("NbdClient needs unix or tcp")
        self.where = unix if unix else f"{tcp[0]}:{tcp[1]}" if tcp else ""
        family = socket.AF_UNIX if unix else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.size = 0
        self.contexts: dict[str, int] = {}
        self._handle = 0
        try:
            self.sock.connect(unix if unix else tcp)  # type: ignore[arg-type]
            self._handshake(export, contexts or [])
        except BaseException:
            self.sock.close()
            raise

    # --- plumbing ---------------------------------------------------------------------
    def _fail(self, detail: str) -> NbdProtocolError:
        return NbdProtocolError(where=self.where, detail=detail)

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise self._fail("the connection closed")
            got += k
        return bytes(buf)

    def _option(self, opt: int, data: bytes) -> list[tuple[int, bytes]]:
        """Send an option; returns its replies up to and including the final one."""
        self.sock.sendall(p.OPTION.pack(p.IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, got_opt, rtype, length = p.OPT_REPLY.unpack(self._recv(p.OPT_REPLY.size))
            if magic != p.OPT_REPLY_MAGIC or got_opt != opt or length > 65536:
                raise self._fail("a malformed option reply")
            payload = self._recv(length)
            replies.append((rtype, payload))
            if rtype == p.REP_ACK or rtype & p.REP_FLAG_ERROR:
                return replies

    def _handshake(self, export: str, contexts: list[str]) -> None:
        magic, ihaveopt, flags = p.HELLO.unpack(self._recv(p.HELLO.size))
        if magic != p.NBDMAGIC or ihaveopt != p.IHAVEOPT or not flags & p.FLAG_FIXED_NEWSTYLE:
            raise self._fail("no fixed newstyle handshake")
        client = p.FLAG_C_FIXED_NEWSTYLE | (flags & p.FLAG_NO_ZEROES and p.FLAG_C_NO_ZEROES)
        self.sock.sendall(struct.pack(">I", client))
        name = export.encode()
        # Always structured: a read's data then arrives in chunks this client checks.
        if self._option(p.OPT_STRUCTURED_REPLY, b"")[-1][0] != p.REP_ACK:
            raise self._fail("no structured replies")
        if contexts:
            query = struct.pack(">I", len(name)) + name + struct.pack(">I", len(contexts))
            for ctx in contexts:
                query += struct.pack(">I", len(ctx)) + ctx.encode()
            for rtype, payload in self._option(p.OPT_SET_META_CONTEXT, query):
                if rtype == p.REP_META_CONTEXT and len(payload) >= 4:
                    (cid,) = struct.unpack(">I", payload[:4])
                    self.contexts[payload[4:].decode(errors="replace")] = cid
                elif rtype & p.REP_FLAG_ERROR:
                    raise self._fail(f"meta contexts refused ({payload.decode(errors='replace')})")
        go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        for rtype, payload in self._option(p.OPT_GO, go):
            if rtype == p.REP_INFO and len(payload) >= 12:
                (info,) = struct.unpack(">H", payload[:2])
                if info == p.INFO_EXPORT:
                    self.size, _ = struct.unpack(">QH", payload[2:12])
            elif rtype & p.REP_FLAG_ERROR:
                raise self._fail(
                    f"export {export!r} refused ({payload.decode(errors='replace') or rtype})"
                )

    def _request(self, cmd: int, offset: int, length: int, flags: int = 0) -> int:
        self._handle += 1
        self.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, self._handle, offset, length))
        return self._handle

    def _chunks(self, handle: int) -> list[tuple[int, bytes]]:
        """The structured reply chunks (type, payload) of request ``handle``."""
        out: list[tuple[int, bytes]] = []
        while True:
            (magic,) = struct.unpack(">I", self._recv(4))
            if magic == p.SIMPLE_REPLY_MAGIC:
                error, got = struct.unpack(">IQ", self._recv(12))
                if got != handle:
                    raise self._fail("a reply to a request never sent")
                if error:
                    raise self._fail(f"error {error}")
                return out
            if magic != p.STRUCTURED_REPLY_MAGIC:
                raise self._fail("a reply with a bad magic")
            flags, rtype, got, length = struct.unpack(">HHQI", self._recv(16))
            if got != handle or length > MAX_REPLY:
                raise self._fail("a reply to a request never sent, or too long")
            payload = self._recv(length)
            if rtype in (p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET):
                (error,) = struct.unpack(">I", payload[:4])
                raise self._fail(f"error {error} on a request")
            if rtype != p.REPLY_TYPE_NONE:
                out.append((rtype, payload))
            if flags & p.REPLY_FLAG_DONE:
                return out

    # --- commands ---------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (holes the server reports read as zeros)."""
        if length <= 0:
            return b""
        if offset < 0 or length > MAX_READ or offset + length > self.size:
            raise self._fail(f"a read of {length} bytes at {offset} is outside the export")
        handle = self._request(p.CMD_READ, offset, length)
        buf = bytearray(length)
        for rtype, payload in self._chunks(handle):
            if rtype == p.REPLY_TYPE_OFFSET_DATA:
                (at,) = struct.unpack(">Q", payload[:8])
                data = payload[8:]
            elif rtype == p.REPLY_TYPE_OFFSET_HOLE:
                at, n = struct.unpack(">QI", payload[:12])
                data = bytes(n)
            else:
                raise self._fail(f"reply type {rtype} to a read")
            rel = at - offset
            if rel < 0 or rel + len(data) > length:
                raise self._fail("read data outside the range asked for")
            buf[rel : rel + len(data)] = data
        return bytes(buf)

    def _check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self._fail(f"a {what} of {length} bytes at {offset} is outside the export")

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (acknowledged: the server has it, not yet durable)."""
        if not data:
            return
        if len(data) > MAX_READ:
            raise ValueError("an NBD write is at most MAX_READ bytes")
        self._check_range(offset, len(data), "write")
        self._handle += 1
        self.sock.sendall(
            p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, self._handle, offset, len(data)) + data
        )
        if self._chunks(self._handle):
            raise self._fail("data in the reply to a write")

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros."""
        if length <= 0:
            return
        self._check_range(offset, length, "write of zeros")
        if self._chunks(self._request(p.CMD_WRITE_ZEROES, offset, length)):
            raise self._fail("data in the reply to a write of zeros")

    def flush(self) -> None:
        """Make every acknowledged write durable."""
        if self._chunks(self._request(p.CMD_FLUSH, 0, 0)):
            raise self._fail("data in the reply to a flush")

    def extents(self, context: str) -> list[tuple[int, int, int]]:
        """(offset, length, flags) runs of ``context`` over the whole export."""
        cid = self.contexts.get(context)
        if cid is None:
            raise self._fail(f"the server did not select the context {context}")
        out: list[tuple[int, int, int]] = []
        pos = 0
        while pos < self.size:
            span = min(STATUS_SPAN, self.size - pos)
            handle = self._request(p.CMD_BLOCK_STATUS, pos, span)
            advanced = pos
            for rtype, payload in self._chunks(handle):
                if rtype != p.REPLY_TYPE_BLOCK_STATUS or len(payload) < 12:
                    raise self._fail(f"reply type {rtype} to block status")
                (got_id,) = struct.unpack(">I", payload[:4])
                if got_id != cid:
                    continue
                for i in range(4, len(payload) - 7, 8):
                    length, flags = struct.unpack(">II", payload[i : i + 8])
                    length = min(length, self.size - advanced)
                    if length == 0:
                        break
                    out.append((advanced, length, flags))
                    advanced += length
            if advanced == pos:
                raise self._fail("block status made no progress")
            pos = advanced
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._request(p.CMD_DISC, 0, 0)
        self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
