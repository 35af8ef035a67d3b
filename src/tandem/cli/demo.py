"""`tandem demo`: a narrated run of real daemons on loopback; exits non-zero if anything fails.

At this stage (one site) the demo starts an appliance and a host agent (``lab.Lab``), and a
sample application that keeps writing (``sampleapp``: SQLite in WAL mode, rotating logs and
files, records on a disk image). It protects the app's data directory (a ``filesystem`` app)
and its disk image (a ``volume`` app) and drives the appliance through its API (the typed
``ApiClient``, as the CLI does): full capture, the app keeps writing, incremental capture,
damage to production, restore of the earlier images with the typed confirmations (the app's
stop command runs first, its start command after), verification that production equals what
was captured, and verification of every image in the pool. A closing report lists every
step, its jobs, their durations and the bytes they moved.

Consistency: the app keeps writing, so each capture is taken while the app is *held*
(quiesced: transaction finished, database closed, files closed), which is when the demo
records the reference state (a BLAKE3 digest of every file and of the disk image). Both
apps are captured at the same quiesce point. Before the restore the demo sets the hold
again, so the app that the restore's start command launches stays held and does not write
until the demo has compared production with the reference; then it is released and must
open the restored database cleanly and write on from the captured row.

Shape: ``STEPS`` is a list of step functions over one shared ``Context``; each returns a
one-line result and records the jobs it ran. The two-site drill adds its steps (pairing,
mirroring, test failover, failover, syncback, failback) to the list and its sites to
``Context.sites``. Progress goes to stderr, the report to stdout (``--json``: one document).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shlex
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import blake3
import typer
from rich import box
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from tandem.errors import TandemError
from tandem.transport.client import ApiClient

from . import sampleapp
from .lab import Daemon, Lab
from .output import byte_progress, emit_json, fail, handle_errors, human_bytes, stderr, stdout

MiB = 1024 * 1024
CONFIRMATIONS = ["DATA LOSS", "OVERWRITE OTHER APPS"]
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
JOB_POLL = 0.1
JOB_TIMEOUT = 300.0
TEMPLATE = "demo"
FILES_APP = "files"
DISK_APP = "disk"
SAMPLE_LIFETIME = 900.0
"""Seconds after which a sample app left behind (demo killed by SIGKILL) stops by itself."""


class StepFailed(Exception):
    """A step's check failed; the message names what."""


# --- records ------------------------------------------------------------------------------


@dataclass
class JobRecord:
    """A job as the report shows it."""

    id: str
    type: str
    app: str
    status: str
    message: str
    bytes_total: int
    bytes_sent: int
    seconds: float
    image: str | None

    @classmethod
    def of(cls, job: dict[str, Any], elapsed: float) -> JobRecord:
        return cls(
            id=str(job["id"]),
            type=str(job["type"]),
            app=str(job.get("app") or ""),
            status=str(job["status"]),
            message=str(job.get("message") or ""),
            bytes_total=int(job.get("bytes_total") or 0),
            bytes_sent=int(job.get("bytes_sent") or 0),
            seconds=_job_seconds(job, elapsed),
            image=job.get("image"),
        )


def _job_seconds(job: dict[str, Any], elapsed: float) -> float:
    """The job's own duration (started → finished), or what the client waited."""
    try:
        started = dt.datetime.fromisoformat(str(job["started"]))
        finished = dt.datetime.fromisoformat(str(job["finished"]))
    except (KeyError, TypeError, ValueError):
        return round(elapsed, 3)
    return round((finished - started).total_seconds(), 3)


@dataclass
class StepRecord:
    name: str
    title: str
    status: str = "pending"  # pending | succeeded | failed | skipped
    seconds: float = 0.0
    result: str = ""
    error: str | None = None
    jobs: list[JobRecord] = field(default_factory=list)


@dataclass
class Step:
    name: str
    title: str
    run: Callable[[Context], str]


# --- the shared context -------------------------------------------------------------------


@dataclass
class Options:
    size_mib: int
    write_seconds: float


