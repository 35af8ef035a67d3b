"""Lifecycle commands that start jobs (capture, restore, image delete) and image commands."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from tandem.domain.rules import RESTORE_CONFIRMATIONS, check_confirmations
from tandem.errors import ConfirmationOutOfOrder, ConfirmationRequired, RemoteError
from tandem.transport.client import api_path

from .common import (
    Fingerprint,
    Json,
    NoWait,
    Token,
    Url,
    checked_app,
    checked_image,
    connect,
)
from .jobs import follow_job, job_of
from .output import emit_json, fail, handle_errors, human_bytes, stdout

image_app = typer.Typer(no_args_is_help=True, help="One image: show, export, verify, delete.")

AppName = Annotated[str, typer.Argument(help="The application.", metavar="APP")]
ImageId = Annotated[str, typer.Argument(help="The image's id.", metavar="IMAGE")]


@handle_errors
def capture(
    app: AppName,
    label: Annotated[str | None, typer.Option("--label", help="A label for the image.")] = None,
    no_wait: NoWait = False,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Capture a snapshot of APP now."""
    with connect(url, token, fingerprint) as client:
        body = {"label": label} if label else {}
        answer = client.post(api_path("/api/v1/apps", checked_app(app), "capture"), body)
        follow_job(client, job_of(client, answer), json_=json_, no_wait=no_wait)


@handle_errors
def restore(
    app: AppName,
    image: Annotated[str, typer.Option("--image", help="The image to restore.")],
    confirm: Annotated[
        list[str] | None,
        typer.Option(
            "--confirm",
            help='Typed confirmations: --confirm "DATA LOSS" --confirm "OVERWRITE OTHER APPS".',
        ),
    ] = None,
    no_wait: NoWait = False,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Diff-restore an image onto the production application (stops and restarts it)."""
    typed = list(confirm or [])
    # The appliance checks the confirmations itself; the client only refuses an order the
    # server would refuse too ("DATA LOSS" answers the first warning, then the second).
    try:
        check_confirmations(typed, RESTORE_CONFIRMATIONS)
    except ConfirmationOutOfOrder:
        raise
    except ConfirmationRequired:
        pass  # the server names what is missing
    with connect(url, token, fingerprint) as client:
        body = {"image": image, "confirm": typed}
        answer = client.post(api_path("/api/v1/apps", checked_app(app), "restore"), body)
        follow_job(client, job_of(client, answer), json_=json_, no_wait=no_wait)


def images_table(rows: list[dict[str, Any]]) -> Table:
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


@handle_errors
def images(
    app: AppName,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """APP's images on this appliance, newest first."""
    with connect(url, token, fingerprint) as client:
        rows = client.get(api_path("/api/v1/apps", checked_app(app), "images"))
    if json_:
        emit_json(rows)
    else:
        stdout.print(images_table(rows))
        window = rows[0].get("window") if rows else None
        if window:  # a PostgreSQL app: what it can be recovered to here
            shown = f"{window.get('start') or '—'} → {window.get('end') or '—'}"
            gap = f" (WAL gap at {window['gap']})" if window.get("gap") else ""
            stdout.print(f"recoverable window: {shown}{gap}", highlight=False)


@image_app.command("show")
@handle_errors
def image_show(
    image: ImageId,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """One image."""
    with connect(url, token, fingerprint) as client:
        doc = client.get(api_path("/api/v1/images", checked_image(image)))
    if json_:
        emit_json(doc)
        return
    for key in ("id", "app", "kind", "created", "label", "size", "state", "manifest", "parent"):
        value = doc.get(key)
        stdout.print(f"{key:9} {'' if value is None else value}", highlight=False)


@image_app.command("export")
@handle_errors
def image_export(
    image: ImageId,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """The NBD export (URI with its secret) of a presented image (operator; audited)."""
    with connect(url, token, fingerprint) as client:
        doc = client.post(api_path("/api/v1/images", checked_image(image), "export"))
    uri = doc.get("nbd_uri") if isinstance(doc, dict) else None
    if not isinstance(uri, str):
        raise RemoteError(
            what=client.what, name=client.name, detail=f"it answered {str(doc)[:200]}"
        )
    if json_:
        emit_json(doc)
    else:
        stdout.print(uri, highlight=False, soft_wrap=True)


@image_app.command("verify")
@handle_errors
def image_verify(
    image: ImageId,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Read and check every chunk of an image; exit 1 if any is missing or corrupt."""
    with connect(url, token, fingerprint) as client:
        report = client.get(api_path("/api/v1/images", checked_image(image), "verify"))
    if json_:
        emit_json(report)
    else:
        stdout.print(
            f"{report['image']}: {report['chunks']} chunk(s), {human_bytes(report['bytes'])} "
            f"verified; {len(report['missing'])} missing, {len(report['bad'])} bad",
            highlight=False,
        )
    if not report["ok"]:
        raise fail(
            f"image {image} is damaged: {len(report['missing'])} chunk(s) missing, "
            f"{len(report['bad'])} corrupt; capture the application again"
        )


@image_app.command("delete")
@handle_errors
def image_delete(
    image: ImageId,
    no_wait: NoWait = False,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Delete an image (a job: the pool's unreferenced chunks are collected too)."""
    with connect(url, token, fingerprint) as client:
        answer = client.delete(api_path("/api/v1/images", checked_image(image)))
        follow_job(client, job_of(client, answer), json_=json_, no_wait=no_wait)


@handle_errors
def audit(
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """The audit trail of state-changing calls (admin)."""
    with connect(url, token, fingerprint) as client:
        rows = client.get("/api/v1/audit", limit=limit)
    if json_:
        emit_json(rows)
        return
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
    stdout.print(table)
