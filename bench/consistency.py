"""Consistency benchmark (issue 14): capturing a busy PostgreSQL cluster from a point in time.

Set-up: for each of btrfs (a subvolume: ``snapshot-btrfs``) and XFS (``reflink``), a file
system in a loop-mounted image made in the work directory, a PostgreSQL cluster
(``initdb``, ``pgbench -i -s 10``) on it, and pgbench at 150 transactions/s with a
per-transaction log. While it runs, as the agent does: the point in time is cut
(``tandem.agent.pit``) and captured into a local pool (``capture_tree``), twice: the first
capture, then a re-capture of the same busy cluster (incremental). Then ``pg_basebackup`` of
the same cluster, still under load.

Reported per file system: the time to a consistent image (cut + capture) against
``pg_basebackup``'s (target for the re-capture: ≤ 0.2×), bytes read, how long writes were
held, and the longest transaction latency pgbench saw while the cut was made (target
≤ 50 ms). Needs root, ``mkfs.btrfs``/``mkfs.xfs`` and PostgreSQL; a file system whose tools
are missing is skipped, and says so.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from bench.common import Config, Report, Row, log

SECTION = "consistency"
RATE = 150
SCALE = 10


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


def _max_latency_ms(logs: Path, start: float, end: float) -> float:
    """The longest latency of a transaction that was running during [start, end] (epoch s),
    from pgbench's per-transaction logs (``client tx latency_us script epoch_s epoch_us``)."""
    worst = 0.0
    for path in logs.glob("pgbench_log.*"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) < 6:
                continue
            latency = int(parts[2]) / 1e6
            done = int(parts[4]) + int(parts[5]) / 1e6
            if done >= start and done - latency <= end:
                worst = max(worst, latency)
    return worst * 1000


def _one(cfg: Config, report: Report, fstype: str, pg: Path) -> None:
    from tandem.agent import pit
    from tandem.domain.consistency import ConsistencyMode
    from tandem.storage.pool import ChunkPool
    from tandem.storage.tree import capture_tree

    tool = f"mkfs.{fstype}"
    if shutil.which(tool) is None:
        report.note(f"{fstype}: skipped, {tool} is missing")
        return
    work = cfg.workdir / fstype
    work.mkdir()
    work.chmod(0o755)
    image, mnt = work / "fs.img", work / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "2G", str(image)], check=True)
    subprocess.run([tool, "-q", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    data = mnt / "pgdata"
    sockets = work / "sockets"
    port = _port()
    bench: subprocess.Popen[bytes] | None = None
    try:
        mnt.chmod(0o755)
        if fstype == "btrfs":
            subprocess.run(["btrfs", "subvolume", "create", str(data)], check=True, stdout=-3)
        else:
            data.mkdir()
        sockets.mkdir()
        for p in (data, sockets):
            shutil.chown(p, "postgres", "postgres")
        data.chmod(0o700)
        _as_pg(str(pg / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
        opts = f"-p {port} -k {sockets} -c listen_addresses=''"
        _as_pg(str(pg / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(sockets / "log"), "-w",
               "start")  # fmt: skip
        conn = ["-h", str(sockets), "-p", str(port)]
        _as_pg(str(pg / "pgbench"), *conn, "-i", "-q", "-s", str(SCALE), "postgres")
        bench = subprocess.Popen(
            ["runuser", "-u", "postgres", "--", str(pg / "pgbench"), *conn, "-n", "-c", "4",
             "-j", "2", "-R", str(RATE), "-T", "3600", "-l", "postgres"],
            cwd=sockets, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(3)  # let the load settle before the first cut
        pool = ChunkPool.create(work / "pool")
        results = []
        base = base_id = None
        for what in ("first", "again"):
            t0, wall0 = time.monotonic(), time.time()
            with pit.point_in_time(str(data), "filesystem", ConsistencyMode.AUTO) as cut:
                cut_done = time.time()
                mid, manifest, stats = capture_tree(
                    pool, cut.path, base=base, base_id=base_id, recheck=cut.recheck,
                    identity=cut.identity,
                )  # fmt: skip
            seconds = time.monotonic() - t0
            results.append((what, cut, seconds, stats.bytes_read, wall0, cut_done))
            base, base_id = manifest, mid
            time.sleep(2)
        t0 = time.monotonic()
        backup = work / "basebackup"
        backup.mkdir()
        shutil.chown(backup, "postgres", "postgres")
        _as_pg(str(pg / "pg_basebackup"), *conn, "-D", str(backup), "-X", "fetch", "-c", "fast")
        base_seconds = time.monotonic() - t0
        base_bytes = sum(p.stat().st_size for p in backup.rglob("*") if p.is_file())
        time.sleep(1)
        bench.terminate()
        bench.wait()
        bench = None
        for what, cut, seconds, read, start, end in results:
            worst = _max_latency_ms(sockets, start, end)
            held = f"{cut.held_seconds * 1000:.1f} ms" if cut.held_seconds is not None else "—"
            ratio = seconds / base_seconds if base_seconds else 0.0
            report.add(
                Row(
                    SECTION,
                    f"{fstype} {cut.cut.value}, {what}: time to image",
                    f"{seconds:.2f} s",
                    f"{base_seconds:.2f} s pg_basebackup",
                    f"{ratio:.2f}×",
                    "≤ 0.2× (again)" if what == "again" else "",
                    {"bytes_read": read, "basebackup_bytes": base_bytes, "held": held},
                )
            )
            report.add(
                Row(
                    SECTION,
                    f"{fstype} {cut.cut.value}, {what}: longest pgbench latency during the cut",
                    f"{worst:.1f} ms (writes held {held})",
                    "",
                    "",
                    "≤ 50 ms",
                )
            )
    finally:
        if bench is not None:
            bench.kill()
            bench.wait()
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(pg / "pg_ctl"), "-D", str(data), "-m",
             "immediate", "-w", "stop"],
            capture_output=True, check=False, cwd="/",
        )  # fmt: skip
        subprocess.run(["umount", str(mnt)], check=False)


def run(cfg: Config, report: Report) -> None:
    pg = _pg_bin()
    if pg is None or os.geteuid() != 0:
        report.note("consistency: skipped, it needs root and PostgreSQL (Debian: postgresql)")
        return
    cfg.workdir.chmod(0o755)  # the postgres user must reach the clusters inside it
    for fstype in ("btrfs", "xfs"):
        log(f"consistency: PostgreSQL under pgbench on {fstype}")
        _one(cfg, report, fstype, pg)
