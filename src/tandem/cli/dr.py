"""DR lifecycle commands: test-failover, failover, mount, unmount (SPEC §2, §3, §6).

Each job command builds the operation's parameters and starts it; ``job_command`` follows
the job (see ``tandem.cli.common``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer

from tandem.transport.api import (
    CaptureIn,
    CloneIn,
    CommitFailbackIn,
    FailbackIn,
    FailoverIn,
    JobAnswer,
    MountIn,
    PresentIn,
    checked,
)

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

Host = Annotated[str, typer.Option("--host", help="The host to present the image to.")]
MountPoint = Annotated[
    str | None,
    typer.Option("--mount-point", help="Full path on the host (a missing folder is created)."),
]
Replica = Annotated[str | None, typer.Option("--image", help="A replica (default: newest).")]


class Action(StrEnum):
    keep_source_path = "keep-source-path"
    specify = "specify"
    map_only = "map-only"
    copy = "copy"


PitTime = Annotated[
    str | None,
    typer.Option(
        "--time",
        help='A PostgreSQL app: recover to this time, "YYYY-MM-DD HH:MM:SS" (UTC unless an '
        "offset is given).",
    ),
]
Latest = Annotated[
    bool, typer.Option("--latest", help="A PostgreSQL app: recover to the newest WAL held.")
]
Port = Annotated[
    int | None,
    typer.Option("--port", help="A PostgreSQL app: the port the recovered server listens on."),
]


def pit_fields(time_: str | None, latest: bool, port: int | None) -> dict[str, object]:
    """The point-in-time options given (none: the request is as before)."""
    fields: dict[str, object] = {}
    if time_ is not None:
        fields["time"] = time_
    if latest:
        fields["latest"] = True
    if port is not None:
        fields["port"] = port
    return fields


ActionOpt = Annotated[
    Action | None,
    typer.Option(
        "--action",
        help="keep-source-path, specify (with --mount-point), map-only (volume: NBD only), or "
        "copy (a full plain copy at --mount-point or the source path; a file tree is "
        "otherwise a virtual copy through FUSE; a new VM's disks copied into --pool).",
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
PoolOpt = Annotated[
    str | None,
    typer.Option(
        "--pool",
        help="The new VM's datastore: an active libvirt storage pool of HOST (with --action "
        "copy its disks are copied there as qcow2 volumes).",
    ),
]


VmOpt = Annotated[
    str | None,
    typer.Option(
        "--vm",
        help="A vm app: an existing domain of HOST to run the image as: it is powered off and "
        "its disks are replaced by the appliance's export until the image is withdrawn (its "
        'own definition then comes back). Needs --confirm "REPLACE VM".',
    ),
]
ShutdownTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--shutdown-timeout",
        help="With --vm: seconds the domain's graceful shutdown may take before it is "
        "powered off (default 120).",
    ),
]
ConfirmOpt = Annotated[
    list[str] | None,
    typer.Option("--confirm", help='With --vm: type "REPLACE VM" to confirm.'),
]


def _vm_options(
    new_vm: str | None,
    network: str | None,
    power_on: bool,
    pool: str | None = None,
    vm: str | None = None,
    shutdown_timeout: float | None = None,
) -> dict[str, Any]:
    """The VM fields of a request, only when given (other apps' requests stay as they were)."""
    out: dict[str, Any] = {}
    if new_vm:
        out["new_vm"] = new_vm
    if vm:
        out["vm"] = vm
    if shutdown_timeout is not None:
        out["shutdown_timeout"] = shutdown_timeout
    if network:
        out["network"] = network
    if pool:
        out["pool"] = pool
    if power_on:
        out["power_on"] = True
    return out


VerifyOpt = Annotated[
    bool, typer.Option("--verify", help="A PostgreSQL app: run pg_amcheck on the recovered copy.")
]


@job_command
def test_failover(
    s: Session,
    app: AppName,
    host: Host,
    image: Replica = None,
    mount_point: MountPoint = None,
    action: ActionOpt = None,
    time_: PitTime = None,
    latest: Latest = False,
    port: Port = None,
    new_vm: NewVmOpt = None,
    network: NetworkOpt = None,
    power_on: PowerOnOpt = False,
    pool: PoolOpt = None,
    verify: VerifyOpt = False,
    vm: VmOpt = None,
    shutdown_timeout: ShutdownTimeoutOpt = None,
    confirm: ConfirmOpt = None,
) -> JobAnswer:
    """Present a writable copy of a replica to HOST; replication goes on (DR appliance).
    A PostgreSQL app is recovered to --time or --latest and started."""
    params = {
        "host": host,
        "image": checked_image(image) if image else None,
        "mount_point": mount_point,
        "action": action,
        **pit_fields(time_, latest, port),
        **_vm_options(new_vm, network, power_on, pool, vm, shutdown_timeout),
        **({"verify": True} if verify else {}),
        **({"confirm": list(confirm)} if confirm else {}),
    }
    return s.api.test_failover(checked_app(app), checked(PresentIn, **params))


@job_command
def failover(
    s: Session,
    app: AppName,
    host: Host,
    confirm: Annotated[
        list[str] | None,
        typer.Option(
            "--confirm", help='Type FAILOVER to confirm (with --vm, then "REPLACE VM" too).'
        ),
    ] = None,
    image: Replica = None,
    mount_point: MountPoint = None,
    action: ActionOpt = None,
    label: Label = None,
    time_: PitTime = None,
    latest: Latest = False,
    port: Port = None,
    new_vm: NewVmOpt = None,
    network: NetworkOpt = None,
    power_on: PowerOnOpt = False,
    pool: PoolOpt = None,
    hosts: Annotated[
        str | None,
        typer.Option(
            "--hosts",
            help="A vm app: also define the failed-over VM, powered off, on these hypervisor "
            "hosts (H1,H2); it starts on --host.",
        ),
    ] = None,
    all_hosts: Annotated[
        bool,
        typer.Option("--all-hosts", help="A vm app: define it on every hypervisor host here."),
    ] = False,
    verify: VerifyOpt = False,
    vm: VmOpt = None,
    shutdown_timeout: ShutdownTimeoutOpt = None,
) -> JobAnswer:
    """Bring APP up at the DR site from its replica; replication stops (DR appliance).
    A PostgreSQL app is recovered to --time or (default) --latest and started."""
    params = {
        "host": host,
        "confirm": list(confirm or []),
        "image": checked_image(image) if image else None,
        "mount_point": mount_point,
        "action": action,
        "label": label,
        **pit_fields(time_, latest, port),
        **_vm_options(new_vm, network, power_on, pool, vm, shutdown_timeout),
        **({"hosts": [h.strip() for h in hosts.split(",") if h.strip()]} if hosts else {}),
        **({"all_hosts": True} if all_hosts else {}),
        **({"verify": True} if verify else {}),
    }
    return s.api.failover(checked_app(app), checked(FailoverIn, **params))


@job_command
def mount(
    s: Session,
    image: ImageId,
    host: Host,
    mount_point: MountPoint = None,
    action: ActionOpt = None,
    time_: PitTime = None,
    latest: Latest = False,
    port: Port = None,
    new_vm: NewVmOpt = None,
    network: NetworkOpt = None,
    power_on: PowerOnOpt = False,
    pool: PoolOpt = None,
    vm: VmOpt = None,
    shutdown_timeout: ShutdownTimeoutOpt = None,
    confirm: ConfirmOpt = None,
) -> JobAnswer:
    """Present any image to HOST as a writable virtual copy (a PostgreSQL base image with
    --time or --latest: recovered from it and started)."""
    params = {
        "host": host,
        "mount_point": mount_point,
        "action": action,
        **pit_fields(time_, latest, port),
        **_vm_options(new_vm, network, power_on, pool, vm, shutdown_timeout),
        **({"confirm": list(confirm)} if confirm else {}),
    }
    return s.api.mount(checked_image(image), checked(MountIn, **params))


@api_command
def unmount(s: Session, image: ImageId) -> None:
    """Take a presented image away from its host (its row stays until `image delete`)."""
    s.emit(s.api.unmount(checked_image(image)), lambda doc: f"unmounted {doc['id']}")


@job_command
def syncback(s: Session, app: AppName, label: Label = None) -> JobAnswer:
    """Send what was written at the DR site home as a new syncback image (DR appliance)."""
    return s.api.syncback(checked_app(app), checked(CaptureIn, label=label))


class Target(StrEnum):
    original = "original"
    restored = "restored"
    new = "new"


@job_command
def failback(
    s: Session,
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
        str | None,
        typer.Option(
            "--path",
            "--domain",
            help="restored/new: the path on that host (a VM: the domain there, --domain).",
        ),
    ] = None,
    pool: Annotated[
        str | None,
        typer.Option(
            "--pool", help="new, a VM: the host's storage pool the new domain's disks go in."
        ),
    ] = None,
    power_on: Annotated[
        bool, typer.Option("--power-on", help="Start the app at production afterwards.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Snapshot style: even though no syncback was made.")
    ] = False,
    shutdown_timeout: Annotated[
        float | None,
        typer.Option(
            "--shutdown-timeout",
            help="Replica style, a VM: seconds each graceful shutdown may take before the VM "
            "is powered off (default 120).",
        ),
    ] = None,
) -> JobAnswer:
    """Fail APP back to production (DR appliance).

    Without --target: the snapshot style (after the final syncback was restored):
    cleans up the DR site and resumes mirroring. With --target: the replica style, which
    sends the differences to the target itself, takes a protective snapshot and leaves the
    failback pending until `commit-failback` or `undo-failback`. A VM fails back onto a
    domain restored at production (--target restored --host H --domain D, registered there
    with `tandem app add`) or onto a new domain defined there in a storage pool
    (--target new --host H --domain NAME --pool P).
    """
    params: dict[str, Any] = {
        "force": force,
        "target": target,
        "host": host,
        "path": path,
        "power_on": power_on,
    }
    if shutdown_timeout is not None:
        params["shutdown_timeout"] = shutdown_timeout
    if pool is not None:
        params["pool"] = pool
    return s.api.failback(checked_app(app), checked(FailbackIn, **params))


@job_command
def commit_failback(
    s: Session,
    app: AppName,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Commit although the DR copy was written after the protective snapshot "
            "(those writes are lost).",
        ),
    ] = False,
) -> JobAnswer:
    """Production works: end a replica-style failback, resume protection (DR appliance)."""
    return s.api.commit_failback(checked_app(app), checked(CommitFailbackIn, force=force))


@job_command
def undo_failback(s: Session, app: AppName) -> JobAnswer:
    """Back to the DR copy in its pre-failback state (protective snapshot) (DR appliance)."""
    return s.api.undo_failback(checked_app(app))


@job_command
def clone(
    s: Session,
    image: ImageId,
    host: Host,
    path: Annotated[str, typer.Option("--path", help="Full path on the host (must be new).")],
    name: Annotated[str | None, typer.Option("--name", help="The new application's name.")] = None,
) -> JobAnswer:
    """A full, independent copy of IMAGE as a new application on HOST."""
    params = {"host": host, "path": path, "name": name}
    return s.api.clone(checked_image(image), checked(CloneIn, **params))
