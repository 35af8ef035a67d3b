"""Failback benchmark (issue 6): the downtime of a snapshot-style failback of a volume, for
1, 4 and 16 GiB volumes with 64 MiB written at the DR site after the catch-up syncback,
against rsync bringing the same changes home in the same run.

Set-up (``tandem.drill.lab``, as in the replication section): appliances ``prod`` and ``dr``
paired, agent ``prod-host`` at prod and ``dr-host`` at dr, a mirroring template. For each
size, a fully written volume (text-like bytes, unique per 4 MiB, so it compresses but does
not deduplicate) is added as an app at prod, captured and replicated; then, as an operator
would (SPEC §4):

1. failover at dr (the volume is presented over NBD); the app writes 32 MiB (64 KiB
   writes of random bytes at random offsets, through an NBD client);
2. catch-up syncback at dr, restored at prod while the app still runs at dr;
3. the app writes ``CHANGED`` = 64 MiB more, then stops: **downtime starts**;
4. final syncback at dr, restore of it at prod: **downtime ends** when the restore job
   finishes (the job timestamps: final syncback started → restore finished). The page
   cache is dropped before it (as root), at every size: the peer's copies before it evict
   what the DR copy was written with at 16 GiB but not at 1 GiB, and a DR site that served
   for days does not have it in memory either;
5. the production volume is compared with the DR copy (``qemu-img compare``), then the
   snapshot-style failback at dr.

Peer: before step 4, the production volume (at the catch-up state) is copied and the DR copy
read out over NBD (``nbdcopy``), and ``rsync --inplace --no-whole-file`` brings the copy up
to date from it: the classic hand-made failback. Its time is the peer's downtime.

``--profile DIR`` records both appliances and both agents with py-spy during each size's
downtime (final syncback and restore); the jobs' own logs (where each spent its time) are
logged after each size.

Reported: downtime and rsync's time per size (target: flat in size), the final syncback's
wire bytes against the bytes changed since the catch-up (target ≈ 1×), and the restore's
bytes written. A size whose volume and copies do not fit on the work directory's file system
is skipped, and says so.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    Config,
    DataSource,
    GiB,
    MiB,
    Report,
    drop_caches,
    fmt_bytes,
    fmt_ratio,
    fmt_seconds,
    have,
    log,
    settle,
)
from bench.e2e import Profiler
from bench.replication import (
    TwoSites,
    add_row,
    job_epoch,
    job_seconds,
    job_timeline,
    run_in_lab,
    wait_job,
)
from tandem.domain.rules import FAILOVER_CONFIRMATION, RESTORE_CONFIRMATIONS
from tandem.drill.lab import Lab
from tandem.drill.sampleapp import NbdDisk

S = "failback · downtime vs volume size (64 MiB changed after the catch-up)"
SIZES_GIB = (1, 4, 16)
CATCH_UP = 32 * MiB  # written at the DR site before the catch-up syncback
CHANGED = 64 * MiB  # written after it: what the final syncback and restore must move
WRITE = 64 * 1024
CHUNK = 4 * MiB
MARGIN = GiB
TARGET = "flat in size"


@dataclass
class Outcome:
    downtime: float  # final syncback started → restore finished (job timestamps)
    final_syncback: float
    restore: float
    final_wire: int  # the final syncback's bytes_sent
    changed: int  # distinct bytes written at the DR site since the catch-up
    restore_sent: int
    catch_up_restore: float
    reported: float | None  # the appliance's own failback downtime for the app
    rsync: float | None  # the peer: rsync of the DR copy onto the production copy


def write_volume(path: Path, size: int, data: DataSource, label: str) -> None:
    """A fully written volume: text-like bytes, unique per 4 MiB chunk."""
    with open(path, "wb") as fh:
        for i in range(size // CHUNK):
            fh.write(data.text(label, i, CHUNK))


def write_at_dr(uri: str, n_bytes: int, rng: random.Random, size: int, data: DataSource) -> int:
    """``n_bytes`` of random 64 KiB writes at random aligned offsets through NBD; returns the
    distinct bytes written."""
    disk = NbdDisk(uri)
    blocks: set[int] = set()
    try:
        for i in range(n_bytes // WRITE):
            block = rng.randrange(size // WRITE)
            blocks.add(block)
            disk.pwrite(data.random(f"dr-{rng.random()}", i, WRITE), block * WRITE)
    finally:
        disk.close()
    return len(blocks) * WRITE


class FailbackBench:
    def __init__(self, cfg: Config, report: Report, lab: Lab) -> None:
        self.cfg = cfg
        self.report = report
        self.data = DataSource(cfg.seed)
        self.root = cfg.workdir / "failback"
        self.sources = self.root / "prod-data"
        self.peer = self.root / "rsync"
        self.sites = TwoSites(lab, dr_host=True)
        self.results: dict[float, Outcome] = {}
        self.sizes = SIZES_GIB if cfg.size <= 0 else (cfg.size / GiB,)
        daemons = [self.sites.prod, self.sites.dr, self.sites.prod_agent, self.sites.dr_agent]
        self.profiler = Profiler(cfg.profile, [d for d in daemons if d is not None])

    @property
    def dr_host(self) -> str:
        assert self.sites.dr_agent is not None
        return self.sites.dr_agent.name

    def run(self) -> None:
        for d in (self.sources, self.peer):
            d.mkdir(parents=True, exist_ok=True)
        log("failback: starting appliances prod and dr and agents prod-host and dr-host")
        self.sites.start()
        self.report.context.append(
            f"Failback: fully written volumes of {', '.join(f'{g:g}' for g in self.sizes)} GiB; "
            f"{fmt_bytes(CATCH_UP)} written at dr before the catch-up syncback and "
            f"{fmt_bytes(CHANGED)} after it, in 64 KiB writes of random bytes over NBD. "
            "Downtime = final syncback started → restore at prod finished (job timestamps), "
            "page cache dropped before it. "
            "Peer: rsync --inplace --no-whole-file of the DR copy onto the production copy."
        )
        for gib in self.sizes:
            self.one_size(gib)
        self.flatness()
        self.profiler.note_tops(self.report)

    def need(self, size: int) -> int:
        # the volume, both pools (about half of it each), the peer's two copies, a margin
        return size + size + (2 * size if have("rsync") else 0) + MARGIN

    def one_size(self, gib: float) -> None:
        size = int(gib * GiB) // CHUNK * CHUNK
        what = f"{gib:g} GiB"
        free = shutil.disk_usage(self.root).free
        if free < self.need(size):
            log(f"failback: {what} skipped: needs {fmt_bytes(self.need(size))} free")
            add_row(
                self.report,
                S,
                f"{what}: skipped (disk space)",
                tandem="skipped",
                peer=f"needs {fmt_bytes(self.need(size))} free, {fmt_bytes(free)} here",
                target=TARGET,
                values=dict(bytes=size, free=free, skipped="disk space"),
            )
            return
        app = f"fb{gib:g}g".replace(".", "_")
        volume = self.sources / f"{app}.img"
        log(f"failback: {what}: writing the volume")
        write_volume(volume, size, self.data, app)
        self.sites.add_volume_app(app, volume)
        log(f"failback: {what}: capture at prod, replicate to dr")
        self.sites.capture_and_replicate(app)
        prod, dr = self.sites.prod_api, self.sites.dr_api
        rng = random.Random(self.data.rng_seed(app))

        log(f"failback: {what}: failover at dr, {fmt_bytes(CATCH_UP)} written there")
        failover = self.job(
            dr,
            f"/api/v1/apps/{app}/failover",
            {"host": self.dr_host, "confirm": [FAILOVER_CONFIRMATION], "label": "bench"},
        )
        # The export is a capability, never in an image document: asked for, as
        # `tandem image export` does.
        uri = str(dr.post(f"/api/v1/images/{failover['image']}/export", {})["nbd_uri"])
        write_at_dr(uri, CATCH_UP, rng, size, self.data)
        catch_up = self.job(dr, f"/api/v1/apps/{app}/syncback", {"label": "catch-up"})
        first = self.restore(app, catch_up)
        log(f"failback: {what}: catch-up syncback and its restore at prod done")

        changed = write_at_dr(uri, CHANGED, rng, size, self.data)
        rsync = self.rsync(volume, uri, what)
        settle()
        # The peer just read and wrote twice the volume: at 16 GiB that evicts what the DR
        # copy was written with, at 1 GiB it does not. Every size starts from disk instead,
        # as a DR site that served for days would.
        if not drop_caches():
            log("failback: the page cache could not be dropped (not root): sizes not alike")
        log(f"failback: {what}: the app stops at dr; final syncback and restore")
        with self.profiler.record(f"{app}-downtime"):
            final = self.job(dr, f"/api/v1/apps/{app}/syncback", {"label": "final"})
            restored = self.restore(app, final)
        self.log_job(dr, final)
        self.log_job(prod, restored)
        self.compare(volume, uri, what)
        self.job(dr, f"/api/v1/apps/{app}/failback", {})
        row = next(a for a in prod.get("/api/v1/apps") if a["name"] == app)
        out = Outcome(
            downtime=(job_epoch(restored, "finished") - job_epoch(final, "started")),
            final_syncback=job_seconds(final),
            restore=job_seconds(restored),
            final_wire=int(final["bytes_sent"]),
            changed=changed,
            restore_sent=int(restored["bytes_sent"]),
            catch_up_restore=job_seconds(first),
            reported=row.get("failback_downtime_seconds"),
            rsync=rsync,
        )
        self.results[gib] = out
        volume.unlink()
        log(
            f"failback: {what}: downtime {out.downtime:.2f} s (syncback {out.final_syncback:.2f}"
            f" s + restore {out.restore:.2f} s), rsync {fmt_seconds(rsync or 0)}"
        )
        self.rows(gib, out)

    def job(self, api: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
        started = api.post(path, body)
        return wait_job(api, started["job"]["id"])

    def log_job(self, api: Any, job: dict[str, Any]) -> None:
        """The job's own log lines, timed from its start: where its time went."""
        for line in job_timeline(job, api.get(f"/api/v1/jobs/{job['id']}/log")):
            log(f"  {line}")

    def restore(self, app: str, syncback: dict[str, Any]) -> dict[str, Any]:
        image = (syncback.get("result") or {}).get("image") or syncback["image"]
        return self.job(
            self.sites.prod_api,
            f"/api/v1/apps/{app}/restore",
            {"image": image, "confirm": list(RESTORE_CONFIRMATIONS)},
        )

    def rsync(self, volume: Path, uri: str, what: str) -> float | None:
        """The peer: rsync the DR copy onto a copy of the production volume."""
        if not (have("rsync") and have("nbdcopy")):
            log("failback: rsync or nbdcopy missing: no peer figure")
            return None
        target = self.peer / "prod.img"
        source = self.peer / "dr.img"
        shutil.copyfile(volume, target)
        subprocess.run(["nbdcopy", uri, str(source)], check=True, capture_output=True)
        settle()
        t0 = time.monotonic()
        subprocess.run(
            ["rsync", "--inplace", "--no-whole-file", str(source), str(target)],
            check=True,
            capture_output=True,
        )
        seconds = time.monotonic() - t0
        target.unlink()
        source.unlink()
        log(f"failback: {what}: rsync {seconds:.2f} s")
        return seconds

    def compare(self, volume: Path, uri: str, what: str) -> None:
        if not have("qemu-img"):
            return
        done = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(volume), uri],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{what}: production differs from the DR copy after the failback restore: "
                f"{(done.stdout + done.stderr).strip()[:300]}"
            )

    def rows(self, gib: float, out: Outcome) -> None:
        what = f"{gib:g} GiB"
        add_row(
            self.report,
            S,
            f"{what}: downtime (final syncback + restore)",
            tandem=f"{fmt_seconds(out.downtime)} ({fmt_seconds(out.final_syncback)} + "
            f"{fmt_seconds(out.restore)})",
            peer=f"rsync {fmt_seconds(out.rsync)}" if out.rsync is not None else "—",
            ratio=fmt_ratio(out.downtime, out.rsync, "rsync"),
            target=TARGET,
            values=dict(
                downtime=out.downtime,
                final_syncback=out.final_syncback,
                restore=out.restore,
                rsync=out.rsync,
                reported=out.reported,
                catch_up_restore=out.catch_up_restore,
            ),
        )
        add_row(
            self.report,
            S,
            f"{what}: final syncback wire bytes",
            tandem=fmt_bytes(out.final_wire),
            peer=f"changed {fmt_bytes(out.changed)}",
            ratio=fmt_ratio(out.final_wire, out.changed, "changed"),
            target="≈ 1× changed",
            values=dict(final_wire=out.final_wire, changed=out.changed, sent=out.restore_sent),
        )

    def flatness(self) -> None:
        if len(self.results) < 2:
            return
        small, big = min(self.results), max(self.results)
        a, b = self.results[small].downtime, self.results[big].downtime
        ra, rb = self.results[small].rsync, self.results[big].rsync
        add_row(
            self.report,
            S,
            f"downtime {big:g} GiB / {small:g} GiB",
            tandem=f"{b / a:.2f}×",
            peer=f"rsync {rb / ra:.2f}×" if ra and rb else "—",
            target="≈ 1× (flat)",
            values=dict(ratio=b / a),
        )


def run(cfg: Config, report: Report) -> None:
    def body(lab: Lab) -> None:
        FailbackBench(cfg, report, lab).run()

    run_in_lab(cfg.workdir / "failback-lab", report, (S,), body)
