"""Replication benchmark (issue 4): tandem mirroring between two real appliances on loopback
TLS, side by side with rsync on the same data in the same run.

Set-up (``tandem.drill.lab``: daemons as child processes on 127.0.0.1, stopped and removed
whatever happens): appliances ``prod`` and ``dr`` and an agent ``prod-host`` registered at
``prod``; ``prod`` paired with ``dr`` (``POST /api/v1/peers`` with the DR admin token); a
volume app over a generated file (half low-entropy text, half random, interleaved per
4 MiB, as in the storage section), protected by a template with ``mirror: true``. Every
capture then queues a ``replicate`` job (the capture job's result names it).

1. First full copy over loopback TLS: bytes of the volume / the replicate job's duration
   (started → finished, the appliance's own timestamps), against rsync's first full copy
   over the same kind of channel (the target, ≥ 0.8×): ``rsync --whole-file`` whose remote
   shell (``rsync -e``) is a TLS 1.3 tunnel on loopback made of ``openssl s_server`` and
   ``s_client`` (no sshd here). For reference, also against plain local ``rsync
   --whole-file`` into an empty directory (no network, no encryption).
2. 1% of the volume changed, once as 64 KiB runs and once as random 4 KiB writes: capture,
   replicate; the replicate job's ``bytes_sent`` against the changed bytes and against the
   literal data of ``rsync --stats --no-whole-file`` onto the previous copy.

Job rows are read through the API (``GET /api/v1/jobs/{id}``). The helpers for the two-site
lab (``TwoSites``, ``wait_job``, ``job_seconds``) are shared with the presentation section.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.markup import escape

from bench.common import (
    Config,
    DataSource,
    GiB,
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
    rsync_literal_bytes,
    run_measured,
    settle,
)
from bench.storage import (
    SMALL_WRITE,
    SUB_BLOCK,
    Got,
    RsyncRun,
    attempt,
    overwrite,
    pick_offsets,
    rsync_delta,
    times,
    write_volume,
)
from tandem.drill.lab import Daemon, Lab
from tandem.errors import TandemError
from tandem.transport.client import ApiClient
from tandem.transport.server import free_port

S1 = "replication 1 · first full copy, loopback TLS"
S2 = "replication 2 · 1% of the volume changed"

TEMPLATE = "mirrored"
APP = "vol"
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
JOB_TIMEOUT = 900.0
JOB_POLL = 0.05
FAILURES = (TandemError, RuntimeError, OSError, subprocess.SubprocessError, ValueError)

# rsync's remote shell over TLS on loopback: the "remote" rsync runs here behind
# ``openssl s_server`` (through two FIFOs), and rsync's side of the channel is
# ``openssl s_client``. TLS 1.3 with AES-256-GCM, as tandem's peer link uses.
TLS_RSH = """#!/bin/bash
set -u
dir=$(dirname "$0")
port=$TLS_RSH_PORT
[ "$1" = "-l" ] && shift 2
shift  # the host: the remote side is this machine
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkfifo "$tmp/in" "$tmp/out"
"$@" < "$tmp/in" > "$tmp/out" &
openssl s_server -accept "127.0.0.1:$port" -cert "$dir/cert.pem" -key "$dir/key.pem" \
    -quiet -naccept 1 > "$tmp/in" < "$tmp/out" 2>/dev/null &
hex=$(printf '%04X' "$port")
for _ in $(seq 500); do
    grep -q ":$hex 00000000:0000 0A" /proc/net/tcp && break
    sleep 0.01
done
openssl s_client -connect "127.0.0.1:$port" -quiet -nocommands 2>/dev/null
status=$?
[ "$status" -eq 0 ] || kill $(jobs -p) 2>/dev/null  # a FIFO's other end may never open
wait
exit $status
"""


def add_row(
    report: Report,
    section: str,
    measure: str,
    *,
    tandem: str,
    peer: str,
    ratio: str = "—",
    target: str = "—",
    values: dict[str, Value] | None = None,
) -> None:
    report.add(Row(section, measure, tandem, peer, ratio, target, values or {}))


# --- jobs -----------------------------------------------------------------------------


def wait_job(
    api: ApiClient, job_id: str, *, poll: float = JOB_POLL, timeout: float = JOB_TIMEOUT
) -> dict[str, Any]:
    """Poll ``GET /api/v1/jobs/{id}`` until the job ends; raise unless it succeeded."""
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = api.get(f"/api/v1/jobs/{job_id}")
        if job["status"] in TERMINAL:
            if job["status"] != "succeeded":
                raise RuntimeError(
                    f"{job['type']} job {job_id} {job['status']}: {job.get('message')}"
                )
            return job
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{job['type']} job {job_id} still {job['status']} after {timeout:.0f} s"
            )
        time.sleep(poll)


def _when(job: dict[str, Any], key: str) -> dt.datetime:
    value = job.get(key)
    if not value:
        raise RuntimeError(f"job {job.get('id')} has no {key!r} time")
    return dt.datetime.fromisoformat(str(value))


def job_epoch(job: dict[str, Any], key: str) -> float:
    """The job's timestamp ``key`` (``created``, ``started``, ``finished``) as epoch seconds."""
    return _when(job, key).timestamp()


