"""Scale: capture latency as an app's images pile up, and the list routes at 1,000 apps.

One appliance and one agent run as child processes on loopback TLS (``tandem.drill.lab``).

1. Capture latency with 10 and with N (``SCALE_IMAGES``, default 1,000) images: an app whose
   template keeps that many snapshots is captured ``CAPTURES`` times, each capture pruning
   the oldest image (the steady state of ``--keep``). The older images are seeded straight
   into the catalog and pool (each a distinct manifest naming a distinct chunk), since a
   thousand real captures would take the whole budget. Figure: median capture job time.
2. ``GET /api/v1/apps`` (the whole list, as the CLI asks) and ``GET /api/v1/jobs`` (the
   Monitor's default page of 100) at ``SCALE_APPS`` apps (default 1,000) and 20 jobs per
   app, over HTTPS through the daemon: p50 and p99 of ``REQUESTS`` calls each; also a page of
   100 apps (``?limit=100``).
3. A garbage collection job of the resulting pool (the first: full, it makes the reference
   counts), then 1% of the big app's images deleted through the API and a second job (an
   incremental one: it counts only what changed).
4. Past one process (with ``SCALE_PG_URL``, or ``TANDEM_TEST_PG_URL``: a PostgreSQL server
   where the bench makes a schema of its own): ``MULTI_APPS`` small apps on one agent, a
   round of captures of them all (a file changed in each) with one appliance process on the
   PostgreSQL catalog, then a round with a second process joined to it
   (``appliance init --join``). Figure: captures per minute of each round, from the first
   submit to the last end.
6. A collection of a big pool (``gc``, in-process, no daemon): a local pool of
   ``SCALE_GC_CHUNKS`` small packed chunks (default 1,000,000; 48 bytes of random data
   each) named by ``SCALE_GC_MANIFESTS`` manifests (default 1,000), a quarter of them then
   not live, every file aged an hour; one ``storage.gc.collect`` of it (full), then 1% of
   the live manifests dropped and a second one (incremental). Figures: their wall times,
   the chunks and packs they removed, and the peak RSS of a child process that runs only
   the collections.
5. Keeping up (``keepup``): ``SCALE_KEEPUP_APPS`` small apps (default 1,000, one 4 KiB file
   each) protected with a template ``--every SCALE_KEEPUP_EVERY`` (default 900 s, the issue's 15
   min) ``--keep 3``, left to the appliance's own scheduler for ``SCALE_KEEPUP_ROUNDS`` (default
   1) intervals after the first round. Figures, from the scheduler's capture jobs in the
   catalog: how long the first round (every app due at once) took; each later capture's lag, the
   time between two captures of an app less the interval (keeping up: at most one interval);
   failures; the appliance process's CPU over the run.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.common import Config, Report, Row, fmt_seconds, log, session_cpu_seconds
from tandem.catalog import queries as q
from tandem.catalog.db import open_catalog
from tandem.catalog.models import Job
from tandem.domain.ids import new_job_id
from tandem.domain.images import ImageKind
from tandem.domain.jobs import JobStatus
from tandem.domain.lifecycle import AppKind
from tandem.drill.lab import Daemon, Lab
from tandem.errors import TandemError
from tandem.storage.manifest import VOLUME_CHUNK, VolumeManifest, encode_manifest
from tandem.storage.pool import ChunkPool
from tandem.transport.client import ApiClient

SECTION = "scale"
SCALE_IMAGES = int(os.environ.get("SCALE_IMAGES", "1000"))
SCALE_APPS = int(os.environ.get("SCALE_APPS", "1000"))
JOBS_PER_APP = 20
CAPTURES = 7
REQUESTS = 200
MULTI_APPS = int(os.environ.get("SCALE_MULTI_APPS", "48"))
MULTI_CPU = float(os.environ.get("SCALE_MULTI_CPU", "0"))
"""Part 4 with ``SCALE_MULTI_CPU=C``: each appliance process is held to C cores by a cgroup of
its own (v1 ``cpu`` controller, CFS quota), standing for a machine of its own; the agent,
PostgreSQL and the bench share the rest. On 2 shared cores without it, a second process only
adds contention (see the README)."""
MULTI_ROUNDS = int(os.environ.get("SCALE_MULTI_ROUNDS", "3"))
"""Part 4 times this many rounds (every app captured once) with one process, then with two,
and compares the medians: one round is 10-20 s, which one burst of other work can skew."""
PARTS = os.environ.get("SCALE_PARTS", "single,multi,keepup").split(",")
"""``single``: parts 1-3 (one appliance, SQLite); ``lists``: part 2 alone (the list routes'
p50/p99, a minute or two); ``multi``: part 4 (PostgreSQL); ``keepup``: part 5 (the
scheduler, SQLite); ``gc``: part 6 (a collection of a big local pool, in-process)."""
GC_CHUNKS = int(os.environ.get("SCALE_GC_CHUNKS", "1000000"))
GC_MANIFESTS = int(os.environ.get("SCALE_GC_MANIFESTS", "1000"))
KEEPUP = {
    "apps": int(os.environ.get("SCALE_KEEPUP_APPS", "1000")),
    "every": int(os.environ.get("SCALE_KEEPUP_EVERY", "900")),
    "rounds": float(os.environ.get("SCALE_KEEPUP_ROUNDS", "1")),
}
"""Part 5's size; ``--quick`` makes it 100 apps on 60 s unless the environment says."""
KEEPUP_QUICK = {"apps": 100, "every": 60, "rounds": 1.0}
PG_URL = os.environ.get("SCALE_PG_URL") or os.environ.get("TANDEM_TEST_PG_URL")
TERMINAL = frozenset({"succeeded", "failed", "canceled"})


