"""Presentation benchmark (issue 5): time to present a volume image to a DR host by test
failover, for 1, 4 and 10 GiB images, against a full restore of the same image.

Set-up (``tandem.drill.lab``, as in the replication section): appliances ``prod`` and ``dr``
paired, agent ``prod-host`` registered at prod and agent ``dr-host`` at dr, a mirroring
template. For each size: a sparse-ish volume (one random MiB in every 8 MiB, the rest holes)
is added as an app at prod, captured and replicated; then, with the replica at dr and
nothing else running:

- Test failover, map-only (``POST /api/v1/apps/APP/test-failover`` on dr with ``host:
  dr-host, action: map-only``): the job's own duration (started → finished), and the wall
  time from the API call until the job is seen succeeded *and* ``qemu-img info`` has opened
  the NBD export it answered. Then unmount and delete the test image (its rule: one test
  image per host). ``ROUNDS`` rounds; the median is shown.
- Full restore of the same image: ``tandem storage restore DR/pool MANIFEST OUT --json``
  onto a new file (restore_volume's own time from its stats, and the process wall time).

The 10 GiB size is skipped, and says so in the table, when the work directory's file system
has too little room for it.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
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
    fmt_bytes,
    fmt_seconds,
    fmt_size,
    have,
    log,
    run_measured,
    settle,
)
from bench.replication import (
    TwoSites,
    add_row,
    job_queued_seconds,
    job_seconds,
    run_in_lab,
    wait_job,
)
from tandem.drill.lab import Lab, tandem_argv

S = "presentation · test failover (NBD) vs full restore"

SIZES_GIB = (1, 4, 10)
ROUNDS = 3
PIECE = MiB  # random data written in pieces of this size …
DATA_EVERY = 8 * MiB  # … one piece in every stretch of this size, the rest holes
CHUNK = 4 * MiB  # tandem's volume chunk
PRESENT_POLL = 0.01  # job polling while timing a presentation
MARGIN = 512 * MiB
TARGET = "< 2 s, flat in size"


@dataclass
class Presentation:
    wall: float  # API call → job succeeded → qemu-img info done
    job: float  # the job's started → finished
    queued: float  # the job's created → started
    info: float  # qemu-img info alone
    withdraw: float  # unmount + delete of the test image
    virtual_size: int


@dataclass
class Restore:
    seconds: float  # restore_volume's own time (its stats)
    wall: float  # the `tandem storage restore` process
    written: int


def sparse_layout(size: int, data: DataSource, label: str) -> list[tuple[int, int]]:
    """Where the data of a sparse-ish volume goes: (offset, length) of one PIECE at a random
    PIECE-aligned offset in every DATA_EVERY stretch."""
    rng = random.Random(data.rng_seed(label))
    pieces = []
    for stretch in range(0, size, DATA_EVERY):
        slots = max(1, min(DATA_EVERY, size - stretch) // PIECE)
        off = stretch + PIECE * rng.randrange(slots)
        pieces.append((off, min(PIECE, size - off)))
    return pieces


def chunk_bytes(pieces: list[tuple[int, int]]) -> int:
    """Bytes of the 4 MiB chunks that hold any of ``pieces``."""
    chunks = {c for off, n in pieces for c in range(off // CHUNK, (off + n - 1) // CHUNK + 1)}
    return len(chunks) * CHUNK


def write_sparse_volume(
    path: Path, size: int, pieces: list[tuple[int, int]], data: DataSource, label: str
) -> int:
    """A sparse file of ``size`` with random bytes at ``pieces``; returns the bytes written."""
    with open(path, "wb") as fh:
        fh.truncate(size)
        for i, (off, n) in enumerate(pieces):
            fh.seek(off)
            fh.write(data.random(label, i, n))
    return sum(n for _, n in pieces)


class PresentationBench:
    def __init__(self, cfg: Config, report: Report, lab: Lab) -> None:
        self.cfg = cfg
        self.report = report
        self.data = DataSource(cfg.seed)
        self.root = cfg.workdir / "presentation"
        self.scratch = self.root / "scratch"
        self.sources = self.root / "prod-data"
        self.restores = self.root / "restore"
        self.sites = TwoSites(lab, dr_host=True)
        self.results: dict[int, tuple[Presentation, Restore]] = {}

    def run(self) -> None:
        for d in (self.scratch, self.sources, self.restores):
            d.mkdir(parents=True, exist_ok=True)
        log("presentation: starting appliances prod and dr and agents prod-host and dr-host")
        t0 = time.monotonic()
        self.sites.start()
        log(f"presentation: lab up and paired in {time.monotonic() - t0:.1f} s")
        self.report.context.append(
            f"Presentation: sparse-ish volumes of {', '.join(f'{g}' for g in SIZES_GIB)} GiB "
            f"(one random {fmt_size(PIECE)} in every {fmt_size(DATA_EVERY)}, holes elsewhere, "
            "so they are quick to make), each captured at prod and replicated to dr first; "
            "agents prod-host and dr-host as child processes on loopback."
        )
        for gib in SIZES_GIB:
            self.one_size(gib)
        self.flatness()

    def one_size(self, gib: int) -> None:
        size = gib * GiB
        label = f"present-{gib}g"
        what = f"{gib} GiB"
        pieces = sparse_layout(size, self.data, label)
        # Upper bounds: every 4 MiB chunk with data, as the source file's blocks, in both
        # pools and in the restored file; plus a margin.
        need = 4 * chunk_bytes(pieces) + MARGIN
        free = shutil.disk_usage(self.root).free
        if free < need:
            log(f"presentation: {what} skipped: needs {fmt_bytes(need)}, {fmt_bytes(free)} free")
            add_row(
                self.report,
                S,
                f"{what}: skipped (disk space)",
                tandem="skipped",
                peer=f"needs {fmt_bytes(need)} free, {fmt_bytes(free)} here",
                target=TARGET,
                values=dict(bytes=size, need=need, free=free, skipped="disk space"),
            )
            return
        source = self.sources / f"vol{gib}g.img"
        log(f"presentation: {what}: writing the volume")
        written = write_sparse_volume(source, size, pieces, self.data, label)
        app = f"vol{gib}g"
        self.sites.add_volume_app(app, source)
        log(f"presentation: {what}: capture at prod, replicate to dr")
        capture, replicate = self.sites.capture_and_replicate(app)
        source.unlink()  # captured: the replica at dr is what is presented and restored
        log(
            f"presentation: {what}: capture {job_seconds(capture):.1f} s, "
            f"replicate {job_seconds(replicate):.1f} s"
        )
        rounds = []
        for r in range(ROUNDS):
            settle()
            shown = self.present(app, size)
            log(
                f"presentation: {what}: round {r + 1}: wall {shown.wall:.3f} s, "
                f"job {shown.job:.3f} s, qemu-img info {shown.info:.3f} s"
            )
            rounds.append(shown)
        manifest = str(self.sites.dr_api.get(f"/api/v1/images/{capture['image']}")["manifest"])
        log(f"presentation: {what}: full restore from dr's pool")
        restore = self.restore(manifest, self.restores / f"{app}.img")
        log(f"presentation: {what}: restore_volume {restore.seconds:.2f} s")

        wall = statistics.median(p.wall for p in rounds)
        job = statistics.median(p.job for p in rounds)
        bad = [p.virtual_size for p in rounds if p.virtual_size != size]
        wrong = f" (qemu-img saw {bad[0]} bytes)" if bad else ""
        self.results[gib] = (
            Presentation(
                wall=wall,
                job=job,
                queued=statistics.median(p.queued for p in rounds),
                info=statistics.median(p.info for p in rounds),
                withdraw=statistics.median(p.withdraw for p in rounds),
                virtual_size=size,
            ),
            restore,
        )
        peer = f"restore {fmt_seconds(restore.seconds)}"
        add_row(
            self.report,
            S,
            f"{what}: present → qemu-img info (wall)",
            tandem=fmt_seconds(wall) + wrong,
            peer=peer,
            ratio=_ratio(wall, restore.seconds),
            target=TARGET,
            values=dict(
                bytes=size,
                data_bytes=written,
                wall_seconds=wall,
                wall_rounds=json.dumps([round(p.wall, 4) for p in rounds]),
                qemu_img_info_seconds=statistics.median(p.info for p in rounds),
                restore_seconds=restore.seconds,
                restore_process_seconds=restore.wall,
                restore_written=restore.written,
            ),
        )
        add_row(
            self.report,
            S,
            f"{what}: test-failover job (started → finished)",
            tandem=fmt_seconds(job),
            peer=peer,
            ratio=_ratio(job, restore.seconds),
            target=TARGET,
            values=dict(
                bytes=size,
                job_seconds=job,
                job_rounds=json.dumps([round(p.job, 4) for p in rounds]),
                queued_seconds=statistics.median(p.queued for p in rounds),
                unmount_delete_seconds=statistics.median(p.withdraw for p in rounds),
                capture_seconds=job_seconds(capture),
                replicate_seconds=job_seconds(replicate),
            ),
        )

    def present(self, app: str, size: int) -> Presentation:
        """One timed test failover (map-only) to dr-host, then its unmount and delete."""
        api = self.sites.dr_api
        assert self.sites.dr_agent is not None
        body = {"host": self.sites.dr_agent.name, "action": "map-only"}
        t0 = time.perf_counter()
        answer = api.post(f"/api/v1/apps/{app}/test-failover", body)
        job = wait_job(api, answer["job"]["id"], poll=PRESENT_POLL)
        t1 = time.perf_counter()
        uri = str((job.get("result") or {}).get("nbd_uri") or "")
        if not uri.startswith("nbd://"):
            raise RuntimeError(f"test-failover job {job['id']} answered no NBD URI: {job}")
        cmd = ["qemu-img", "info", "--output=json", uri]
        info = run_measured(cmd, scratch=self.scratch).check("qemu-img info")
        t2 = time.perf_counter()
        virtual_size = int(json.loads(info.stdout).get("virtual-size", -1))
        image = str(job["image"])
        api.post(f"/api/v1/images/{image}/unmount")
        deleted = api.delete(f"/api/v1/images/{image}")
        wait_job(api, deleted["job"]["id"], poll=PRESENT_POLL)
        t3 = time.perf_counter()
        return Presentation(
            wall=t2 - t0,
            job=job_seconds(job),
            queued=job_queued_seconds(job),
            info=t2 - t1,
            withdraw=t3 - t2,
            virtual_size=virtual_size,
        )

    def restore(self, manifest: str, out: Path) -> Restore:
        """``tandem storage restore`` of the replica from dr's pool onto a new file."""
        pool = self.sites.dr.directory / "pool"
        settle()
        cmd = tandem_argv("storage", "restore", str(pool), manifest, str(out), "--json")
        res = run_measured(cmd, scratch=self.scratch).check("tandem storage restore")
        stats: dict[str, Any] = json.loads(res.stdout)["stats"]
        out.unlink(missing_ok=True)
        return Restore(
            seconds=float(stats["seconds"]),
            wall=res.seconds,
            written=int(stats.get("bytes_written") or 0),
        )

    def flatness(self) -> None:
        small, large = min(self.results, default=0), max(self.results, default=0)
        if small == large:
            return
        (p_small, r_small), (p_large, r_large) = self.results[small], self.results[large]
        add_row(
            self.report,
            S,
            f"{large} GiB ÷ {small} GiB (flatness)",
            tandem=f"wall {p_large.wall / p_small.wall:.2f}×, job {p_large.job / p_small.job:.2f}×",
            peer=f"restore {r_large.seconds / r_small.seconds:.2f}×",
            target="≈ 1× (flat in size)",
            values=dict(
                wall_ratio=p_large.wall / p_small.wall,
                job_ratio=p_large.job / p_small.job,
                restore_ratio=r_large.seconds / r_small.seconds,
            ),
        )


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}× restore time" if b > 0 else "—"


