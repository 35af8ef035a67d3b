"""Tree presentation benchmark (issue 15 item 4): time to usable files of a test failover of
a file tree, at 1 and 16 GiB, as a virtual copy through FUSE (the default) and as a full
copy (``action: copy``, what presenting a tree was before).

Set-up (``tandem.drill.lab``, as in the presentation section): appliances ``prod`` and
``dr`` paired, agents ``prod-host`` and ``dr-host``. For each size: a tree of 16 sparse-ish
files adding up to the size (one random MiB in every 64 MiB, holes elsewhere, so it is quick
to make and to capture) plus 10 small files, captured at prod and replicated to dr. Then,
with nothing else running, ``ROUNDS`` rounds, each presenting every size both ways in
turn: test failover to dr-host at a fresh mount point; time from the API call until the job
is seen succeeded *and* the tree is usable (an ``os.walk`` with ``lstat`` of every entry,
and the first MiB of one big file and one small file read back); then unmount and delete of
the test image. The median is shown.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path

from bench.common import Config, DataSource, GiB, MiB, Report, fmt_seconds, log, settle
from bench.replication import TEMPLATE, TwoSites, add_row, job_seconds, run_in_lab, wait_job
from tandem.drill.lab import Lab

S = "tree presentation · test failover (FUSE) vs full copy"

SIZES_GIB = (1, 16)
ROUNDS = 5
FILES = 16
STRIDE = 64 * MiB  # one random MiB in every stretch of this size, holes elsewhere
POLL = 0.01
TARGET = "flat (≤ 1.2×) in size"


def make_tree(root: Path, size: int, data: DataSource, label: str) -> int:
    """The tree; returns the bytes of data written (holes not counted)."""
    (root / "big").mkdir(parents=True)
    (root / "small").mkdir()
    written = 0
    for i in range(10):
        (root / "small" / f"s{i}.txt").write_bytes(data.text(label, 10_000 + i, 64 * 1024))
        written += 64 * 1024
    each = size // FILES
    for i in range(FILES):
        with open(root / "big" / f"part{i:02}.bin", "wb") as fh:
            fh.truncate(each)
            for k, off in enumerate(range(0, each, STRIDE)):
                fh.seek(off)
                fh.write(data.random(label, i * 100_000 + k, MiB))
                written += MiB
    return written


def usable(point: Path) -> None:
    """What an operator does first: list and stat everything, read a big and a small file."""
    for folder, dirs, files in os.walk(point):
        for name in dirs + files:
            os.lstat(os.path.join(folder, name))
    with open(point / "big" / "part07.bin", "rb") as fh:
        if len(fh.read(MiB)) != MiB:
            raise RuntimeError(f"short read of {point}/big/part07.bin")
    (point / "small" / "s3.txt").read_bytes()


class TreePresentationBench:
    def __init__(self, cfg: Config, report: Report, lab: Lab) -> None:
        self.cfg = cfg
        self.report = report
        self.data = DataSource(cfg.seed)
        self.root = cfg.workdir / "tree-presentation"
        self.sources = self.root / "prod-data"
        self.points = self.root / "dr-mounts"
        self.sites = TwoSites(lab, dr_host=True)
        self.results: dict[tuple[int, str], float] = {}

    def run(self) -> None:
        for d in (self.sources, self.points):
            d.mkdir(parents=True, exist_ok=True)
        self.sites.start()
        self.report.context.append(
            f"Tree presentation: trees of {FILES} sparse-ish files (one random MiB in every "
            f"{STRIDE // MiB} MiB) adding up to {', '.join(map(str, SIZES_GIB))} GiB, plus 10 "
            "small files; captured at prod and replicated to dr first."
        )
        written = {gib: self.prepare(gib) for gib in SIZES_GIB}
        # Rounds interleave the sizes and the two ways, so a load that drifts over the run
        # (other work on the machine) weighs on each alike.
        rounds: dict[tuple[int, str], list[tuple[float, float, int]]] = {}
        for r in range(ROUNDS):
            for gib in SIZES_GIB:
                for how in ("fuse", "copy"):
                    settle()
                    seconds, job, sent = self.present(f"tree{gib}g", how, f"{gib}-{how}-{r}")
                    log(
                        f"tree presentation: {gib} GiB {how}: {seconds:.3f} s to usable files "
                        f"(job {job:.3f} s, {sent} bytes sent)"
                    )
                    rounds.setdefault((gib, how), []).append((seconds, job, sent))
        for gib in SIZES_GIB:
            for how in ("fuse", "copy"):
                self.add(gib, how, written[gib], rounds[(gib, how)])
        self.flatness()

    def prepare(self, gib: int) -> int:
        """Make the tree of ``gib`` GiB, protect it at prod, capture and replicate it."""
        app = f"tree{gib}g"
        source = self.sources / app
        written = make_tree(source, gib * GiB, self.data, app)
        api = self.sites.prod_api
        agent = self.sites.prod_agent.name
        api.post(
            "/api/v1/apps", {"name": app, "host": agent, "kind": "filesystem", "path": str(source)}
        )
        api.post(f"/api/v1/apps/{app}/protect", {"template": TEMPLATE})
        capture, replicate = self.sites.capture_and_replicate(app)
        log(
            f"tree presentation: {gib} GiB: capture {job_seconds(capture):.1f} s, "
            f"replicate {job_seconds(replicate):.1f} s"
        )
        return written

    def add(self, gib: int, how: str, written: int, rounds: list[tuple[float, float, int]]) -> None:
        wall = statistics.median(s for s, _, _ in rounds)
        self.results[(gib, how)] = wall
        add_row(
            self.report,
            S,
            f"{gib} GiB: test failover → usable files, "
            + ("virtual copy (FUSE)" if how == "fuse" else "full copy (--action copy)"),
            tandem=fmt_seconds(wall),
            peer="—",
            target=TARGET if how == "fuse" else "report",
            values=dict(
                bytes=gib * GiB,
                data_bytes=written,
                seconds=wall,
                rounds=json.dumps([round(s, 4) for s, _, _ in rounds]),
                job_seconds=statistics.median(j for _, j, _ in rounds),
                bytes_sent=statistics.median(b for _, _, b in rounds),
            ),
        )

    def present(self, app: str, how: str, name: str) -> tuple[float, float, int]:
        api = self.sites.dr_api
        assert self.sites.dr_agent is not None
        point = self.points / name
        body: dict[str, str] = {
            "host": self.sites.dr_agent.name,
            "mount_point": str(point),
            "action": "copy" if how == "copy" else "specify",
        }
        t0 = time.perf_counter()
        answer = api.post(f"/api/v1/apps/{app}/test-failover", body)
        job = wait_job(api, answer["job"]["id"], poll=POLL)
        usable(point)
        seconds = time.perf_counter() - t0
        image = str(job["image"])
        api.post(f"/api/v1/images/{image}/unmount")
        deleted = api.delete(f"/api/v1/images/{image}")
        wait_job(api, deleted["job"]["id"], poll=POLL)
        return seconds, job_seconds(job), int(job.get("bytes_sent") or 0)

    def flatness(self) -> None:
        small, large = min(SIZES_GIB), max(SIZES_GIB)
        ratios = {}
        for how in ("fuse", "copy"):
            a, b = self.results.get((small, how)), self.results.get((large, how))
            if a and b:
                ratios[how] = b / a
        if "fuse" in ratios:
            add_row(
                self.report,
                S,
                f"{large} GiB ÷ {small} GiB (flatness)",
                tandem=f"virtual copy {ratios['fuse']:.2f}×",
                peer=f"full copy {ratios.get('copy', 0):.2f}×",
                target=TARGET,
                values=dict(fuse_ratio=ratios["fuse"], copy_ratio=ratios.get("copy")),
            )


NOTES = (
    "Tree presentation: 'usable files' runs from the test-failover API call on dr, through "
    f"polling the job every {POLL * 1000:.0f} ms until it succeeded, to an lstat of every "
    "entry and the first MiB of one big and one small file read back at the mount point; "
    f"median of {ROUNDS} rounds, each followed by unmount and delete. The trees are sparse "
    "so the full copy writes only their data (holes stay holes); a dense tree makes the "
    "full copy proportionally slower, the virtual copy not.",
)


def run(cfg: Config, report: Report) -> None:
    report.notes.extend(NOTES)
    root = cfg.workdir / "tree-presentation"
    root.mkdir(parents=True, exist_ok=True)
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        add_row(report, S, "not run", tandem="/dev/fuse or fusermount3 missing (fuse3)", peer="—")
        return

    def body(lab: Lab) -> None:
        TreePresentationBench(cfg, report, lab).run()

    try:
        run_in_lab(root / "lab", report, (S,), body)
    finally:
        shutil.rmtree(root, ignore_errors=True)
