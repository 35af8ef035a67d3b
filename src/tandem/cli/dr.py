"""DR lifecycle commands: test-failover, failover, mount, unmount (SPEC §2, §3, §6)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from .common import Fingerprint, Json, NoWait, Token, Url, connect
from .jobs import follow_job
from .output import emit_json, handle_errors, stdout

AppName = Annotated[str, typer.Argument(help="The application.", metavar="APP")]
ImageId = Annotated[str, typer.Argument(help="The image's id.", metavar="IMAGE")]
Host = Annotated[str, typer.Option("--host", help="The host to present the image to.")]
MountPoint = Annotated[
    str | None,
    typer.Option("--mount-point", help="Full path on the host (a missing folder is created)."),
]


class Action(StrEnum):
    keep_source_path = "keep-source-path"
    specify = "specify"
    map_only = "map-only"


ActionOpt = Annotated[
    Action | None,
    typer.Option(
        "--action",
        help="keep-source-path, specify (with --mount-point) or map-only (volume: NBD only).",
    ),
]


@handle_errors
def test_failover(
    app: AppName,
    host: Host,
    image: Annotated[
        str | None, typer.Option("--image", help="A replica (default: newest).")
    ] = None,
    mount_point: MountPoint = None,
    action: ActionOpt = None,
    no_wait: NoWait = False,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Present a writable copy of a replica to HOST; replication goes on (DR appliance)."""
    body = {
        "host": host,
        "image": image,
        "mount_point": mount_point,
        "action": action.value if action else None,
    }
    with connect(url, token, fingerprint) as client:
        answer = client.post(f"/api/v1/apps/{app}/test-failover", body)
        follow_job(client, answer["job"], json_=json_, no_wait=no_wait)


@handle_errors
def failover(
    app: AppName,
    host: Host,
    confirm: Annotated[
        list[str] | None, typer.Option("--confirm", help="Type FAILOVER to confirm.")
    ] = None,
    image: Annotated[
        str | None, typer.Option("--image", help="A replica (default: newest).")
    ] = None,
    mount_point: MountPoint = None,
    action: ActionOpt = None,
    label: Annotated[str | None, typer.Option("--label", help="A label for the image.")] = None,
    no_wait: NoWait = False,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Bring APP up at the DR site from its replica; replication stops (DR appliance)."""
    body = {
        "host": host,
        "confirm": list(confirm or []),
        "image": image,
        "mount_point": mount_point,
        "action": action.value if action else None,
        "label": label,
    }
    with connect(url, token, fingerprint) as client:
        answer = client.post(f"/api/v1/apps/{app}/failover", body)
        follow_job(client, answer["job"], json_=json_, no_wait=no_wait)


@handle_errors
def mount(
    image: ImageId,
    host: Host,
    mount_point: MountPoint = None,
    action: ActionOpt = None,
    no_wait: NoWait = False,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Present any image to HOST as a writable virtual copy."""
    body = {"host": host, "mount_point": mount_point, "action": action.value if action else None}
    with connect(url, token, fingerprint) as client:
        answer = client.post(f"/api/v1/images/{image}/mount", body)
        follow_job(client, answer["job"], json_=json_, no_wait=no_wait)


@handle_errors
def unmount(
    image: ImageId,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Take a presented image away from its host (its row stays until `image delete`)."""
    with connect(url, token, fingerprint) as client:
        doc = client.post(f"/api/v1/images/{image}/unmount", {})
    if json_:
        emit_json(doc)
    else:
        stdout.print(f"unmounted {doc['id']}")


@handle_errors
def syncback(
    app: AppName,
    label: Annotated[str | None, typer.Option("--label", help="A label for the image.")] = None,
    no_wait: NoWait = False,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Send what was written at the DR site home as a new syncback image (DR appliance)."""
    with connect(url, token, fingerprint) as client:
        answer = client.post(f"/api/v1/apps/{app}/syncback", {"label": label} if label else {})
        follow_job(client, answer["job"], json_=json_, no_wait=no_wait)


@handle_errors
def failback(
    app: AppName,
    force: Annotated[
        bool, typer.Option("--force", help="Fail back even though no syncback was made.")
    ] = False,
    no_wait: NoWait = False,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Snapshot-style failback: clean up the DR site, resume mirroring (DR appliance)."""
    with connect(url, token, fingerprint) as client:
        answer = client.post(f"/api/v1/apps/{app}/failback", {"force": force})
        follow_job(client, answer["job"], json_=json_, no_wait=no_wait)


@handle_errors
def clone(
    image: ImageId,
    host: Host,
    path: Annotated[str, typer.Option("--path", help="Full path on the host (must be new).")],
    name: Annotated[str | None, typer.Option("--name", help="The new application's name.")] = None,
    no_wait: NoWait = False,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """A full, independent copy of IMAGE as a new application on HOST."""
    body = {"host": host, "path": path, "name": name}
    with connect(url, token, fingerprint) as client:
        answer = client.post(f"/api/v1/images/{image}/clone", body)
        follow_job(client, answer["job"], json_=json_, no_wait=no_wait)
