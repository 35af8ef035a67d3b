"""PostgreSQL on this host: find a cluster, check it can be protected, take base backups,
stream its WAL, and start a recovered copy at a point in time.

How the agent talks to a cluster
- It finds the cluster from its data directory: ``postmaster.pid`` gives the port and the
  socket folder, ``PG_VERSION`` the major version, the directory's owner the OS user.
- It runs the cluster's own client programs (``psql``, ``pg_receivewal``, ``pg_ctl`` from
  ``/usr/lib/postgresql/MAJOR/bin``) *as that owner* (``runuser``) over the local socket. So
  the default ``peer`` authentication of Debian's clusters lets it in with no password stored
  anywhere, and client and server are always the same major version. (A Python driver in
  the agent, root, would need a password or a ``pg_hba`` rule for root.)

WAL streaming (``Receiver``)
- ``pg_receivewal`` runs as the owner with the physical replication slot ``tandem_<app>``
  (created with ``--if-not-exists`` before it starts, so the server keeps every segment the
  appliance has not received), writing into ``DIR/pg/<app>/wal`` (mode 0700, owned by the
  cluster's owner, who needs no access to the agent's folder above it: the folder is passed
  as an open descriptor). Completed segments are named as the server names them; the
  segment being written is ``NAME.partial``, zero-padded to the segment size.
- The appliance pulls: it lists the folder and reads each file from the offset it holds
  (``read_wal``); the growing ``.partial`` is sent without its trailing zeros. WAL is
  append-only, so bytes below an offset once read never change and re-reading is safe
  (resume = read again). The appliance acknowledges completed segments it stored durably;
  only those are removed here.
- ``drop`` stops the receiver and drops the slot, so no slot is ever left behind to make
  the server keep WAL forever.

Recovery (``recover``): the copy presented at a folder gets its ``backup_label`` (and
``tablespace_map``), a clean ``pg_wal``, ``recovery.signal`` and a ``restore_command`` that
takes each segment from ``tandem_wal/RUN/`` inside the copy (``RUN``: a name the appliance
gives each recovery), where the appliance puts it (``spool_wal``). No secret is written
anywhere. Once the copy is promoted, all of it goes again (``_settle``): the settings
appended to ``postgresql.auto.conf`` and the spool. A failed-over copy that becomes
production again (syncback, restore) carries none of them home.

Lazy WAL fetch: the WAL is staged *ahead of replay*, not all before PostgreSQL starts. The
request names the segments the appliance holds for this recovery (``segments``: written to
``tandem_wal/RUN/plan``). ``restore_command`` is ``tandem_wal/RUN/restore.sh %f %p``, run by
PostgreSQL as the cluster's owner: for a name not in the plan (a timeline history file, the
segment after the last) it fails at once, which PostgreSQL reads as "no more WAL"; for a
name in the plan it records it in ``want`` there and waits until the segment is in the
folder, then copies it (a wait is appended to ``waited`` as a count of
``RESTORE_POLL`` rounds: the recovery reports the sum as ``wal_wait_seconds``). The
appliance, meanwhile, follows ``want`` (``spool_wanted``, a long poll) and keeps a few
segments (its prefetch window) ahead of it, so replay rarely waits and WAL past the
recovery target is never sent. Why this and not a fetch command
that calls the agent: the script needs no credential and no socket (the owner of the
cluster never gets to talk to the agent, let alone read its token); the agent stays the
only party that talks to the appliance. If no segment comes within ``START_TIMEOUT`` the
script exits 126, which makes PostgreSQL abort the recovery rather than end it early at a
point short of the one asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tandem.domain.wal import parse_lsn, parse_name
from tandem.errors import (
    ClusterUnfit,
    InvalidInput,
    NotAPresentedCopy,
    PostgresCommandFailed,
    RecoveryFailed,
    RecoveryOver,
    TandemError,
    WalFileGone,
)
from tandem.storage.manifest import HARDLINK, TreeManifest
from tandem.transport.agent_api import (
    SEGMENT_SIZE,
    WAL_FILE,
    WAL_NAME,
    WAL_OR_HISTORY,
    PgRunRequest,
    ProbeRequest,
    RecoverRequest,
    SpoolRequest,
    StreamRequest,
    WalAck,
    WalRead,
    WantedRequest,
)
from tandem.transport.server import free_port

log = logging.getLogger(__name__)

PG_ROOT = Path("/usr/lib/postgresql")
SQL_TIMEOUT = 60.0
START_TIMEOUT = float(os.environ.get("TANDEM_PG_START_TIMEOUT", "300"))
SPOOL = "tandem_wal"
"""The folder inside a recovered copy that its restore_command reads from."""


def _spool_of(path: str, run: str | None) -> Path:
    return Path(path, SPOOL, run) if run else Path(path, SPOOL)


def _make_spool(path: str, run: str | None, uid: int, gid: int) -> Path:
    spool = _spool_of(path, run)
    for folder in (Path(path, SPOOL), spool):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chown(folder, uid, gid)
    return spool


def slot_name(app: str) -> str:
    """The replication slot tandem keeps for ``app`` (lower case, digits, underscores)."""
    return "tandem_" + re.sub(r"[^a-z0-9_]", "_", app.lower())[:55]


@dataclass(frozen=True)
class Cluster:
    data: str
    port: int
    sockets: str
    owner: str
    uid: int
    gid: int
    major: str

    @property
    def bin(self) -> Path:
        return PG_ROOT / self.major / "bin"

    def conn(self) -> list[str]:
        return ["-h", self.sockets, "-p", str(self.port)]


def _major_of(data: str) -> str:
    try:
        major = Path(data, "PG_VERSION").read_text().strip()
    except OSError as exc:
        raise ClusterUnfit(
            path=data,
            reason=f"it has no readable PG_VERSION ({exc.strerror})",
            fix="Give the data directory of a PostgreSQL cluster (PGDATA) as --path",
        ) from exc
    if not re.fullmatch(r"[0-9]{1,3}", major):
        raise ClusterUnfit(
            path=data, reason=f"PG_VERSION says {major[:20]!r}", fix="Give a PostgreSQL PGDATA"
        )
    return major


def binaries(major: str, data: str) -> Path:
    """This host's binaries of PostgreSQL ``major``; refused when it has none."""
    where = PG_ROOT / major / "bin"
    if not (where / "postgres").exists():
        have = sorted(p.name for p in PG_ROOT.glob("*") if (p / "bin" / "postgres").exists())
        raise ClusterUnfit(
            path=data,
            reason=f"it is a PostgreSQL {major} cluster and this host has PostgreSQL "
            f"{', '.join(have) or 'none'}",
            fix=f"Install PostgreSQL {major} on this host (Debian: postgresql-{major}) or "
            "choose a host that has it",
        )
    return where


