"""A sample application that keeps writing, for the demo and end-to-end tests.

``python -m tandem.cli.sampleapp DIR`` runs in the foreground until SIGTERM/SIGINT and, at a
steady rate, writes the data directory DIR:

- ``app.db``: an SQLite database in WAL mode; every tick appends a few rows in one
  transaction (``-wal`` and ``-shm`` exist while it runs);
- ``log/app.log``: one line per tick, rotated to ``app.1.log`` … ``app.4.log`` at 16 KiB, with
  a symlink ``log/previous.log`` to the newest rotated log;
- ``blobs/``: a 32 KiB file every few ticks, written to a temporary name and renamed; the
  eight newest are kept;
- ``assets/``: sixteen 256 KiB files made when the directory is first set up, then left alone;
- with ``--disk IMG``: a 4 KiB record per tick at a pseudo-random 64 KiB-aligned offset of
  the existing file or block device IMG (in its first three quarters).

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
``status DIR``   prints ``status.json``.

These are the app's ``--start`` and ``--stop`` commands in the demo: a host agent runs them
through ``/bin/sh`` and waits for them, so ``start`` must not leave its own output pipes
open in the background process (it does not: the process's stdio is redirected).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

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

    def __init__(self, paths: Paths, disk: Path | None) -> None:
        self.paths = paths
        self.disk_path = disk
        self.rng = random.Random()
        self.db: sqlite3.Connection | None = None
        self.log_fd: int | None = None
        self.disk_fd: int | None = None
        self.disk_span = 0
        self.rows = 0
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
        self.rows = int(db.execute("SELECT count(*) FROM rows").fetchone()[0])
        existing = sorted((data / "blobs").glob("blob-*.bin"))
        self.blobs = int(existing[-1].stem.split("-")[1]) if existing else 0
        self.log_fd = os.open(data / "log" / "app.log", APPEND, 0o644)
        if self.disk_path is not None:
            self.disk_fd = os.open(self.disk_path, os.O_WRONLY)
            size = os.lseek(self.disk_fd, 0, os.SEEK_END)
            self.disk_span = max(1, (size * 3 // 4) // RECORD_ALIGN)

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
        if self.disk_fd is not None:
            head = f"sampleapp record {self.records} tick {self.ticks} at {now:.3f}\n".encode()
            record = head + self.rng.randbytes(RECORD_SIZE - len(head))
            os.pwrite(self.disk_fd, record, self.rng.randrange(self.disk_span) * RECORD_ALIGN)
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
        for name in ("log_fd", "disk_fd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                with contextlib.suppress(OSError):
                    os.fsync(fd)
                os.close(fd)


class App:
    """The ``run`` loop: ticks until a stop signal, honouring holds."""

    def __init__(
        self, paths: Paths, disk: Path | None, interval: float, lifetime: float | None
    ) -> None:
        self.paths = paths
        self.writer = Writer(paths, disk)
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
    disk: Path | None = None,
    interval: float = 0.05,
    lifetime: float | None = None,
    timeout: float = 30.0,
) -> int:
    """Start ``run`` in the background; returns its pid once it is up (running or held)."""
    pid = running_pid(paths)
    if pid is not None:
        return pid
    paths.run.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "tandem.cli.sampleapp", "run", str(paths.data)]
    argv += ["--run-dir", str(paths.run), "--interval", str(interval)]
    if disk is not None:
        argv += ["--disk", str(Path(disk).absolute())]
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
        prog="python -m tandem.cli.sampleapp",
        description="A sample application that keeps writing (SQLite in WAL mode and files).",
    )
    parser.add_argument("command", choices=COMMANDS, help="What to do (default: run).")
    parser.add_argument("data", type=Path, help="The data directory.")
    parser.add_argument("--run-dir", type=Path, help="Control files (default: DATA.run).")
    parser.add_argument("--disk", type=Path, help="Also write records into this file.")
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
            return App(paths, ns.disk, ns.interval, ns.lifetime).run()
        if ns.command == "start":
            pid = start(
                paths,
                disk=ns.disk,
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