def job_seconds(job: dict[str, Any]) -> float:
    """The job's own duration: its ``started`` to its ``finished`` timestamp."""
    return (_when(job, "finished") - _when(job, "started")).total_seconds()


def job_queued_seconds(job: dict[str, Any]) -> float:
    """How long the job waited for a worker: ``created`` to ``started``."""
    return (_when(job, "started") - _when(job, "created")).total_seconds()


def job_timeline(job: dict[str, Any], lines: list[dict[str, Any]]) -> list[str]:
    """The job's own log lines (``GET /jobs/{id}/log``), each timed from its start: where
    its time went."""
    start = _when(job, "started")
    return [
        f"{job['type']} +{(_when(line, 'ts') - start).total_seconds():6.3f} s  {line['text']}"
        for line in lines
    ]


# --- the two-site lab -----------------------------------------------------------------


class TwoSites:
    """Appliances ``prod`` and ``dr`` paired, agent ``prod-host`` registered at ``prod`` and,
    with ``dr_host``, agent ``dr-host`` registered at ``dr``; a mirroring template at prod.

    Clients are closed by the lab when it closes (registered with ``on_close``)."""

    def __init__(self, lab: Lab, *, dr_host: bool) -> None:
        self.lab = lab
        self.prod = lab.add("appliance", "prod")
        self.dr = lab.add("appliance", "dr")
        self.prod_agent = lab.add("agent", "prod-host")
        self.dr_agent: Daemon | None = lab.add("agent", "dr-host") if dr_host else None
        self._prod_api: ApiClient | None = None
        self._dr_api: ApiClient | None = None
        lab.on_close("close the API clients", self.close)

    @property
    def prod_api(self) -> ApiClient:
        if self._prod_api is None:
            self._prod_api = self.prod.client()
        return self._prod_api

    @property
    def dr_api(self) -> ApiClient:
        if self._dr_api is None:
            self._dr_api = self.dr.client()
        return self._dr_api

    def close(self) -> None:
        for api in (self._prod_api, self._dr_api):
            if api is not None:
                api.close()
        self._prod_api = self._dr_api = None

    def start(self) -> None:
        daemons = [self.prod, self.dr, self.prod_agent]
        if self.dr_agent is not None:
            daemons.append(self.dr_agent)
        self.lab.up(*daemons)
        register_host(self.prod_api, self.prod_agent)
        if self.dr_agent is not None:
            register_host(self.dr_api, self.dr_agent)
        self.prod_api.post(
            "/api/v1/peers",
            {"url": self.dr.url, "token": self.dr.token, "fingerprint": self.dr.fingerprint},
        )
        self.prod_api.post(
            "/api/v1/templates", {"name": TEMPLATE, "every": None, "keep": None, "mirror": True}
        )

    def add_volume_app(self, name: str, path: Path) -> None:
        self.prod_api.post(
            "/api/v1/apps",
            {"name": name, "host": self.prod_agent.name, "kind": "volume", "path": str(path)},
        )
        self.prod_api.post(f"/api/v1/apps/{name}/protect", {"template": TEMPLATE})

    def capture_and_replicate(self, app: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Capture ``app`` at prod and wait for the replicate job the capture queued; both
        finished job rows, and checks that the replica has the snapshot's manifest."""
        started = self.prod_api.post(f"/api/v1/apps/{app}/capture", {"label": "bench"})
        capture = wait_job(self.prod_api, started["job"]["id"])
        mirror = (capture.get("result") or {}).get("mirror_job")
        if not mirror:
            raise RuntimeError(f"capture job {capture['id']} queued no replicate job")
        replicate = wait_job(self.prod_api, str(mirror))
        snapshot = self.prod_api.get(f"/api/v1/images/{capture['image']}")
        replicas = {i["id"]: i for i in self.dr_api.get(f"/api/v1/apps/{app}/images")}
        replica = replicas.get(snapshot["id"])
        if replica is None or replica["manifest"] != snapshot["manifest"]:
            raise RuntimeError(
                f"the DR appliance holds no replica of {snapshot['id']} with its manifest"
            )
        return capture, replicate


def register_host(api: ApiClient, agent: Daemon) -> None:
    api.post(
        "/api/v1/hosts",
        {
            "name": agent.name,
            "url": agent.url,
            "token": agent.token,
            "fingerprint": agent.fingerprint,
        },
    )


def run_in_lab(
    root: Path, report: Report, sections: tuple[str, ...], body: Callable[[Lab], None]
) -> None:
    """Run ``body`` in a lab under ``root``; a failure becomes a row, with the daemons' log
    tails on stderr, and never leaves a daemon behind."""
    with Lab(root) as lab:
        try:
            body(lab)
        except FAILURES as exc:
            log(f"[red]failed:[/red] {escape(str(exc))}")
            for d in lab:
                log(f"{d.kind} {d.name} log ends with:\n{escape(d.log_tail())}")
            for section in sections:
                add_row(
                    report,
                    section,
                    "section failed",
                    tandem="failed",
                    peer=f"{type(exc).__name__}: {str(exc)[:120]}",
                )


# --- the run --------------------------------------------------------------------------


class ReplicationBench:
    def __init__(self, cfg: Config, report: Report, lab: Lab) -> None:
        self.cfg = cfg
        self.report = report
        self.size = cfg.size
        self.data = DataSource(cfg.seed)
        self.root = cfg.workdir / "replication"
        self.scratch = self.root / "scratch"
        self.volume = self.root / "prod-data" / "vol.img"
        self.copy_dir = self.root / "rsync-copy"
        self.copy = self.copy_dir / self.volume.name
        self.tls_dir = self.root / "rsync-tls"
        self.sites = TwoSites(lab, dr_host=False)
        self.has_rsync = have("rsync")
        self.has_tls_rsh = self.has_rsync and have("openssl")

    def run(self) -> None:
        for d in (self.scratch, self.volume.parent):
            d.mkdir(parents=True, exist_ok=True)
        log("replication: starting appliances prod and dr and agent prod-host")
        t0 = time.monotonic()
        self.sites.start()
        log(f"replication: lab up and paired in {time.monotonic() - t0:.1f} s")
        log(f"replication: writing a {fmt_size(self.size)} volume")
        write_volume(self.volume, self.size, self.data, "replication")
        self.report.context.append(
            f"Replication: a {fmt_size(self.size)} volume, even 4 MiB segments low-entropy "
            "text (zstd-1 halves them), odd ones random; appliances prod and dr and agent "
            "prod-host as child processes on loopback TLS (tandem.drill.lab)."
        )
        self.sites.add_volume_app(APP, self.volume)
        self.step_first_copy()
        self.step_changes()

    def step_first_copy(self) -> None:
        log("replication 1: capture at prod, then the replicate job to dr")
        settle()
        capture, job = self.sites.capture_and_replicate(APP)
        seconds = job_seconds(job)
        sent = int(job["bytes_sent"])
        log(
            f"replication 1: capture {job_seconds(capture):.2f} s, replicate {seconds:.2f} s, "
            f"{fmt_bytes(sent)} sent"
        )
        log("replication 1: rsync --whole-file into an empty directory")
        peer = self.rsync_copy()
        rate = self.size / seconds if seconds > 0 else None
        peer_rate = peer.num(lambda p: self.size / p.seconds if p.seconds > 0 else 0.0)
        add_row(
            self.report,
            S1,
            f"{fmt_size(self.size)} volume: throughput",
            tandem=fmt_rate(self.size, seconds),
            peer=peer.show(lambda p: f"rsync --whole-file {fmt_rate(self.size, p.seconds)}"),
            ratio=fmt_ratio(rate, peer_rate, "rsync"),
            target="— (report: no encryption)",
            values=dict(
                bytes=self.size,
                tandem_seconds=seconds,
                rsync_seconds=peer.num(lambda p: p.seconds),
                replicate_queued_seconds=job_queued_seconds(job),
                capture_seconds=job_seconds(capture),
                capture_bytes_sent=int(capture["bytes_sent"]),
            ),
        )
        log("replication 1: rsync --whole-file through a TLS tunnel (the same channel)")
        tls = self.rsync_copy_tls()
        tls_rate = tls.num(lambda p: self.size / p.seconds if p.seconds > 0 else 0.0)
        add_row(
            self.report,
            S1,
            f"{fmt_size(self.size)} volume: throughput, peer over TLS",
            tandem=fmt_rate(self.size, seconds),
            peer=tls.show(
                lambda p: f"rsync --whole-file over TLS {fmt_rate(self.size, p.seconds)}"
            ),
            ratio=fmt_ratio(rate, tls_rate, "rsync/TLS"),
            target="≥ 0.8× rsync over TLS",
            values=dict(
                bytes=self.size,
                tandem_seconds=seconds,
                rsync_tls_seconds=tls.num(lambda p: p.seconds),
            ),
        )
        add_row(
            self.report,
            S1,
            f"{fmt_size(self.size)} volume: bytes sent",
            tandem=fmt_bytes(sent),
            peer=peer.show(lambda p: f"rsync literal {fmt_bytes(p.literal)}"),
            ratio=fmt_ratio(sent, peer.num(lambda p: p.literal), "rsync"),
            target="— (report)",
            values=dict(
                bytes=self.size, tandem_sent=sent, rsync_literal=peer.num(lambda p: p.literal)
            ),
        )

    def rsync_copy(self) -> Got[RsyncRun]:
        if not self.has_rsync:
            return Got()
        self.copy_dir.mkdir(parents=True, exist_ok=True)
        settle()

        def copy() -> RsyncRun:
            cmd = ["rsync", "--stats", "--whole-file", str(self.volume), f"{self.copy_dir}/"]
            res = run_measured(cmd, scratch=self.scratch).check("rsync")
            return RsyncRun(seconds=res.seconds, literal=rsync_literal_bytes(res.stdout))

        return attempt("rsync", copy)

    def rsync_copy_tls(self) -> Got[RsyncRun]:
        """``rsync --whole-file`` into an empty directory through ``TLS_RSH``; the copy is
        removed afterwards (the later steps use the plain rsync copy)."""
        if not self.has_tls_rsh:
            return Got(why="rsync or openssl not installed")
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        dest = self.tls_dir / "copy"
        dest.mkdir(exist_ok=True)

        def copy() -> RsyncRun:
            key, cert = self.tls_dir / "key.pem", self.tls_dir / "cert.pem"
            req = "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1"
            req += " -subj /CN=localhost"
            argv = ["openssl", *req.split(), "-keyout", str(key), "-out", str(cert)]
            subprocess.run(argv, check=True, capture_output=True)
            rsh = self.tls_dir / "tls-rsh"
            rsh.write_text(TLS_RSH)
            rsh.chmod(0o755)
            settle()
            cmd = ["rsync", "--stats", "--whole-file", "--timeout=300", "-e", str(rsh)]
            cmd += [str(self.volume), f"localhost:{dest}/"]
            env = {"TLS_RSH_PORT": str(free_port())}
            res = run_measured(cmd, scratch=self.scratch, env=env).check("rsync over TLS")
            if os.path.getsize(dest / self.volume.name) != self.size:
                raise RuntimeError("rsync over TLS left a copy of the wrong size")
            return RsyncRun(seconds=res.seconds, literal=rsync_literal_bytes(res.stdout))

        try:
            return attempt("rsync over TLS", copy)
        finally:
            shutil.rmtree(self.tls_dir, ignore_errors=True)

    def step_changes(self) -> None:
        if self.has_rsync and not self.copy.exists():
            shutil.copyfile(self.volume, self.copy)  # rsync's basis, if its copy failed
        self.change_case("64 KiB runs", SUB_BLOCK, "repl-64k")
        self.change_case("4 KiB writes", SMALL_WRITE, "repl-4k")

    def change_case(self, name: str, grain: int, label: str) -> None:
        rng = random.Random(self.data.rng_seed(label))
        offsets = pick_offsets(self.size, grain, rng)
        changed = overwrite(self.volume, offsets, grain, self.data, label)
        what = f"{name}, {fmt_bytes(changed)}"
        log(f"replication 2: {what}: capture, then the replicate job")
        settle()
        capture, job = self.sites.capture_and_replicate(APP)
        sent = int(job["bytes_sent"])
        seconds = job_seconds(job)
        scan = job_seconds(capture)
        log(
            f"replication 2: {what}: capture {scan:.2f} s, "
            f"{fmt_bytes(sent)} sent in {seconds:.2f} s"
        )
        log(f"replication 2: {what}: rsync --no-whole-file onto the previous copy")
        sync = self.rsync_delta()
        literal = sync.num(lambda s: s.literal)
        if grain == SUB_BLOCK:
            ratio = fmt_ratio(sent, changed, "changed")
            target = "≤ 1.1× changed"
        else:
            ratio = fmt_ratio(sent, literal, "rsync")
            target = "≤ 1× rsync"
        add_row(
            self.report,
            S2,
            f"{what}: wire bytes",
            tandem=f"{fmt_bytes(sent)} ({times(sent, changed)})",
            peer=sync.show(
                lambda s: f"rsync literal {fmt_bytes(s.literal)} ({times(s.literal, changed)})"
            ),
            ratio=ratio,
            target=target,
            values=dict(changed=changed, tandem_sent=sent, rsync_literal=literal),
        )
        add_row(
            self.report,
            S2,
            f"{what}: capture + replicate time",
            tandem=f"{fmt_seconds(scan)} + {fmt_seconds(seconds)}",
            peer=sync.show(lambda s: f"rsync {fmt_seconds(s.seconds)}"),
            ratio=fmt_ratio(scan + seconds, sync.num(lambda s: s.seconds), "rsync time"),
            target="— (report)",
            values=dict(
                tandem_seconds=seconds,
                capture_seconds=scan,
                capture_bytes_sent=int(capture["bytes_sent"]),
                rsync_seconds=sync.num(lambda s: s.seconds),
            ),
        )

    def rsync_delta(self) -> Got[RsyncRun]:
        if not self.has_rsync:
            return Got()
        settle()
        return attempt(
            "rsync", lambda: rsync_delta(self.volume, self.copy, self.scratch, inplace=False)
        )

    def need_bytes(self) -> int:
        # The volume and rsync's copy (and its temporary file), the copy through TLS (removed
        # once measured), prod's pool and dr's pool (each about 3/4 of the volume: the text
        # half compresses), and a margin.
        return int(self.size * 5.5) + GiB


NOTES = (
    "Replication 1: tandem's figure is the replicate job's own duration (started → finished "
    "on the production appliance): the snapshot read from prod's pool, sent over TLS on "
    "loopback in the encoding the receiver can use, verified and made durable in dr's pool, "
    "and committed. rsync copies the same file into an empty directory on this machine "
    "(no network, no TLS, no fsync). Bytes sent: the job's bytes_sent (compressed frames) "
    "against rsync's --stats 'Literal data'. Both sending and receiving appliance, the agent "
    "and rsync share this machine's CPUs. The capture before it (agent → prod) is in --json. "
    "The target compares like with like: the same rsync with its remote shell a TLS 1.3 "
    "tunnel on loopback (openssl s_server ↔ s_client, AES-256-GCM like tandem's peer link; "
    "still no fsync, no verification). Plain local rsync is reported for reference.",
    "Replication 2: tandem's wire bytes are the replicate job's bytes_sent (frames of 64 KiB "
    "sub-block deltas or whole chunks, compressed); rsync's are the --stats 'Literal data' of "
    "a local --no-whole-file --ignore-times sync onto the previous copy (block size ≈ √size), "
    "without its checksum and match traffic. The 4 KiB case follows the 64 KiB case on the "
    "same volume. Time: tandem's capture (the agent reads and hashes the whole volume) plus "
    "its replicate job, against rsync reading both files. Each replica's manifest is checked "
    "equal to its snapshot's.",
)


def run(cfg: Config, report: Report) -> None:
    report.notes.extend(NOTES)
    root = cfg.workdir / "replication"
    root.mkdir(parents=True, exist_ok=True)

    def body(lab: Lab) -> None:
        bench = ReplicationBench(cfg, report, lab)
        free = shutil.disk_usage(root).free
        if free < bench.need_bytes():
            raise RuntimeError(
                f"needs {fmt_bytes(bench.need_bytes())} free in {root}, has {fmt_bytes(free)}"
            )
        bench.run()

    try:
        run_in_lab(root / "lab", report, (S1, S2), body)
    finally:
        shutil.rmtree(root, ignore_errors=True)
