"""Consistency benchmark (issue 14): capturing a busy PostgreSQL cluster from a point in time,
the way an operator does — ``tandem capture APP`` through the CLI, the appliance's job
runner and the host agent (``tandem.drill.lab``: daemons on loopback TLS) — against
``pg_basebackup`` of the same busy cluster in the same run.

Set-up: one PostgreSQL cluster (``initdb``, ``pgbench -i -s SCALE``, about 750 MB at
scale 50), copied onto each file system, one after the other, in a loop-mounted image made
in the work directory: btrfs (the data directory is a subvolume: ``snapshot-btrfs``), XFS
(``reflink``) and ext4 (``--consistency freeze``: writes held for the whole capture). Each is
a ``filesystem`` app on the data directory of one appliance and one agent. pgbench runs at
``RATE`` transactions/s with a per-transaction log while: the first capture, ``AGAIN``
re-captures of the same busy cluster (incremental), then ``pg_basebackup -X fetch -c fast``.

Reported per file system: the time to a consistent image (the wall time of ``tandem capture
APP --json``, a fresh CLI process) against ``pg_basebackup``'s (target for a re-capture:
≤ 0.2×), bytes read by the agent, how long writes were held (the job's ``held_seconds``),
and the longest pgbench transaction that overlapped the cut (the window the agent reports:
``cut_at`` + ``cut_seconds``; its schedule lag taken off, see ``_max_latency_ms``; target
≤ 50 ms with a snapshot or reflink source) beside the same over the whole capture and over
the seconds before it, which show what the machine's load alone does to pgbench. Needs
root, ``mkfs.btrfs``/``mkfs.xfs``/``mkfs.ext4`` and PostgreSQL; a file system whose tools
are missing is skipped, and says so.
``--profile DIR`` records the appliance and the agent with py-spy during the re-captures.
"""

from __future__ import annotations

import compileall
import glob
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import tandem
from bench.common import Config, Report, Row, fmt_bytes, log, run_measured
from bench.e2e import Profiler
from bench.replication import (
    job_epoch,
    job_queued_seconds,
    job_seconds,
    job_timeline,
    run_in_lab,
)
from tandem.drill.lab import Lab, tandem_argv

SECTION = "consistency · tandem capture of a busy PostgreSQL cluster vs pg_basebackup"
RATE = 150
SCALE = 50
AGAIN = 2
PAUSE_BETWEEN = 2.0  # seconds of load between two captures
FS_SIZE = "3G"
FILESYSTEMS = (
    # (file system, how the app is cut, the data directory is a btrfs subvolume)
    ("btrfs", "auto", True),
    ("xfs", "auto", False),
    ("ext4", "freeze", False),
)


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"))
    return Path(found[-1]).parent if found else None


def _as_pg(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *argv],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _max_latency_ms(logs: Path, start: float, end: float) -> tuple[float, int]:
    """The longest time a transaction ran while it overlapped [start, end] (epoch s), and
    how many did, from pgbench's per-transaction logs (``client tx latency_us script
    epoch_s epoch_us schedule_lag_us``). With ``--rate`` the latency pgbench logs counts
    from the scheduled start; its schedule lag (the client behind its schedule, which on a
    busy machine is CPU the client did not get) is taken off: what is left is the time the
    server took, the pause the app saw."""
    worst, count = 0.0, 0
    for path in logs.glob("pgbench_log.*"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) < 6:
                continue
            lag = int(parts[6]) / 1e6 if len(parts) > 6 else 0.0
            ran = int(parts[2]) / 1e6 - lag
            done = int(parts[4]) + int(parts[5]) / 1e6
            if done >= start and done - ran <= end:
                worst = max(worst, ran)
                count += 1
    return worst * 1000, count


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