def _same_dir(named: str, data: str) -> bool:
    """Whether ``named`` (a postmaster.pid's data directory line) is ``data``: a pid file
    copied with another cluster's files (a live read of it) names that cluster's server."""
    return os.path.realpath(named.strip()) == os.path.realpath(data)


def find_cluster(data: str) -> Cluster:
    """The running cluster whose data directory is ``data``."""
    major = _major_of(data)
    binaries(major, data)
    try:
        lines = Path(data, "postmaster.pid").read_text().splitlines()
    except FileNotFoundError as exc:
        raise ClusterUnfit(
            path=data,
            reason="PostgreSQL is not running there (no postmaster.pid)",
            fix="Start the cluster, then add the application again",
        ) from exc
    try:
        pid, port, sockets = int(lines[0]), int(lines[3]), lines[4].strip()
        if not _same_dir(lines[1], data):
            raise ValueError("another cluster's")
        os.kill(pid, 0)
    except (IndexError, ValueError, ProcessLookupError) as exc:
        raise ClusterUnfit(
            path=data,
            reason="its postmaster.pid names no running server",
            fix="Start the cluster, then try again",
        ) from exc
    if not sockets:
        raise ClusterUnfit(
            path=data,
            reason="it listens on no Unix socket (unix_socket_directories is empty)",
            fix="Set unix_socket_directories in postgresql.conf and restart PostgreSQL",
        )
    st = os.stat(data)
    owner = pwd.getpwuid(st.st_uid).pw_name
    return Cluster(data, port, sockets.split(",")[0].strip(), owner, st.st_uid, st.st_gid, major)


def as_owner(uid: int, owner: str, argv: list[str]) -> list[str]:
    """``argv`` run as the cluster's owner (directly when the agent already is that user)."""
    if os.geteuid() == uid:
        return argv
    return ["runuser", "-u", owner, "--", *argv]


