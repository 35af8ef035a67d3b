"""A sample application that keeps writing, for the demo and end-to-end tests.

``python -m tandem.drill.sampleapp DIR`` runs in the foreground until SIGTERM/SIGINT and, at a
steady rate, writes the data directory DIR:

- ``app.db``: an SQLite database in WAL mode; every tick appends a few rows in one
  transaction (``-wal`` and ``-shm`` exist while it runs);
- ``log/app.log``: one line per tick, rotated to ``app.1.log`` … ``app.4.log`` at 16 KiB, with
  a symlink ``log/previous.log`` to the newest rotated log;
- ``blobs/``: a 32 KiB file every few ticks, written to a temporary name and renamed; the
  eight newest are kept;
- ``assets/``: sixteen 256 KiB files made when the directory is first set up, then left alone;
- with ``--disk DISK``: a 4 KiB record per tick at a pseudo-random 64 KiB-aligned offset of
  DISK (in its first three quarters): an existing file or block device, or an NBD export
  ``nbd://HOST:PORT/NAME`` (a volume presented by an appliance, written through the small
  NBD client here, as a virtual machine writes its virtual disk). With ``--disk-from FILE``
  the disk is named by the first line of FILE, read each time the app opens its data: the
  host's say in which disk is attached to the app (a path at one site, the NBD export of a
  failed-over volume at the other), so one start hook script serves both sites.

Control files live outside DIR, in its *run directory* (``--run-dir``, default ``DIR.run``
beside DIR), so capturing or restoring DIR never touches them: ``pid``, ``status.json``
(state, counters, the last error, the database check), ``hold`` and ``app.log``.

Commands (the first argument; without one, ``run``):

``run DIR``      the application itself, in the foreground.
``start DIR``    starts ``run`` in the background (a session of its own, output to the run
                 directory's ``app.log``) and returns once it is up; 0 if it already runs.
``stop DIR``     SIGTERM, then waits for it to exit (SIGKILL after ``--timeout``); 0 if it
                 was not running.
``hold DIR``     quiesces it: it finishes its transaction, closes the database (SQLite then
                 checkpoints and removes ``-wal`` and ``-shm``) and every file, and stops
                 writing until ``release``; returns once it has acknowledged. A process
                 started while the hold is in place stays held and does not touch DIR, so the
                 data can be checked right after a restore that restarted it.
``release DIR``  removes the hold and waits until it writes again.
``status DIR``   prints ``status.json`` (``opened_rows`` is the row count found when the
                 database was last opened: where the app resumed after a restore or a
                 failover).

``start`` and ``stop`` are what the demo's hook scripts (``sampleapp-start``/``-stop`` in each
agent's ``scripts/`` folder) exec: a host agent runs them and waits for them, so ``start``
must not leave its own output pipes open in the background process (it does not: the
process's stdio is redirected).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import unquote, urlsplit

COMMANDS = ("run", "start", "stop", "hold", "release", "status")
ROWS_PER_TICK = 5
SEED_ROWS = 5000
SEED_ASSETS = 16
SEED_LOG_LINES = 100
ASSET_SIZE = 256 * 1024
BLOB_SIZE = 32 * 1024
BLOB_EVERY = 5
BLOBS_KEPT = 8
LOG_ROTATE_AT = 16 * 1024
LOGS_KEPT = 4
RECORD_SIZE = 4096
RECORD_ALIGN = 64 * 1024
STATUS_EVERY = 5
POLL = 0.02
APPEND = os.O_WRONLY | os.O_CREAT | os.O_APPEND


class SampleAppError(Exception):
    """A control command could not do what it was asked (the message says why)."""


# --- disks --------------------------------------------------------------------------------

NBD_MAGIC = 0x4E42444D41474943  # "NBDMAGIC"
NBD_IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_OPT_EXPORT_NAME = 1
NBD_REQUEST_MAGIC = 0x25609513
NBD_REPLY_MAGIC = 0x67446698
NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_DISC, NBD_CMD_FLUSH = 0, 1, 2, 3
NBD_FLAG_READ_ONLY = 1 << 1
NBD_DEFAULT_PORT = 10809
_NBD_REQUEST = struct.Struct(">IHHQQI")
_NBD_REPLY = struct.Struct(">IIQ")


class NbdDisk:
    """A minimal NBD client for one export: fixed newstyle handshake with NBD_OPT_EXPORT_NAME,
    one request at a time, simple replies. Enough to write a virtual disk and read it back.

    ``nbd://HOST[:PORT]/NAME``; errors are ``OSError`` (the server's errno where it sent one).
    """

    def __init__(self, uri: str, timeout: float = 30.0) -> None:
        parts = urlsplit(uri)
        if parts.scheme != "nbd" or not parts.hostname or len(parts.path) < 2:
            raise OSError(f"{uri!r} is not an NBD URI (nbd://HOST:PORT/NAME)")
        self.uri = uri
        self.sock = socket.create_connection(
            (parts.hostname, parts.port or NBD_DEFAULT_PORT), timeout=timeout
        )
        self.handle = 0
        try:
            magic, opt, flags = struct.unpack(">QQH", self._recv(18))
            if magic != NBD_MAGIC or opt != NBD_IHAVEOPT or not flags & NBD_FLAG_FIXED_NEWSTYLE:
                raise OSError(f"{uri}: not a fixed-newstyle NBD server")
            no_zeroes = flags & NBD_FLAG_NO_ZEROES
            self.sock.sendall(struct.pack(">I", NBD_FLAG_FIXED_NEWSTYLE | no_zeroes))
            name = unquote(parts.path[1:]).encode()
            self.sock.sendall(struct.pack(">QII", NBD_IHAVEOPT, NBD_OPT_EXPORT_NAME, len(name)))
            self.sock.sendall(name)
            try:
                self.size, tflags = struct.unpack(">QH", self._recv(10))
            except ConnectionError as exc:
                raise OSError(f"{uri}: the server refused the export (unknown or gone)") from exc
            if not no_zeroes:
                self._recv(124)
            self.read_only = bool(tflags & NBD_FLAG_READ_ONLY)
        except BaseException:
            self.sock.close()
            raise

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = self.sock.recv(min(n - len(buf), 1 << 20))
            if not part:
                raise ConnectionError(f"{self.uri}: the NBD server closed the connection")
            buf += part
        return bytes(buf)

    def _request(self, command: int, offset: int, length: int, data: bytes = b"") -> bytes:
        self.handle += 1
        self.sock.sendall(
            _NBD_REQUEST.pack(NBD_REQUEST_MAGIC, 0, command, self.handle, offset, length) + data
        )
        magic, error, handle = _NBD_REPLY.unpack(self._recv(_NBD_REPLY.size))
        if magic != NBD_REPLY_MAGIC or handle != self.handle:
            raise OSError(f"{self.uri}: unexpected NBD reply")
        if error:
            raise OSError(error, f"{self.uri}: {os.strerror(error)}")
        return self._recv(length) if command == NBD_CMD_READ else b""

    def pread(self, length: int, offset: int) -> bytes:
        return self._request(NBD_CMD_READ, offset, length)

    def pwrite(self, data: bytes, offset: int) -> None:
        self._request(NBD_CMD_WRITE, offset, len(data), data)

    def flush(self) -> None:
        self._request(NBD_CMD_FLUSH, 0, 0)

    def close(self) -> None:
        """Flush (unless read-only), say goodbye and close; never raises."""
        try:
            if not self.read_only:
                self.flush()
            self.handle += 1
            self.sock.sendall(
                _NBD_REQUEST.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, self.handle, 0, 0)
            )
        except OSError:
            pass
        finally:
            self.sock.close()


class FileDisk:
    """A disk image file or block device, written in place."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)

    def pwrite(self, data: bytes, offset: int) -> None:
        os.pwrite(self.fd, data, offset)

    def close(self) -> None:
        try:
            with contextlib.suppress(OSError):
                os.fsync(self.fd)
        finally:
            os.close(self.fd)