class Cluster:
    """A PostgreSQL cluster on a loop-mounted file system, under pgbench."""

    def __init__(self, pg: Path, work: Path, fstype: str, subvolume: bool) -> None:
        self.pg, self.work, self.fstype, self.subvolume = pg, work, fstype, subvolume
        self.image, self.mnt = work / "fs.img", work / "mnt"
        self.data = self.mnt / "pgdata"
        self.sockets = work / "sockets"
        self.port = _port()
        self.bench: subprocess.Popen[bytes] | None = None
        self.mounted = self.started = False

    @property
    def conn(self) -> list[str]:
        return ["-h", str(self.sockets), "-p", str(self.port)]

    def make(self, template: Path) -> None:
        self.work.mkdir()
        self.work.chmod(0o755)
        self.mnt.mkdir()
        subprocess.run(["truncate", "-s", FS_SIZE, str(self.image)], check=True)
        mkfs = [f"mkfs.{self.fstype}", "-q"] + (["-F"] if self.fstype == "ext4" else [])
        subprocess.run([*mkfs, str(self.image)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(self.image), str(self.mnt)], check=True)
        self.mounted = True
        self.mnt.chmod(0o755)
        if self.subvolume:
            subprocess.run(["btrfs", "subvolume", "create", str(self.data)], check=True, stdout=-3)
        else:
            self.data.mkdir()
        subprocess.run(["cp", "-a", f"{template}/.", f"{self.data}/"], check=True)
        self.sockets.mkdir()
        for p in (self.data, self.sockets):
            shutil.chown(p, "postgres", "postgres")
        self.data.chmod(0o700)
        os.sync()

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.sockets} -c listen_addresses=''"
        _as_pg(str(self.pg / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
               str(self.sockets / "log"), "-w", "start")  # fmt: skip
        self.started = True
        self.bench = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", str(self.pg / "pgbench"), *self.conn, "-n",
             "-c", "4", "-j", "2", "-R", str(RATE), "-T", "3600", "-l", "postgres"],
            cwd=self.sockets, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def basebackup(self) -> tuple[float, int]:
        backup = self.work / "basebackup"
        backup.mkdir()
        shutil.chown(backup, "postgres", "postgres")
        t0 = time.monotonic()
        _as_pg(str(self.pg / "pg_basebackup"), *self.conn, "-D", str(backup), "-X", "fetch",
               "-c", "fast")  # fmt: skip
        seconds = time.monotonic() - t0
        size = _tree_bytes(backup)
        shutil.rmtree(backup)
        return seconds, size

    def stop_load(self) -> None:
        if self.bench is not None:
            self.bench.terminate()
            try:
                self.bench.wait(30)
            except subprocess.TimeoutExpired:
                self.bench.kill()
                self.bench.wait()
            self.bench = None

    def close(self) -> None:
        if self.bench is not None:
            self.bench.kill()
            self.bench.wait()
            self.bench = None
        if self.started:
            subprocess.run(
                ["runuser", "-u", "postgres", "--", str(self.pg / "pg_ctl"), "-D",
                 str(self.data), "-m", "immediate", "-w", "stop"],
                capture_output=True, check=False, cwd="/",
            )  # fmt: skip
            self.started = False
        if self.mounted:
            subprocess.run(["umount", str(self.mnt)], check=False)
            self.mounted = False
        self.image.unlink(missing_ok=True)


