"""Tree failover benchmark (issue 15 item 4): time to usable files of a *failover* of a file
tree, at 1 and 4 GiB, presented as a FUSE virtual copy whose layer lives beside the mount
point (``agent.fusemount``).

Set-up as the tree presentation section (``bench.treepresentation``): appliances ``prod``
and ``dr`` paired, agents ``prod-host`` and ``dr-host``, trees of 16 sparse-ish files
adding up to the size plus 10 small files, captured at prod and replicated to dr. A failover
is not repeated on one app without a failback, so each size has ``APPS`` apps (their own
trees) and each is failed over once, sizes interleaved; time from the failover API call
until the job is seen succeeded *and* the tree is usable (``treepresentation.usable``). The
median is shown. The copies are left failed over; the lab's end takes them down.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time

from bench.common import Config, DataSource, GiB, Report, fmt_seconds, log, settle
from bench.replication import TEMPLATE, TwoSites, add_row, job_seconds, run_in_lab, wait_job
from bench.treepresentation import POLL, TARGET, make_tree, usable
from tandem.drill.lab import Lab

S = "tree failover · time to usable files (FUSE copy)"

SIZES_GIB = (1, 4)
APPS = 3


class TreeFailoverBench:
    def __init__(self, cfg: Config, report: Report, lab: Lab) -> None:
        self.cfg = cfg
        self.report = report
        self.data = DataSource(cfg.seed)
        self.root = cfg.workdir / "tree-failover"
        self.sites = TwoSites(lab, dr_host=True)

    def run(self) -> None:
        (self.root / "prod-data").mkdir(parents=True, exist_ok=True)
        (self.root / "dr-mounts").mkdir(parents=True, exist_ok=True)
        self.sites.start()
        for gib in SIZES_GIB:
            for k in range(APPS):
                self.prepare(f"fo{gib}g{k}", gib)
        rounds: dict[int, list[tuple[float, float, int]]] = {}
        for k in range(APPS):
            for gib in SIZES_GIB:
                settle()
                seconds, job, sent = self.failover(f"fo{gib}g{k}")
                log(
                    f"tree failover: {gib} GiB: {seconds:.3f} s to usable files "
                    f"(job {job:.3f} s, {sent} bytes sent)"
                )
                rounds.setdefault(gib, []).append((seconds, job, sent))
        medians = {}
        for gib in SIZES_GIB:
            wall = statistics.median(s for s, _, _ in rounds[gib])
            medians[gib] = wall
            add_row(
                self.report,
                S,
                f"{gib} GiB: failover → usable files, virtual copy (FUSE)",
                tandem=fmt_seconds(wall),
                peer="—",
                target=TARGET,
                values=dict(
                    bytes=gib * GiB,
                    seconds=wall,
                    rounds=json.dumps([round(s, 4) for s, _, _ in rounds[gib]]),
                    job_seconds=statistics.median(j for _, j, _ in rounds[gib]),
                    bytes_sent=statistics.median(b for _, _, b in rounds[gib]),
                ),
            )
        small, large = min(SIZES_GIB), max(SIZES_GIB)
        add_row(
            self.report,
            S,
            f"{large} GiB ÷ {small} GiB (flatness)",
            tandem=f"{medians[large] / medians[small]:.2f}×",
            peer="—",
            target=TARGET,
            values=dict(ratio=medians[large] / medians[small]),
        )

    def prepare(self, app: str, gib: int) -> None:
        source = self.root / "prod-data" / app
        make_tree(source, gib * GiB, self.data, app)
        api = self.sites.prod_api
        agent = self.sites.prod_agent.name
        api.post(
            "/api/v1/apps", {"name": app, "host": agent, "kind": "filesystem", "path": str(source)}
        )
        api.post(f"/api/v1/apps/{app}/protect", {"template": TEMPLATE})
        capture, replicate = self.sites.capture_and_replicate(app)
        log(
            f"tree failover: {app}: capture {job_seconds(capture):.1f} s, "
            f"replicate {job_seconds(replicate):.1f} s"
        )

    def failover(self, app: str) -> tuple[float, float, int]:
        api = self.sites.dr_api
        assert self.sites.dr_agent is not None
        point = self.root / "dr-mounts" / app
        body = {
            "host": self.sites.dr_agent.name,
            "mount_point": str(point),
            "confirm": ["FAILOVER"],
        }
        t0 = time.perf_counter()
        answer = api.post(f"/api/v1/apps/{app}/failover", body)
        job = wait_job(api, answer["job"]["id"], poll=POLL)
        usable(point)
        seconds = time.perf_counter() - t0
        if (job.get("result") or {}).get("presentation") != "fuse":
            raise RuntimeError(f"failover of {app} was not presented through FUSE: {job}")
        return seconds, job_seconds(job), int(job.get("bytes_sent") or 0)


NOTES = (
    "Tree failover: 'usable files' runs from the failover API call on dr, through polling "
    f"the job every {POLL * 1000:.0f} ms until it succeeded, to an lstat of every entry and "
    f"the first MiB of one big and one small file read back; median of {APPS} apps per size "
    "(a failover is not repeated without a failback), sizes interleaved.",
)


def run(cfg: Config, report: Report) -> None:
    report.notes.extend(NOTES)
    root = cfg.workdir / "tree-failover"
    root.mkdir(parents=True, exist_ok=True)
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        add_row(report, S, "not run", tandem="/dev/fuse or fusermount3 missing (fuse3)", peer="—")
        return

    def body(lab: Lab) -> None:
        TreeFailoverBench(cfg, report, lab).run()

    try:
        run_in_lab(root / "lab", report, (S,), body)
    finally:
        shutil.rmtree(root, ignore_errors=True)