def _run(
    c: Cluster,
    argv: list[str],
    what: str,
    cwd: str = "/",
    timeout: float = SQL_TIMEOUT,
    error: type[TandemError] = PostgresCommandFailed,
) -> str:
    try:
        proc = subprocess.run(
            as_owner(c.uid, c.owner, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise error(path=c.data, reason=f"{what} took longer than {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        raise error(path=c.data, reason=f"{what} failed: {tail[-1] if tail else proc.returncode}")
    return proc.stdout


def query(c: Cluster, sql: str) -> list[list[str]]:
    """Rows of ``sql`` run by psql as the owner (fields split on ``|``)."""
    out = _run(
        c,
        [
            str(c.bin / "psql"),
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            *c.conn(),
            "-d",
            "postgres",
            "-c",
            sql,
        ],
        "a query",
    )
    return [line.split("|") for line in out.splitlines() if line]


# --- probing: can this cluster be protected? -----------------------------------------------


def probe(req: ProbeRequest) -> dict[str, Any]:
    """The cluster at ``req.path`` and whether it can be protected; refuses (naming the
    setting to change) a cluster without ``wal_level`` replica or logical, without a free
    replication slot or WAL sender, or in recovery."""
    c = find_cluster(req.path)
    slot = slot_name(req.app)
    row = query(
        c,
        "SELECT current_setting('wal_level'), current_setting('max_wal_senders'), "
        "current_setting('max_replication_slots'), "
        "(SELECT count(*) FROM pg_replication_slots), "
        "(SELECT count(*) FROM pg_stat_replication), "
        "current_setting('wal_segment_size'), "
        f"(SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'), "
        "pg_is_in_recovery(), current_setting('server_version_num')",
    )[0]
    wal_level, senders, slots, used_slots, used_senders, seg, mine, standby, version = row
    fix = "in postgresql.conf and restart PostgreSQL"
    if wal_level not in ("replica", "logical"):
        raise ClusterUnfit(
            path=c.data,
            reason=f"its wal_level is {wal_level}, which keeps too little WAL to recover from",
            fix=f"Set wal_level = replica {fix}",
        )
    if standby == "t":
        raise ClusterUnfit(
            path=c.data, reason="it is a standby (in recovery)", fix="Protect the primary"
        )
    if mine == "0" and int(used_slots) >= int(slots):
        raise ClusterUnfit(
            path=c.data,
            reason=f"all its {slots} replication slots are taken (max_replication_slots)",
            fix=f"Raise max_replication_slots {fix}",
        )
    if int(used_senders) >= int(senders):
        raise ClusterUnfit(
            path=c.data,
            reason=f"all its {senders} WAL senders are busy (max_wal_senders)",
            fix=f"Raise max_wal_senders {fix}",
        )
    if seg not in ("16MB", str(SEGMENT_SIZE)):
        raise ClusterUnfit(
            path=c.data,
            reason=f"its wal_segment_size is {seg}; tandem streams 16MB segments",
            fix="Protect a cluster made by initdb with the default --wal-segsize",
        )
    return {
        "port": c.port,
        "socket_dir": c.sockets,
        "owner": c.owner,
        "major": c.major,
        "version": int(version),
        "wal_level": wal_level,
        "slot": slot,
    }


# --- base backups -------------------------------------------------------------------------

END = "__tandem_end__"


class BackupSession:
    """One psql session of the owner holding a non-exclusive backup (``pg_backup_start``
    … ``pg_backup_stop`` must run on the same connection: closing it aborts the backup)."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        argv = [
            str(c.bin / "psql"),
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            *c.conn(),
            "-d",
            "postgres",
        ]
        self.proc = subprocess.Popen(
            as_owner(c.uid, c.owner, argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
        )

    def ask(self, sql: str) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(f"{sql};\n\\echo {END}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        lines: list[str] = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise PostgresCommandFailed(
                    path=self.c.data, reason=f"the backup session ended: {err.strip()[-300:]}"
                )
            if line.rstrip("\n") == END:
                return lines
            lines.append(line.rstrip("\n"))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class BaseBackup:
    start_lsn: str
    start_time: str
    start_wal: str
    timeline: int
    stop_lsn: str = ""
    stop_time: str = ""
    backup_label: str = ""
    tablespace_map: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@contextlib.contextmanager
def base_backup(path: str, label: str) -> Iterator[BaseBackup]:
    """``pg_backup_start`` (fast checkpoint) on one session; on a clean exit
    ``pg_backup_stop`` on the same session fills in the stop point and the files a copy
    needs. On an error the session is closed, which aborts the backup."""
    c = find_cluster(path)
    session = BackupSession(c)
    try:
        safe = re.sub(r"[^A-Za-z0-9 ._:-]", "_", label)[:60]
        row = session.ask(
            f"SELECT lsn, now(), pg_walfile_name(lsn), "
            f"(SELECT timeline_id FROM pg_control_checkpoint()) "
            f"FROM pg_backup_start('{safe}', true) AS lsn"
        )[0].split("|")
        backup = BaseBackup(row[0], row[1], row[2], int(row[3]))
        yield backup
        row = session.ask(
            "SELECT lsn, now(), encode(convert_to(labelfile, 'UTF8'), 'hex'), "
            "encode(convert_to(coalesce(spcmapfile, ''), 'UTF8'), 'hex') "
            "FROM pg_backup_stop(false)"
        )[0].split("|")
        backup.stop_lsn, backup.stop_time = row[0], row[1]
        backup.backup_label = bytes.fromhex(row[2]).decode()
        backup.tablespace_map = bytes.fromhex(row[3]).decode()
    finally:
        session.close()


# --- WAL streaming ------------------------------------------------------------------------


MARKS_KEPT = 120
"""Coverage marks kept per app while the receiver lags (one per listing, every few seconds)."""


class Receivers:
    """The ``pg_receivewal`` processes of this agent, one per app, in ``DIR/pg``."""

    def __init__(self, directory: Path) -> None:
        self.root = directory / "pg"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._paths: dict[str, str] = {}
        self._marks: dict[str, list[tuple[datetime, int]]] = {}
        self._seen: dict[str, datetime] = {}
        self._flushed: dict[str, tuple[int, int]] = {}
        """(timeline, LSN) the receiver reported flushed, as last read by ``covered``."""

    def spool(self, app: str) -> Path:
        return self.root / app / "wal"

    def ensure(self, req: StreamRequest) -> dict[str, Any]:
        """Keep ``pg_receivewal`` running for the app (start it, or again after it died);
        the slot is created first if it does not exist."""
        c = find_cluster(req.path)
        slot = slot_name(req.app)
        spool = self.spool(req.app)
        with self._lock:
            self._paths[req.app] = req.path
            proc = self._procs.get(req.app)
            if proc is not None and proc.poll() is None:
                return {"running": True, "started": False, "slot": slot}
            self._stop_orphan(req.app)
            self.root.mkdir(mode=0o700, exist_ok=True)
            fresh = not spool.exists()
            spool.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chown(spool, c.uid, c.gid)
            log = spool.parent / "receivewal.log"
            receivewal = str(c.bin / "pg_receivewal")
            if fresh:  # a new stream: a slot of that name is another stream's (see drop_stale)
                self._drop_stale(c, slot)
            _run(
                c,
                [receivewal, *c.conn(), "-S", slot, "--create-slot", "--if-not-exists"],
                "creating the replication slot",
            )
            # The owner cannot reach DIR (root's): the receiver writes through an open
            # descriptor of the folder, named /proc/self/fd/N, which needs no path to it.
            fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
            try:
                with open(log, "ab") as out:
                    self._procs[req.app] = subprocess.Popen(
                        as_owner(
                            c.uid,
                            c.owner,
                            # -n: no loop of its own (this agent restarts it); -s 1: report
                            # (and flush) at least every second.
                            [
                                receivewal,
                                *c.conn(),
                                "-S",
                                slot,
                                "-D",
                                f"/proc/self/fd/{fd}",
                                "-n",
                                "-s",
                                "1",
                                "--synchronous",
                            ],
                        ),
                        cwd="/",
                        pass_fds=(fd,),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                (spool.parent / "receivewal.pid").write_text(str(self._procs[req.app].pid))
            finally:
                os.close(fd)
        return {"running": True, "started": True, "slot": slot}

    @staticmethod
    def _drop_stale(c: Cluster, slot: str) -> None:
        """Drop an inactive slot named ``slot`` before a new stream starts: one this stream
        never held, e.g. the slot of the DR copy's stream, carried home in ``pg_replslot``
        when that copy was synced back and restored here, whose position is the DR site's
        (or one a restore put back from an older state). This stream starts at the
        cluster's position and the appliance sees where it begins."""
        query(
            c,
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            f"WHERE slot_name = '{slot}' AND NOT active",
        )

    def _stop_orphan(self, app: str) -> None:
        """Stop a receiver a previous run of this agent left (killed, it could not): it
        holds the slot, so a new one could not stream."""
        try:
            pid = int((self.root / app / "receivewal.pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"pg_receivewal" not in cmdline:
            return  # gone; the number is another process's now
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def listing(self, app: str) -> dict[str, Any]:
        """The WAL files held for ``app``: name, size, and for the ``.partial`` the length
        without its zero padding; ``seen``: the newest moment every commit acknowledged
        before it is in these files (None: none known yet, e.g. after a restart)."""
        spool = self.spool(app)
        seen = self.covered(app)  # before the files are listed: they hold at least that
        files = []
        if spool.is_dir():
            for entry in sorted(os.scandir(spool), key=lambda e: e.name):
                if re.fullmatch(WAL_FILE, entry.name) and entry.is_file():
                    files.append({"name": entry.name, "size": entry.stat().st_size})
        proc = self._procs.get(app)
        running = proc is not None and proc.poll() is None
        return {"files": files, "seen": seen.isoformat() if seen else None, "running": running}

    def covered(self, app: str) -> datetime | None:
        """The newest server time ``T`` whose WAL the receiver has flushed.

        Replication is asynchronous: a commit acknowledged at ``T`` may not have reached
        the receiver yet, so the time a listing is made says nothing. Each call marks
        (``T``, the server's flush position at ``T``) — every commit acknowledged before
        ``T`` lies below that position — and reads the position the receiver reports
        flushed; the newest mark it has passed is covered. Marks not passed yet wait for a
        later call. A cluster that does not answer (stopped, in recovery) covers nothing
        new: the point stays where it was."""
        path = self._paths.get(app)
        if path is not None:
            try:
                row = query(
                    find_cluster(path),
                    "SELECT extract(epoch FROM clock_timestamp()), pg_current_wal_flush_lsn(), "
                    "(SELECT r.flush_lsn FROM pg_replication_slots s JOIN pg_stat_replication r "
                    f"ON r.pid = s.active_pid WHERE s.slot_name = '{slot_name(app)}'), "
                    "substr(pg_walfile_name(pg_current_wal_flush_lsn()), 1, 8)",
                )[0]
            except (TandemError, OSError, IndexError, ValueError) as exc:
                log.debug("WAL coverage of %s not read: %s", app, exc)
            else:
                mark = (datetime.fromtimestamp(float(row[0]), UTC), parse_lsn(row[1]))
                flushed = parse_lsn(row[2]) if len(row) > 2 and row[2] else -1
                timeline = int(row[3], 16) if len(row) > 3 and row[3] else 0
                with self._lock:
                    if flushed >= 0 and timeline:
                        self._flushed[app] = (timeline, flushed)
                    marks = [*self._marks.get(app, []), mark]
                    passed = [m[0] for m in marks if m[1] <= flushed]
                    if passed:
                        self._seen[app] = max(passed[-1], self._seen.get(app, passed[-1]))
                    self._marks[app] = [m for m in marks if m[1] > flushed][-MARKS_KEPT:]
        with self._lock:
            return self._seen.get(app)

    def read(self, req: WalRead) -> bytes:
        """Bytes of a WAL file from ``offset``; a ``.partial`` without its zero padding,
        but never short of what the receiver reported flushed (WAL itself may end in zero
        bytes: a record cut there would be lost where the window already claims it)."""
        path = self.spool(req.app) / req.name
        try:
            with open(path, "rb") as fh:
                fh.seek(req.offset)
                data = fh.read(SEGMENT_SIZE - req.offset)
        except FileNotFoundError as exc:
            raise WalFileGone(name=req.name, app=req.app) from exc
        if req.name.endswith(".partial"):
            keep = len(data.rstrip(b"\0"))
            timeline, start = parse_name(req.name.removesuffix(".partial"))
            with self._lock:
                known = self._flushed.get(req.app)
            if known is not None and known[0] == timeline:
                keep = max(keep, min(known[1] - start, SEGMENT_SIZE) - req.offset)
            data = data[: max(keep, 0)]
        return data

    def ack(self, req: WalAck) -> dict[str, Any]:
        """Remove the completed segments the appliance stored durably."""
        removed = []
        for name in req.names:
            if re.fullmatch(WAL_OR_HISTORY, name):
                with contextlib.suppress(FileNotFoundError):
                    (self.spool(req.app) / name).unlink()
                    removed.append(name)
        return {"removed": removed}

    def drop(self, req: StreamRequest) -> dict[str, Any]:
        """Stop the receiver and drop the slot (the cluster keeps no WAL for tandem after)."""
        with self._lock:
            self._stop_orphan(req.app)
            for known in (self._paths, self._marks, self._seen, self._flushed):
                known.pop(req.app, None)  # a new stream covers nothing until it is seen to
            proc = self._procs.pop(req.app, None)
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        dropped = False
        with contextlib.suppress(ClusterUnfit):  # the cluster is gone: no slot to drop
            c = find_cluster(req.path)
            slot = slot_name(req.app)
            deadline = time.monotonic() + 10
            rounds = 0
            while True:
                rows = query(
                    c,
                    "SELECT count(*), count(*) FILTER (WHERE active) FROM "
                    f"pg_replication_slots WHERE slot_name = '{slot}'",
                )
                if rows[0][0] == "0":
                    break
                if rows[0][1] == "0":
                    query(c, f"SELECT pg_drop_replication_slot('{slot}')")
                    dropped = True
                    break
                if time.monotonic() > deadline:  # a receiver this agent does not know of
                    rounds += 1
                    if rounds > 3:
                        raise PostgresCommandFailed(
                            path=c.data,
                            reason=f"replication slot {slot} stays in use by a receiver "
                            "tandem did not start; stop it, then remove the app again",
                        )
                    query(
                        c,
                        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                        f"WHERE slot_name = '{slot}' AND active",
                    )
                    deadline = time.monotonic() + 10
                time.sleep(0.1)  # the sender of the receiver just stopped is going away
        shutil.rmtree(self.root / req.app, ignore_errors=True)
        return {"dropped": dropped}

    def stop_all(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


# --- recovery -----------------------------------------------------------------------------


STARTUP_DIRS = (
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
)
NOT_RECOVERED = ("pg_wal", "pg_replslot", *STARTUP_DIRS)
"""Folders of a data directory whose *contents* a recovered copy is not given (the
folders themselves are): its ``pg_wal`` and slots are replaced by the WAL the appliance
stages (``recover`` empties them anyway), and the rest PostgreSQL initializes at start-up
(the list ``pg_basebackup`` omits, as PostgreSQL's manual allows for a base backup)."""
NOT_RECOVERED_FILES = ("postmaster.pid", "postmaster.opts", "backup_label.old")


def not_recovered(path: str) -> bool:
    """Whether a path of a data directory (relative to it) is what a recovery never reads
    (``NOT_RECOVERED``, ``NOT_RECOVERED_FILES``). A base image leaves these out (the WAL is
    streamed apart: on a cluster loaded with WAL, ``pg_wal`` may be half of its size), and a
    copy to recover from an older image that holds them is placed without them."""
    top, _, rest = path.partition("/")
    if rest and top in NOT_RECOVERED:
        return path != "pg_wal/archive_status"  # PostgreSQL expects it there
    return path in NOT_RECOVERED_FILES


def for_recovery(manifest: TreeManifest) -> TreeManifest:
    """A base image's tree without what its recovery never reads (``not_recovered``)."""

    def kept(path: str) -> bool:
        return not not_recovered(path)

    entries = [
        e for e in manifest.entries if kept(e.path) and (e.type != HARDLINK or kept(e.target))
    ]
    return TreeManifest(entries, dict(manifest.meta))


def _owner_of(path: str) -> Cluster:
    st = os.stat(path)
    major = _major_of(path)
    binaries(major, path)
    return Cluster(path, 0, "", pwd.getpwuid(st.st_uid).pw_name, st.st_uid, st.st_gid, major)


def _copy_dir(path: str) -> str:
    real = os.path.realpath(path)
    if real != path.rstrip("/") or not os.path.isdir(real):
        raise NotAPresentedCopy(path=path)
    return real


_settled: set[tuple[str, str]] = set()
"""(copy, run) of the recoveries this agent has ended: their spool takes no more WAL."""


def spool_wal(req: SpoolRequest, data: bytes) -> dict[str, Any]:
    """Place one WAL segment where the copy's restore_command reads it. Not flushed to
    disk: the spool is read only by the recovery that is running (a crash of the host ends
    it, and the job withdraws the copy or the restore in place is made again), and
    PostgreSQL checks every record it replays."""
    path = _copy_dir(req.path)
    c = _owner_of(path)
    if req.run and (path, req.run) in _settled:
        # Promoted, and its spool removed (``_settle``): a segment still on its way when
        # replay ended must not come back into the copy (it would travel home with it).
        raise RecoveryOver(run=req.run, path=path)
    spool = _make_spool(path, req.run, c.uid, c.gid)
    if len(data) > SEGMENT_SIZE:
        raise InvalidInput(detail=f"WAL segment {req.name} is larger than a segment")
    if re.fullmatch(WAL_NAME, req.name):  # a segment is read whole; a history file as is
        data = data.ljust(SEGMENT_SIZE, b"\0")
    tmp = spool / f".{req.name}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.chown(tmp, c.uid, c.gid)
    os.replace(tmp, spool / req.name)
    return {"name": req.name, "size": len(data)}


RESTORE_SCRIPT = """#!/bin/sh
# tandem: the restore_command of this recovered copy. The appliance stages the WAL segments
# named in plan into this folder as replay asks for them (want).
dir=$(dirname "$0")
grep -qx -- "$1" "$dir/plan" || exit 1  # not held: no more WAL of that name
printf '%s\\n' "$1" > "$dir/.want" && mv -f "$dir/.want" "$dir/want"
waited=0
while [ ! -f "$dir/$1" ]; do
    waited=$((waited + 1))
    [ "$waited" -gt {rounds} ] && exit 126  # nothing came: abort, never stop short
    sleep {poll}
done
[ "$waited" -gt 0 ] && printf '%s\\n' "$waited" >> "$dir/waited"  # replay stood still so long
exec cp -- "$dir/$1" "$2"
"""
RESTORE_POLL = 0.05
"""Seconds between the restore script's looks for the segment it waits for."""


def restore_script(rounds: int) -> str:
    """The restore script, giving up after ``rounds`` looks for a segment."""
    return RESTORE_SCRIPT.replace("{rounds}", str(rounds)).replace("{poll}", str(RESTORE_POLL))


def wal_waited(spool: Path) -> float:
    """Seconds replay stood waiting for WAL not yet staged (the restore script's count; the
    copy's owner can write it, so only whole numbers are believed, and 0 when unreadable)."""
    try:
        rounds = sum(
            int(line)
            for line in (spool / "waited").read_text()[:100_000].split()
            if line.isdigit() and len(line) < 9
        )
    except (OSError, UnicodeDecodeError):
        return 0.0
    return round(rounds * RESTORE_POLL, 2)


def spool_wanted(req: WantedRequest) -> dict[str, Any]:
    """The segment the copy's restore_command waits for (None before it asked for one) and
    how many segments are staged; waits up to ``req.wait`` s for a change from
    ``req.after``."""
    path = _copy_dir(req.path)
    spool = _spool_of(path, req.run)
    deadline = time.monotonic() + req.wait
    while True:
        try:
            wanted: str | None = (spool / "want").read_text().strip() or None
        except FileNotFoundError:
            wanted = None
        if wanted != req.after or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    if wanted is not None and not re.fullmatch(WAL_NAME, wanted):
        wanted = None  # the owner of the copy wrote it: trust only a segment name
    return {"wanted": wanted}


COMMIT_RE = re.compile(r"desc: COMMIT (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


def last_commit(c: Cluster, spool: Path) -> datetime | None:
    """The time of the last commit in the newest segments of ``spool`` (``pg_waldump``)."""
    names = sorted(p.name for p in spool.iterdir() if re.fullmatch(WAL_NAME, p.name))
    for name in reversed(names[-3:]):
        proc = subprocess.run(
            as_owner(
                c.uid,
                c.owner,
                [str(c.bin / "pg_waldump"), "-p", str(spool), "-r", "Transaction", name],
            ),
            capture_output=True,
            text=True,
            timeout=SQL_TIMEOUT,
            cwd="/",
            env={**os.environ, "TZ": "UTC"},
            check=False,
        )  # its last record is followed by zeros: it ends with an error, after the records
        found = COMMIT_RE.findall(proc.stdout)
        if found:
            return datetime.fromisoformat(found[-1]).replace(tzinfo=UTC)
    return None


def recover(req: RecoverRequest) -> dict[str, Any]:
    """Start the copy at ``req.path`` as a PostgreSQL recovered to ``req.target_time`` (or
    to the end of its WAL), promoted there; wait until it accepts connections; report the
    point reached. ``req.stop``: shut it down cleanly after (a restore in place)."""
    path = _copy_dir(req.path)
    c0 = _owner_of(path)
    for name in (
        "postmaster.pid",
        "postmaster.opts",
        "backup_label.old",
        "recovery.signal",
        "standby.signal",
    ):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, name))
    # The copy's own pg_wal and slots are not the WAL to recover with (a live read of pg_wal
    # may be torn); the segments come from the spool through restore_command.
    for sub in ("pg_wal", "pg_replslot"):
        folder = Path(path, sub)
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.name != "archive_status":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    Path(path, "pg_wal", "archive_status").mkdir(exist_ok=True)
    os.chown(Path(path, "pg_wal", "archive_status"), c0.uid, c0.gid)
    spool = _make_spool(path, req.run, c0.uid, c0.gid)
    if req.run:
        for entry in Path(path, SPOOL).iterdir():  # another recovery's, never to be read
            if entry.name != req.run:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def write(name: str, text: str, mode: str = "w") -> None:
        target = os.path.join(path, name)
        with open(target, mode) as fh:
            fh.write(text)
        os.chown(target, c0.uid, c0.gid)
        os.chmod(target, 0o600)

    write("backup_label", req.backup_label)
    if req.tablespace_map:
        write("tablespace_map", req.tablespace_map)
    write("recovery.signal", "")
    auto = Path(path, "postgresql.auto.conf")
    try:
        settings_before: str | None = auto.read_text()
    except FileNotFoundError:
        settings_before = None
    target = req.target_time
    if target is not None:
        last = last_commit(c0, spool)
        if last is not None and target >= last:
            # Nothing committed after ``last`` is in the WAL given, and PostgreSQL refuses a
            # target its WAL does not pass: the end of the WAL is that same state.
            target = None
    plan = req.segments or sorted(p.name for p in spool.iterdir() if re.fullmatch(WAL_NAME, p.name))
    for name, text, mode in (
        ("plan", "".join(f"{n}\n" for n in plan), 0o600),
        ("restore.sh", restore_script(int(START_TIMEOUT / RESTORE_POLL)), 0o700),
    ):
        target_file = spool / name
        target_file.unlink(missing_ok=True)
        target_file.write_text(text)
        os.chown(target_file, c0.uid, c0.gid)
        os.chmod(target_file, mode)
    (spool / "want").unlink(missing_ok=True)
    settings = [
        "",
        "# tandem: point-in-time recovery of this copy",
        f'restore_command = \'/bin/sh "{spool}/restore.sh" "%f" "%p"\'',
        "recovery_target_action = 'promote'",
        "archive_mode = 'off'",
    ]
    if target is not None:
        when = target.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
        settings += [f"recovery_target_time = '{when}'", "recovery_target_inclusive = 'true'"]
    else:
        settings.append("recovery_target_timeline = 'latest'")
    write("postgresql.auto.conf", "\n".join(settings) + "\n", "a")
    port = req.port or free_port()
    sockets = req.socket_dir or path
    c = Cluster(path, port, sockets, c0.owner, c0.uid, c0.gid, c0.major)
    log = os.path.join(path, "tandem-recovery.log")
    opts = f"-p {port} -k {sockets} -c listen_addresses=''"
    t0 = time.monotonic()
    try:
        _run(
            c,
            [
                str(c.bin / "pg_ctl"),
                "-D",
                path,
                "-o",
                opts,
                "-l",
                log,
                "-t",
                str(int(START_TIMEOUT)),
                "-w",
                "start",
            ],
            f"starting PostgreSQL (its log: {log})",
            timeout=START_TIMEOUT + 10,
            error=RecoveryFailed,
        )
    except RecoveryFailed as exc:
        # The copy (and its log) goes when the presentation is undone: say why here.
        try:
            tail = " | ".join(Path(log).read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            tail = ""
        raise RecoveryFailed(path=path, reason=f"{exc.fields.get('reason')}; log: {tail}") from exc
    deadline = time.monotonic() + START_TIMEOUT
    while True:  # pg_ctl -w returns once connections are accepted; promotion may lag
        row = query(c, "SELECT pg_is_in_recovery(), pg_last_xact_replay_timestamp()")[0]
        if row[0] == "f":
            break
        if time.monotonic() > deadline:
            raise RecoveryFailed(
                path=path, reason=f"it was not promoted within {START_TIMEOUT:.0f} s"
            )
        time.sleep(0.1)
    reached = row[1] or None
    waited = wal_waited(spool)
    _settle(c, settings_before)
    if req.run:  # a run names one recovery; without one the next would be refused too
        _settled.add((path, req.run))
    checked = amcheck(c) if req.verify else None
    if req.stop:
        stop_copy(path)
        if os.path.exists(os.path.join(path, "postmaster.pid")):
            raise RecoveryFailed(
                path=path, reason=f"it was recovered to {reached} but did not shut down within 60 s"
            )
    return {
        "amcheck": checked,
        "port": port,
        "socket_dir": sockets,
        "reached": reached,
        "seconds": round(time.monotonic() - t0, 3),
        "wal_wait_seconds": waited,
        "major": c.major,
    }


def _settle(c: Cluster, settings_before: str | None) -> None:
    """The copy is promoted: what tandem wrote to recover it goes. Its settings
    (``restore_command``, the target, ``archive_mode = off``) leave ``postgresql.auto.conf``,
    which gets back what it held before, and the spool of WAL goes with its script. The
    copy is now a cluster like the one it was captured from: if it becomes production again
    (failover, syncback, restore) it carries none of a recovery's settings home. (Read at
    start-up only, so the running server is not affected.) A segment the appliance was
    still staging is refused after this (``spool_wal``)."""
    auto = Path(c.data, "postgresql.auto.conf")
    if settings_before is None:
        auto.unlink(missing_ok=True)
    else:
        tmp = Path(c.data, ".postgresql.auto.conf.tandem")
        tmp.write_text(settings_before)
        os.chown(tmp, c.uid, c.gid)
        os.chmod(tmp, 0o600)
        os.replace(tmp, auto)
    shutil.rmtree(Path(c.data, SPOOL), ignore_errors=True)


def amcheck(c: Cluster) -> dict[str, Any]:
    """``pg_amcheck`` over every database of the running copy ``c`` (it installs the amcheck
    extension where it is missing: the copy is a drill's, not production)."""
    t0 = time.monotonic()
    proc = subprocess.run(
        as_owner(
            c.uid,
            c.owner,
            [
                str(c.bin / "pg_amcheck"),
                *c.conn(),
                "--all",
                "--heapallindexed",
                "--install-missing",
            ],
        ),
        capture_output=True,
        text=True,
        timeout=3600,
        cwd="/",
        check=False,
    )
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return {
        "ok": proc.returncode == 0,
        "returncode": proc.returncode,
        "seconds": round(time.monotonic() - t0, 3),
        "report": lines[-20:],
    }


def start_copy(req: PgRunRequest) -> dict[str, Any]:
    """Start the stopped cluster of a presented copy again, listening as it did (only on
    its socket, ``req.port`` or a free one); waits until it accepts connections."""
    path = _copy_dir(req.path)
    c0 = _owner_of(path)
    port = req.port or free_port()
    sockets = req.socket_dir or path
    c = Cluster(path, port, sockets, c0.owner, c0.uid, c0.gid, c0.major)
    log = os.path.join(path, "tandem-recovery.log")
    _run(
        c,
        [
            str(c.bin / "pg_ctl"),
            "-D",
            path,
            "-o",
            f"-p {port} -k {sockets} -c listen_addresses=''",
            "-l",
            log,
            "-t",
            str(int(START_TIMEOUT)),
            "-w",
            "start",
        ],
        f"starting PostgreSQL (its log: {log})",
        timeout=START_TIMEOUT + 10,
        error=RecoveryFailed,
    )
    return {"port": port, "socket_dir": sockets}


def stop_copy(path: str) -> bool:
    """Stop a PostgreSQL running on the copy at ``path`` (fast shutdown); False if none
    (a postmaster.pid copied from another cluster names that one's server: not signalled)."""
    try:
        lines = Path(path, "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:  # an unreadable copy runs no server from it; the unmount goes on
        log.warning("cannot read %s/postmaster.pid (%s): no server stopped", path, exc)
        return False
    if len(lines) < 2 or not _same_dir(lines[1], path):
        return False
    try:
        c = _owner_of(path)
    except ClusterUnfit:
        return False
    pg_ctl = str(c.bin / "pg_ctl")
    subprocess.run(
        as_owner(c.uid, c.owner, [pg_ctl, "-D", path, "-m", "fast", "-w", "-t", "60", "stop"]),
        capture_output=True,
        timeout=90,
        cwd="/",
        check=False,
    )
    return True