NOTES = (
    "Presentation: the data is sparse-ish (one random MiB in every 8 MiB, holes elsewhere) so "
    "that it is quick to make; a full restore onto a new file writes only the 4 MiB chunks "
    "holding data (holes stay holes), so a dense image of the same size would take "
    "proportionally longer to restore, while a presentation copies nothing either way.",
    f"Presentation: 'wall' runs from the test-failover API call on dr, through polling the "
    f"job every {PRESENT_POLL * 1000:.0f} ms until it succeeded, to `qemu-img info` of the "
    f"NBD export it answered having exited; median of {ROUNDS} rounds (each followed by "
    "unmount and delete of the test image; every round's figure is in --json). 'restore' is "
    "restore_volume's own time from `tandem storage restore DR/pool MANIFEST NEW-FILE --json` "
    "(the process, with interpreter start, is in --json); its last fsync included.",
)


def run(cfg: Config, report: Report) -> None:
    report.notes.extend(NOTES)
    root = cfg.workdir / "presentation"
    root.mkdir(parents=True, exist_ok=True)
    if not have("qemu-img"):
        add_row(
            report,
            S,
            "not run",
            tandem="qemu-img missing (apt-get install qemu-utils)",
            peer="—",
        )
        return

    def body(lab: Lab) -> None:
        PresentationBench(cfg, report, lab).run()

    try:
        run_in_lab(root / "lab", report, (S,), body)
    finally:
        shutil.rmtree(root, ignore_errors=True)
