"""PostgreSQL benchmark (issue 17): tandem's base images + WAL stream against pgBackRest.

Set-up (``tandem.drill.lab``, as in the replication section): appliances ``prod`` and
``dr`` paired, agent ``prod-host`` at prod and ``dr-host`` at dr, all child processes on
loopback TLS, driven with the ``tandem`` CLI as an operator does. One PostgreSQL cluster
(``initdb``, ``pgbench -i -s SCALE``) with ``archive_command = pgbackrest archive-push``
to a local pgBackRest repository (default ``archive_timeout``: off), both protecting it at
once: a tandem app (``--kind postgresql``, a mirrored template, one base image) and a
pgBackRest full backup. Then pgbench at ``RATE`` transactions/s for the WAL phase, with a
side writer (a second pgbench, ``-R 10``) inserting ``clock_timestamp()`` into ``beats``
every 100 ms: the commits whose time we know.

(i) RPO at an unplanned failover: ``pg_ctl stop -m immediate`` at the end of the phase,
then ``test-failover --latest`` at DR; RPO = newest beat production acknowledged (read
after its crash recovery) − newest beat in the recovered copy. pgBackRest's: the same for
``restore`` to the end of its archive (what ``archive-push`` got into the repo before the
kill). Target ≤ 5 s.

(ii) time to a database accepting connections at a time ``T`` (``test-failover --time T``,
wall clock of the command, which returns once the copy is promoted), against
``pgbackrest restore --type=time --target=T`` + ``pg_ctl start`` until promoted; for ``T``
early in the WAL phase (most WAL lies after it) and late (most lies before it). Target
≤ 10 s. ``--quick``: a small cluster and five minutes of WAL; otherwise ~1 GB and an hour.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import Config, Report, fmt_ratio, fmt_seconds, log, tree_size
from bench.replication import TwoSites, add_row, run_in_lab
from tandem.drill.lab import Lab

SECTION = "postgresql"
RATE = 150
STANZA = "bench"
QUICK = {"scale": 10, "minutes": 5.0, "base_every": 0.0}
FULL = {"scale": 34, "minutes": 60.0, "base_every": 300.0}  # pgbench -s 34 ≈ 1.0 GB (70 was 2.06)
"""``base_every``: seconds between the scheduled base images of the WAL phase (0: none),
each taken by both tools as their operators schedule them: a tandem capture (incremental,
deduplicated) and a ``pgbackrest backup --type=incr``. A recovery to ``T`` starts from the
newest base before ``T`` in both (tandem's ``pg_recovery``; pgBackRest's backup-set
selection for ``--type=time``), so the replay after a base stays bounded by the schedule.
Every five minutes: a tandem base is an incremental, deduplicated capture of a few seconds,
and replaying ten minutes of WAL at 150 tps (~700 MB) alone takes PostgreSQL ~12 s here."""


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"))
    return Path(found[-1]).parent if found else None


def _as_pg(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["runuser", "-u", "postgres", "--", *argv],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} … failed: {proc.stderr.strip()[-400:]}")
    return proc


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Pg:
    """A cluster at ``data`` listening on a socket in ``sockets`` only."""

    def __init__(self, bin_: Path, data: Path, sockets: Path, port: int | None = None) -> None:
        self.bin, self.data, self.sockets, self.port = bin_, data, sockets, port or _port()

    def conn(self) -> list[str]:
        return ["-h", str(self.sockets), "-p", str(self.port)]

    def start(self, timeout: int = 3600) -> None:
        opts = f"-p {self.port} -k {self.sockets} -c listen_addresses=''"
        _as_pg(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.sockets / f"{self.data.name}.log"),
            "-t",
            str(timeout),
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        _as_pg(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False
        )

    def sql(self, query: str) -> str:
        return _as_pg(
            str(self.bin / "psql"), "-X", "-At", *self.conn(), "-d", "postgres", "-c", query
        ).stdout.strip()

    def promoted(self, deadline: float) -> None:
        while self.sql("SELECT pg_is_in_recovery()") != "f":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster at {self.data} was not promoted in time")
            time.sleep(0.05)


def newest_beat(pg: Pg) -> datetime:
    return datetime.fromisoformat(pg.sql("SELECT max(t) FROM beats"))


class PgBench:
    def __init__(self, cfg: Config, report: Report, lab: Lab, bin_: Path) -> None:
        self.cfg, self.report, self.bin = cfg, report, bin_
        self.size = QUICK if cfg.quick else FULL
        self.root = cfg.workdir / "postgresql"
        self.sites = TwoSites(lab, dr_host=True)
        self.sockets = self.root / "sockets"
        self.prod = Pg(bin_, self.root / "pgdata", self.sockets)
        self.repo = self.root / "pgbackrest"
        self.conf = self.root / "pgbackrest.conf"
        self.loads: list[subprocess.Popen[bytes]] = []

    def pgbackrest(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _as_pg(
            "pgbackrest", f"--config={self.conf}", f"--stanza={STANZA}", *args, check=check
        )

    def setup(self) -> None:
        self.root.mkdir(parents=True)
        for d in (self.sockets, self.prod.data, self.repo):
            d.mkdir()
            shutil.chown(d, "postgres", "postgres")
        self.prod.data.chmod(0o700)
        self.conf.write_text(
            f"[global]\nrepo1-path={self.repo}\nlog-path={self.repo}\nlock-path={self.repo}\n"
            "start-fast=y\nlog-level-console=warn\nlog-level-file=off\n"
            f"[{STANZA}]\npg1-path={self.prod.data}\npg1-socket-path={self.sockets}\n"
            f"pg1-port={self.prod.port}\n"
        )
        _as_pg(
            str(self.bin / "initdb"),
            "-D",
            str(self.prod.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        )
        with open(self.prod.data / "postgresql.conf", "a") as conf:
            conf.write(
                "archive_mode = on\n"
                f"archive_command = 'pgbackrest --config={self.conf} --stanza={STANZA} "
                "archive-push %p'\nmax_wal_size = 4GB\n"
            )
        self.prod.start()
        log(f"postgresql: pgbench -i -s {self.size['scale']}")
        _as_pg(
            str(self.bin / "pgbench"),
            *self.prod.conn(),
            "-i",
            "-q",
            "-s",
            str(self.size["scale"]),
            "postgres",
        )
        self.prod.sql("CREATE TABLE beats (t timestamptz NOT NULL)")
        self.pgbackrest("stanza-create")

    def load(self) -> None:
        beat = self.root / "beat.sql"
        beat.write_text("INSERT INTO beats VALUES (clock_timestamp());\n")
        base = [
            "runuser",
            "-u",
            "postgres",
            "--",
            str(self.bin / "pgbench"),
            *self.prod.conn(),
            "-n",
            "-T",
            str(int(self.size["minutes"] * 60) + 600),
        ]
        for extra in (
            ["-c", "4", "-j", "2", "-R", str(RATE)],
            ["-c", "1", "-R", "10", "-f", str(beat)],
        ):
            self.loads.append(
                subprocess.Popen(
                    [*base, *extra, "postgres"],
                    cwd="/",
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    def stop_load(self) -> None:
        for p in self.loads:
            p.kill()
            p.wait()
        self.loads = []

    def run(self) -> None:
        self.setup()
        log("postgresql: starting appliances prod and dr and agents prod-host and dr-host")
        self.sites.start()
        a, b = self.sites.prod.cli(), self.sites.dr.cli()
        a(
            "app",
            "add",
            "db",
            "--host",
            "prod-host",
            "--kind",
            "postgresql",
            "--path",
            str(self.prod.data),
        )
        a("app", "protect", "db", "--template", "mirrored")
        self.load()
        t0 = time.monotonic()
        taken = a("capture", "db")
        if taken["job"]["status"] != "succeeded":
            raise RuntimeError(f"capture failed: {taken['job'].get('message')}")
        log("postgresql: pgbackrest backup --type=full")
        t1 = time.monotonic()
        self.pgbackrest("backup", "--type=full")
        backup_s, capture_s = time.monotonic() - t1, t1 - t0
        size = tree_size(self.prod.data)
        self.wait_replica(b)
        time.sleep(2)  # pgBackRest keeps its backup's stop time in whole seconds
        early = datetime.now(UTC)
        start_lsn = self.prod.sql("SELECT pg_current_wal_lsn()")
        seconds = self.size["minutes"] * 60
        log(f"postgresql: {seconds:.0f} s of pgbench at {RATE} tps (early target {early})")
        deadline = time.monotonic() + seconds
        every = float(self.size["base_every"])
        next_base = time.monotonic() + every if every else float("inf")
        bases: list[tuple[float, float]] = []
        while time.monotonic() < deadline:
            if time.monotonic() >= next_base and deadline - time.monotonic() > 60:
                next_base += every
                bases.append(self.scheduled_bases(a))
            time.sleep(1)
        late = datetime.now(UTC)
        time.sleep(5)
        tps = float(
            self.prod.sql(
                "SELECT count(*) / greatest(extract(epoch FROM max(mtime) - min(mtime)), 1) "
                f"FROM pgbench_history WHERE mtime >= '{early.replace(tzinfo=None)}'"
            )
        )
        wal = int(self.prod.sql(f"SELECT pg_current_wal_lsn() - '{start_lsn}'::pg_lsn"))
        self.prod.stop("immediate")
        killed = datetime.now(UTC)
        self.stop_load()
        log("postgresql: production killed (pg_ctl stop -m immediate)")
        self.report.context.append(
            f"PostgreSQL: cluster of {size / 1e9:.2f} GB (pgbench -s {self.size['scale']}), "
            f"{seconds / 60:g} min of WAL ({wal / 1e6:,.0f} MB) at {tps:.0f} tps achieved "
            f"(asked {RATE}); base image {capture_s:.1f} s, pgbackrest full backup "
            f"{backup_s:.1f} s. Peer: pgBackRest 2.45, local repo, archive-push, "
            "archive_timeout off."
            + (
                f" Scheduled bases every {every / 60:g} min in the WAL phase: {len(bases)} "
                f"tandem captures (median {sorted(b[0] for b in bases)[len(bases) // 2]:.1f} s) "
                f"and pgbackrest incr backups (median "
                f"{sorted(b[1] for b in bases)[len(bases) // 2]:.1f} s)."
                if bases
                else ""
            )
        )
        # (i) RPO
        self.wait_window(b, killed)
        latest = self.tandem_recover(b, "latest", None)
        pgbr_latest = self.pgbackrest_recover("latest", None)  # what reached the repo
        self.prod.start()  # crash recovery: every commit production acknowledged
        acked = newest_beat(self.prod)
        self.prod.stop()
        rpo_t = (acked - latest["beat"]).total_seconds()
        rpo_p = (acked - pgbr_latest["beat"]).total_seconds()
        add_row(
            self.report,
            SECTION,
            "RPO at an unplanned failover (last acked − last recovered)",
            tandem=fmt_seconds(max(rpo_t, 0.0)),
            peer=f"{fmt_seconds(rpo_p)} pgBackRest",
            ratio=fmt_ratio(rpo_t, rpo_p, "pgBackRest"),
            target="≤ 5 s",
            values={"tandem_s": rpo_t, "pgbackrest_s": rpo_p, "segments": latest["segments"]},
        )
        # (ii) time to accepting connections at a point in time
        for name, when in (("early", early), ("late", late)):
            t = self.tandem_recover(b, name, when)
            p = self.pgbackrest_recover(name, when)
            add_row(
                self.report,
                SECTION,
                f"test-failover --time T → accepting connections, T {name} in the WAL",
                tandem=f"{fmt_seconds(t['seconds'])} (start + replay {fmt_seconds(t['replay'])}; "
                f"{t['fetched']}/{t['segments']} segments sent)",
                peer=f"{fmt_seconds(p['seconds'])} pgbackrest restore + start",
                ratio=fmt_ratio(t["seconds"], p["seconds"], "pgBackRest"),
                target="≤ 10 s",
                values={
                    "tandem_s": t["seconds"],
                    "pgbackrest_s": p["seconds"],
                    "segments": t["segments"],
                    "fetched": t["fetched"],
                    "replay_s": t["replay"],
                    "target": when.isoformat(),
                },
            )

    def scheduled_bases(self, a: Any) -> tuple[float, float]:
        """One scheduled base by each tool; their seconds (tandem's capture, pgBackRest's)."""
        log("postgresql: scheduled bases (tandem capture, pgbackrest backup --type=incr)")
        t0 = time.monotonic()
        taken = a("capture", "db")
        if taken["job"]["status"] != "succeeded":
            raise RuntimeError(f"capture failed: {taken['job'].get('message')}")
        t1 = time.monotonic()
        self.pgbackrest("backup", "--type=incr")
        return t1 - t0, time.monotonic() - t1

    def wait_replica(self, b: Any) -> None:
        deadline = time.monotonic() + 900
        while not any(i["kind"] == "replica" for i in b("images", "db")):
            if time.monotonic() > deadline:
                raise RuntimeError("no replica of the base image at dr")
            time.sleep(0.5)

    def wait_window(self, b: Any, after: datetime) -> None:
        """Until the DR window passes ``after`` or stops moving for 3 s (production is dead:
        what it had streamed has arrived), as an operator would look before failing over."""
        deadline = time.monotonic() + 120
        last, since = None, time.monotonic()
        while True:
            rows = b("images", "db")
            end = (rows[0].get("window") or {}).get("end") if rows else None
            if end and datetime.fromisoformat(end) > after:
                return
            if end != last:
                last, since = end, time.monotonic()
            elif end and time.monotonic() - since >= 3:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the DR window did not pass {after} (it ends {end})")
            time.sleep(0.5)

    def tandem_recover(self, b: Any, name: str, when: datetime | None) -> dict[str, Any]:
        where = self.root / f"tandem-{name}"
        how = ["--latest"] if when is None else ["--time", when.isoformat()]
        t0 = time.monotonic()
        done = b("test-failover", "db", "--host", "dr-host", *how, "--mount-point", str(where))
        seconds = time.monotonic() - t0
        job = done["job"]
        if job["status"] != "succeeded":
            raise RuntimeError(f"test-failover {name} failed: {job.get('message')}")
        result = job["result"]
        copy = Pg(
            self.bin, Path(result["paths"][0]), Path(result["socket_dir"]), int(result["port"])
        )
        beat = newest_beat(copy)
        b("unmount", done["image"]["id"])
        log(f"postgresql: tandem {name}: {seconds:.2f} s, {result.get('wal_segments')} segments")
        self.log_steps(b, job, t0, seconds)
        return {
            "seconds": seconds,
            "beat": beat,
            "segments": result.get("wal_segments"),
            "fetched": result.get("wal_segments_fetched", result.get("wal_segments")),
            "replay": float(result.get("recovery_seconds") or 0.0),
        }

    def log_steps(self, b: Any, job: dict[str, Any], t0: float, seconds: float) -> None:
        """Where the seconds of a test failover went: the job's log lines, each with the
        time since the job was queued (the appliance's clock), and the CLI's own total."""
        lines = b("job", "log", job["id"])
        shown = b("job", "show", job["id"])

        def when(stamp: str) -> datetime:  # all UTC, with or without the offset written
            return datetime.fromisoformat(stamp).replace(tzinfo=None)

        created = when(shown["created"])

        def at(stamp: str) -> str:
            return f"+{(when(stamp) - created).total_seconds():.2f} s"

        steps = [f"started {at(shown['started'])}"]
        steps += [f"{at(line['ts'])} {line['text'][:240]}" for line in lines]
        steps.append(f"finished {at(shown['finished'])}; the command took {seconds:.2f} s")
        for step in steps:
            log(f"postgresql:   {step}")

    def pgbackrest_recover(self, name: str, when: datetime | None) -> dict[str, Any]:
        copy = Pg(self.bin, self.root / f"pgbackrest-{name}", self.sockets)
        copy.data.mkdir(mode=0o700)
        shutil.chown(copy.data, "postgres", "postgres")
        how = (
            ["--type=default"]
            if when is None
            else [
                "--type=time",
                f"--target={when.strftime('%Y-%m-%d %H:%M:%S.%f+00')}",
                "--target-action=promote",
            ]
        )
        t0 = time.monotonic()
        self.pgbackrest("restore", f"--pg1-path={copy.data}", "--archive-mode=off", *how)
        copy.start()
        copy.promoted(time.monotonic() + 3600)
        seconds = time.monotonic() - t0
        beat = newest_beat(copy)
        copy.stop("immediate")
        shutil.rmtree(copy.data, ignore_errors=True)
        log(f"postgresql: pgbackrest {name}: {seconds:.2f} s")
        return {"seconds": seconds, "beat": beat}

    def close(self) -> None:
        self.stop_load()
        self.prod.stop("immediate")


def run(cfg: Config, report: Report) -> None:
    pg = _pg_bin()
    if pg is None or os.geteuid() != 0 or shutil.which("pgbackrest") is None:
        report.note(
            "postgresql: skipped, it needs root, PostgreSQL and pgBackRest "
            "(Debian: postgresql pgbackrest)"
        )
        return
    cfg.workdir.chmod(0o755)  # the postgres user must reach the clusters inside it

    def body(lab: Lab) -> None:
        bench = PgBench(cfg, report, lab, pg)
        try:
            bench.run()
        finally:
            bench.close()

    run_in_lab(cfg.workdir / "lab", report, (SECTION,), body)
