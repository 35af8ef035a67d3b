"""`tandem demo`: the whole two-site DR drill on real daemons on loopback; exits non-zero,
naming the step, if anything fails.

The sites: appliances ``prod`` and ``dr`` and host agents ``host1`` (production) and
``host2`` (DR site), child processes of a ``lab.Lab``. Both "hosts" share this machine, so
each has a directory standing for its file system (``host1-fs``, ``host2-fs``) and its agent
runs with ``DEMO_HOST_ROOT`` pointing there. The sample application (``sampleapp``: SQLite in
WAL mode, rotating logs and files, 4 KiB records on a disk) lives at ``$DEMO_HOST_ROOT/app``
on whichever host runs it, and writes the disk named in ``$DEMO_HOST_ROOT/disk.attached``
(the disk image at production; the NBD export of the failed-over volume at the DR site).
The app's hooks are two scripts, ``sampleapp-start`` and ``sampleapp-stop``, that the demo
installs in each agent's ``scripts/`` folder (as a host's administrator would) and registers
by name: at production when the app is added, at the DR site (``app set`` on the mirror)
once the app is mirrored there. The same scripts work at both sites, as the same path on two
real hosts would.

Two apps are protected with a mirroring template: ``files`` (the data directory, a
``filesystem`` app, carrying the start/stop hooks) and ``disk`` (the disk image, a
``volume`` app attached to the same process). The drill, each step driving the appliances'
REST API as the CLI does (the equivalent ``tandem`` command is shown):

  pair the appliances → protect → full capture + replication → the app writes →
  incremental capture + replication → test failover to host2 at a mount point (the test
  copy is compared with the replica; a capture replicates meanwhile) → unmount and delete →
  test failover of the volume over NBD → disaster (the app, host1's agent and the prod
  appliance are killed; RPO = age of the newest replica at that moment) → failover with
  FAILOVER (failover time = the first failover call → the app up at the DR site, started by
  its start hook through host2's agent) → the app writes at the DR site (through NBD
  for its disk) while production comes back → catch-up syncback → the app is stopped at the
  DR site (downtime starts) → final syncback → restore of the final syncback images at
  production with both confirmations (the restore's start hook brings the app up:
  downtime ends) → production compared with the DR copy → snapshot-style failback → a
  capture at production replicates incrementally.

Consistency: the app keeps writing, so every capture and syncback is taken while the app is
*held* (quiesced: transaction finished, database and files closed; ``sampleapp hold``),
which is when the demo records the reference state (a BLAKE3 digest of every file and of
the disk). Where the demo compares a copy that an operation has just started the app on
(failover, restore), it sets the hold first: the app that the start hook launches
comes up held, the data is compared, then the app is released. Timings stop when the app
is up, before the demo's own comparison.

Shape: ``STEPS`` is a list of step functions over one shared ``Context``; each returns a
one-line result and records the jobs it ran. Progress goes to stderr, the closing report
to stdout (``--json``: one document).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import random
import shlex
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from tandem.domain.lifecycle import AppKind
from tandem.domain.units import human_bytes
from tandem.errors import TandemError
from tandem.transport.agent import AgentClient
from tandem.transport.api import (
    AppHooksIn,
    AppIn,
    CaptureIn,
    FailbackIn,
    FailoverIn,
    HostIn,
    JobAnswer,
    PairIn,
    PresentIn,
    ProtectIn,
    RestoreIn,
    TemplateIn,
)
from tandem.transport.client import ApplianceClient

from . import sampleapp
from .lab import Daemon, Lab
from .operator import Cli
from .report import HOST_ROOT_VAR, build_report

MiB = 1024 * 1024
stderr = Console(stderr=True)
"""Where the drill narrates its steps (the report goes to stdout)."""

FAILOVER_CONFIRMATION = ["FAILOVER"]
RESTORE_CONFIRMATIONS = ["DATA LOSS", "OVERWRITE OTHER APPS"]
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
JOB_POLL = 0.05
JOB_TIMEOUT = 300.0
TEMPLATE = "mirrored"
FILES_APP = "files"
DISK_APP = "disk"
APPS = (FILES_APP, DISK_APP)
ATTACHED = "disk.attached"
START_HOOK = "sampleapp-start"
STOP_HOOK = "sampleapp-stop"
"""The sample app's hook scripts, in each agent's scripts/ folder."""
"""In a host's directory: names the disk the sample app writes (a path or an nbd:// URI)."""
SAMPLE_LIFETIME = 900.0
"""Seconds after which a sample app left behind (demo killed by SIGKILL) stops by itself."""
APP_UP_TIMEOUT = 30.0


class StepFailed(Exception):
    """A step's check failed; the message names what."""


# --- records ------------------------------------------------------------------------------


