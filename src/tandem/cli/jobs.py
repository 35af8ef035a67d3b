"""The Monitor (`tandem jobs`, `tandem job …`) and how every job-starting command ends.

Contract (CLI.md): a command that starts a job waits for it by default with a progress bar
on stderr; ``--no-wait`` returns at once; the exit status is 0 only if the job succeeded;
with ``--json`` exactly one document ``{"job": {...}[, "image": {...}][, "nbd_uri": …
[, "nbd_fingerprint": …]]}`` goes to stdout. ``nbd_uri`` is the export of a presented
volume, taken from the result of the job the caller started (the appliance shows it to
that caller only, and to admins); ``nbd_fingerprint``, for an ``nbds://`` export, is the
certificate the NBD client pins.
An answer that is not the document a command expects is a one-line error, never a crash.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tandem.errors import NotFound
from tandem.transport.api import GcIn, checked
from tandem.transport.client import ApplianceClient

from .common import Session, api_command, checked_job, job_of
from .output import byte_progress, emit_json, fail, human_bytes, plain, real, stderr, stdout

if TYPE_CHECKING:  # Rich is imported when a table is made (tandem.cli.output)
    from rich.table import Table

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
POLL = 0.25
"""Seconds between progress updates while a command waits for its job: each is a long poll
(``GET /jobs/{id}?wait=POLL``) that the appliance answers as soon as the job ends, so a job
that takes 50 ms costs its caller about 50 ms, not a poll interval."""
WATCH_POLL = 1.0

job_app = typer.Typer(no_args_is_help=True, help="Show, follow and cancel one job.")


def _describe(job: dict[str, Any]) -> str:
    return f"{job['type']} {job.get('app') or ''}".strip()


RECOVERY_KEYS = (
    "recovered_to",
    "target",
    "port",
    "socket_dir",
    "base",
    "wal_segments",
    "window",
    "amcheck",
)


def _finish(client: ApplianceClient, job: dict[str, Any], json_: bool) -> None:
    """Render a job that ended (or was not waited for); raise the exit status it implies."""
    doc: dict[str, Any] = {"job": job}
    if job.get("image"):
        # The image may have gone since (a restore's source deleted meanwhile).
        with contextlib.suppress(NotFound):
            doc["image"] = plain(client.image(job["image"]))
    result = job.get("result")
    if isinstance(result, dict) and result.get("nbd_uri"):
        doc["nbd_uri"] = result["nbd_uri"]  # CLI.md: a presented volume's export
        if result.get("nbd_fingerprint"):  # over TLS (nbds://): the certificate to pin
            doc["nbd_fingerprint"] = result["nbd_fingerprint"]
    if isinstance(result, dict) and "recovered_to" in result:  # a database recovered
        doc["recovery"] = {k: result.get(k) for k in RECOVERY_KEYS}
    if json_:
        emit_json(doc)
    else:
        line = f"{job['id']} {_describe(job)}: {job['status']}"
        if job.get("message"):
            line += f" — {job['message']}"
        stdout.print(line, highlight=False, soft_wrap=True)
    if job["status"] in ("failed", "canceled"):
        raise fail(f"job {job['id']} ({_describe(job)}) {job['status']}: {job['message']}")


def _wait_a_little(client: ApplianceClient, job_id: str) -> dict[str, Any]:
    """The job after at most POLL seconds of waiting for it to end (see POLL)."""
    started = time.monotonic()
    job: dict[str, Any] = plain(client.job(job_id, wait=POLL))
    if job["status"] not in TERMINAL:
        # An appliance that does not know ``wait`` answers at once: poll as before.
        time.sleep(max(0.0, POLL - (time.monotonic() - started)))
    return job


def follow_job(client: ApplianceClient, job: dict[str, Any], *, json_: bool, no_wait: bool) -> None:
    """End a job-starting command: wait (showing progress) unless ``no_wait``, then render."""
    if no_wait:
        if json_:
            emit_json({"job": job})
        else:
            stdout.print(f"{job['id']} {_describe(job)}: {job['status']}", highlight=False)
        return
    _finish(client, wait_job(client, job), json_)


def wait_job(client: ApplianceClient, job: dict[str, Any]) -> dict[str, Any]:
    """Wait for ``job`` to end, showing its progress; the job as it ended."""
    job_id = job["id"]
    try:
        with byte_progress(_describe(job)) as progress:
            task = progress.add_task(f"{_describe(job)} ({job['status']})", total=None)
            while job["status"] not in TERMINAL:
                job = _wait_a_little(client, job_id)
                total = int(job.get("bytes_total") or 0)
                progress.update(
                    task,
                    total=total or None,
                    completed=int(job.get("bytes_done") or 0),
                    description=f"{_describe(job)} ({job['status']})",
                )
    except KeyboardInterrupt:
        raise fail(
            f"stopped waiting; job {job_id} goes on (`tandem job show {job_id}`, "
            f"`tandem job cancel {job_id}`)",
            130,
        ) from None
    return job


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD)
    for name in ("id", "type", "app", "status"):
        table.add_column(name, no_wrap=True)
    table.add_column("sent", justify="right", no_wrap=True)
    table.add_column("message", overflow="fold")
    for job in jobs:
        status = job["status"]
        total = int(job.get("bytes_total") or 0)
        if status == "running" and total:
            status += f" {100 * int(job['bytes_done']) // total}%"
        table.add_row(
            job["id"],
            job["type"],
            job.get("app") or "",
            status,
            human_bytes(int(job.get("bytes_sent") or 0)),
            job.get("message") or "",
        )
    return table


@api_command
def jobs(
    s: Session,
    app: Annotated[str | None, typer.Option("--app", help="Only this application's jobs.")] = None,
    status: Annotated[
        list[str] | None, typer.Option("--status", help="Only jobs in this status (repeatable).")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    after: Annotated[
        str | None,
        typer.Option("--after", help="Only jobs older than this job id (the next page)."),
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", help="Refresh until none of the jobs is queued or running.")
    ] = False,
) -> None:
    """The Monitor: jobs, newest first."""

    def fetch() -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = plain(
            s.api.jobs(app=app, limit=limit, after=after, status=status or None)
        )
        return answer

    rows = fetch()
    if watch:
        # Live output goes to stderr when stdout carries the one JSON document.
        from rich.live import Live

        console = real(stderr if s.json else stdout)
        with Live(jobs_table(rows), console=console, refresh_per_second=4) as live:
            while any(job["status"] not in TERMINAL for job in rows):
                time.sleep(WATCH_POLL)
                rows = fetch()
                live.update(jobs_table(rows))
        if not s.json:
            return
    s.emit(rows, jobs_table)


JobId = Annotated[str, typer.Argument(help="The job's id.", metavar="ID")]
JOB_KEYS = (
    "id",
    "type",
    "app",
    "image",
    "status",
    "message",
    "bytes_total",
    "bytes_done",
    "bytes_sent",
    "created",
    "started",
    "finished",
    "actor",
)


@job_app.command("show")
@api_command
def job_show(s: Session, job_id: JobId) -> None:
    """A job's status, progress, timings and message."""

    def render(job: dict[str, Any]) -> None:
        for key in JOB_KEYS:
            value = job.get(key)
            if key.startswith("bytes_"):
                value = f"{human_bytes(int(value or 0))} ({value})"
            stdout.print(f"{key:12} {'' if value is None else value}", highlight=False)

    s.emit(s.api.job(checked_job(job_id)), render)


