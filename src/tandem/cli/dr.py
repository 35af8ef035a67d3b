"""DR lifecycle commands: test-failover, failover, mount, unmount (SPEC §2, §3, §6)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer

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


NewVmOpt = Annotated[
    str | None,
    typer.Option("--new-vm", help="A vm app: the new VM (libvirt domain) to define at HOST."),
]
NetworkOpt = Annotated[
    str | None, typer.Option("--network", help="The new VM's libvirt network (none by default).")
]
PowerOnOpt = Annotated[bool, typer.Option("--power-on", help="Start the new VM.")]


def _vm_options(new_vm: str | None, network: str | None, power_on: bool) -> dict[str, Any]:
    """The new-VM fields of a request, only when given (other apps' requests stay as they were)."""
    out: dict[str, Any] = {}
    if new_vm:
        out["new_vm"] = new_vm
    if network:
        out["network"] = network
    if power_on:
        out["power_on"] = True
    return out


@handle_errors
def test_failover(
    app: AppName,
    host: Host,
    image: Annotated[
        str | None, typer.Option("--image", help="A replica (default: newest).")
    ] = None,
    mount_point: MountPoint = None,
    action: ActionOpt = None,
    new_vm: NewVmOpt = None,
    network: NetworkOpt = None,
    power_on: PowerOnOpt = False,
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
        **_vm_options(new_vm, network, power_on),
    }
    with connect(url, token, fingerprint) as client:
        answer = client.post(api_path("/api/v1/apps", checked_app(app), "test-failover"), body)
        follow_job(client, job_of(client, answer), json_=json_, no_wait=no_wait)


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
    new_vm: NewVmOpt = None,
    network: NetworkOpt = None,
    power_on: PowerOnOpt = False,
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
        **_vm_options(new_vm, network, power_on),
    }
    with connect(url, token, fingerprint) as client:
        answer = client.post(api_path("/api/v1/apps", checked_app(app), "failover"), body)
        follow_job(client, job_of(client, answer), json_=json_, no_wait=no_wait)


@handle_errors
def mount(
    image: ImageId,
    host: Host,
    mount_point: MountPoint = None,
    action: ActionOpt = None,
    new_vm: NewVmOpt = None,
    network: NetworkOpt = None,
    power_on: PowerOnOpt = False,
    no_wait: NoWait = False,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Present any image to HOST as a writable virtual copy."""
    body = {
        "host": host,
        "mount_point": mount_point,
        "action": action.value if action else None,
        **_vm_options(new_vm, network, power_on),
    }
    with connect(url, token, fingerprint) as client:
        answer = client.post(api_path("/api/v1/images", checked_image(image), "mount"), body)
        follow_job(client, job_of(client, answer), json_=json_, no_wait=no_wait)


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
        doc = client.post(api_path("/api/v1/images", checked_image(image), "unmount"), {})
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
        body = {"label": label} if label else {}
        answer = client.post(api_path("/api/v1/apps", checked_app(app), "syncback"), body)
        follow_job(client, job_of(client, answer), json_=json_, no_wait=no_wait)


class Target(StrEnum):
    original = "original"
    restored = "restored"
    new = "new"


@handle_errors
def failback(
    app: AppName,
    target: Annotated[
        Target | None,
        typer.Option(
            "--target",
            help="Replica style: fail back to the original app, one restored at a new "
            "location, or a new one (default: snapshot style).",
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option("--host", help="restored/new: the production host.")
    ] = None,
    path: Annotated[
        str | None, typer.Option("--path", help="restored/new: the path on that host.")
    ] = None,
    power_on: Annotated[
        bool, typer.Option("--power-on", help="Start the app at production afterwards.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Snapshot style: even though no syncback was made.")
    ] = False,
    no_wait: NoWait = False,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Fail APP back to production (DR appliance).

    Without --target: the snapshot style (after the final syncback was restored):
    cleans up the DR site and resumes mirroring. With --target: the replica style, which
    sends the differences to the target itself, takes a protective snapshot and leaves the
    failback pending until `commit-failback` or `undo-failback`.
    """
    body = {
        "force": force,
        "target": target.value if target else None,
        "host": host,
        "path": path,
        "power_on": power_on,
    }
    with connect(url, token, fingerprint) as client:
        answer = client.post(api_path("/api/v1/apps", checked_app(app), "failback"), body)
        follow_job(client, job_of(client, answer), json_=json_, no_wait=no_wait)


def _end(
    app: str,
    which: str,
    no_wait: bool,
    url: str | None,
    token: str | None,
    fingerprint: str | None,
    json_: bool,
    body: dict[str, bool] | None = None,
) -> None:
    with connect(url, token, fingerprint) as client:
        answer = client.post(api_path("/api/v1/apps", checked_app(app), which), body or {})
        follow_job(client, job_of(client, answer), json_=json_, no_wait=no_wait)


@handle_errors
def commit_failback(
    app: AppName,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Commit although the DR copy was written after the protective snapshot "
            "(those writes are lost).",
        ),
    ] = False,
    no_wait: NoWait = False,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Production works: end a replica-style failback, resume protection (DR appliance)."""
    _end(app, "commit-failback", no_wait, url, token, fingerprint, json_, {"force": force})


@handle_errors
def undo_failback(
    app: AppName,
    no_wait: NoWait = False,
    url: Url = None,
    token: Token = None,
    fingerprint: Fingerprint = None,
    json_: Json = False,
) -> None:
    """Back to the DR copy in its pre-failback state (protective snapshot) (DR appliance)."""
    _end(app, "undo-failback", no_wait, url, token, fingerprint, json_)


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
        answer = client.post(api_path("/api/v1/images", checked_image(image), "clone"), body)
        follow_job(client, job_of(client, answer), json_=json_, no_wait=no_wait)