def _make_template(pg: Path, work: Path) -> Path:
    """One cluster, initialised once and copied onto each file system (stopped)."""
    data = work / "template"
    sockets = work / "template-sockets"
    for p in (data, sockets):
        p.mkdir()
        shutil.chown(p, "postgres", "postgres")
    data.chmod(0o700)
    _as_pg(str(pg / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
    port = _port()
    opts = f"-p {port} -k {sockets} -c listen_addresses=''"
    _as_pg(str(pg / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(sockets / "log"), "-w",
           "start")  # fmt: skip
    try:
        _as_pg(str(pg / "pgbench"), "-h", str(sockets), "-p", str(port), "-i", "-q", "-s",
               str(SCALE), "postgres")  # fmt: skip
    finally:
        _as_pg(str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    return data


class ConsistencyBench:
    def __init__(self, cfg: Config, report: Report, lab: Lab, pg: Path) -> None:
        self.cfg, self.report, self.lab, self.pg = cfg, report, lab, pg
        self.root = cfg.workdir / "consistency"
        self.scratch = self.root / "scratch"
        self.site = lab.add("appliance", "site")
        self.host = lab.add("agent", "host")
        self.profiler = Profiler(cfg.profile, [self.site, self.host])

    def cli(self, *args: str) -> tuple[dict[str, Any], float]:
        res = run_measured(
            tandem_argv(*args, "--json"), scratch=self.scratch, env=self.site.env()
        ).check(f"tandem {' '.join(args)}")
        doc: dict[str, Any] = json.loads(res.stdout)
        return doc, res.seconds

    def capture(self, app: str) -> tuple[dict[str, Any], float, float, float]:
        """(the job, wall seconds, epoch start, epoch end) of ``tandem capture APP``."""
        start = time.time()
        doc, seconds = self.cli("capture", app)
        end = time.time()
        job: dict[str, Any] = doc["job"]
        if job["status"] != "succeeded":
            raise RuntimeError(f"capture of {app}: job {job['status']}: {job.get('message')}")
        return job, seconds, start, end

    def run(self) -> None:
        self.scratch.mkdir(parents=True)
        self.root.chmod(0o755)  # the postgres user must reach the clusters inside it
        compileall.compile_dir(Path(tandem.__file__).parent, quiet=1)
        log(f"consistency: a PostgreSQL cluster, pgbench -i -s {SCALE}")
        template = _make_template(self.pg, self.root)
        size = _tree_bytes(template)
        self.report.context.append(
            f"Consistency: PostgreSQL ({self.pg.parent.name}) `pgbench -i -s {SCALE}` "
            f"({fmt_bytes(size)}), pgbench -c 4 -R {RATE} while `tandem capture` (CLI → "
            "appliance → agent, loopback TLS) and `pg_basebackup -X fetch -c fast` run; "
            "each file system in a loop-mounted image."
        )
        self.lab.up(self.site, self.host)
        self.cli("host", "add", self.host.name, "--url", self.host.url, "--token",
                 self.host.token, "--fingerprint", self.host.fingerprint)  # fmt: skip
        self.cli("template", "add", "bench")
        for fstype, mode, subvolume in FILESYSTEMS:
            if shutil.which(f"mkfs.{fstype}") is None:
                self.report.note(f"consistency {fstype}: skipped, mkfs.{fstype} is missing")
                continue
            cluster = Cluster(self.pg, self.root / fstype, fstype, subvolume)
            try:
                log(f"consistency: {fstype}: copying the cluster, starting pgbench at {RATE}/s")
                cluster.make(template)
                cluster.start()
                self.one(cluster, mode)
            finally:
                cluster.close()
        self.profiler.note_tops(self.report)

    def one(self, cluster: Cluster, mode: str) -> None:
        app = f"pg-{cluster.fstype}"
        self.cli("app", "add", app, "--host", self.host.name, "--kind", "filesystem", "--path",
                 str(cluster.data), "--consistency", mode)  # fmt: skip
        self.cli("app", "protect", app, "--template", "bench")
        time.sleep(3)  # let the load settle before the first cut
        runs: list[tuple[str, dict[str, Any], float, float, float]] = []
        job, wall, start, end = self.capture(app)
        runs.append(("first", job, wall, start, end))
        log(f"consistency: {cluster.fstype}: first capture {wall:.2f} s; re-captures")
        with self.profiler.record(f"{cluster.fstype}-again"):
            for _ in range(AGAIN):
                time.sleep(PAUSE_BETWEEN)
                job, wall, start, end = self.capture(app)
                runs.append(("again", job, wall, start, end))
                at = {k: job_epoch(job, k) - start for k in ("created", "started", "finished")}
                log(
                    f"  CLI started; job created +{at['created']:.3f} s, started "
                    f"+{at['started']:.3f} s, finished +{at['finished']:.3f} s; CLI ended "
                    f"+{end - start:.3f} s"
                )
                lines: Any = self.cli("job", "log", job["id"])[0]  # a list of lines
                for line in job_timeline(job, lines):
                    log(f"  {line}")
        _, apps_wall = self.cli("apps")  # the CLI's own start and one call: its floor
        time.sleep(PAUSE_BETWEEN)
        log(f"consistency: {cluster.fstype}: pg_basebackup")
        b_start = time.time()
        base_seconds, base_bytes = cluster.basebackup()
        b_end = time.time()
        time.sleep(1)  # the log of transactions that overlapped the last step
        cluster.stop_load()
        base_pause, _ = _max_latency_ms(cluster.sockets, b_start, b_end)
        self.report.add(
            Row(
                SECTION,
                f"{cluster.fstype}: pg_basebackup",
                "—",
                f"{base_seconds:.2f} s, {fmt_bytes(base_bytes)}, longest pgbench "
                f"latency {base_pause:.0f} ms",
                "",
                "",
                {"seconds": base_seconds, "bytes": base_bytes, "pause_ms": base_pause},
            )
        )
        for what, job, wall, start, end in runs:
            result = job.get("result") or {}
            whole, _ = _max_latency_ms(cluster.sockets, start, end)
            quiet, _ = _max_latency_ms(cluster.sockets, start - PAUSE_BETWEEN + 0.2, start)
            cut_at, cut_s = result.get("cut_at"), result.get("cut_seconds")
            pause = None
            if cut_at is not None and cut_s is not None:
                pause, _ = _max_latency_ms(cluster.sockets, cut_at, cut_at + cut_s)
            held = result.get("held_seconds")
            held_s = f"{float(held) * 1000:.0f} ms" if held is not None else "—"
            cut_ms = f"{float(cut_s) * 1000:.0f} ms" if cut_s is not None else "—"
            read = int(result.get("bytes_read") or 0)
            cut = result.get("consistency") or "?"
            ratio = wall / base_seconds if base_seconds else 0.0
            job_ratio = job_seconds(job) / base_seconds if base_seconds else 0.0
            pit_source = cut in ("snapshot-btrfs", "reflink")
            self.report.add(
                Row(
                    SECTION,
                    f"{cluster.fstype} {cut}, {what}: time to a consistent image",
                    f"{wall:.2f} s (job {job_seconds(job):.2f} s, queued "
                    f"{job_queued_seconds(job):.2f} s; `tandem apps` {apps_wall:.2f} s), read "
                    f"{fmt_bytes(read)}",
                    f"pg_basebackup {base_seconds:.2f} s",
                    f"{ratio:.2f}× (job {job_ratio:.2f}×)",
                    "≤ 0.2×" if what == "again" else "—",
                    {
                        "cli_seconds": wall,
                        "job_seconds": job_seconds(job),
                        "queued_seconds": job_queued_seconds(job),
                        "apps_cli_seconds": apps_wall,
                        "bytes_read": read,
                        "basebackup_seconds": base_seconds,
                        "basebackup_bytes": base_bytes,
                        "consistency": cut,
                    },
                )
            )
            self.report.add(
                Row(
                    SECTION,
                    f"{cluster.fstype} {cut}, {what}: longest pgbench transaction during the cut",
                    f"{pause:.0f} ms" if pause is not None else "not reported",
                    f"cut {cut_ms}, writes held {held_s}; during the whole capture "
                    f"{whole:.0f} ms; in the {PAUSE_BETWEEN:.0f} s before it {quiet:.0f} ms",
                    "",
                    "≤ 50 ms" if pit_source else "—",
                    {
                        "pause_ms": pause,
                        "cut_seconds": cut_s,
                        "held_seconds": held,
                        "held_read": result.get("held_read"),
                        "capture_max_latency_ms": whole,
                        "before_max_latency_ms": quiet,
                    },
                )
            )


def run(cfg: Config, report: Report) -> None:
    pg = _pg_bin()
    if pg is None or os.geteuid() != 0:
        report.note("consistency: skipped, it needs root and PostgreSQL (Debian: postgresql)")
        return
    cfg.workdir.chmod(0o755)
    root = cfg.workdir / "consistency"

    def body(lab: Lab) -> None:
        ConsistencyBench(cfg, report, lab, pg).run()

    root.mkdir(parents=True, exist_ok=True)
    run_in_lab(root / "lab", report, (SECTION,), body)