@job_app.command("log")
@api_command
def job_log(s: Session, job_id: JobId) -> None:
    """A job's log lines, oldest first."""

    def render(lines: list[dict[str, Any]]) -> None:
        for line in lines:
            stdout.print(
                f"{line['ts'][:19]} {line['level']:7} {line['text']}", highlight=False, markup=False
            )

    s.emit(s.api.job_log(checked_job(job_id)), render)


@job_app.command("cancel")
@api_command
def job_cancel(s: Session, job_id: JobId) -> None:
    """Cancel a queued job, or ask a running one to stop."""
    answer = plain(s.api.cancel_job(checked_job(job_id)))
    job = job_of(s.api, answer)
    state = "cancel requested" if job["status"] == "running" else job["status"]
    s.emit(
        answer, lambda _: stdout.print(f"{job['id']} {_describe(job)}: {state}", highlight=False)
    )


@api_command
def gc(
    s: Session,
    status: Annotated[
        bool, typer.Option("--status", help="Show what waits for collection; start nothing.")
    ] = False,
    after_deletions: Annotated[
        int | None,
        typer.Option(help="Set: collect by itself once this many images were deleted."),
    ] = None,
    every: Annotated[
        int | None,
        typer.Option(help="Set: collect by itself when this many seconds passed since the last."),
    ] = None,
    keep_job_days: Annotated[
        int | None, typer.Option(help="Set: delete job rows that ended this many days ago.")
    ] = None,
    full_every: Annotated[
        int | None,
        typer.Option(
            help="Set: make a full collection (which also finds what no image ever named) "
            "after this many seconds; the others count only what changed."
        ),
    ] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Do not wait for the job.")] = False,
) -> None:
    """Collect the pool's garbage now (a `gc` job), or show or set when it runs by itself."""
    settings = {
        "after_deletions": after_deletions,
        "every_seconds": every,
        "keep_job_days": keep_job_days,
        "full_every_seconds": full_every,
    }
    changes = {k: v for k, v in settings.items() if v is not None}
    if not status and not changes:
        s.follow(s.api.collect_garbage(), no_wait=no_wait)
        return

    def render(doc: dict[str, Any]) -> None:
        for key, value in doc.items():
            stdout.print(f"{key:18} {'' if value is None else value}", highlight=False)

    s.emit(s.api.set_gc(checked(GcIn, **changes)) if changes else s.api.gc_settings(), render)