@dataclass
class Site:
    """One site of the drill: its appliance, its host agent and a client for the appliance."""

    role: str
    appliance: Daemon
    agent: Daemon
    client: ApiClient | None = None

    @property
    def api(self) -> ApiClient:
        if self.client is None:
            self.client = self.appliance.client()
        return self.client

    @property
    def host(self) -> str:
        return self.agent.name


@dataclass
class SampleApp:
    """The sample application on a site's host: where it writes, how it starts and stops."""

    paths: sampleapp.Paths
    disk: Path
    start: str
    stop: str

    def status(self) -> dict[str, Any]:
        return sampleapp.read_status(self.paths)

    def apps(self) -> list[tuple[str, str, Path]]:
        """The protected apps over its data: (name, kind, path)."""
        return [(FILES_APP, "filesystem", self.paths.data), (DISK_APP, "volume", self.disk)]


@dataclass
class Reference:
    """What an app's data was when it was captured (taken while the app was held)."""

    app: str
    image: str
    state: dict[str, str]


class Context:
    """What every step reads and writes: the lab, the sites, the app, images, checks."""

    def __init__(self, lab: Lab, options: Options) -> None:
        self.lab = lab
        self.options = options
        self.sites: dict[str, Site] = {}
        self.app: SampleApp | None = None
        self.images: dict[str, dict[str, Any]] = {}
        """Images by the demo's name for them, e.g. ``files-full``."""
        self.references: dict[str, Reference] = {}
        """Reference states by image id."""
        self.checks: dict[str, bool] = {}
        self.facts: dict[str, Any] = {}
        self.step: StepRecord | None = None

    @property
    def prod(self) -> Site:
        return self.sites["production"]

    @property
    def sample(self) -> SampleApp:
        if self.app is None:
            raise StepFailed("the sample application was not set up")
        return self.app

    def close(self) -> None:
        for site in self.sites.values():
            if site.client is not None:
                site.client.close()
                site.client = None

    # --- narration ---------------------------------------------------------------------

    def say(self, text: str) -> None:
        stderr.print(f"     {text}", highlight=False, soft_wrap=True)

    def command(self, text: str) -> None:
        """Show the CLI command an operator would type for what the demo does next."""
        stderr.print(f"     [dim]$ tandem {escape(text)}[/]", highlight=False, soft_wrap=True)

    def check(self, name: str, ok: bool, failure: str) -> None:
        """Record a check; a failed one fails the step with ``failure``."""
        self.checks[name] = ok
        if not ok:
            raise StepFailed(failure)

    # --- jobs --------------------------------------------------------------------------

    def start_job(self, site: Site, path: str, body: dict[str, Any]) -> dict[str, Any]:
        job: dict[str, Any] = site.api.post(path, body)["job"]
        return job

    def wait_jobs(self, site: Site, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Wait for the jobs (showing progress), record them, fail the step if one failed."""
        t0 = time.monotonic()
        deadline = t0 + JOB_TIMEOUT
        done: dict[str, dict[str, Any]] = {}
        with _progress() as progress:
            tasks = {
                j["id"]: progress.add_task(f"{j['type']} {j.get('app') or ''}", total=None)
                for j in jobs
            }
            current = {j["id"]: j for j in jobs}
            while len(done) < len(jobs):
                for job_id, job in list(current.items()):
                    if job_id in done:
                        continue
                    if job["status"] not in TERMINAL:
                        job = current[job_id] = site.api.get(f"/api/v1/jobs/{job_id}")
                    total = int(job.get("bytes_total") or 0)
                    progress.update(
                        tasks[job_id],
                        total=total or None,
                        completed=int(job.get("bytes_done") or 0),
                    )
                    if job["status"] in TERMINAL:
                        done[job_id] = job
                if len(done) < len(jobs):
                    if time.monotonic() > deadline:
                        raise StepFailed(f"jobs still running after {JOB_TIMEOUT:.0f} s")
                    time.sleep(JOB_POLL)
        elapsed = time.monotonic() - t0
        finished = [done[j["id"]] for j in jobs]
        failures = []
        for job in finished:
            record = JobRecord.of(job, elapsed)
            if self.step is not None:
                self.step.jobs.append(record)
            mark = "[green]✓[/]" if record.status == "succeeded" else "[red]✗[/]"
            self.say(
                f"{mark} {record.id}  {record.type} {record.app}  {record.status}  "
                f"{record.seconds:.2f} s  total {human_bytes(record.bytes_total)}  "
                f"sent {human_bytes(record.bytes_sent)}"
            )
            if record.status != "succeeded":
                failures.append(
                    f"job {record.id} ({record.type} {record.app}) {record.status}: "
                    f"{record.message}"
                )
        if failures:
            raise StepFailed("; ".join(failures))
        return finished

    def image_of(self, site: Site, job: dict[str, Any]) -> dict[str, Any]:
        if not job.get("image"):
            raise StepFailed(f"job {job['id']} succeeded but names no image")
        image: dict[str, Any] = site.api.get(f"/api/v1/images/{job['image']}")
        return image


def _progress() -> Progress:
    """Progress bars on a terminal; nothing (not even a blank line) otherwise."""
    if stderr.is_terminal:
        return byte_progress("jobs")
    return Progress(console=stderr, disable=True)


# --- data states --------------------------------------------------------------------------


def _digest_file(path: str | Path) -> str:
    hasher = blake3.blake3()
    with open(path, "rb") as fh:
        while block := fh.read(4 * MiB):
            hasher.update(block)
    return hasher.hexdigest()


def tree_state(root: Path) -> dict[str, str]:
    """Every entry under ``root``: type, mode, size, mtime and content digest (or target).

    Directory times are left out: creating and deleting entries changes them, and they are
    not data.
    """
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            mode = f"{stat.S_IMODE(st.st_mode):04o}"
            if stat.S_ISLNK(st.st_mode):
                out[rel] = f"link -> {os.readlink(path)}"
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = f"dir {mode}"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = (
                    f"file {mode} size={st.st_size} mtime_ns={st.st_mtime_ns} "
                    f"blake3={_digest_file(path)}"
                )
            else:
                out[rel] = f"special {stat.S_IFMT(st.st_mode):o}"
    return out


def volume_state(path: Path) -> dict[str, str]:
    """The content of a disk image or block device: its size and digest."""
    return {"": f"volume size={path.stat().st_size} blake3={_digest_file(path)}"}


def state_of(kind: str, path: Path) -> dict[str, str]:
    return tree_state(path) if kind == "filesystem" else volume_state(path)


def differences(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """What differs, as short phrases ('missing x', 'extra y', 'changed z')."""
    out = [f"missing {p or 'content'}" for p in sorted(expected.keys() - actual.keys())]
    out += [f"extra {p}" for p in sorted(actual.keys() - expected.keys())]
    out += [
        f"changed {p or 'content'}"
        for p in sorted(expected.keys() & actual.keys())
        if expected[p] != actual[p]
    ]
    return out


def _brief(items: list[str], limit: int = 4) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def make_disk(path: Path, size: int) -> int:
    """A sparse disk image whose first half holds data (some random, some text); bytes written."""
    rng = random.Random(2026)
    written = 0
    with open(path, "wb") as fh:
        fh.truncate(size)
        for i in range(size // 2 // MiB):
            if i % 3 == 0:
                block = rng.randbytes(MiB)
            else:
                line = b"tandem demo disk, block %08d: the quick brown fox\n" % i
                block = (line * (MiB // len(line) + 1))[:MiB]
            fh.seek(i * MiB)
            fh.write(block)
            written += len(block)
    return written


# --- steps --------------------------------------------------------------------------------


def step_start_site(ctx: Context) -> str:
    appliance = ctx.lab.add("appliance", "prod")
    agent = ctx.lab.add("agent", "prod-host")
    ctx.command(f"appliance init {appliance.directory} --name prod --listen 127.0.0.1:PORT")
    ctx.command(f"agent init {agent.directory} --name prod-host --listen 127.0.0.1:PORT")
    ctx.command(f"appliance serve {appliance.directory} & tandem agent serve {agent.directory} &")
    ctx.lab.up(appliance, agent)
    ctx.sites["production"] = site = Site("production", appliance, agent)
    ctx.say(f"appliance {appliance.name} at {appliance.url}")
    ctx.say(f"agent {agent.name} at {agent.url}")
    ctx.command(f"host add {agent.name} --url {agent.url} --token … --fingerprint …")
    site.api.post(
        "/api/v1/hosts",
        {
            "name": agent.name,
            "url": agent.url,
            "token": agent.token,
            "fingerprint": agent.fingerprint,
        },
    )
    return f"appliance {appliance.name} and agent {agent.name} up; host {agent.name} registered"


def step_start_app(ctx: Context) -> str:
    home = ctx.lab.root / "prod-host-data"
    home.mkdir()
    disk = home / "disk.img"
    size = ctx.options.size_mib * MiB
    written = make_disk(disk, size)
    paths = sampleapp.Paths.of(home / "app")
    python = shlex.quote(sys.executable)
    module = f"{python} -m tandem.cli.sampleapp"
    start = (
        f"{module} start {shlex.quote(str(paths.data))} --disk {shlex.quote(str(disk))}"
        f" --lifetime {SAMPLE_LIFETIME:.0f}"
    )
    stop = f"{module} stop {shlex.quote(str(paths.data))}"
    ctx.app = app = SampleApp(paths, disk, start, stop)
    ctx.lab.on_close("stop the sample app", lambda: sampleapp.stop(paths))
    sampleapp.start(paths, disk=disk, lifetime=SAMPLE_LIFETIME)
    time.sleep(0.3)
    status = app.status()
    ctx.say(f"disk image {escape(str(disk))} ({human_bytes(size)}, {human_bytes(written)} written)")
    ctx.say(f"data directory {escape(str(paths.data))}: SQLite (WAL), logs, blobs, assets")
    ctx.say(f"start command: {escape(start)}")
    ctx.say(f"stop command:  {escape(stop)}")
    ctx.check(
        "app_started",
        status.get("state") == "running",
        f"the sample app is not running: {status}",
    )
    return f"sample app writing (pid {status['pid']}, {status['rows']} rows so far)"


def step_protect(ctx: Context) -> str:
    site, app = ctx.prod, ctx.sample
    for name, kind, path in app.apps():
        ctx.command(
            f"app add {name} --host {site.host} --kind {kind} --path {path} "
            "--start '…sampleapp start …' --stop '…sampleapp stop …'"
        )
        site.api.post(
            "/api/v1/apps",
            {
                "name": name,
                "host": site.host,
                "kind": kind,
                "path": str(path),
                "start": app.start,
                "stop": app.stop,
            },
        )
    ctx.command(f"template add {TEMPLATE}")
    site.api.post(
        "/api/v1/templates", {"name": TEMPLATE, "every": None, "keep": None, "mirror": False}
    )
    states = []
    for name in (FILES_APP, DISK_APP):
        ctx.command(f"app protect {name} --template {TEMPLATE}")
        row = site.api.post(f"/api/v1/apps/{name}/protect", {"template": TEMPLATE})
        states.append(f"{name} {row['state']}")
    ctx.check(
        "apps_managed",
        all(s.endswith("managed") for s in states),
        f"protect did not make the apps managed: {states}",
    )
    return f"apps {FILES_APP} (filesystem) and {DISK_APP} (volume) protected: " + ", ".join(states)


def _capture_both(ctx: Context, label: str, tag: str) -> dict[str, JobRecord]:
    """Hold the app, record the reference states, capture both apps at once, release."""
    site, app = ctx.prod, ctx.sample
    t0 = time.monotonic()
    held = sampleapp.hold(app.paths)
    ctx.say(f"app held (quiesced) at row {held.get('rows')}")
    states = {FILES_APP: tree_state(app.paths.data), DISK_APP: volume_state(app.disk)}
    try:
        jobs = []
        for name in (FILES_APP, DISK_APP):
            ctx.command(f'capture {name} --label "{label}"')
            jobs.append(ctx.start_job(site, f"/api/v1/apps/{name}/capture", {"label": label}))
        finished = ctx.wait_jobs(site, jobs)
    finally:
        sampleapp.release(app.paths)
    ctx.say(f"app released after {time.monotonic() - t0:.2f} s held")
    records: dict[str, JobRecord] = {}
    for job in finished:
        image = ctx.image_of(site, job)
        name = str(job["app"])
        ctx.images[f"{name}-{tag}"] = image
        ctx.references[image["id"]] = Reference(name, image["id"], states[name])
        records[name] = JobRecord.of(job, 0.0)
        ctx.say(f"image {image['id']} of {name} ({image['kind']}, {human_bytes(image['size'])})")
    ctx.facts[f"rows_at_{tag}"] = held.get("rows")
    return records


def step_capture_full(ctx: Context) -> str:
    records = _capture_both(ctx, "first, full", "full")
    ctx.facts["full"] = {name: asdict(r) for name, r in records.items()}
    sent = sum(r.bytes_sent for r in records.values())
    return f"both apps captured at one quiesce point; {human_bytes(sent)} sent"


def step_app_writes(ctx: Context) -> str:
    before = ctx.sample.status()
    time.sleep(ctx.options.write_seconds)
    after = ctx.sample.status()
    rows = int(after.get("rows", 0)) - int(before.get("rows", 0))
    blobs = int(after.get("blobs", 0)) - int(before.get("blobs", 0))
    records = int(after.get("records", 0)) - int(before.get("records", 0))
    ctx.check(
        "app_writes",
        after.get("state") == "running" and rows > 0,
        f"the sample app did not write: {after}",
    )
    return (
        f"the app wrote {rows} rows, {blobs} files and {records} disk records "
        f"in {ctx.options.write_seconds:.1f} s"
    )


def step_capture_incremental(ctx: Context) -> str:
    records = _capture_both(ctx, "second, incremental", "incr")
    full = ctx.facts["full"]
    ctx.facts["incremental"] = {name: asdict(r) for name, r in records.items()}
    parts = []
    for name, record in records.items():
        full_sent = int(full[name]["bytes_sent"])
        ctx.check(
            f"incremental_smaller_{name}",
            record.bytes_sent < full_sent,
            f"the incremental capture of {name} sent {record.bytes_sent} bytes, "
            f"not less than the full capture's {full_sent}",
        )
        share = 100 * record.bytes_sent / full_sent if full_sent else 0.0
        parts.append(
            f"{name} {human_bytes(record.bytes_sent)} vs {human_bytes(full_sent)} ({share:.1f}%)"
        )
    return "incremental sent " + "; ".join(parts)


def step_damage(ctx: Context) -> str:
    app = ctx.sample
    data = app.paths.data
    rng = random.Random(7)
    deleted = 0
    for victim in [*sorted((data / "blobs").glob("blob-*.bin")), *(data / "log").glob("app.*.log")]:
        victim.unlink(missing_ok=True)
        deleted += 1
    for victim in sorted((data / "assets").glob("*.bin"))[:3]:
        victim.unlink()
        deleted += 1
    with open(data / "assets" / "asset-10.bin", "r+b") as fh:
        fh.seek(1000)
        fh.write(rng.randbytes(5000))
    with open(data / "app.db", "r+b") as fh:
        fh.seek(8192)
        fh.write(rng.randbytes(64 * 1024))
    scribbled = 0
    with open(app.disk, "r+b") as fh:
        size = app.disk.stat().st_size
        for offset in (size // 8, size // 3, size * 5 // 8):
            fh.seek(offset)
            fh.write(rng.randbytes(MiB) if offset % 2 else bytes(MiB))
            scribbled += MiB
    time.sleep(0.3)
    diffs = {
        name: differences(
            ctx.references[ctx.images[f"{name}-full"]["id"]].state, state_of(kind, path)
        )
        for name, kind, path in app.apps()
    }
    ctx.say(f"deleted {deleted} files, corrupted app.db and asset-10.bin")
    ctx.say(f"scribbled over {human_bytes(scribbled)} of {app.disk.name}")
    ctx.say(f"production now differs from the full images: {escape(_brief(diffs[FILES_APP]))}")
    status = app.status()
    if status.get("errors"):
        ctx.say(f"the app has seen {status['errors']} error(s): {status.get('last_error')}")
    ctx.check(
        "damage_visible",
        bool(diffs[FILES_APP]) and bool(diffs[DISK_APP]),
        "the damage did not change production (nothing to restore)",
    )
    return (
        f"{len(diffs[FILES_APP])} differences in {FILES_APP}, {DISK_APP} content changed; "
        "the app keeps running"
    )


def step_restore(ctx: Context) -> str:
    site, app = ctx.prod, ctx.sample
    before = app.status()
    # The start command the restore runs must bring the app up held, so that the data can be
    # compared before it writes again (the verify step releases it).
    sampleapp.hold(app.paths, wait=False)
    ctx.say("hold set: the app the restore restarts stays quiesced until verified")
    jobs = []
    for name in (FILES_APP, DISK_APP):
        image = ctx.images[f"{name}-full"]
        ctx.command(
            f'restore {name} --image {image["id"]} --confirm "DATA LOSS" '
            '--confirm "OVERWRITE OTHER APPS"'
        )
        job = ctx.start_job(
            site,
            f"/api/v1/apps/{name}/restore",
            {"image": image["id"], "confirm": CONFIRMATIONS},
        )
        # One after the other: both apps share the sample app's stop and start commands.
        jobs += ctx.wait_jobs(site, [job])
    after = app.status()
    ctx.check(
        "app_restarted",
        after.get("pid") != before.get("pid") and after.get("state") == "held",
        f"the restore did not stop and restart the app (before {before}, after {after})",
    )
    ctx.say(f"the app was stopped (pid {before.get('pid')}) and started (pid {after.get('pid')})")
    sent = sum(int(j.get("bytes_sent") or 0) for j in jobs)
    return (
        f"{FILES_APP} and {DISK_APP} diff-restored from the full images; {human_bytes(sent)} sent"
    )


def step_verify_data(ctx: Context) -> str:
    app = ctx.sample
    results = []
    for name, kind, path in app.apps():
        image = ctx.images[f"{name}-full"]
        expected = ctx.references[image["id"]].state
        diff = differences(expected, state_of(kind, path))
        ctx.check(
            f"{name}_equal",
            not diff,
            f"production {name} differs from image {image['id']}: {_brief(diff)}",
        )
        what = f"{len(expected)} entries" if kind == "filesystem" else human_bytes(image["size"])
        results.append(f"{name} ({what})")
        ctx.say(f"[green]✓[/] {name} equals image {image['id']} as captured ({what})")
    ctx.checks["data_equal"] = True
    return "data equal: " + ", ".join(results)


def step_resume_app(ctx: Context) -> str:
    app = ctx.sample
    released = sampleapp.release(app.paths)
    captured = int(ctx.facts.get("rows_at_full") or 0)
    ctx.check(
        "app_resumed_from_image",
        released.get("check") == "ok" and int(released.get("rows", -1)) >= captured,
        f"the app did not reopen the restored database cleanly: {released}",
    )
    ctx.say(f"database reopened at row {released['rows']} (captured at row {captured})")
    time.sleep(0.5)
    status = app.status()
    ctx.check(
        "app_writes_after_restore",
        status.get("state") == "running"
        and int(status.get("rows", 0)) > int(released["rows"])
        and not status.get("errors"),
        f"the app does not write cleanly after the restore: {status}",
    )
    return f"quick_check ok; writing again from row {released['rows']}, now at {status['rows']}"


def step_verify_images(ctx: Context) -> str:
    site = ctx.prod
    chunks = total = count = 0
    for name in (FILES_APP, DISK_APP):
        for image in site.api.get(f"/api/v1/apps/{name}/images"):
            ctx.command(f"image verify {image['id']}")
            report = site.api.get(f"/api/v1/images/{image['id']}/verify")
            ctx.check(
                f"image_ok_{image['id']}",
                bool(report["ok"]),
                f"image {image['id']} of {name}: {len(report['missing'])} chunk(s) missing, "
                f"{len(report['bad'])} corrupt",
            )
            chunks += int(report["chunks"])
            total += int(report["bytes"])
            count += 1
    ctx.checks["images_verified"] = count > 0
    ctx.facts["images_verified"] = count
    return f"{count} images, {chunks} chunks, {human_bytes(total)} read and verified"


STEPS: list[Step] = [
    Step("start-site", "start the production site", step_start_site),
    Step("start-app", "start the sample app", step_start_app),
    Step("protect", "protect the app", step_protect),
    Step("capture-full", "capture (full)", step_capture_full),
    Step("app-writes", "the app keeps writing", step_app_writes),
    Step("capture-incremental", "capture (incremental)", step_capture_incremental),
    Step("damage", "damage production", step_damage),
    Step("restore", "restore the full images", step_restore),
    Step("verify-data", "verify production = image", step_verify_data),
    Step("resume-app", "release the app", step_resume_app),
    Step("verify-images", "tandem image verify", step_verify_images),
]


# --- running and reporting ----------------------------------------------------------------


def run_steps(ctx: Context, steps: list[Step], records: list[StepRecord]) -> None:
    """Run the steps in order, filling ``records``; after a failure the rest are skipped.

    A KeyboardInterrupt (Ctrl-C, or SIGTERM through the lab) fails the running step, skips
    the rest and propagates.
    """
    records[:] = [StepRecord(s.name, s.title, status="skipped") for s in steps]
    for i, (step, record) in enumerate(zip(steps, records, strict=True), 1):
        ctx.step = record
        stderr.print(f"[bold]{i:2}. {escape(step.title)}[/]", highlight=False)
        t0 = time.monotonic()
        try:
            record.result = step.run(ctx)
            record.status = "succeeded"
        except Exception as exc:
            record.status = "failed"
            if isinstance(exc, TandemError):
                record.error = exc.message
            elif isinstance(exc, StepFailed | OSError):
                record.error = str(exc)
            else:  # a bug of the demo or an answer it did not expect: say what, go on cleanly
                record.error = f"internal error: {type(exc).__name__}: {exc}"
            for d in ctx.lab.exited():
                assert d.proc is not None
                record.error += f"; {d.kind} {d.name} exited with status {d.proc.returncode}"
                last = d.log_tail().splitlines()[-1] if d.log_path.exists() else ""
                if last and last != "(empty log)":
                    record.error += f": {last}"
                if ctx.lab.keep:
                    record.error += f" (log {d.log_path})"
        except KeyboardInterrupt:
            record.status, record.error = "failed", "interrupted"
            raise
        finally:
            record.seconds = round(time.monotonic() - t0, 3)
            ctx.step = None
        if record.status != "succeeded":
            stderr.print(
                f"    [red]✗ {escape(step.title)} failed:[/] {escape(record.error or '')}",
                highlight=False,
                soft_wrap=True,
            )
            return
        stderr.print(
            f"    [green]✓[/] {escape(record.result)} [dim]({record.seconds:.2f} s)[/]",
            highlight=False,
            soft_wrap=True,
        )


def build_report(
    ctx: Context, records: list[StepRecord], seconds: float, workdir: str, kept: bool
) -> dict[str, Any]:
    failed = next((r for r in records if r.status == "failed"), None)
    jobs = [j for r in records for j in r.jobs]
    ok = failed is None and all(r.status == "succeeded" for r in records)
    return {
        "ok": ok,
        "failed_step": failed.name if failed else None,
        "error": f"{failed.title}: {failed.error}" if failed else None,
        "seconds": round(seconds, 3),
        "workdir": workdir,
        "kept": kept,
        "steps": [asdict(r) for r in records],
        "checks": dict(ctx.checks),
        "data_verified_equal": bool(ctx.checks.get("data_equal")),
        "captures": {
            "full": ctx.facts.get("full", {}),
            "incremental": ctx.facts.get("incremental", {}),
        },
        "images": {k: v["id"] for k, v in ctx.images.items()},
        "bytes_total": sum(j.bytes_total for j in jobs),
        "bytes_sent": sum(j.bytes_sent for j in jobs),
        "sites": {
            role: {
                "appliance": {"name": s.appliance.name, "url": s.appliance.url},
                "agent": {"name": s.agent.name, "url": s.agent.url},
            }
            for role, s in ctx.sites.items()
        },
    }


def print_report(report: dict[str, Any]) -> None:
    """The closing report on stdout: steps and their jobs, results, totals, the verdict."""
    table = Table(title="tandem demo — one site", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("step / job", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("total", justify="right", no_wrap=True)
    table.add_column("sent", justify="right", no_wrap=True)
    marks = {"succeeded": "[green]✓[/]", "failed": "[red]✗[/]", "skipped": "[dim]-[/]"}
    for i, step in enumerate(report["steps"], 1):
        seconds = "" if step["status"] == "skipped" else f"{step['seconds']:.2f} s"
        table.add_row(str(i), f"{marks.get(step['status'], '?')} {escape(step['title'])}", seconds)
        for job in step["jobs"]:
            table.add_row(
                "",
                f"  {job['type']} {job['app']} {job['id']}",
                f"{job['seconds']:.2f} s",
                human_bytes(job["bytes_total"]),
                human_bytes(job["bytes_sent"]),
            )
    stdout.print(table)
    results = Table.grid(padding=(0, 1))
    results.add_column(justify="right", no_wrap=True)
    results.add_column(overflow="fold")
    for i, step in enumerate(report["steps"], 1):
        if step["status"] == "succeeded":
            results.add_row(f"{i}.", f"{escape(step['title'])}: {escape(step['result'])}")
        elif step["status"] == "failed":
            results.add_row(
                f"{i}.",
                f"{escape(step['title'])}: [red]FAILED: {escape(step['error'] or '')}[/]",
            )
    stdout.print(results)
    stdout.print(
        f"\nbytes moved by the jobs: {human_bytes(report['bytes_sent'])} sent between machines, "
        f"{human_bytes(report['bytes_total'])} processed",
        highlight=False,
    )
    if report["ok"]:
        stdout.print(
            f"[green]all {len(report['steps'])} steps succeeded in {report['seconds']:.1f} s; "
            "data verified equal to the captured images[/]",
            highlight=False,
        )
    else:
        stdout.print(f"[red]demo FAILED: {escape(report['error'] or '')}[/]", highlight=False)
    if report["kept"]:
        root = report["workdir"]
        stdout.print(f"files kept in {root}; to look around:", highlight=False)
        for site in report["sites"].values():
            appliance, agent = site["appliance"]["name"], site["agent"]["name"]
            stdout.print(
                f"  tandem appliance serve {root}/{appliance} & "
                f"tandem agent serve {root}/{agent} &\n"
                f"  set -a; . {root}/{appliance}.env; set +a; tandem jobs",
                highlight=False,
                soft_wrap=True,
            )


@handle_errors
def demo(
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the demo directory afterwards and print it.")
    ] = False,
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--workdir", help="Work in this (new or empty) directory.", show_default=False
        ),
    ] = None,
    size_mib: Annotated[
        int, typer.Option("--size-mib", min=8, help="Size of the sample disk image in MiB.")
    ] = 256,
    write_seconds: Annotated[
        float,
        typer.Option("--write-seconds", min=0.2, help="How long the app writes between captures."),
    ] = 2.0,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Run the DR demo on real daemons on loopback; exit non-zero if any step fails."""
    t0 = time.monotonic()
    try:
        lab = Lab(workdir, keep=keep, prefix="tandem-demo-")
    except TandemError as exc:
        raise fail(exc.message, 2) from None
    stderr.print(
        "[bold]tandem demo[/]: one site — an appliance, a host agent and a sample app that "
        "keeps writing",
        highlight=False,
    )
    stderr.print(
        f"work directory {escape(str(lab.root))}"
        + (" (kept)" if keep else " (removed at the end)"),
        highlight=False,
    )
    ctx = Context(lab, Options(size_mib, write_seconds))
    records: list[StepRecord] = []
    interrupted = False
    try:
        with lab:
            try:
                run_steps(ctx, STEPS, records)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                ctx.close()
                stderr.print("stopping the sample app and the daemons", highlight=False)
    except KeyboardInterrupt:
        interrupted = True
    if keep:
        for site in ctx.sites.values():
            env = site.appliance.env()
            text = "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items())
            (lab.root / f"{site.appliance.name}.env").write_text(text)
    report = build_report(ctx, records, time.monotonic() - t0, str(lab.root), keep)
    if interrupted:
        report["ok"], report["error"] = False, "interrupted"
    if lab.cleanup_errors:
        report["cleanup_errors"] = lab.cleanup_errors
    if json_:
        emit_json(report)
    else:
        print_report(report)
    if interrupted:
        raise fail("interrupted", 130)
    if not report["ok"]:
        raise fail(f"demo failed at {report['error']}")