def open_disk(target: str) -> FileDisk | NbdDisk:
    """The disk named by ``target``: an ``nbd://`` URI or a path."""
    return NbdDisk(target) if target.startswith("nbd://") else FileDisk(target)


def disk_target(disk: str | None, disk_from: Path | None) -> str | None:
    """What ``--disk`` / ``--disk-from`` name now (``OSError`` if the file cannot be read)."""
    if disk_from is not None:
        lines = disk_from.read_text().strip().splitlines()
        if not lines:
            raise OSError(f"{disk_from} names no disk")
        return lines[0].strip()
    return disk


@dataclass(frozen=True)
class Paths:
    data: Path
    run: Path

    @classmethod
    def of(cls, data: Path | str, run_dir: Path | str | None = None) -> Paths:
        data = Path(data).absolute()
        run = Path(run_dir).absolute() if run_dir else data.with_name(data.name + ".run")
        return cls(data, run)

    @property
    def pid(self) -> Path:
        return self.run / "pid"

    @property
    def status(self) -> Path:
        return self.run / "status.json"

    @property
    def hold(self) -> Path:
        return self.run / "hold"

    @property
    def log(self) -> Path:
        return self.run / "app.log"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_status(paths: Paths) -> dict[str, Any]:
    """The last status the application wrote (``{}`` if none)."""
    try:
        doc = json.loads(paths.status.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat.rpartition(")")[2].split()[0] != "Z"


def running_pid(paths: Paths) -> int | None:
    """The pid of the running application, or None."""
    try:
        pid = int(paths.pid.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid > 0 and _alive(pid) else None


# --- the application ----------------------------------------------------------------------


class Writer:
    """The application's data: opened, written tick by tick, closed (quiesced)."""

    def __init__(self, paths: Paths, disk: str | None, disk_from: Path | None = None) -> None:
        self.paths = paths
        self.disk_arg = disk
        self.disk_from = disk_from
        self.disk_target: str | None = None
        self.rng = random.Random()
        self.db: sqlite3.Connection | None = None
        self.log_fd: int | None = None
        self.disk: FileDisk | NbdDisk | None = None
        self.disk_span = 0
        self.rows = 0
        self.opened_rows = 0
        self.ticks = 0
        self.blobs = 0
        self.records = 0
        self.check = ""

    @property
    def is_open(self) -> bool:
        return self.db is not None

    def open(self) -> None:
        data = self.paths.data
        fresh = not (data / "app.db").exists()
        for sub in ("log", "blobs", "assets"):
            (data / sub).mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(data / "app.db", isolation_level=None)
        self.db = db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        self.check = str(db.execute("PRAGMA quick_check").fetchone()[0])
        db.execute(
            "CREATE TABLE IF NOT EXISTS rows"
            " (id INTEGER PRIMARY KEY, ts REAL NOT NULL, tick INTEGER NOT NULL, payload TEXT)"
        )
        if fresh:
            self._seed()
        self.rows = self.opened_rows = int(db.execute("SELECT count(*) FROM rows").fetchone()[0])
        existing = sorted((data / "blobs").glob("blob-*.bin"))
        self.blobs = int(existing[-1].stem.split("-")[1]) if existing else 0
        self.log_fd = os.open(data / "log" / "app.log", APPEND, 0o644)
        self.disk_target = disk_target(self.disk_arg, self.disk_from)
        if self.disk_target is not None:
            self.disk = open_disk(self.disk_target)
            self.disk_span = max(1, (self.disk.size * 3 // 4) // RECORD_ALIGN)

    def _seed(self) -> None:
        assert self.db is not None
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT INTO rows (ts, tick, payload) VALUES (?, 0, ?)",
            ((time.time(), self.rng.randbytes(100).hex()) for _ in range(SEED_ROWS)),
        )
        self.db.execute("COMMIT")
        with open(self.paths.data / "log" / "app.log", "a") as log:
            for i in range(SEED_LOG_LINES):
                log.write(f"{time.time():.3f} seed {i} {self.rng.randbytes(96).hex()}\n")
        for i in range(SEED_ASSETS):
            (self.paths.data / "assets" / f"asset-{i:02d}.bin").write_bytes(os.urandom(ASSET_SIZE))

    def tick(self) -> None:
        assert self.db is not None and self.log_fd is not None
        self.ticks += 1
        now = time.time()
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT INTO rows (ts, tick, payload) VALUES (?, ?, ?)",
            ((now, self.ticks, self.rng.randbytes(100).hex()) for _ in range(ROWS_PER_TICK)),
        )
        self.db.execute("COMMIT")
        self.rows += ROWS_PER_TICK
        line = f"{now:.3f} tick {self.ticks} rows {self.rows} last {self.rng.randbytes(96).hex()}\n"
        os.write(self.log_fd, line.encode())
        if os.fstat(self.log_fd).st_size >= LOG_ROTATE_AT:
            self._rotate_log()
        if self.ticks % BLOB_EVERY == 0:
            self._write_blob()
        if self.disk is not None:
            head = f"sampleapp record {self.records} tick {self.ticks} at {now:.3f}\n".encode()
            record = head + self.rng.randbytes(RECORD_SIZE - len(head))
            self.disk.pwrite(record, self.rng.randrange(self.disk_span) * RECORD_ALIGN)
            self.records += 1

    def _rotate_log(self) -> None:
        assert self.log_fd is not None
        log = self.paths.data / "log"
        os.close(self.log_fd)
        self.log_fd = None
        with contextlib.suppress(FileNotFoundError):
            (log / f"app.{LOGS_KEPT}.log").unlink()
        for n in range(LOGS_KEPT - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(log / f"app.{n}.log", log / f"app.{n + 1}.log")
        os.replace(log / "app.log", log / "app.1.log")
        tmp = log / ".previous.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to("app.1.log")
        os.replace(tmp, log / "previous.log")
        self.log_fd = os.open(log / "app.log", APPEND, 0o644)

    def _write_blob(self) -> None:
        blobs = self.paths.data / "blobs"
        self.blobs += 1
        tmp = blobs / f".blob-{self.blobs:06d}.tmp"
        tmp.write_bytes(self.rng.randbytes(BLOB_SIZE))
        os.replace(tmp, blobs / f"blob-{self.blobs:06d}.bin")
        for old in sorted(blobs.glob("blob-*.bin"))[:-BLOBS_KEPT]:
            old.unlink()

    def close(self) -> None:
        """Quiesce: every write durable, every file closed (SQLite removes -wal and -shm)."""
        if self.db is not None:
            db, self.db = self.db, None
            # A damaged database may refuse even this; the process must still end cleanly.
            with contextlib.suppress(sqlite3.Error):
                if db.in_transaction:
                    db.execute("ROLLBACK")
            with contextlib.suppress(sqlite3.Error):
                db.close()
        if self.log_fd is not None:
            fd, self.log_fd = self.log_fd, None
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.close(fd)
        if self.disk is not None:
            disk, self.disk = self.disk, None
            disk.close()


class App:
    """The ``run`` loop: ticks until a stop signal, honouring holds."""

    def __init__(
        self,
        paths: Paths,
        disk: str | None,
        interval: float,
        lifetime: float | None,
        disk_from: Path | None = None,
    ) -> None:
        self.paths = paths
        self.writer = Writer(paths, disk, disk_from)
        self.interval = interval
        self.deadline = None if lifetime is None else time.monotonic() + lifetime
        self.stopping = False
        self.state = "starting"
        self.held_for = ""
        self.errors = 0
        self.last_error = ""

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def write_status(self) -> None:
        w = self.writer
        doc = {
            "pid": os.getpid(),
            "state": self.state,
            "held_for": self.held_for,
            "rows": w.rows,
            "opened_rows": w.opened_rows,
            "disk": w.disk_target,
            "ticks": w.ticks,
            "blobs": w.blobs,
            "records": w.records,
            "errors": self.errors,
            "last_error": self.last_error,
            "check": w.check,
            "updated": time.time(),
        }
        _write_atomic(self.paths.status, json.dumps(doc))

    def _error(self, exc: Exception) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        print(f"sampleapp: {self.last_error}", file=sys.stderr, flush=True)

    def _should_end(self) -> bool:
        if self.stopping:
            return True
        if self.deadline is not None and time.monotonic() > self.deadline:
            print("sampleapp: lifetime reached, stopping", file=sys.stderr, flush=True)
            return True
        # Gone run directory: whoever started us has cleaned up and forgot to stop us.
        return not self.paths.run.is_dir()

    def run(self) -> int:
        # Not parents=True: a run directory whose parent is gone means we were cleaned up.
        self.paths.run.mkdir(exist_ok=True)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        _write_atomic(self.paths.pid, f"{os.getpid()}\n")
        next_tick = time.monotonic()
        try:
            while not self._should_end():
                if self.paths.hold.exists():
                    self._hold()
                    continue
                if not self.writer.is_open:
                    try:
                        self.writer.open()
                    except (OSError, sqlite3.Error) as exc:
                        self._error(exc)
                        self.writer.close()
                        time.sleep(self.interval)
                        continue
                    self.state, self.held_for = "running", ""
                    self.write_status()
                try:
                    self.writer.tick()
                except (OSError, sqlite3.Error) as exc:
                    self._error(exc)
                if self.writer.ticks % STATUS_EVERY == 0:
                    try:
                        self.write_status()
                    except OSError as exc:
                        self._error(exc)
                next_tick += self.interval
                time.sleep(max(0.0, next_tick - time.monotonic()))
                next_tick = max(next_tick, time.monotonic() - self.interval)
        finally:
            self.writer.close()
            self.state = "stopped"
            with contextlib.suppress(OSError):
                self.write_status()
            with contextlib.suppress(OSError):
                if self.paths.pid.read_text().strip() == str(os.getpid()):
                    self.paths.pid.unlink()
        return 0

    def _hold(self) -> None:
        try:
            token = self.paths.hold.read_text().strip()
        except FileNotFoundError:
            return
        if self.state != "held" or token != self.held_for:
            self.writer.close()
            self.state, self.held_for = "held", token
            self.write_status()
        time.sleep(POLL)


# --- control commands ---------------------------------------------------------------------


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SampleAppError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL)


def start(
    paths: Paths,
    *,
    disk: Path | str | None = None,
    disk_from: Path | None = None,
    interval: float = 0.05,
    lifetime: float | None = None,
    timeout: float = 30.0,
) -> int:
    """Start ``run`` in the background; returns its pid once it is up (running or held)."""
    pid = running_pid(paths)
    if pid is not None:
        return pid
    paths.run.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "tandem.drill.sampleapp", "run", str(paths.data)]
    argv += ["--run-dir", str(paths.run), "--interval", str(interval)]
    if disk is not None:
        target = str(disk)
        argv += ["--disk", target if target.startswith("nbd://") else str(Path(target).absolute())]
    if disk_from is not None:
        argv += ["--disk-from", str(Path(disk_from).absolute())]
    if lifetime is not None:
        argv += ["--lifetime", str(lifetime)]
    # posix_spawn, not Popen: the process outlives us and is never waited for here; its
    # stdio is redirected so that a caller waiting on our output pipes does not wait for it.
    pid = os.posix_spawn(
        sys.executable,
        argv,
        dict(os.environ),
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(paths.log), APPEND, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
    )

    def up() -> bool:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            tail = paths.log.read_text(errors="replace").strip().splitlines()[-5:]
            raise SampleAppError(
                f"the sample app exited at start (status {os.waitstatus_to_exitcode(code)}): "
                + " | ".join(tail)
            )
        status = read_status(paths)
        return status.get("pid") == pid and status.get("state") in ("running", "held")

    _wait(up, timeout, "the sample app to start")
    return pid


def stop(paths: Paths, *, timeout: float = 30.0) -> bool:
    """Stop the application; returns whether it was running."""
    pid = running_pid(paths)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    try:
        _wait(lambda: not _alive(pid), timeout, f"the sample app (pid {pid}) to exit")
    except SampleAppError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait(lambda: not _alive(pid), 5.0, f"the sample app (pid {pid}) to die")
    return True


def hold(paths: Paths, *, wait: bool = True, timeout: float = 30.0) -> dict[str, Any]:
    """Quiesce the application; returns its status once held (``{}`` if it is not running)."""
    paths.run.mkdir(parents=True, exist_ok=True)
    token = os.urandom(8).hex()
    _write_atomic(paths.hold, token)
    if not wait:
        return {}

    def held() -> bool:
        pid = running_pid(paths)
        if pid is None:
            return True
        status = read_status(paths)
        return status.get("pid") == pid and status.get("held_for") == token

    _wait(held, timeout, "the sample app to hold its writes")
    return read_status(paths) if running_pid(paths) else {}


def release(paths: Paths, *, timeout: float = 30.0) -> dict[str, Any]:
    """End a hold; returns the status once it writes again (``{}`` if it is not running)."""
    with contextlib.suppress(FileNotFoundError):
        paths.hold.unlink()

    def writing() -> bool:
        pid = running_pid(paths)
        if pid is None:
            return True
        status = read_status(paths)
        return status.get("pid") == pid and status.get("state") == "running"

    _wait(writing, timeout, "the sample app to write again")
    return read_status(paths) if running_pid(paths) else {}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tandem.drill.sampleapp",
        description="A sample application that keeps writing (SQLite in WAL mode and files).",
    )
    parser.add_argument("command", choices=COMMANDS, help="What to do (default: run).")
    parser.add_argument("data", type=Path, help="The data directory.")
    parser.add_argument("--run-dir", type=Path, help="Control files (default: DATA.run).")
    parser.add_argument(
        "--disk", help="Also write records into this file, block device or nbd:// export."
    )
    parser.add_argument(
        "--disk-from", type=Path, help="Read the --disk to use from this file's first line."
    )
    parser.add_argument("--interval", type=float, default=0.05, help="Seconds between ticks.")
    parser.add_argument("--lifetime", type=float, help="Stop by itself after this many seconds.")
    parser.add_argument("--timeout", type=float, default=30.0, help="For start/stop/hold.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in COMMANDS and not args[0].startswith("-"):
        args.insert(0, "run")
    ns = _parser().parse_args(args)
    paths = Paths.of(ns.data, ns.run_dir)
    try:
        if ns.command == "run":
            return App(paths, ns.disk, ns.interval, ns.lifetime, ns.disk_from).run()
        if ns.command == "start":
            pid = start(
                paths,
                disk=ns.disk,
                disk_from=ns.disk_from,
                interval=ns.interval,
                lifetime=ns.lifetime,
                timeout=ns.timeout,
            )
            print(f"sample app running (pid {pid})")
        elif ns.command == "stop":
            was = stop(paths, timeout=ns.timeout)
            print("sample app stopped" if was else "sample app was not running")
        elif ns.command == "hold":
            status = hold(paths, timeout=ns.timeout)
            print(f"sample app held at row {status['rows']}" if status else "not running (held)")
        elif ns.command == "release":
            release(paths, timeout=ns.timeout)
            print("sample app released")
        else:
            print(json.dumps(read_status(paths) | {"running": running_pid(paths) is not None}))
    except (SampleAppError, OSError) as exc:
        print(f"sampleapp: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
