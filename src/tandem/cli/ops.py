"""Lifecycle commands that start jobs (capture, restore, image delete) and image commands."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from tandem.domain.rules import RESTORE_CONFIRMATIONS, check_confirmations
from tandem.errors import ConfirmationOutOfOrder, ConfirmationRequired, Forbidden
from tandem.transport.api import CaptureIn, JobAnswer, RestoreIn, VerifyOut, checked

from .common import (
    AppName,
    ImageId,
    Label,
    Session,
    api_command,
    checked_app,
    checked_image,
    job_command,
)
from .jobs import wait_job
from .output import fail, human_bytes, plain, stdout

if TYPE_CHECKING:  # Rich is imported when a table is made (tandem.cli.output)
    from rich.console import Group
    from rich.table import Table

image_app = typer.Typer(no_args_is_help=True, help="One image: show, export, verify, delete.")


@job_command
def capture(s: Session, app: AppName, label: Label = None) -> JobAnswer:
    """Capture a snapshot of APP now."""
    return s.api.capture(checked_app(app), checked(CaptureIn, label=label))


@job_command
def restore(
    s: Session,
    app: AppName,
    image: Annotated[str, typer.Option("--image", help="The image to restore.")],
    confirm: Annotated[
        list[str] | None,
        typer.Option(
            "--confirm",
            help='Typed confirmations: --confirm "DATA LOSS" --confirm "OVERWRITE OTHER APPS".',
        ),
    ] = None,
    power_on: Annotated[
        bool, typer.Option("--power-on", help="A VM: start it once restored.")
    ] = False,
    shutdown_timeout: Annotated[
        float | None,
        typer.Option(
            "--shutdown-timeout",
            help="A VM: seconds its graceful shutdown may take before it is powered off "
            "(default 120).",
        ),
    ] = None,
    time_: Annotated[
        str | None,
        typer.Option(
            "--time",
            help="A catch-up syncback of a PostgreSQL app: roll it forward to this time "
            '("YYYY-MM-DD HH:MM:SS", UTC unless an offset is given).',
        ),
    ] = None,
    latest: Annotated[
        bool,
        typer.Option(
            "--latest",
            help="A catch-up syncback of a PostgreSQL app: roll it forward to the newest WAL "
            "held (the default).",
        ),
    ] = False,
) -> JobAnswer:
    """Diff-restore an image onto the production application (stops and restarts it; a VM
    is powered off by the restore, and started with --power-on). A catch-up syncback of a
    PostgreSQL app is rolled forward with the DR site's WAL pushed home, to --time or the
    newest WAL held."""
    typed = list(confirm or [])
    # The appliance checks the confirmations itself; the client only refuses an order the
    # server would refuse too ("DATA LOSS" answers the first warning, then the second).
    try:
        check_confirmations(typed, RESTORE_CONFIRMATIONS)
    except ConfirmationOutOfOrder:
        raise
    except ConfirmationRequired:
        pass  # the server names what is missing
    body = checked(
        RestoreIn,
        image=checked_image(image),
        confirm=typed,
        power_on=power_on,
        **({"shutdown_timeout": shutdown_timeout} if shutdown_timeout is not None else {}),
        **({"time": time_} if time_ is not None else {}),
        **({"latest": True} if latest else {}),
    )
    return s.api.restore(checked_app(app), body)


def images_view(rows: list[dict[str, Any]]) -> Table | Group:
    """The images table; for a PostgreSQL app, with its recoverable window under it."""
    from rich.console import Group
    from rich.text import Text

    table = images_table(rows)
    window = rows[0].get("window") if rows else None
    if not window:
        return table
    shown = f"{window.get('start') or '—'} → {window.get('end') or '—'}"
    gap = f" (WAL gap at {window['gap']})" if window.get("gap") else ""
    return Group(table, Text(f"recoverable window: {shown}{gap}"))


def images_table(rows: list[dict[str, Any]]) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(
        "id", "kind", "created", "size", "label", "state", "consistency", box=box.SIMPLE_HEAD
    )
    for row in rows:
        table.add_row(
            row["id"],
            row["kind"],
            row["created"][:19],
            human_bytes(int(row.get("size") or 0)),
            row.get("label") or "",
            row["state"],
            row.get("consistency") or "",
        )
    return table


@api_command
def images(s: Session, app: AppName) -> None:
    """APP's images on this appliance, newest first."""
    s.emit(s.api.images(checked_app(app)), images_view)


@image_app.command("show")
@api_command
def image_show(s: Session, image: ImageId) -> None:
    """One image."""
    keys = ("id", "app", "kind", "created", "label", "size", "state", "manifest", "parent")
    s.show(s.api.image(checked_image(image)), keys)


@image_app.command("export")
@api_command
def image_export(s: Session, image: ImageId) -> None:
    """The NBD export (URI with its secret) of a presented image (operator; audited)."""
    doc = s.api.export_image(checked_image(image))
    s.emit(doc, lambda _: stdout.print(doc.nbd_uri, highlight=False, soft_wrap=True))


@image_app.command("verify")
@api_command
def image_verify(s: Session, image: ImageId) -> None:
    """Read and check every chunk of an image (a job, shown in the Monitor); exit 1 if any
    is missing or corrupt. A viewer's token may not start jobs: it gets the same check
    answered in the call."""
    try:
        started = s.api.start("POST /images/{image_id}/verify", checked_image(image))
    except Forbidden:
        report = s.api.verify_image(checked_image(image))
    else:
        job = wait_job(s.api, plain(started.job))
        if job["status"] != "succeeded":
            raise fail(f"job {job['id']} (verify {image}) {job['status']}: {job['message']}")
        report = VerifyOut.model_validate(job["result"])
    s.emit(
        report,
        lambda r: stdout.print(
            f"{r['image']}: {r['chunks']} chunk(s), {human_bytes(r['bytes'])} "
            f"verified; {len(r['missing'])} missing, {len(r['bad'])} bad",
            highlight=False,
        ),
    )
    if not report.ok:
        raise fail(
            f"image {image} is damaged: {len(report.missing)} chunk(s) missing, "
            f"{len(report.bad)} corrupt; capture the application again"
        )


@image_app.command("delete")
@job_command
def image_delete(s: Session, image: ImageId) -> JobAnswer:
    """Delete an image (a job: the pool's unreferenced chunks are collected too)."""
    return s.api.delete_image(checked_image(image))


def audit_table(rows: list[dict[str, Any]]) -> Table:
    from rich import box
    from rich.table import Table

    table = Table("ts", "actor", "role", "method", "path", "status", box=box.SIMPLE_HEAD)
    for row in rows:
        table.add_row(
            row["ts"][:19],
            row.get("actor") or "",
            row.get("role") or "",
            row["method"],
            row["path"],
            str(row["status"]),
        )
    return table


@api_command
def audit(
    s: Session, limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50
) -> None:
    """The audit trail of state-changing calls (admin)."""
    s.emit(s.api.audit(limit), audit_table)