def _wait(
    api: ApiClient, job_id: str, timeout: float = 600.0, poll: float = 0.02
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = api.get(f"/api/v1/jobs/{job_id}")
        if job["status"] in TERMINAL:
            if job["status"] != "succeeded":
                raise RuntimeError(f"{job['type']} job {job_id} {job['status']}: {job['message']}")
            return job
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} still {job['status']} after {timeout:.0f} s")
        time.sleep(poll)


def _job_seconds(job: dict[str, Any]) -> float:
    started = datetime.fromisoformat(str(job["started"]))
    finished = datetime.fromisoformat(str(job["finished"]))
    return (finished - started).total_seconds()


class ScaleBench:
    def __init__(self, cfg: Config, report: Report, lab: Lab) -> None:
        self.cfg = cfg
        self.report = report
        self.lab = lab
        self.site: Daemon = lab.add("appliance", "site")
        self.agent: Daemon = lab.add("agent", "host")
        self.root = cfg.workdir / "scale"
        self.api: ApiClient | None = None

    def add(self, measure: str, tandem: str, target: str, values: dict[str, Any]) -> None:
        self.report.add(Row(SECTION, measure, tandem, "—", "—", target, values))

    def run(self, *, captures: bool = True) -> None:
        """Parts 1-3; ``captures=False``: part 2 alone (the list routes)."""
        self.lab.up(self.site, self.agent)
        api = self.api = self.site.client()
        self.lab.on_close("close the client", api.close)
        api.post(
            "/api/v1/hosts",
            {
                "name": self.agent.name,
                "url": self.agent.url,
                "token": self.agent.token,
                "fingerprint": self.agent.fingerprint,
            },
        )
        self.catalog_url = f"sqlite:///{self.site.directory / 'catalog.db'}"
        if captures:
            self.capture_ratio()
        self.seed_apps()
        self.list_latency("GET /apps", "/api/v1/apps", {})
        self.list_latency("GET /apps?limit=100", "/api/v1/apps", {"limit": 100})
        self.list_latency("GET /jobs", "/api/v1/jobs", {})
        if captures:
            self.collect("garbage collection job")
            self.delete_some("big", max(1, SCALE_IMAGES // 100))
            self.collect(f"garbage collection job after {max(1, SCALE_IMAGES // 100)} deletions")

    def capture_ratio(self) -> None:
        small = self.capture_latency("small", 10)
        big = self.capture_latency("big", SCALE_IMAGES)
        ratio = big / small if small else float("nan")
        self.add(
            f"capture, {SCALE_IMAGES} vs 10 images",
            f"{fmt_seconds(big)} vs {fmt_seconds(small)} ({ratio:.2f}×)",
            "≤ 1.2×",
            {"seconds_10": small, f"seconds_{SCALE_IMAGES}": big, "ratio": ratio},
        )

    # --- capture latency ------------------------------------------------------------------

    def capture_latency(self, app: str, images: int) -> float:
        assert self.api is not None
        data = self.root / app
        data.mkdir(parents=True)
        for i in range(8):
            (data / f"f{i}").write_bytes(os.urandom(16 * 1024))
        self.api.post("/api/v1/templates", {"name": f"keep-{app}", "keep": images})
        self.api.post(
            "/api/v1/apps",
            {"name": app, "host": self.agent.name, "kind": "filesystem", "path": str(data)},
        )
        self.api.post(f"/api/v1/apps/{app}/protect", {"template": f"keep-{app}"})
        self.capture(app, data)  # the base later captures build on
        log(f"scale: seeding {images} older images of {app}")
        self.seed_images(app, images)
        times = [self.capture(app, data) for _ in range(CAPTURES)]
        median = statistics.median(times)
        log(f"scale: {app} ({images} images) capture median {fmt_seconds(median)}")
        return median

    def capture(self, app: str, data: Path) -> float:
        assert self.api is not None
        (data / "changing").write_bytes(os.urandom(32 * 1024))
        job = self.api.post(f"/api/v1/apps/{app}/capture", {})["job"]
        return _job_seconds(_wait(self.api, job["id"]))

    def seed_images(self, app: str, n: int) -> None:
        pool = ChunkPool(self.site.directory / "pool")
        manifests = []
        with pool.writer() as writer:
            for i in range(n):
                digest = writer.put(f"{app}-seed-{i}-".encode() * 64).digest
                manifest = VolumeManifest(size=VOLUME_CHUNK, chunks=[digest])
                manifests.append(writer.commit_manifest(encode_manifest(manifest)))
        start = datetime.now(UTC) - timedelta(days=30)
        with open_catalog(self.catalog_url) as catalog, catalog.begin() as session:
            for i, mid in enumerate(manifests):
                q.add_image(
                    session,
                    app=app,
                    kind=ImageKind.SNAPSHOT,
                    manifest=mid.hex(),
                    size=4096,
                    created=start + timedelta(seconds=i),
                )

    # --- the list routes ----------------------------------------------------------------

    def seed_apps(self) -> None:
        log(f"scale: seeding {SCALE_APPS} apps and {SCALE_APPS * JOBS_PER_APP} jobs")
        now = datetime.now(UTC) - timedelta(days=1)
        with open_catalog(self.catalog_url) as catalog, catalog.begin() as session:
            for i in range(SCALE_APPS):
                q.add_app(
                    session,
                    name=f"app{i:05}",
                    kind=AppKind.FILESYSTEM,
                    host=self.agent.name,
                    path=f"/srv/app{i:05}",
                )
            session.add_all(
                Job(
                    id=new_job_id(),
                    type="capture",
                    app=f"app{i % SCALE_APPS:05}",
                    status=JobStatus.SUCCEEDED,
                    message="seeded",
                    params={},
                    created=now + timedelta(milliseconds=i),
                    started=now + timedelta(milliseconds=i),
                    finished=now + timedelta(milliseconds=i + 1),
                )
                for i in range(SCALE_APPS * JOBS_PER_APP)
            )

    def list_latency(self, measure: str, path: str, params: dict[str, Any]) -> None:
        """p50/p99 of ``REQUESTS`` calls, and the appliance's CPU per call: the latency
        follows the machine's load, the CPU much less."""
        assert self.api is not None
        for _ in range(5):
            self.api.get(path, **params)  # warm
        samples = []
        cpu0 = _cpu_seconds(self.site)
        for _ in range(REQUESTS):
            t0 = time.perf_counter()
            self.api.get(path, **params)
            samples.append(time.perf_counter() - t0)
        cpu = (_cpu_seconds(self.site) - cpu0) / REQUESTS
        samples.sort()
        p50 = samples[len(samples) // 2]
        p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
        log(
            f"scale: {measure} p50 {fmt_seconds(p50)} p99 {fmt_seconds(p99)}, "
            f"appliance CPU {fmt_seconds(cpu)} a call"
        )
        self.add(
            f"{measure} at {SCALE_APPS} apps",
            f"p99 {fmt_seconds(p99)} (p50 {fmt_seconds(p50)}; {fmt_seconds(cpu)} CPU)",
            "p99 ≤ 100 ms",
            {"p50": p50, "p99": p99, "cpu_per_call": cpu},
        )

    # --- garbage collection ---------------------------------------------------------------

    def delete_some(self, app: str, n: int) -> None:
        """Delete the ``n`` oldest images of ``app`` (as an operator would, one job each)."""
        assert self.api is not None
        rows = self.api.get(f"/api/v1/apps/{app}/images", limit=1000)
        for row in sorted(rows, key=lambda r: r["created"])[:n]:
            _wait(self.api, self.api.delete(f"/api/v1/images/{row['id']}")["job"]["id"])

    def collect(self, measure: str) -> None:
        """A ``gc`` job (the first one is full: it makes the reference counts; a later one
        counts what changed)."""
        assert self.api is not None
        try:
            answer = self.api.post("/api/v1/gc", {})
        except Exception as exc:  # an appliance without the gc job
            log(f"scale: no garbage collection job here ({exc})")
            return
        job = _wait(self.api, answer["job"]["id"])
        result = job.get("result") or {}
        seconds = _job_seconds(job)
        log(f"scale: gc {fmt_seconds(seconds)}: {job['message']}")
        self.add(
            measure,
            f"{fmt_seconds(seconds)} ({'full' if result.get('full', True) else 'incremental'}),"
            f" {result.get('chunks_kept', '?')} chunks kept, "
            f"{result.get('chunks_removed', '?')} removed",
            "never inside a capture",
            {"seconds": seconds, **{k: v for k, v in result.items() if isinstance(v, int)}},
        )


class MultiProcessBench:
    """Captures per minute with one appliance process, then two, on one PostgreSQL catalog."""

    def __init__(self, cfg: Config, report: Report, root: Path, catalog: str) -> None:
        self.cfg = cfg
        self.report = report
        self.root = root
        self.catalog = catalog
        self.daemons: list[Daemon] = []

    def start(self, daemon: Daemon) -> Daemon:
        self.daemons.append(daemon)
        daemon.start()
        if MULTI_CPU > 0 and daemon.kind == "appliance":
            _cap_cpu(daemon, MULTI_CPU)
        return daemon

    def run(self) -> None:
        first = self.start(
            Daemon.create("appliance", self.root / "p1", "pgsite", "--catalog", self.catalog)
        )
        agent = self.start(Daemon.create("agent", self.root / "agent", "host"))
        with first.client() as api:
            api.post(
                "/api/v1/hosts",
                {
                    "name": agent.name,
                    "url": agent.url,
                    "token": agent.token,
                    "fingerprint": agent.fingerprint,
                },
            )
            api.post("/api/v1/templates", {"name": "manual", "keep": 3})
            apps = []
            for i in range(MULTI_APPS):
                name, data = f"m{i:03}", self.root / "data" / f"m{i:03}"
                data.mkdir(parents=True)
                for j in range(8):
                    (data / f"f{j}").write_bytes(os.urandom(16 * 1024))
                api.post(
                    "/api/v1/apps",
                    {"name": name, "host": agent.name, "kind": "filesystem", "path": str(data)},
                )
                api.post(f"/api/v1/apps/{name}/protect", {"template": "manual"})
                apps.append((name, data))
            self.round([api], apps)  # the first, full captures: not measured
            ones = [self.round([api], apps, "one process") for _ in range(MULTI_ROUNDS)]
        second = self.start(
            Daemon.create("appliance", self.root / "p2", "pgsite", "--join", str(first.directory))
        )
        with first.client() as api1, second.client() as api2:
            twos = [self.round([api1, api2], apps, "two processes") for _ in range(MULTI_ROUNDS)]
        one, two = statistics.median(ones), statistics.median(twos)
        ratio = two / one if one else float("nan")
        log(f"scale: {one:.0f} captures/min with one process, {two:.0f} with two (medians)")
        capped = f", each process held to {MULTI_CPU:g} core" if MULTI_CPU > 0 else ""
        self.report.add(
            Row(
                SECTION,
                f"captures per minute, {MULTI_APPS} small apps, PostgreSQL catalog{capped}",
                f"two processes {two:.0f}/min vs one {one:.0f}/min ({ratio:.2f}×; median of"
                f" {MULTI_ROUNDS} rounds each)",
                "—",
                "—",
                "≥ 1.7× one process",
                {
                    "one_process": one,
                    "two_processes": two,
                    "ratio": ratio,
                    "rounds_one": " / ".join(f"{r:.0f}" for r in ones),
                    "rounds_two": " / ".join(f"{r:.0f}" for r in twos),
                },
            )
        )

    def round(self, apis: list[ApiClient], apps: list[tuple[str, Path]], what: str = "") -> float:
        """Capture every app once (a file changed in each), submitting through ``apis`` in
        turn; captures per minute from the first submit to the last end. Logs the CPU each
        part used per capture and how idle the machine was: with the appliances held to a
        quota, a machine with no idle time left means the shared rest (agent, PostgreSQL,
        this client) limited the round, not the appliances."""
        for _, data in apps:
            (data / "changing").write_bytes(os.urandom(16 * 1024))
        parts = [(d.kind, d.proc.pid) for d in self.daemons if d.proc is not None]
        cpu0 = [session_cpu_seconds(pid) for _, pid in parts]
        idle0, steal0 = _machine_cpu()
        t0, started = time.monotonic(), datetime.now(UTC)
        ids = [
            apis[i % len(apis)].post(f"/api/v1/apps/{name}/capture", {})["job"]["id"]
            for i, (name, _) in enumerate(apps)
        ]
        # The round ends at the last job's end as the catalog recorded it; the bench looks
        # four times a second, through each process in turn, so that its own calls are a
        # small and even share of the appliances' CPU (every 20 ms through the first one
        # was ~50 calls a second, all on one side).
        ends = [
            datetime.fromisoformat(str(_wait(apis[i % len(apis)], job_id, poll=0.25)["finished"]))
            for i, job_id in enumerate(ids)
        ]
        last = max(ends)
        if last.tzinfo is None:  # the catalog's times are UTC
            last = last.replace(tzinfo=UTC)
        seconds = (last - started).total_seconds()
        idle1, steal1 = _machine_cpu()
        capacity = (time.monotonic() - t0) * (os.cpu_count() or 1)
        idle, steal = (idle1 - idle0) / capacity, (steal1 - steal0) / capacity
        each = ", ".join(
            f"{kind} {1000 * (session_cpu_seconds(pid) - before) / len(apps):.0f} ms"
            for (kind, pid), before in zip(parts, cpu0, strict=True)
        )
        rate = len(apps) * 60.0 / seconds
        if what:
            log(
                f"scale: {what}: {rate:.0f}/min; CPU a capture: {each};"
                f" machine idle {idle:.0%}, stolen {steal:.0%}"
            )
        return rate

    def close(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()


class KeepUpBench:
    """The appliance's own scheduler with many small apps on one interval (part 5)."""

    def __init__(self, cfg: Config, report: Report, lab: Lab) -> None:
        self.cfg, self.report, self.lab = cfg, report, lab
        self.site: Daemon = lab.add("appliance", "keepup")
        self.agent: Daemon = lab.add("agent", "keepup-host")
        self.root = cfg.workdir / "scale" / "keepup"
        size = {**KEEPUP}
        if cfg.quick:
            size.update(
                (k, v)
                for k, v in KEEPUP_QUICK.items()
                if f"SCALE_KEEPUP_{k.upper()}" not in os.environ
            )
        self.apps, self.every, self.rounds = int(size["apps"]), int(size["every"]), size["rounds"]

    def run(self) -> None:
        self.lab.up(self.site, self.agent)
        with self.site.client() as api:
            api.post(
                "/api/v1/hosts",
                {
                    "name": self.agent.name,
                    "url": self.agent.url,
                    "token": self.agent.token,
                    "fingerprint": self.agent.fingerprint,
                },
            )
            api.post("/api/v1/templates", {"name": "every", "every": f"{self.every}s", "keep": 3})
            log(f"scale: keep-up, {self.apps} apps on --every {self.every}s --keep 3")
            names = []
            for i in range(self.apps):
                name, data = f"k{i:05}", self.root / f"k{i:05}"
                data.mkdir(parents=True)
                (data / "f").write_bytes(os.urandom(4096))
                app = {"name": name, "host": self.agent.name, "kind": "filesystem"}
                api.post("/api/v1/apps", {**app, "path": str(data)})
                names.append(name)
            cpu0, t0 = _cpu_seconds(self.site), time.monotonic()
            started = datetime.now(UTC)
            for name in names:  # protecting makes the app due at the scheduler's next tick
                api.post(f"/api/v1/apps/{name}/protect", {"template": "every"})
            end = t0 + self.every * (self.rounds + 1)
            while time.monotonic() < end:
                time.sleep(min(30.0, max(0.0, end - time.monotonic())))
                log(f"scale: keep-up, {time.monotonic() - t0:.0f} s of {end - t0:.0f} s")
            cpu = (_cpu_seconds(self.site) - cpu0) / (time.monotonic() - t0)
        self.figures(started, cpu)

    def figures(self, started: datetime, cpu: float) -> None:
        from sqlalchemy import select

        url = f"sqlite:///{self.site.directory / 'catalog.db'}"
        with open_catalog(url, upgrade=False) as catalog, catalog.read() as session:
            jobs = session.scalars(
                select(Job).where(Job.type == "capture", Job.actor == "scheduler")
            ).all()
        by_app: dict[str, list[datetime]] = {}
        failed = 0
        for job in jobs:
            if job.status is JobStatus.SUCCEEDED and job.finished is not None and job.app:
                by_app.setdefault(job.app, []).append(_aware(job.finished))
            elif job.status is JobStatus.FAILED:
                failed += 1
        firsts = [min(ends) for ends in by_app.values()]
        first_round = (
            (max(firsts) - started).total_seconds() if len(by_app) == self.apps else float("inf")
        )
        lags = sorted(
            (b - a).total_seconds() - self.every
            for ends in by_app.values()
            for a, b in zip(sorted(ends), sorted(ends)[1:], strict=False)
        )
        if not lags:
            raise RuntimeError("keep-up: no app was captured twice; the run was too short")
        p50 = lags[len(lags) // 2]
        p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
        kept_up = lags[-1] <= self.every and first_round <= self.every and not failed
        log(
            f"scale: keep-up first round {first_round:.0f} s, lag p50 {p50:.1f} s p99 "
            f"{p99:.1f} s max {lags[-1]:.1f} s, {len(jobs)} captures, {failed} failed, "
            f"appliance CPU {cpu:.0%} of a core"
        )
        self.report.add(
            Row(
                SECTION,
                f"{self.apps} small apps on --every {self.every}s, "
                f"{self.rounds:g} intervals after the first round",
                f"{'kept up' if kept_up else 'fell behind'}: first round {first_round:.0f} s, "
                f"lag p99 {p99:.1f} s (max {lags[-1]:.1f} s), {failed} failed, appliance CPU "
                f"{cpu:.0%} of a core",
                "—",
                "—",
                "lag ≤ one interval",
                {
                    "first_round": first_round,
                    "lag_p50": p50,
                    "lag_p99": p99,
                    "lag_max": lags[-1],
                    "captures": len(jobs),
                    "failed": failed,
                    "cpu": cpu,
                },
            )
        )


def _cpu_seconds(daemon: Daemon) -> float:
    """User plus system CPU seconds of the daemon's process (all its threads)."""
    assert daemon.proc is not None
    fields = Path(f"/proc/{daemon.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


CGROUP_CPU = Path("/sys/fs/cgroup/cpu")


def _machine_cpu() -> tuple[float, float]:
    """CPU seconds of the whole machine since boot (``/proc/stat``): idle (with iowait), and
    stolen by the hypervisor (a virtual machine's CPUs running another guest's work)."""
    with open("/proc/stat") as fh:
        fields = fh.readline().split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[4]) + int(fields[5])) / tick, int(fields[8]) / tick


def _cap_cpu(daemon: Daemon, cores: float) -> None:
    """Move ``daemon``'s process (all its threads) into a cgroup of its own held to
    ``cores`` of CPU time (CFS quota over a 100 ms period)."""
    assert daemon.proc is not None
    group = CGROUP_CPU / f"tandem-bench-{daemon.proc.pid}"
    group.mkdir(exist_ok=True)
    (group / "cpu.cfs_period_us").write_text("100000")
    (group / "cpu.cfs_quota_us").write_text(str(int(cores * 100000)))
    (group / "cgroup.procs").write_text(str(daemon.proc.pid))
    log(f"scale: appliance {daemon.name} (pid {daemon.proc.pid}) held to {cores:g} core")


def _uncap_all() -> None:
    for group in CGROUP_CPU.glob("tandem-bench-*"):
        with contextlib.suppress(OSError):
            group.rmdir()  # once its process is gone


def multi_process(cfg: Config, report: Report, root: Path) -> None:
    if not PG_URL:
        log("scale: no PostgreSQL (SCALE_PG_URL): the two-process figure is skipped")
        return
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from tandem.catalog.db import normalize_url

    base = make_url(normalize_url(PG_URL))
    schema = f"bench_{os.getpid()}_{int(time.time())}"
    admin = create_engine(base)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = base.update_query_dict({"options": f"-csearch_path={schema}"})
    bench = MultiProcessBench(cfg, report, root, url.render_as_string(hide_password=False))
    try:
        bench.run()
    except (RuntimeError, OSError, TandemError) as exc:
        log(f"scale (two processes) failed: {exc}")
        for d in bench.daemons:
            log(f"{d.kind} {d.name} log ends with:\n{d.log_tail()}")
        report.add(Row(SECTION, "two processes failed", "failed", str(exc)[:120], "—", "—"))
    finally:
        bench.close()
        _uncap_all()
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


def big_pool_gc(cfg: Config, report: Report, root: Path) -> None:
    """Part 6: build the pool, then collect it in a child process (its peak RSS alone)."""
    import json
    import shutil
    import subprocess
    import sys

    pool_dir = root / "pool"
    shutil.rmtree(pool_dir, ignore_errors=True)
    pool = ChunkPool.create(pool_dir)
    per = max(1, GC_CHUNKS // GC_MANIFESTS)
    log(f"scale: building a pool of {GC_CHUNKS} chunks in {GC_MANIFESTS} manifests")
    built = time.monotonic()
    live: list[str] = []
    with pool.writer() as writer:
        for m in range(GC_MANIFESTS):
            digests: list[bytes | None] = [writer.put(os.urandom(48)).digest for _ in range(per)]
            manifest = VolumeManifest(size=VOLUME_CHUNK * per, chunks=digests)
            mid = writer.commit_manifest(encode_manifest(manifest))
            if m % 4:
                live.append(mid.hex())
    past = time.time() - 3600
    for folder in (pool_dir / "packs", pool_dir / "manifests"):
        for entry in os.scandir(folder):
            os.utime(entry.path, (past, past))
    log(f"scale: pool built in {fmt_seconds(time.monotonic() - built)}")
    (root / "live.json").write_text(json.dumps(live))
    child = (
        "import json, sys, time, resource\n"
        "from tandem.storage import gc\n"
        "from tandem.storage.pool import ChunkPool\n"
        "pool = ChunkPool(sys.argv[1])\n"
        "live = [bytes.fromhex(m) for m in json.load(open(sys.argv[2]))]\n"
        "t = time.monotonic()\n"
        "run = gc.collect(pool, lambda: live)\n"
        "full = time.monotonic() - t\n"
        "import os\n"
        "for e in os.scandir(pool.packs_dir):\n"  # the next collection comes hours later
        "    os.utime(e.path, (time.time() - 3600,) * 2)\n"
        "rest = live[max(1, len(live) // 100):]\n"
        "t = time.monotonic()\n"
        "inc = gc.collect(pool, lambda: rest)\n"
        "print(json.dumps({'seconds': full, 'removed': run.chunks_removed,"
        " 'kept': run.chunks_kept, 'packs_deleted': run.packs_deleted,"
        " 'packs_rewritten': run.packs_rewritten, 'freed': run.bytes_freed,"
        " 'incremental_seconds': time.monotonic() - t, 'incremental_full': inc.full,"
        " 'incremental_removed': inc.chunks_removed, 'incremental_packs': inc.packs_done,"
        " 'max_rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))\n"
    )
    load = os.getloadavg()[0]
    done = subprocess.run(
        [sys.executable, "-c", child, str(pool_dir), str(root / "live.json")],
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(done.stdout.strip().splitlines()[-1])
    log(f"scale: gc of {GC_CHUNKS} chunks: {out}")
    report.add(
        Row(
            SECTION,
            f"garbage collection of {GC_CHUNKS:,} packed chunks, a quarter garbage",
            f"{fmt_seconds(out['seconds'])}, {out['removed']:,} removed, "
            f"{out['packs_deleted']} pack(s) deleted, {out['packs_rewritten']} rewritten, "
            f"peak RSS {out['max_rss'] / 2**20:.0f} MiB (load average {load:.1f})",
            "—",
            "—",
            "≤ 60 s",
            {**out, "load_average": load},
        )
    )
    report.add(
        Row(
            SECTION,
            "the next garbage collection of that pool, 1% of its live images deleted",
            f"{fmt_seconds(out['incremental_seconds'])}"
            f" ({'full' if out['incremental_full'] else 'incremental'}),"
            f" {out['incremental_removed']:,} removed, {out['incremental_packs']} pack(s) swept",
            "—",
            "—",
            "cost follows what changed",
            {k: v for k, v in out.items() if k.startswith("incremental")},
        )
    )
    shutil.rmtree(pool_dir, ignore_errors=True)


def run(cfg: Config, report: Report) -> None:
    root = cfg.workdir / "scale"
    root.mkdir(parents=True, exist_ok=True)
    report.context.append(
        f"Scale: one appliance and one agent on loopback TLS; capture latency at 10 and "
        f"{SCALE_IMAGES} images of an app (its template keeps that many: each capture prunes "
        f"one), then the list routes at {SCALE_APPS} apps and {SCALE_APPS * JOBS_PER_APP} "
        "jobs (seeded into the catalog)."
    )
    if "single" in PARTS or "lists" in PARTS:
        with Lab(root / "lab") as lab:
            bench = ScaleBench(cfg, report, lab)
            try:
                bench.run(captures="single" in PARTS)
            except (RuntimeError, OSError) as exc:
                log(f"scale failed: {exc}")
                for d in lab:
                    log(f"{d.kind} {d.name} log ends with:\n{d.log_tail()}")
                report.add(Row(SECTION, "section failed", "failed", str(exc)[:120], "—", "—"))
    if "multi" in PARTS:
        (root / "multi").mkdir(exist_ok=True)
        multi_process(cfg, report, root / "multi")
    if "gc" in PARTS:
        (root / "gc").mkdir(exist_ok=True)
        big_pool_gc(cfg, report, root / "gc")
    if "keepup" in PARTS:
        with Lab(root / "keepup-lab") as lab:
            keepup = KeepUpBench(cfg, report, lab)
            try:
                keepup.run()
            except (RuntimeError, OSError, TandemError) as exc:
                log(f"scale (keep-up) failed: {exc}")
                for d in lab:
                    log(f"{d.kind} {d.name} log ends with:\n{d.log_tail()}")
                report.add(Row(SECTION, "keep-up failed", "failed", str(exc)[:120], "—", "—"))
