"""End-to-end capture benchmark (issue 15 item 3): ``tandem capture`` as the operator runs
it — the CLI, the appliance's job runner and the host agent over loopback TLS — against
restic and ``cat`` on the same data in the same run.

Set-up (``tandem.drill.lab``: daemons as child processes on 127.0.0.1, stopped and removed
whatever happens): one appliance ``site`` and one agent ``host``, registered; a template
without schedule or mirroring; three apps: a volume (the storage section's generator: half
low-entropy text, half random, alternating per 4 MiB), the storage section's tree (small
files of 1-8 KiB plus four 64 MiB files) and a 4 MiB volume for the fixed costs.

Each tandem figure is the wall time of ``tandem capture APP --json`` (a fresh CLI process:
its start-up, the job's submission, the capture by the agent, the wait for the job's end),
beside the job's own duration (its ``started`` → ``finished``) and its queueing time
(``created`` → ``started``). The peers: ``restic backup`` (a fresh repository, its second
backup of the tree uses the first as parent) and ``cat`` into /dev/null (a volume: one
``cat``; a tree: ``find … | xargs cat``). Re-captures are best of ``ROUNDS``.

The tree's first capture also gets a row of CPU seconds: user + system time of every
process of the agent's and of the appliance's session (``/proc/PID/stat`` read before and
after it) beside restic's (``wait4``). On a shared machine that figure swings less than
wall time, which follows whatever else runs.

``--profile DIR`` (with ``py-spy`` installed) records each daemon while it captures and
writes ``DIR/<daemon>-<step>.txt`` (collapsed stacks); the heaviest functions of each go to
the report's notes.
"""

from __future__ import annotations

import collections
import compileall
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tandem
from bench.common import (
    Config,
    DataSource,
    MiB,
    Report,
    Row,
    Value,
    fmt_bytes,
    fmt_rate,
    fmt_ratio,
    fmt_seconds,
    fmt_size,
    have,
    log,
    run_measured,
    session_cpu_seconds,
    settle,
)
from bench.replication import job_queued_seconds, job_seconds, run_in_lab
from bench.storage import (
    FILES_PER_DIR,
    LARGE_FILE_SIZE,
    LARGE_FILES,
    Got,
    Restic,
    attempt,
    write_tree,
    write_volume,
)
from tandem.drill.lab import Daemon, Lab, tandem_argv

S1 = "e2e 1 · first capture through the CLI and daemons"
S2 = "e2e 2 · unchanged re-capture through the CLI and daemons"
S3 = "e2e 3 · fixed costs of a capture job"

ROUNDS = 5
TEMPLATE = "bench"
TINY = 4 * MiB
PROFILE_RATE = 100  # samples a second (py-spy --nonblocking: the daemon is never paused)


class Profiler:
    """``py-spy record`` attached to the daemons while one step runs (when asked)."""

    def __init__(self, out: Path | None, daemons: list[Daemon]) -> None:
        self.out = out
        self.daemons = daemons
        self.pyspy = shutil.which("py-spy") or shutil.which(
            "py-spy", path=str(Path(sys.executable).parent)
        )
        self.available = out is not None and self.pyspy is not None
        self.files: list[Path] = []

    def record(self, step: str) -> _Recording:
        return _Recording(self, step)

    def note_tops(self, report: Report) -> None:
        """A note per profile recorded: where the daemon's CPU went (``top_functions``)."""
        for path in self.files:
            top = top_functions(path)
            if top:
                shares = ", ".join(f"{f} {share:.0%}" for f, share in top)
                report.note(f"profile {path.name}: {shares}")


class _Recording:
    def __init__(self, profiler: Profiler, step: str) -> None:
        self.profiler = profiler
        self.step = step
        self.procs: list[tuple[Path, subprocess.Popen[bytes]]] = []

    def __enter__(self) -> _Recording:
        p = self.profiler
        if not p.available or p.out is None:
            return self
        p.out.mkdir(parents=True, exist_ok=True)
        for d in p.daemons:
            if d.proc is None:
                continue
            path = p.out / f"{d.name}-{self.step}.txt"
            assert p.pyspy is not None
            cmd = [p.pyspy, "record", "--pid", str(d.proc.pid), "--format", "raw"]
            cmd += ["--rate", str(PROFILE_RATE), "--nonblocking", "--output", str(path)]
            proc = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            self.procs.append((path, proc))
        time.sleep(0.5)  # py-spy attaches before the measured step starts
        return self

    def __exit__(self, *exc: object) -> None:
        for path, proc in self.procs:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if path.exists():
                self.profiler.files.append(path)