@dataclass
class JobRecord:
    """A job as the report shows it."""

    id: str
    type: str
    app: str
    site: str
    status: str
    message: str
    bytes_total: int
    bytes_sent: int
    seconds: float
    image: str | None

    @classmethod
    def of(cls, job: dict[str, Any], site: str, elapsed: float) -> JobRecord:
        return cls(
            id=str(job["id"]),
            type=str(job["type"]),
            app=str(job.get("app") or ""),
            site=site,
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

    @property
    def bytes_sent(self) -> int:
        return sum(j.bytes_sent for j in self.jobs)


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
    """One site: its appliance, its host's agent, and the host's file system (``root``)."""

    role: str
    appliance: Daemon
    agent: Daemon
    root: Path
    client: ApplianceClient | None = None

    @property
    def name(self) -> str:
        return self.appliance.name

    @property
    def api(self) -> ApplianceClient:
        if self.client is None:
            self.client = self.appliance.api()
        return self.client

    def reconnect(self) -> None:
        """Drop the client (its appliance was restarted)."""
        if self.client is not None:
            self.client.close()
            self.client = None

    @property
    def host(self) -> str:
        return self.agent.name

    @functools.cached_property
    def cli(self) -> Cli:
        """The ``tandem`` command against this site's appliance, as an operator runs it."""
        return self.appliance.cli()

    @property
    def paths(self) -> sampleapp.Paths:
        """The sample app on this site's host: data and run directories."""
        return sampleapp.Paths.of(self.root / "app")

    @property
    def attached(self) -> Path:
        return self.root / ATTACHED

    def run_on_host(self, script: str) -> dict[str, Any]:
        """Run a hook script of the files app on the host through its agent, as the
        appliance does."""
        env = {"TANDEM_APP": FILES_APP, "TANDEM_SITE": self.role, "TANDEM_OPERATION": "demo"}
        with AgentClient(
            self.agent.name, self.agent.url, self.agent.token, self.agent.fingerprint
        ) as agent:
            return agent.run_hook(script, env, timeout=60.0)


@dataclass
class Reference:
    """What an app's data was when an image of it was taken (the app held)."""

    app: str
    image: str
    state: dict[str, str]
    rows: int


class Context:
    """What every step reads and writes: the lab, the sites, images, checks and measures."""

    def __init__(self, lab: Lab, options: Options) -> None:
        self.lab = lab
        self.options = options
        self.sites: dict[str, Site] = {}
        self.start_cmd = ""
        self.stop_cmd = ""
        self.images: dict[str, str] = {}
        """Image ids by the demo's name for them, e.g. ``files-full``."""
        self.references: dict[str, Reference] = {}
        """Reference states by image id."""
        self.checks: dict[str, bool] = {}
        self.data_equal: dict[str, bool] = {}
        """The data comparisons: copy name → equal."""
        self.measures: dict[str, Any] = {}
        """RPO, failover time, failback downtime…"""
        self.transfers: dict[str, dict[str, int]] = {}
        """Bytes sent by kind of transfer, per app (``replication-full`` → {app: bytes})."""
        self.facts: dict[str, Any] = {}
        self.step: StepRecord | None = None

    @property
    def prod(self) -> Site:
        return self.sites["production"]

    @property
    def dr(self) -> Site:
        return self.sites["dr"]

    @property
    def disk_image(self) -> Path:
        return self.prod.root / "disk.img"

    def close(self) -> None:
        for site in self.sites.values():
            site.reconnect()

    # --- narration ---------------------------------------------------------------------

    def say(self, text: str) -> None:
        stderr.print(f"     {text}", highlight=False, soft_wrap=True)

    def command(self, site: Site | None, text: str) -> None:
        """Show the CLI command an operator would type (against ``site``'s appliance)."""
        where = f"{site.name}" if site is not None else ""
        stderr.print(
            f"     [dim]{where}$ tandem {escape(text)}[/]", highlight=False, soft_wrap=True
        )

    def check(self, name: str, ok: bool, failure: str) -> None:
        """Record a check; a failed one fails the step with ``failure``."""
        self.checks[name] = ok
        if not ok:
            raise StepFailed(failure)

    def compare(
        self, name: str, what: str, expected: dict[str, str], actual: dict[str, str]
    ) -> str:
        """Compare two data states; record it in ``data_equal``; fail the step if they differ."""
        diff = differences(expected, actual)
        self.data_equal[name] = not diff
        self.check(f"equal_{name}", not diff, f"{what} differs: {_brief(diff)}")
        size = f"{len(expected)} entries" if len(expected) != 1 else "1 volume"
        self.say(f"[green]✓[/] {escape(what)}: equal ({size})")
        return size

    # --- jobs --------------------------------------------------------------------------

    def start_job(self, answer: JobAnswer) -> dict[str, Any]:
        """The job an operation started (``site.api.capture(…)``…), as its JSON document."""
        return _doc(answer.job)

    def run_job(self, site: Site, answer: JobAnswer) -> dict[str, Any]:
        """Wait for the one job an operation started at ``site``."""
        return self.wait_jobs(site, [self.start_job(answer)])[0]

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
                        job = current[job_id] = _doc(site.api.job(job_id))
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
            record = JobRecord.of(job, site.name, elapsed)
            if self.step is not None:
                self.step.jobs.append(record)
            mark = "[green]✓[/]" if record.status == "succeeded" else "[red]✗[/]"
            self.say(
                f"{mark} {record.id}  {record.type} {record.app}  {record.status}  "
                f"{record.seconds:.2f} s  sent {human_bytes(record.bytes_sent)}"
                f"  [dim]{escape(record.message)}[/]"
            )
            if record.status != "succeeded":
                failures.append(
                    f"job {record.id} ({record.type} {record.app}) {record.status}: "
                    f"{record.message}"
                )
        if failures:
            raise StepFailed("; ".join(failures))
        return finished

    def image(self, site: Site, image_id: str) -> dict[str, Any]:
        return _doc(site.api.image(image_id))

    def images_of(self, site: Site, app: str) -> list[dict[str, Any]]:
        return [_doc(image) for image in site.api.images(app)]

    def app_row(self, site: Site, app: str) -> dict[str, Any]:
        return _doc(site.api.app(app))


def _doc(model: BaseModel) -> dict[str, Any]:
    """A document of the API as the JSON an operator's script reads (what the report and
    the checks below keep)."""
    return model.model_dump(mode="json")


def _progress() -> Progress:
    """Progress bars on a terminal; nothing (not even a blank line) otherwise."""
    if not stderr.is_terminal:
        return Progress(console=stderr, disable=True)
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    return Progress(TextColumn("{task.description}"), *columns, console=stderr, transient=True)


def _image_of(job: dict[str, Any]) -> str:
    if not job.get("image"):
        raise StepFailed(f"job {job['id']} succeeded but names no image")
    return str(job["image"])


def _sent(jobs: Iterable[dict[str, Any]]) -> dict[str, int]:
    return {str(j["app"]): int(j.get("bytes_sent") or 0) for j in jobs}


def _both(sent: dict[str, int]) -> str:
    return ", ".join(f"{app} {human_bytes(n)}" for app, n in sent.items())


def _age(created: str) -> float:
    when = dt.datetime.fromisoformat(created)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return (dt.datetime.now(dt.UTC) - when).total_seconds()


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


def nbd_state(uri: str) -> dict[str, str]:
    """The content of an NBD export, read through it: its size and digest."""
    disk = sampleapp.NbdDisk(uri)
    try:
        hasher = blake3.blake3()
        for offset in range(0, disk.size, 4 * MiB):
            hasher.update(disk.pread(min(4 * MiB, disk.size - offset), offset))
    finally:
        disk.close()
    return {"": f"volume size={disk.size} blake3={hasher.hexdigest()}"}


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


# --- the sample app -----------------------------------------------------------------------


def wait_app(paths: sampleapp.Paths, states: tuple[str, ...], what: str) -> dict[str, Any]:
    """Wait until the sample app at ``paths`` runs in one of ``states``; its status."""
    deadline = time.monotonic() + APP_UP_TIMEOUT
    while True:
        pid = sampleapp.running_pid(paths)
        status = sampleapp.read_status(paths)
        if pid is not None and status.get("pid") == pid and status.get("state") in states:
            return status
        if time.monotonic() > deadline:
            raise StepFailed(f"the sample app {what} is not up after {APP_UP_TIMEOUT:.0f} s")
        time.sleep(0.02)


def writes_since(before: dict[str, Any], after: dict[str, Any]) -> str:
    rows = int(after.get("rows", 0)) - int(before.get("rows", 0))
    blobs = int(after.get("blobs", 0)) - int(before.get("blobs", 0))
    records = int(after.get("records", 0)) - int(before.get("records", 0))
    return f"{rows} rows, {blobs} files, {records} disk records"


def capture_and_mirror(ctx: Context, label: str, tag: str) -> dict[str, dict[str, int]]:
    """Hold the app, record the reference states, capture both apps at one quiesce point,
    release; wait for the replications the captures queued and check the replicas arrived.
    Returns the bytes sent per app: ``{"capture": {...}, "replicate": {...}}``."""
    prod, dr = ctx.prod, ctx.dr
    t0 = time.monotonic()
    held = sampleapp.hold(prod.paths)
    if not held:
        raise StepFailed(f"the sample app is not running at {prod.host}")
    states = {FILES_APP: tree_state(prod.paths.data), DISK_APP: volume_state(ctx.disk_image)}
    try:
        jobs = []
        for name in APPS:
            ctx.command(prod, f'capture {name} --label "{label}"')
            jobs.append(ctx.start_job(prod.api.capture(name, CaptureIn(label=label))))
        captured = ctx.wait_jobs(prod, jobs)
    finally:
        sampleapp.release(prod.paths)
    ctx.say(f"app held at row {held.get('rows')} for {time.monotonic() - t0:.2f} s, released")
    mirrors = []
    for job in captured:
        name, image_id = str(job["app"]), _image_of(job)
        ctx.images[f"{name}-{tag}"] = image_id
        ctx.references[image_id] = Reference(name, image_id, states[name], int(held["rows"]))
        mirror = (job.get("result") or {}).get("mirror_job")
        if not mirror:
            raise StepFailed(
                f"capture {job['id']} of {name} queued no replication (is the template "
                "mirroring and the peer paired?)"
            )
        mirrors.append(_doc(prod.api.job(mirror)))
    ctx.say("mirroring to dr: replication jobs queued by the captures")
    replicated = ctx.wait_jobs(prod, mirrors)
    for job in captured:
        name, image_id = str(job["app"]), str(job["image"])
        replicas = {i["id"] for i in ctx.images_of(dr, name) if i["kind"] == "replica"}
        ctx.check(
            f"replica_{name}_{tag}",
            image_id in replicas,
            f"the replication succeeded but dr holds no replica {image_id} of {name}",
        )
    return {"capture": _sent(captured), "replicate": _sent(replicated)}


# --- steps --------------------------------------------------------------------------------


def _stopper(paths: sampleapp.Paths) -> Callable[[], object]:
    return lambda: sampleapp.stop(paths)


def step_start_sites(ctx: Context) -> str:
    lab = ctx.lab
    roots = {"production": lab.root / "host1-fs", "dr": lab.root / "host2-fs"}
    for root in roots.values():
        root.mkdir()
    prod = lab.add("appliance", "prod")
    dr = lab.add("appliance", "dr")
    host1 = lab.add("agent", "host1", {HOST_ROOT_VAR: str(roots["production"])})
    host2 = lab.add("agent", "host2", {HOST_ROOT_VAR: str(roots["dr"])})
    for d in (prod, dr):
        ctx.command(None, f"appliance init {d.directory} --name {d.name} --listen 127.0.0.1:PORT")
    for d in (host1, host2):
        ctx.command(None, f"agent init {d.directory} --name {d.name} --listen 127.0.0.1:PORT")
    ctx.say("… and `tandem appliance serve DIR` / `tandem agent serve DIR` for each")
    lab.up(prod, dr, host1, host2)
    ctx.sites["production"] = Site("production", prod, host1, roots["production"])
    ctx.sites["dr"] = Site("dr", dr, host2, roots["dr"])
    for site in ctx.sites.values():
        ctx.say(
            f"{site.role}: appliance {site.name} at {site.appliance.url}, agent {site.host} "
            f"at {site.agent.url} ({HOST_ROOT_VAR}={escape(str(site.root))})"
        )
        ctx.command(site, f"host add {site.host} --url {site.agent.url} --token … --fingerprint …")
        agent = site.agent
        site.api.add_host(
            HostIn(name=site.host, url=agent.url, token=agent.token, fingerprint=agent.fingerprint)
        )
    return "appliances prod and dr, agents host1 (at prod) and host2 (at dr) up and registered"


def step_pair(ctx: Context) -> str:
    prod, dr = ctx.prod, ctx.dr
    ctx.command(prod, f"peer add --url {dr.appliance.url} --token DR_ADMIN_TOKEN --fingerprint …")
    other = dr.appliance
    prod.api.add_peer(PairIn(url=other.url, token=other.token, fingerprint=other.fingerprint))
    at_prod = [p.name for p in prod.api.peers()]
    at_dr = [p.name for p in dr.api.peers()]
    ctx.check(
        "paired",
        at_prod == [dr.name] and at_dr == [prod.name],
        f"pairing is not mutual: prod lists {at_prod}, dr lists {at_dr}",
    )
    return f"{prod.name} ⇄ {dr.name} paired in both directions"


def step_start_app(ctx: Context) -> str:
    prod = ctx.prod
    size = ctx.options.size_mib * MiB
    written = make_disk(ctx.disk_image, size)
    prod.attached.write_text(f"{ctx.disk_image}\n")
    module = f"{shlex.quote(sys.executable)} -m tandem.drill.sampleapp"
    root = f'"${HOST_ROOT_VAR}"'
    ctx.start_cmd = (
        f"{module} start {root}/app --disk-from {root}/{ATTACHED} --lifetime {SAMPLE_LIFETIME:.0f}"
    )
    ctx.stop_cmd = f"{module} stop {root}/app"
    for site in ctx.sites.values():
        ctx.lab.on_close(f"stop the sample app at {site.role}", _stopper(site.paths))
        for hook, command in ((START_HOOK, ctx.start_cmd), (STOP_HOOK, ctx.stop_cmd)):
            site.agent.install_script(hook, f"#!/bin/sh\nexec {command}\n")
    ctx.say(
        f"disk image {escape(str(ctx.disk_image))} ({human_bytes(size)}, "
        f"{human_bytes(written)} written), attached in {ATTACHED}"
    )
    ctx.say(
        f"hook scripts in each agent's scripts/ folder: {START_HOOK} "
        f"(exec {escape(ctx.start_cmd)}), {STOP_HOOK} (exec {escape(ctx.stop_cmd)})"
    )
    ctx.say(f"{START_HOOK} run on {prod.host} through its agent")
    result = prod.run_on_host(START_HOOK)
    ctx.check(
        "app_started",
        result.get("returncode") == 0,
        f"the start hook failed on {prod.host}: {str(result.get('stderr')).strip()[-300:]}",
    )
    status = wait_app(prod.paths, ("running",), f"at {prod.host}")
    return f"sample app writing at {prod.host} (pid {status['pid']}, {status['rows']} rows)"


def step_protect(ctx: Context) -> str:
    prod = ctx.prod
    apps = [
        (FILES_APP, "filesystem", prod.paths.data, START_HOOK, STOP_HOOK),
        (DISK_APP, "volume", ctx.disk_image, None, None),
    ]
    for name, kind, path, start, stop in apps:
        hooks = f" --start {start} --stop {stop}" if start else ""
        ctx.command(prod, f"app add {name} --host {prod.host} --kind {kind} --path {path}{hooks}")
        prod.api.add_app(
            AppIn(
                name=name,
                host=prod.host,
                kind=AppKind(kind),
                path=str(path),
                start=start,
                stop=stop,
            )
        )
    ctx.command(prod, f"template add {TEMPLATE} --mirror")
    prod.api.add_template(TemplateIn(name=TEMPLATE, every=None, keep=None, mirror=True))
    states = []
    for name in APPS:
        ctx.command(prod, f"app protect {name} --template {TEMPLATE}")
        row = prod.api.protect(name, ProtectIn(template=TEMPLATE))
        states.append(f"{name} {row.state.value}")
    ctx.check(
        "apps_managed",
        all(s.endswith(" managed") for s in states),
        f"protect did not make the apps managed: {states}",
    )
    ctx.say(
        f"{DISK_APP} has no start/stop hooks: those of {FILES_APP} start and stop the "
        "process that writes both"
    )
    return f"{FILES_APP} (filesystem) and {DISK_APP} (volume) managed, mirrored to dr"


def step_capture_full(ctx: Context) -> str:
    sent = capture_and_mirror(ctx, "first, full", "full")
    ctx.transfers["capture-full"] = sent["capture"]
    ctx.transfers["replication-full"] = sent["replicate"]
    # The mirror now exists at dr: its hooks are the DR site's to set, for its own host.
    dr = ctx.dr
    ctx.command(dr, f"app set {FILES_APP} --start {START_HOOK} --stop {STOP_HOOK}")
    row = dr.api.set_app(FILES_APP, AppHooksIn(start=START_HOOK, stop=STOP_HOOK))
    ctx.check(
        "dr_hooks_set",
        (row.start, row.stop) == (START_HOOK, STOP_HOOK),
        f"dr did not keep the hooks of {FILES_APP}: {row}",
    )
    return f"full replication sent {_both(sent['replicate'])}"


def step_app_writes(ctx: Context) -> str:
    paths = ctx.prod.paths
    before = sampleapp.read_status(paths)
    time.sleep(ctx.options.write_seconds)
    after = sampleapp.read_status(paths)
    ctx.check(
        "app_writes",
        after.get("state") == "running" and int(after["rows"]) > int(before["rows"]),
        f"the sample app did not write: {after}",
    )
    return f"the app wrote {writes_since(before, after)} in {ctx.options.write_seconds:.1f} s"


def step_capture_incremental(ctx: Context) -> str:
    sent = capture_and_mirror(ctx, "second, incremental", "incr")
    ctx.transfers["capture-incremental"] = sent["capture"]
    ctx.transfers["replication-incremental"] = sent["replicate"]
    full = ctx.transfers["replication-full"]
    parts = []
    for name, n in sent["replicate"].items():
        ctx.check(
            f"incremental_smaller_{name}",
            n < full[name],
            f"the incremental replication of {name} sent {n} bytes, not less than the full "
            f"one's {full[name]}",
        )
        parts.append(f"{name} {human_bytes(n)} ({100 * n / max(1, full[name]):.1f}% of full)")
    row = ctx.app_row(ctx.prod, FILES_APP)
    lag = row.get("replication_lag_seconds")
    ctx.measures["replication_lag_after_incremental_seconds"] = lag
    if lag is not None:
        ctx.say(f"prod reports a replication lag of {lag:.2f} s for {FILES_APP}")
    return "incremental replication sent " + "; ".join(parts)


def step_test_failover(ctx: Context) -> str:
    dr = ctx.dr
    mount = dr.root / "drill" / "app"
    ctx.command(dr, f"test-failover {FILES_APP} --host {dr.host} --mount-point {mount}")
    job = ctx.run_job(
        dr, dr.api.test_failover(FILES_APP, PresentIn(host=dr.host, mount_point=str(mount)))
    )
    image = ctx.image(dr, _image_of(job))
    ctx.images["files-test"] = image["id"]
    ctx.facts["test_mount"] = str(mount)
    replica = str(image.get("parent"))
    ctx.check(
        "test_copy_of_newest_replica",
        replica == ctx.images["files-incr"],
        f"the test copy is of {replica}, not the newest replica {ctx.images['files-incr']}",
    )
    reference = ctx.references[replica]
    size = ctx.compare(
        "dr_test_copy",
        f"the test copy at {mount} vs replica {replica}",
        reference.state,
        tree_state(mount),
    )
    return f"test copy {image['id']} of replica {replica} on {dr.host}: equal ({size})"


def step_capture_during_test(ctx: Context) -> str:
    dr = ctx.dr
    sent = capture_and_mirror(ctx, "during the test", "during")
    ctx.transfers["replication-during-test"] = sent["replicate"]
    mount = Path(ctx.facts["test_mount"])
    image = ctx.image(dr, ctx.images["files-test"])
    ctx.check(
        "test_copy_still_mounted",
        image["state"] == "mounted",
        f"the test image {image['id']} is {image['state']} after the replication",
    )
    reference = ctx.references[ctx.images["files-incr"]]
    ctx.compare(
        "dr_test_copy_unchanged",
        "the test copy after the replication vs its replica",
        reference.state,
        tree_state(mount),
    )
    return (
        f"replicated {_both(sent['replicate'])} while the test copy was up; "
        "the test copy did not change"
    )


def _withdraw(ctx: Context, site: Site, image_id: str) -> dict[str, Any]:
    ctx.command(site, f"unmount {image_id}")
    site.api.unmount(image_id)
    ctx.command(site, f"image delete {image_id}")
    return ctx.run_job(site, site.api.delete_image(image_id))


def step_end_test(ctx: Context) -> str:
    dr = ctx.dr
    image_id = ctx.images["files-test"]
    _withdraw(ctx, dr, image_id)
    mount = Path(ctx.facts["test_mount"])
    left = [i["id"] for i in ctx.images_of(dr, FILES_APP) if i["kind"] == "test-failover"]
    ctx.check(
        "test_copy_removed",
        not mount.exists() and not left,
        f"the test copy is still there (mount point exists: {mount.exists()}, images {left})",
    )
    return f"{image_id} unmounted and deleted; {mount} removed from {dr.host}"


def step_test_volume(ctx: Context) -> str:
    dr = ctx.dr
    ctx.command(dr, f"test-failover {DISK_APP} --host {dr.host}")
    job = ctx.run_job(dr, dr.api.test_failover(DISK_APP, PresentIn(host=dr.host)))
    image = ctx.image(dr, _image_of(job))
    uri = str((job.get("result") or {}).get("nbd_uri") or "")  # the export: the job's result
    ctx.check("test_volume_exported", uri.startswith("nbd://"), f"no NBD export: {image}")
    replica = str(image.get("parent"))
    ctx.check(
        "test_volume_of_newest_replica",
        replica == ctx.images["disk-during"],
        f"the test volume is of {replica}, not the newest replica {ctx.images['disk-during']}",
    )
    ctx.say(f"exported as {escape(uri.rsplit('.', 1)[0])}.… (the export name holds a secret)")
    ctx.compare(
        "dr_test_volume",
        f"the test volume read over NBD vs replica {replica}",
        ctx.references[replica].state,
        nbd_state(uri),
    )
    _withdraw(ctx, dr, image["id"])
    return f"test volume {image['id']} read over NBD: equal to replica {replica}; deleted"


def step_disaster(ctx: Context) -> str:
    prod, dr = ctx.prod, ctx.dr
    replicas = [i for i in ctx.images_of(dr, FILES_APP) if i["kind"] == "replica"]
    newest = max(replicas, key=lambda i: str(i["created"]))
    rpo = _age(str(newest["created"]))
    lag = ctx.app_row(prod, FILES_APP).get("replication_lag_seconds")
    status = sampleapp.read_status(prod.paths)
    pid = sampleapp.running_pid(prod.paths)
    if pid is None:
        raise StepFailed("the sample app is not running at production")
    os.kill(pid, signal.SIGKILL)
    reference = ctx.references.get(str(newest["id"]))
    rows_lost = int(status.get("rows", 0)) - reference.rows if reference else None
    ctx.lab.kill(prod.appliance)
    ctx.lab.kill(prod.agent)
    prod.reconnect()
    ctx.measures["rpo_seconds"] = round(rpo, 3)
    ctx.measures["rpo_reported_by_prod_seconds"] = lag
    ctx.measures["rows_lost"] = rows_lost
    ctx.say(f"newest replica at dr: {newest['id']}, taken {rpo:.2f} s ago (RPO achieved)")
    ctx.say(
        f"killed (SIGKILL): the sample app (pid {pid}), agent {prod.host}, appliance {prod.name}"
    )
    lost = f", about {rows_lost} rows written since then are lost" if rows_lost else ""
    return f"production lost; RPO achieved {rpo:.2f} s (newest replica's age){lost}"


def step_failover(ctx: Context) -> str:
    dr = ctx.dr
    mount = dr.paths.data
    # The app the failover's start hook launches comes up held: the copy is compared
    # before it writes (then released). The timing stops when it is up.
    sampleapp.hold(dr.paths, wait=False)
    t0 = time.monotonic()
    ctx.command(dr, f"failover {DISK_APP} --host {dr.host} --confirm FAILOVER --label disaster")
    job = ctx.run_job(
        dr,
        dr.api.failover(
            DISK_APP, FailoverIn(host=dr.host, confirm=FAILOVER_CONFIRMATION, label="disaster")
        ),
    )
    disk = ctx.image(dr, _image_of(job))
    uri = str((job.get("result") or {}).get("nbd_uri") or "")  # the export: the job's result
    dr.attached.write_text(f"{uri}\n")
    ctx.say(f"volume attached to {dr.host}: its NBD export written to {ATTACHED}")
    ctx.command(
        dr,
        f"failover {FILES_APP} --host {dr.host} --confirm FAILOVER --mount-point {mount} "
        "--label disaster",
    )
    job = ctx.run_job(
        dr,
        dr.api.failover(
            FILES_APP,
            FailoverIn(
                host=dr.host,
                confirm=FAILOVER_CONFIRMATION,
                mount_point=str(mount),
                label="disaster",
            ),
        ),
    )
    files = ctx.image(dr, _image_of(job))
    wait_app(dr.paths, ("held", "running"), f"at {dr.host}")
    seconds = time.monotonic() - t0
    ctx.measures["failover_seconds"] = round(seconds, 3)
    ctx.images["files-failover"], ctx.images["disk-failover"] = files["id"], disk["id"]
    ctx.facts["dr_disk_uri"] = uri
    ctx.say(f"app up at {dr.host} {seconds:.2f} s after the first failover call")
    states = {a: ctx.app_row(dr, a)["state"] for a in APPS}
    ctx.check(
        "failed_over",
        set(states.values()) == {"failed-over"},
        f"the apps at dr are not failed over: {states}",
    )
    copies: list[tuple[str, dict[str, Any], Callable[[], dict[str, str]]]] = [
        (FILES_APP, files, lambda: tree_state(mount)),
        (DISK_APP, disk, lambda: nbd_state(uri)),
    ]
    for name, image, actual in copies:
        replica = str(image.get("parent"))
        ctx.check(
            f"failover_of_newest_replica_{name}",
            replica == ctx.images[f"{name}-during"],
            f"{name} failed over from {replica}, not the newest replica",
        )
        ctx.compare(
            f"dr_failover_{name}",
            f"the failed-over {name} at {dr.host} vs replica {replica}",
            ctx.references[replica].state,
            actual(),
        )
    released = sampleapp.release(dr.paths)
    expected = ctx.references[ctx.images["files-during"]].rows
    ctx.check(
        "dr_resumed_at_replica",
        released.get("opened_rows") == expected and released.get("check") == "ok",
        f"the app at dr did not resume cleanly at the replica's row {expected}: {released}",
    )
    return (
        f"failover time {seconds:.2f} s; the app resumed at {dr.host} at row {expected} "
        f"(the replica's), disk through NBD"
    )


def step_dr_runs(ctx: Context) -> str:
    prod, dr = ctx.prod, ctx.dr
    before = sampleapp.read_status(dr.paths)
    # Production comes back meanwhile: its appliance and host1's agent start again.
    ctx.lab.launch(prod.appliance, prod.agent)
    time.sleep(ctx.options.write_seconds)
    ctx.lab.wait(prod.appliance, prod.agent)
    after = sampleapp.read_status(dr.paths)
    ctx.check(
        "dr_app_writes",
        after.get("state") == "running"
        and int(after["rows"]) > int(before["rows"])
        and int(after["records"]) > int(before["records"])
        and not after.get("errors"),
        f"the app does not write cleanly at dr: {after}",
    )
    state = ctx.app_row(prod, FILES_APP)["state"]
    ctx.say(f"appliance {prod.name} and agent {prod.host} are back (prod still sees {state})")
    return f"the app wrote {writes_since(before, after)} at {dr.host}; production is back"


def _syncback(ctx: Context, label: str, tag: str) -> dict[str, int]:
    dr = ctx.dr
    jobs = []
    for name in APPS:
        ctx.command(dr, f"syncback {name} --label {label}")
        jobs.append(ctx.start_job(dr.api.syncback(name, CaptureIn(label=label))))
    finished = ctx.wait_jobs(dr, jobs)
    for job in finished:
        ctx.images[f"{job['app']}-{tag}"] = _image_of(job)
    sent = _sent(finished)
    ctx.transfers[f"syncback-{tag}"] = sent
    return sent


def step_syncback_catch_up(ctx: Context) -> str:
    dr = ctx.dr
    t0 = time.monotonic()
    held = sampleapp.hold(dr.paths)
    try:
        sent = _syncback(ctx, "catch-up", "catch-up")
    finally:
        sampleapp.release(dr.paths)
    ctx.say(f"app held at row {held.get('rows')} for {time.monotonic() - t0:.2f} s, released")
    homes = {i["id"] for a in APPS for i in ctx.images_of(ctx.prod, a) if i["kind"] == "syncback"}
    ctx.check(
        "catch_up_at_prod",
        {ctx.images[f"{a}-catch-up"] for a in APPS} <= homes,
        "the catch-up syncback images are not at prod",
    )
    return f"catch-up syncback sent {_both(sent)}; the app keeps serving at {ctx.dr.host}"


def step_stop_dr(ctx: Context) -> str:
    dr = ctx.dr
    ctx.say(f"the operator runs the app's stop hook {STOP_HOOK} on {dr.host} (through its agent)")
    ctx.measures["downtime_started"] = time.monotonic()
    result = dr.run_on_host(STOP_HOOK)
    ctx.check(
        "dr_app_stopped",
        result.get("returncode") == 0 and sampleapp.running_pid(dr.paths) is None,
        f"the stop hook did not stop the app at dr: {result}",
    )
    status = sampleapp.read_status(dr.paths)
    ctx.facts["rows_dr_stop"] = int(status["rows"])
    return f"the app stopped at {dr.host} at row {status['rows']}: downtime starts"


def step_syncback_final(ctx: Context) -> str:
    sent = _syncback(ctx, "final", "final")
    catch_up = ctx.transfers["syncback-catch-up"]
    total, before = sum(sent.values()), sum(catch_up.values())
    ctx.check(
        "final_syncback_smaller",
        total < before,
        f"the final syncback sent {total} bytes, not less than the catch-up's {before}",
    )
    return f"final syncback sent {_both(sent)} ({human_bytes(total)} vs {human_bytes(before)})"


def step_restore(ctx: Context) -> str:
    prod = ctx.prod
    # The app the restore's start hook launches comes up held until compared.
    sampleapp.hold(prod.paths, wait=False)
    jobs = []
    # The disk first: the start hook, run by the restore of the files app, opens it.
    for name in (DISK_APP, FILES_APP):
        image = ctx.images[f"{name}-final"]
        ctx.command(
            prod,
            f'restore {name} --image {image} --confirm "DATA LOSS" '
            '--confirm "OVERWRITE OTHER APPS"',
        )
        jobs += [
            ctx.run_job(
                prod,
                prod.api.restore(name, RestoreIn(image=image, confirm=RESTORE_CONFIRMATIONS)),
            )
        ]
    status = wait_app(prod.paths, ("held", "running"), f"at {prod.host}")
    downtime = time.monotonic() - float(ctx.measures["downtime_started"])
    ctx.measures["failback_downtime_seconds"] = round(downtime, 3)
    reported = (jobs[-1].get("result") or {}).get("downtime_seconds")
    ctx.measures["failback_downtime_reported_seconds"] = reported
    ctx.say(f"the restore's start hook started the app at {prod.host} (pid {status['pid']})")
    if reported is not None:
        ctx.say(f"the restore job reports a failback downtime of {float(reported):.2f} s")
    return f"both apps diff-restored from the final syncback; failback downtime {downtime:.2f} s"


def step_verify_production(ctx: Context) -> str:
    prod, dr = ctx.prod, ctx.dr
    ctx.compare(
        "production_files",
        f"production {FILES_APP} vs the DR copy (stopped)",
        tree_state(dr.paths.data),
        tree_state(prod.paths.data),
    )
    ctx.compare(
        "production_disk",
        f"production {DISK_APP} vs the DR volume read over NBD (stopped)",
        nbd_state(str(ctx.facts["dr_disk_uri"])),
        volume_state(ctx.disk_image),
    )
    released = sampleapp.release(prod.paths)
    expected = int(ctx.facts["rows_dr_stop"])
    ctx.check(
        "prod_resumed_at_dr_state",
        released.get("opened_rows") == expected and released.get("check") == "ok",
        f"the app at production did not resume at the DR site's last row {expected}: {released}",
    )
    time.sleep(0.3)
    status = sampleapp.read_status(prod.paths)
    ctx.check(
        "prod_writes_again",
        status.get("state") == "running" and int(status["rows"]) > expected,
        f"the app does not write at production: {status}",
    )
    return (
        f"production equals the DR copy; the app resumed at row {expected} (the last written "
        "at dr): nothing written at the DR site was lost"
    )


def step_failback(ctx: Context) -> str:
    prod, dr = ctx.prod, ctx.dr
    jobs = []
    for name in APPS:
        ctx.command(dr, f"failback {name}")
        jobs.append(ctx.start_job(dr.api.failback(name, FailbackIn())))
    ctx.wait_jobs(dr, jobs)
    states = {f"{a}@{s.name}": ctx.app_row(s, a)["state"] for s in (prod, dr) for a in APPS}
    ctx.check(
        "managed_again",
        set(states.values()) == {"managed"},
        f"the apps are not managed again: {states}",
    )
    kinds = {i["kind"] for a in APPS for i in ctx.images_of(dr, a)}
    ctx.check(
        "dr_images_cleaned",
        kinds == {"replica"} and not dr.paths.data.exists(),
        f"failback left images of kinds {sorted(kinds)} at dr "
        f"(DR copy present: {dr.paths.data.exists()})",
    )
    return "failed back: failover and syncback images removed at dr, state managed at both sites"


def step_mirror_resumes(ctx: Context) -> str:
    sent = capture_and_mirror(ctx, "after failback", "after")
    ctx.transfers["replication-after-failback"] = sent["replicate"]
    first = ctx.transfers["replication-full"]
    parts = []
    for name, n in sent["replicate"].items():
        ctx.check(
            f"resumed_incrementally_{name}",
            n < first[name],
            f"the replication of {name} after failback sent {n} bytes, not less than the first "
            f"replication's {first[name]}",
        )
        parts.append(f"{name} {human_bytes(n)} ({100 * n / max(1, first[name]):.1f}% of the first)")
    return "mirroring resumed incrementally: " + "; ".join(parts)


def step_verify_images(ctx: Context) -> str:
    results = []
    for site in ctx.sites.values():
        count = chunks = 0
        for name in APPS:
            for image in ctx.images_of(site, name):
                report = site.api.verify_image(image["id"])
                ctx.check(
                    f"image_ok_{site.name}_{image['id']}",
                    report.ok,
                    f"image {image['id']} of {name} at {site.name}: {len(report.missing)} "
                    f"chunk(s) missing, {len(report.bad)} corrupt",
                )
                count += 1
                chunks += report.chunks
        ctx.command(site, f"image verify … ({count} images)")
        results.append(f"{site.name}: {count} images, {chunks} chunks")
    return "every image intact: " + "; ".join(results)


STEPS: list[Step] = [
    Step("start-sites", "start two sites", step_start_sites),
    Step("pair", "pair the appliances", step_pair),
    Step("start-app", "start the sample app at production", step_start_app),
    Step("protect", "protect with a mirroring template", step_protect),
    Step("capture-full", "full capture + replication", step_capture_full),
    Step("app-writes", "the app keeps writing", step_app_writes),
    Step("capture-incremental", "incremental capture + replication", step_capture_incremental),
    Step("test-failover", "test failover to host2", step_test_failover),
    Step("capture-during-test", "capture + replication during the test", step_capture_during_test),
    Step("end-test", "unmount + delete the test copy", step_end_test),
    Step("test-volume", "test failover of the volume (NBD)", step_test_volume),
    Step("disaster", "disaster at production", step_disaster),
    Step("failover", "failover to host2", step_failover),
    Step("dr-runs", "the app runs at dr; production comes back", step_dr_runs),
    Step("syncback-catch-up", "catch-up syncback", step_syncback_catch_up),
    Step("stop-dr", "stop the app at dr (downtime starts)", step_stop_dr),
    Step("syncback-final", "final syncback", step_syncback_final),
    Step("restore", "restore at production (downtime ends)", step_restore),
    Step("verify-production", "verify production = DR state", step_verify_production),
    Step("failback", "failback (snapshot style)", step_failback),
    Step("mirror-resumes", "capture at production: mirroring resumes", step_mirror_resumes),
    Step("verify-images", "tandem image verify at both sites", step_verify_images),
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
            elif isinstance(exc, StepFailed | OSError | sampleapp.SampleAppError):
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


def run_drill(
    lab: Lab, options: Options, steps: list[Step] | None = None
) -> tuple[dict[str, Any], bool]:
    """Run the drill's steps (``STEPS`` by default) in ``lab``; its report (see
    ``tandem.drill.report``) and whether it was interrupted (Ctrl-C, SIGTERM)."""
    t0 = time.monotonic()
    ctx = Context(lab, options)
    records: list[StepRecord] = []
    interrupted = False
    try:
        with lab:
            try:
                run_steps(ctx, STEPS if steps is None else steps, records)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                ctx.close()
                stderr.print("stopping the sample app and the daemons", highlight=False)
    except KeyboardInterrupt:
        interrupted = True
    if lab.keep:
        for site in ctx.sites.values():
            env = site.appliance.env()
            text = "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items())
            with contextlib.suppress(OSError):
                (lab.root / f"{site.appliance.name}.env").write_text(text)
    report = build_report(ctx, records, time.monotonic() - t0, str(lab.root), lab.keep)
    if interrupted:
        report["ok"], report["error"] = False, "interrupted"
        report["data_verified_equal"] = False
    if lab.cleanup_errors:
        report["cleanup_errors"] = lab.cleanup_errors
    return report, interrupted