IDLE_LEAVES = (
    "wait (threading",
    "select (selectors",
    "get (queue",
    "_worker (concurrent",
    "Runner.run (asyncio",
    "run_forever",
    "recv (ssl",
    "read (ssl",
)
"""Innermost frames where a thread waits (a lock, a queue, the network), not works."""


def top_functions(path: Path, n: int = 6) -> list[tuple[str, float]]:
    """The innermost frames (file:line) with most samples in a collapsed-stack file, leaving
    out those where a thread waits (``IDLE_LEAVES``): where the daemon's CPU went, as shares
    of its working samples."""
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        if any(idle in leaf for idle in IDLE_LEAVES):
            continue
        leaves[leaf] += int(count)
        total += int(count)
    return [(f, c / total) for f, c in leaves.most_common(n)] if total else []


class EndToEndBench:
    def __init__(self, cfg: Config, report: Report, lab: Lab) -> None:
        self.cfg = cfg
        self.report = report
        self.size = cfg.size
        self.data = DataSource(cfg.seed)
        self.root = cfg.workdir / "e2e"
        self.scratch = self.root / "scratch"
        self.volume = self.root / "data" / "vol.img"
        self.tiny = self.root / "data" / "tiny.img"
        self.tree = self.root / "data" / "tree"
        self.lab = lab
        self.site = lab.add("appliance", "site")
        self.host = lab.add("agent", "host")
        self.restic = Restic(self.root, self.scratch) if have("restic") else None
        self.tree_bytes = 0
        self.restic_cpu: Got[float] = Got()  # CPU seconds of the last restic_backup
        self.profiler = Profiler(cfg.profile, [self.site, self.host])

    # --- helpers ------------------------------------------------------------------------

    def cli(self, *args: str) -> tuple[dict[str, Any], float]:
        """Run ``tandem ARGS --json`` against the appliance: (its document, wall seconds)."""
        res = run_measured(
            tandem_argv(*args, "--json"), scratch=self.scratch, env=self.site.env()
        ).check(f"tandem {' '.join(args)}")
        doc: dict[str, Any] = json.loads(res.stdout)
        return doc, res.seconds

    def capture(self, app: str) -> tuple[dict[str, Any], float]:
        doc, seconds = self.cli("capture", app)
        job: dict[str, Any] = doc["job"]
        if job["status"] != "succeeded":
            raise RuntimeError(f"capture of {app}: job {job['status']}: {job.get('message')}")
        return job, seconds

    def daemons_cpu(self) -> tuple[float, float]:
        """CPU seconds used so far by the agent and the appliance (each a session of its
        own): read before and after a step, their difference is its CPU on each side."""
        out = []
        for d in (self.host, self.site):
            out.append(session_cpu_seconds(d.proc.pid) if d.proc is not None else 0.0)
        return out[0], out[1]

    def row(
        self,
        section: str,
        measure: str,
        *,
        tandem: str,
        peer: str,
        ratio: str = "—",
        target: str = "—",
        values: dict[str, Value] | None = None,
    ) -> None:
        self.report.add(Row(section, measure, tandem, peer, ratio, target, values or {}))

    def restic_backup(self, path: Path) -> Got[float]:
        if self.restic is None:
            return Got()
        restic = self.restic
        settle()
        got = attempt("restic", lambda: restic.backup(path))
        if got.value is None:
            self.restic_cpu = Got(why=got.why)
            return Got(why=got.why)
        self.restic_cpu = Got(got.value.cpu_seconds)
        return Got(got.value.seconds)

    def cat_volume(self) -> float:
        return (
            run_measured(["cat", str(self.volume)], scratch=self.scratch, stdout=False)
            .check("cat")
            .seconds
        )

    def cat_tree(self) -> float:
        cmd = ["sh", "-c", 'find "$1" -type f -print0 | xargs -0 cat', "sh", str(self.tree)]
        return run_measured(cmd, scratch=self.scratch, stdout=False).check("cat").seconds

    # --- the run ------------------------------------------------------------------------

    def run(self) -> None:
        for d in (self.scratch, self.volume.parent):
            d.mkdir(parents=True, exist_ok=True)
        log(f"e2e: writing a {fmt_size(self.size)} volume and a tree of {self.cfg.files:,} files")
        write_volume(self.volume, self.size, self.data, "e2e-volume")
        write_volume(self.tiny, TINY, self.data, "e2e-tiny")
        self.tree_bytes = write_tree(self.tree, self.cfg.files, self.data)
        settle()
        dirs = -(-self.cfg.files // FILES_PER_DIR)
        self.report.context.append(
            f"End to end: `tandem capture APP --json` (a new CLI process each time) against one "
            f"appliance and one agent on loopback TLS; volume {fmt_size(self.size)} (text and "
            f"random alternating per 4 MiB); tree {self.cfg.files:,} files of 1-8 KiB in "
            f"{dirs:,} directories + {LARGE_FILES} × {fmt_size(LARGE_FILE_SIZE)} "
            f"({fmt_bytes(self.tree_bytes)})."
        )
        # The CLI as installed: pip compiles an installed package's bytecode, which an
        # editable install (or PYTHONDONTWRITEBYTECODE) leaves to every start.
        compileall.compile_dir(Path(tandem.__file__).parent, quiet=1)
        log("e2e: starting appliance site and agent host")
        self.lab.up(self.site, self.host)
        self.cli(
            "host",
            "add",
            self.host.name,
            "--url",
            self.host.url,
            "--token",
            self.host.token,
            "--fingerprint",
            self.host.fingerprint,
        )
        self.cli("template", "add", TEMPLATE)
        for app, kind, path in (
            ("vol", "volume", self.volume),
            ("tree", "filesystem", self.tree),
            ("tiny", "volume", self.tiny),
        ):
            self.cli(
                "app", "add", app, "--host", self.host.name, "--kind", kind, "--path", str(path)
            )
            self.cli("app", "protect", app, "--template", TEMPLATE)
        if self.restic is not None:
            self.restic.init()
        self.step_fixed_costs()
        self.step_volume()
        self.step_tree()
        self.profiler.note_tops(self.report)

    def step_fixed_costs(self) -> None:
        log(f"e2e 3: fixed costs: re-captures of a {fmt_size(TINY)} volume, best of {ROUNDS}")
        self.capture("tiny")
        best: tuple[float, dict[str, Any]] | None = None
        for _ in range(ROUNDS):
            job, seconds = self.capture("tiny")
            if best is None or seconds < best[0]:
                best = (seconds, job)
        assert best is not None
        wall, job = best
        _, help_wall = self.cli("apps")
        self.row(
            S3,
            f"unchanged {fmt_size(TINY)} volume: CLI wall time",
            tandem=fmt_seconds(wall),
            peer=f"`tandem apps` {fmt_seconds(help_wall)}",
            target="—",
            values=dict(cli_seconds=wall, apps_cli_seconds=help_wall),
        )
        self.row(
            S3,
            "  of which the job (started → finished)",
            tandem=fmt_seconds(job_seconds(job)),
            peer=f"queued {fmt_seconds(job_queued_seconds(job))}",
            target="< 0.3 s job overhead",
            values=dict(job_seconds=job_seconds(job), queued_seconds=job_queued_seconds(job)),
        )

    def first_capture(self, app: str, path: Path, what: str, size: int, **extra: Value) -> None:
        """The first capture of ``app`` (whose data is ``path``) through the CLI, then
        restic's backup of the same data: wall time and the CPU each side spent."""
        log(f"e2e 1: first capture of the {app} through the CLI")
        settle()
        load = os.getloadavg()[0]
        agent0, appliance0 = self.daemons_cpu()
        with self.profiler.record(f"{'volume' if app == 'vol' else app}-first"):
            job, wall = self.capture(app)
        agent1, appliance1 = self.daemons_cpu()
        agent_cpu, appliance_cpu = agent1 - agent0, appliance1 - appliance0
        log(
            f"e2e 1: {fmt_seconds(wall)}, job {fmt_seconds(job_seconds(job))}, CPU agent "
            f"{agent_cpu:.2f} s + appliance {appliance_cpu:.2f} s (load {load:.1f}); restic"
        )
        peer = self.restic_backup(path)
        self.row(
            S1,
            f"{what}: time",
            tandem=f"{fmt_seconds(wall)} ({fmt_rate(size, wall)})",
            peer=peer.show(lambda s: f"restic {fmt_seconds(s)} ({fmt_rate(size, s)})"),
            ratio=fmt_ratio(wall, peer.value, "restic time"),
            target="≤ 0.5× restic time",
            values=dict(
                bytes=size,
                cli_seconds=wall,
                job_seconds=job_seconds(job),
                bytes_sent=int(job.get("bytes_sent") or 0),
                restic_seconds=peer.value,
                load_average=load,
                **extra,
            ),
        )
        cpu = agent_cpu + appliance_cpu
        self.row(
            S1,
            f"{what}: CPU seconds",
            tandem=f"{cpu:.2f} s (agent {agent_cpu:.2f} + appliance {appliance_cpu:.2f})",
            peer=self.restic_cpu.show(lambda s: f"restic {s:.2f} s"),
            ratio=fmt_ratio(cpu, self.restic_cpu.value, "restic CPU"),
            values=dict(
                agent_cpu_seconds=agent_cpu,
                appliance_cpu_seconds=appliance_cpu,
                restic_cpu_seconds=self.restic_cpu.value,
            ),
        )

    def step_volume(self) -> None:
        self.first_capture("vol", self.volume, f"volume {fmt_size(self.size)}", self.size)
        for touched in (False, True):
            self.volume_again(touched)

    def volume_again(self, touched: bool) -> None:
        """Unchanged re-captures, best of ROUNDS, against cat. ``touched``: the file's mtime
        is moved first (same bytes), so the agent cannot trust its stamp and reads it all."""
        what = "touched, read and hashed" if touched else "untouched"
        log(f"e2e 2: re-capture of the unchanged volume ({what}) against cat, best of {ROUNDS}")
        best_cat = best = float("inf")
        best_job: dict[str, Any] = {}
        with self.profiler.record("volume-touched" if touched else "volume-again"):
            for _ in range(ROUNDS):
                best_cat = min(best_cat, self.cat_volume())
                if touched:
                    os.utime(self.volume)
                job, wall = self.capture("vol")
                if wall < best:
                    best, best_job = wall, job
        read = int((best_job.get("result") or {}).get("stats", {}).get("bytes_read") or 0)
        self.row(
            S2,
            f"volume {fmt_size(self.size)}, {what}: speed",
            tandem=f"{fmt_rate(self.size, best)} ({fmt_seconds(best)}, job "
            f"{fmt_seconds(job_seconds(best_job))}, read {fmt_bytes(read)})",
            peer=f"cat {fmt_rate(self.size, best_cat)} ({fmt_seconds(best_cat)})",
            ratio=fmt_ratio(best_cat, best, "cat speed"),
            target="≥ 0.5× cat speed",
            values=dict(
                bytes=self.size,
                cli_seconds=best,
                job_seconds=job_seconds(best_job),
                cat_seconds=best_cat,
                bytes_read=read,
            ),
        )

    def step_tree(self) -> None:
        size = self.tree_bytes
        what = f"tree, {self.cfg.files:,} files"
        self.first_capture("tree", self.tree, what, size, files=self.cfg.files)
        log(f"e2e 2: unchanged re-capture of the tree, best of {ROUNDS}; restic; cat")
        best = float("inf")
        best_job: dict[str, Any] = {}
        with self.profiler.record("tree-again"):
            for _ in range(ROUNDS):
                job, wall = self.capture("tree")
                if wall < best:
                    best, best_job = wall, job
        again = self.restic_backup(self.tree)
        best_cat = min(self.cat_tree() for _ in range(ROUNDS))
        self.row(
            S2,
            f"tree, {self.cfg.files:,} files: time",
            tandem=f"{fmt_seconds(best)} (job {fmt_seconds(job_seconds(best_job))})",
            peer=f"cat {fmt_seconds(best_cat)}; "
            + again.show(lambda s: f"restic {fmt_seconds(s)}"),
            ratio=fmt_ratio(best_cat, best, "cat speed"),
            target="≥ 0.5× cat speed",
            values=dict(
                bytes=size,
                cli_seconds=best,
                job_seconds=job_seconds(best_job),
                cat_seconds=best_cat,
                restic_seconds=again.value,
            ),
        )


def run(cfg: Config, report: Report) -> None:
    root = cfg.workdir / "e2e"
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    need = 4 * cfg.size + 3 * (cfg.files * 5 * 1024 + LARGE_FILES * LARGE_FILE_SIZE)
    if free < need:
        raise SystemExit(f"{root}: {fmt_size(free)} free, the e2e section needs {fmt_size(need)}")

    def body(lab: Lab) -> None:
        EndToEndBench(cfg, report, lab).run()

    run_in_lab(root / "lab", report, (S1, S2, S3), body)
    report.note(
        "e2e: wall times of `tandem capture` include the CLI's start-up (Python, imports), "
        "which `tandem apps` alone shows; restic and cat are native programs."
    )
