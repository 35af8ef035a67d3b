"""Presenting an image to a host: the shared core of test failover, failover and mount.

A presented image is a *virtual copy*: a new image row over a base image that never changes.
- Volume apps: an overlay (``storage.overlay``) over the base manifest, exported by the
  appliance's NBD server as ``nbd://HOST:PORT/IMAGE.SECRET`` (the secret makes the URI a
  capability), or ``nbds://…`` when that server requires TLS (any address but loopback);
  then the result also has ``nbd_fingerprint``, the appliance certificate's. Presenting a
  1 TiB image costs the same as a 1 MiB one: nothing is copied.
- File-system apps: a writable virtual copy at the mount point, through FUSE on the host
  (``agent.fusemount``): reads fetch the chunks they touch from this appliance's pool
  through a read session that stays open while the copy is presented (its meta names the
  image: ``{"presented": IMAGE}``); writes go to a copy-on-write layer on the host, which
  syncback reads. Presenting a 100 GB tree costs what a 10 MB one does. The ``copy`` mount
  action writes a full, plain copy instead (at ``--mount-point``, else at the app's path).
- With a mount action other than ``map-only``, the host's agent places the image at the
  mount point under SPEC §2's rules (an empty folder is used, a missing one made; a file or
  a non-empty folder fails the job and leaves nothing behind); for a volume that is a full
  copy (``volume.img``) beside its NBD export.

Invariants
- The image row is written last, in one transaction, once the export and the mount exist:
  a failed presentation leaves no row, no export, no overlay and nothing on the host.
- The export name and secret live in the row (``nbd_export`` holds the URI), so exports are
  made again with the same URI when the appliance restarts (``restore_exports``); a FUSE
  copy's read session is not kept anywhere, so at start each presented tree's host is
  given a new one (``restore_tree_sessions``).
- Withdrawing (unmount) takes down what the agent placed (a FUSE copy or a VM's disks'
  mounts are unmounted, refused while a process on the host uses them), then removes the
  export, then the overlay, then closes the copy's read session. In that order because a
  VM's disks are mounted through the export: unmounting them writes back what their file
  systems still cache, which fails with EIO (the write lost) once the export is gone.

New VMs (a ``vm`` app's image, ``--new-vm NAME``): after the export exists, the host's agent
defines domain NAME from the XML the image holds, each disk a slice of the export
(``storage.vmimage``, ``agent.vm.define``): a test VM with a new UUID, new MACs and no NIC
unless ``--network`` names one; a failover VM with the captured identity. The name is kept
in the row (``vm_name``); withdrawing destroys and undefines that domain first. A failure
after the domain was defined removes it with the rest.

Existing VMs (``--vm DOMAIN``, typed confirmation ``REPLACE VM``): the host's agent powers
the domain off and defines it again with its disks on the export, keeping its own definition
in its libvirt metadata (``agent.vm.take_over``); the row has ``vm_name`` and
``vm_existing``, and withdrawing gives the domain its definition back (``give_back``) instead
of removing it. Checked at submit: it exists on the host, is not the source domain, and has
as many disks as the image.

A VM image with a mount point (``specify``): the agent mounts each disk's file system from
the export at the mount point, or ``_1``, ``_2``… for several disks (``agent.diskmount``);
unmaterialize takes the mounts down.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from tandem.catalog import queries as q
from tandem.catalog.models import App, Host, Image, Job
from tandem.domain.images import ImageKind, ImageState
from tandem.domain.lifecycle import AppKind, AppState, storage_kind
from tandem.domain.paths import check_path
from tandem.domain.rules import VM_TARGET_CONFIRMATION, check_confirmations
from tandem.domain.vms import check_domain_name
from tandem.errors import (
    ImageHoldsNoVm,
    InvalidInput,
    MapOnlyOfTree,
    MountPointNeeded,
    NbdCertificateMissing,
    NbdNotServed,
    NotFound,
    NotHypervisor,
    OptionsDoNotApply,
    OptionsExclusive,
    OptionsMissing,
    PresentActionUnknown,
    ProductionHostListed,
    ShutdownTimeoutOutOfRange,
    TandemError,
    VmDisksDiffer,
    VmIsItsSource,
    VmOptionsUnused,
    VmPresentationUnknown,
    VmTargetMissing,
    VmTargetNeeded,
)
from tandem.jobs.queue import submit_job
from tandem.jobs.runner import JobContext
from tandem.operations.hosts import agent_for, check_own_location
from tandem.operations.jobparams import JobParams
from tandem.operations.site import Site
from tandem.operations.streams import follow
from tandem.storage import vmimage
from tandem.storage.manifest import VolumeManifest, load_manifest
from tandem.storage.overlay import Overlay
from tandem.transport.agent import AgentClient
from tandem.transport.agent_api import DefineRequest, MaterializeRequest, TakeOverRequest
from tandem.transport.api import checked

ACTIONS = ("keep-source-path", "specify", "map-only", "copy")
FUSE_SESSION_TTL = 10 * 365 * 24 * 3600.0
"""A presented copy reads through its session for as long as it is presented."""


def placement(action: str, mount_point: str | None) -> str:
    """Where the agent puts the image for ``action``: ``copy`` is a full copy at the mount
    point when one is given, else at the app's own path."""
    if action == "copy":
        return "specify" if mount_point else "keep-source-path"
    return action


def presentation(app: App, action: str) -> str:
    """How a file tree is presented: ``fuse`` (a virtual copy), unless the action is
    ``copy``; a volume's placed copy is always a full one (its NBD export is virtual)."""
    return "fuse" if app.kind is AppKind.FILESYSTEM and action != "copy" else "copy"


BLOCK_KINDS = (AppKind.VOLUME, AppKind.VM)
"""Apps whose images are volume manifests, presented over NBD (a VM's: its disks end to end,
``storage.vmimage``)."""


def export_name(image_id: str) -> str:
    """The NBD export name of an image (NBD names take no underscore)."""
    return image_id.replace("_", "-")


@dataclass
class Presented:
    nbd_uri: str | None
    paths: list[str]
    mount_point: str | None
    bytes_sent: int
    nbd_fingerprint: str | None = None  # the certificate to pin, for an nbds:// export
    vm: dict[str, Any] | None = None  # the new VM: name, uuid, running
    presentation: str | None = None  # "fuse" or "copy" when the agent placed the image
    vm_hosts: list[str] | None = None  # the other hosts the new VM is defined on (off)

    def export_fields(self) -> dict[str, str | None]:
        """What a job result says of the export: ``nbd_uri``, and ``nbd_fingerprint`` for
        an export over TLS (``nbds://``); ``presentation`` (``fuse``: a virtual copy,
        ``copy``: a full one) when the image was placed on the host."""
        fields: dict[str, str | None] = {"nbd_uri": self.nbd_uri}
        if self.nbd_fingerprint:
            fields["nbd_fingerprint"] = self.nbd_fingerprint
        if self.presentation:
            fields["presentation"] = self.presentation
        return fields


def export_fingerprint(site: Site, uri: str) -> str | None:
    """The certificate fingerprint a host pins to reach ``uri``: the appliance's own (its NBD
    server serves TLS with the certificate its API serves), for an ``nbds://`` export."""
    return site.fingerprint if uri.startswith("nbds://") else None


def _nbd_tls(site: Site, uri: str) -> dict[str, str | None]:
    """The NBD TLS fields of an agent request on ``uri``: for an ``nbds://`` export, the
    appliance's certificate to trust (``nbd_ca``) and its fingerprint to pin
    (``nbd_fingerprint``); both None for a plain one."""
    fingerprint = export_fingerprint(site, uri)
    tls = fingerprint is not None
    return {"nbd_ca": site.certificate if tls else None, "nbd_fingerprint": fingerprint}


DEFAULT_SHUTDOWN_TIMEOUT = 120.0
"""Seconds an existing domain (``--vm``) has to shut down before it is powered off."""


@dataclass(frozen=True)
class NewVm:
    """A new VM to define at the host from a VM image (``--new-vm``)."""

    name: str
    network: str | None = None
    power_on: bool = False
    keep_identity: bool = False
    pool: str | None = None
    copy: bool = False  # disks copied into qcow2 volumes of ``pool`` (``--action copy``)
    existing: bool = False  # ``--vm``: an existing domain of the host, taken over
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT  # an existing domain's graceful stop

    def as_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "new_vm": self.name,
            "network": self.network,
            "power_on": self.power_on,
            "keep_identity": self.keep_identity,
            "pool": self.pool,
            "copy_disks": self.copy,
        }
        if self.existing:
            params.update(existing_vm=True, shutdown_timeout=self.shutdown_timeout)
        return params


class PresentParams(JobParams):
    """The parameters of a job that presents an image (test failover, failover, mount):
    the host, where the image goes, the VM it becomes (``NewVm.as_params``) and the point a
    database is recovered to (``time``: none, the latest)."""

    host: str
    action: str
    mount_point: str | None = None
    new_vm: str | None = None
    network: str | None = None
    power_on: bool = False
    keep_identity: bool = False
    pool: str | None = None
    copy_disks: bool = False
    existing_vm: bool = False
    shutdown_timeout: float | None = None
    time: str | None = None
    port: int | None = None

    def vm(self) -> NewVm | None:
        """The VM the image becomes, if any."""
        if not self.new_vm:
            return None
        return NewVm(
            self.new_vm,
            self.network,
            self.power_on,
            self.keep_identity,
            self.pool,
            self.copy_disks,
            self.existing_vm,
            DEFAULT_SHUTDOWN_TIMEOUT if self.shutdown_timeout is None else self.shutdown_timeout,
        )


def check_new_vm(
    app: App,
    new_vm: str | None,
    network: str | None,
    power_on: bool,
    *,
    keep_identity: bool,
    required: bool = True,
    pool: str | None = None,
    vm: str | None = None,
    shutdown_timeout: float | None = None,
) -> NewVm | None:
    """The VM a presentation runs as: a new one (``new_vm``) or an existing domain of the host
    (``vm``, taken over: ``NewVm.existing``). A vm app needs one (a mount may present just
    the disks' export instead: ``required`` False), other apps take none."""
    if app.kind is not AppKind.VM:
        if new_vm or network or power_on or pool or vm or shutdown_timeout is not None:
            raise VmOptionsUnused(app=app.name, kind=app.kind.value)
        return None
    if vm:
        return _existing_vm(app, vm, new_vm, network, pool, power_on, shutdown_timeout)
    if shutdown_timeout is not None:
        raise OptionsDoNotApply(
            options="--shutdown-timeout",
            why="it is how long an existing domain (--vm DOMAIN) may take to shut down, and a "
            "new VM has nothing to shut down",
            fix="Leave it out",
        )
    if not new_vm and not required and not (network or power_on or pool):
        return None
    if not new_vm:
        raise VmTargetNeeded(app=app.name)
    check_domain_name(new_vm, "--new-vm")
    if network is not None:
        check_domain_name(network, "--network")
    if pool is not None:
        check_domain_name(pool, "--pool")
    if new_vm == app.path:
        raise VmIsItsSource(what="--new-vm", domain=new_vm, fix="Give --new-vm another name")
    return NewVm(new_vm, network, power_on, keep_identity, pool)


def _existing_vm(
    app: App,
    vm: str,
    new_vm: str | None,
    network: str | None,
    pool: str | None,
    power_on: bool,
    shutdown_timeout: float | None,
) -> NewVm:
    if new_vm:
        raise OptionsExclusive(choices="--new-vm NAME (a new VM) and --vm DOMAIN (an existing one)")
    if network or pool:
        raise OptionsDoNotApply(
            options="--network and --pool",
            why="they are for a new VM, and an existing domain (--vm) keeps its own NICs, MACs "
            "and files",
            fix="Leave them out",
        )
    check_domain_name(vm, "--vm")
    if vm == app.path:
        raise VmIsItsSource(what="--vm", domain=vm, fix="Name another domain with --vm")
    if shutdown_timeout is not None and not 0 <= shutdown_timeout <= 3600:
        raise ShutdownTimeoutOutOfRange(value=shutdown_timeout)
    timeout = DEFAULT_SHUTDOWN_TIMEOUT if shutdown_timeout is None else shutdown_timeout
    return NewVm(vm, None, power_on, True, None, existing=True, shutdown_timeout=timeout)


@dataclass(frozen=True)
class VmAsk:
    """What a presentation's request asks of a vm app's image: a new VM (``new_vm`` and its
    ``network``, ``power_on``, datastore ``pool``) or an existing domain (``vm``, its
    ``shutdown_timeout``). Checked against the app by ``check``."""

    new_vm: str | None = None
    network: str | None = None
    power_on: bool = False
    pool: str | None = None
    vm: str | None = None
    shutdown_timeout: float | None = None

    @classmethod
    def of(cls, body: Any) -> VmAsk:
        """The ask of an API request (``transport.api.PresentIn``, ``FailoverIn``, ``MountIn``)."""
        return cls(
            body.new_vm, body.network, body.power_on, body.pool, body.vm, body.shutdown_timeout
        )

    def check(self, app: App, *, keep_identity: bool, required: bool = True) -> NewVm | None:
        return check_new_vm(
            app,
            self.new_vm,
            self.network,
            self.power_on,
            keep_identity=keep_identity,
            required=required,
            pool=self.pool,
            vm=self.vm,
            shutdown_timeout=self.shutdown_timeout,
        )


def check_at_host(
    site: Site,
    app: App,
    host: str,
    ask: VmAsk,
    *,
    keep_identity: bool,
    required: bool,
    image: str | None,
    confirm: list[str] | None,
    before: tuple[str, ...] = (),
) -> NewVm | None:
    """The checks made before a presentation's job exists: the VM asked fits the app and is
    confirmed, and the DR host has what it needs (a pool or network it lacks, a domain it
    does not have, is bad input). The VM asked, if any."""
    asked = ask.check(app, keep_identity=keep_identity, required=required)
    check_vm_confirmed(asked, confirm, *before)
    check_vm_target(site, host, asked)
    check_existing_target(site, app, host, asked, image)
    return asked


def placed(
    app: App,
    ask: VmAsk,
    action: str | None,
    mount_point: str | None,
    *,
    keep_identity: bool,
    required: bool,
) -> tuple[str, NewVm | None]:
    """Where a presentation goes, checked again in the job's transaction: its mount action
    and the VM it becomes (with that action)."""
    target = ask.check(app, keep_identity=keep_identity, required=required)
    action = check_action(app, action, mount_point)
    return action, vm_with_action(app, target, action)


def queued(
    session: Any,
    kind: type[PresentParams],
    *,
    type: str,
    app: str,
    image: str,
    lifecycle: bool,
    actor: str | None,
    host: str,
    mount_point: str | None,
    action: str,
    target: NewVm | None,
    **more: Any,
) -> Job:
    """Queue a presentation's job (in the submit's transaction, after ``placed``): its
    parameters, of ``kind``, are where it goes, the VM it becomes and ``more``."""
    params = kind(
        host=host,
        mount_point=mount_point,
        action=action,
        **more,
        **(target.as_params() if target is not None else {}),
    )
    return submit_job(
        session,
        type=type,
        app=app,
        image=image,
        params=params.stored(),
        lifecycle=lifecycle,
        actor=actor,
    )


def check_vm_confirmed(vm: NewVm | None, confirm: list[str] | None, *before: str) -> None:
    """An existing domain (``--vm``) is powered off and its disks replaced: the typed
    confirmation ``VM_TARGET_CONFIRMATION`` is required (after the operation's own ones,
    ``before``)."""
    if vm is not None and vm.existing:
        check_confirmations(confirm or [], [*before, VM_TARGET_CONFIRMATION])


def check_existing_target(
    site: Site, app: App, host: str, vm: NewVm | None, image: str | None
) -> None:
    """At submit, for ``--vm``: the domain exists on ``host`` and has as many disks as the
    image (``image``, else the app's newest replica) holds."""
    if vm is None or not vm.existing:
        return
    with site.catalog.read() as session:
        row = q.get_host(session, name=host)
        base = (
            q.get_image(session, image_id=image)
            if image
            else q.latest_image(session, app=app.name, kind=ImageKind.REPLICA)
        )
        manifest_hex = base.manifest if base is not None else None
    with agent_for(row) as agent:
        domains = {str(d.get("name")): d for d in agent.vms()}
    found = domains.get(vm.name)
    if found is None:
        raise NotFound(what="Domain", name=vm.name, listing=f"vms --host {host}")
    if manifest_hex is None:
        return  # no image yet: the job refuses that itself
    manifest = load_manifest(site.pool, bytes.fromhex(manifest_hex))
    slots = vmimage.slots_of(manifest) if isinstance(manifest, VolumeManifest) else None
    disks = found.get("disks") if isinstance(found.get("disks"), list) else []
    if slots is not None and len(slots) != len(disks or []):
        raise VmDisksDiffer(
            domain=vm.name, host=host, have=len(disks or []), app=app.name, want=len(slots)
        )


def vm_with_action(app: App, vm: NewVm | None, action: str) -> NewVm | None:
    """``--action copy`` for a VM: the new VM's disks are copied into its pool."""
    if app.kind is AppKind.VM and action == "specify" and vm is not None:
        raise OptionsDoNotApply(
            options="--mount-point together with --new-vm or --vm",
            why="a VM's disks are either mounted as file systems on the host or run as a VM, "
            "never both at once (the file systems would be written twice)",
            fix="Drop one",
        )
    if app.kind is not AppKind.VM or action != "copy":
        return vm
    if vm is not None and vm.existing:
        raise OptionsDoNotApply(
            options="--action copy",
            why="it copies a VM's disks into a new VM's datastore, and an existing domain "
            "(--vm) runs from the appliance's export",
            fix="Drop --action copy",
        )
    if vm is None or vm.pool is None:
        raise OptionsMissing(
            what="--action copy",
            options="--new-vm NAME and --pool P",
            why=" (it copies a VM's disks into the new VM's datastore)",
        )
    return replace(vm, copy=True)


def vm_hosts_for(
    site: Site, app: App, host: str, hosts: list[str] | None, all_hosts: bool
) -> list[str]:
    """The other hosts a failed-over VM is defined on (``--hosts`` / ``--all-hosts``), after
    ``host``, where it starts. Each named host must be a hypervisor of this site; with
    ``all_hosts``, every registered host whose agent is one. Asked of the agents at submit."""
    if not hosts and not all_hosts:
        return []
    if hosts and all_hosts:
        raise OptionsExclusive(choices="--hosts H1,H2 and --all-hosts")
    if app.kind is not AppKind.VM:
        raise OptionsDoNotApply(
            options="--hosts and --all-hosts",
            why=f"they define a failed-over VM on several hypervisors, and {app.name!r} is a "
            f"{app.kind.value} app",
            fix="Leave them out",
        )
    with site.catalog.read() as session:
        if all_hosts:
            rows = [h for h in q.list_hosts(session) if h.name != app.host]
        else:
            rows = [q.get_host(session, name=name) for name in dict.fromkeys(hosts or [])]
    out = []
    for row in rows:
        if row.name == host:
            continue
        if row.name == app.host:
            raise ProductionHostListed(host=row.name, app=app.name)
        with agent_for(row) as agent:
            info = agent.info()
        if not info.get("hypervisor"):
            if all_hosts:
                continue  # --all-hosts: the hypervisors among this site's hosts
            raise NotHypervisor(reason=f"host {row.name}: {info.get('reason', 'no libvirt')}")
        out.append(row.name)
    return out


def check_vm_target(site: Site, host: str, vm: NewVm | None) -> None:
    """At submit, before the job exists: ``check_vm_host`` for the host named ``host``."""
    if vm is None or vm.existing or (vm.pool is None and vm.network is None):
        return
    with site.catalog.read() as session:
        row = q.get_host(session, name=host)
    check_vm_host(row, vm)


def check_vm_host(host: Host, vm: NewVm | None) -> None:
    """At submit: the host is a hypervisor with the pool (active) and the network named."""
    if vm is None or (vm.pool is None and vm.network is None):
        return
    with agent_for(host) as agent:
        found = agent.vm_resources()
    pools = {str(p["name"]): p for p in found["pools"]}
    networks = {str(n["name"]) for n in found["networks"]}
    if vm.pool is not None:
        if vm.pool not in pools:
            raise VmTargetMissing(host=host.name, what="storage pool", name=vm.pool, why="")
        if not pools[vm.pool].get("active"):
            raise VmTargetMissing(
                host=host.name, what="active storage pool", name=vm.pool, why=" (it is inactive)"
            )
    if vm.network is not None and vm.network not in networks:
        raise VmTargetMissing(host=host.name, what="network", name=vm.network, why="")


def check_action(app: App, action: str | None, mount_point: str | None) -> str:
    """The mount action to use; refuses combinations SPEC §2 does not allow."""
    if action is None:
        if mount_point:
            action = "specify"
        else:
            action = "map-only" if app.kind in BLOCK_KINDS else "keep-source-path"
    if action not in ACTIONS:
        raise PresentActionUnknown(action=action, actions=", ".join(ACTIONS))
    if mount_point:
        check_path(mount_point, "--mount-point")
    elif action == "specify":
        raise MountPointNeeded(what="--action specify")
    if placement(action, mount_point) == "keep-source-path" and app.kind is not AppKind.VM:
        check_own_location(app, "a copy at its production path")
    if app.kind is AppKind.VM and action not in ("map-only", "copy", "specify"):
        raise VmPresentationUnknown(action=action)
    if app.kind is AppKind.VM and mount_point and action != "specify":
        raise OptionsDoNotApply(
            options=f"--mount-point with --action {action}",
            why="--mount-point mounts a VM's disks' file systems, and that action does not",
            fix="Drop one of them",
        )
    if action == "map-only" and app.kind not in BLOCK_KINDS:
        raise MapOnlyOfTree(app=app.name)
    return action


def present(
    site: Site,
    ctx: JobContext,
    *,
    image_id: str,
    base: Image,
    app: App,
    host: Host,
    action: str,
    mount_point: str | None,
    writable: bool = True,
    new_vm: NewVm | None = None,
    vm_hosts: list[Host] | None = None,
    recovering: bool = False,
    layer_beside: bool = False,
) -> Presented:
    """Export and/or materialize a virtual copy of ``base`` for ``host``; undone on failure.
    A new VM is also defined, powered off, on each of ``vm_hosts`` (failover ``--hosts``).
    ``recovering``: a database's base image about to be recovered (its ``pg_wal`` and the
    like are not written, ``agent.pg.for_recovery``). ``layer_beside``: a tree's FUSE copy
    keeps its copy-on-write layer beside the mount point (a failover copy, which the app
    serves from: a catch-up syncback cuts it on that file system)."""
    base_id = bytes.fromhex(base.manifest)
    uri: str | None = None
    overlay: Overlay | None = None
    transfer = None
    defined: str | None = None
    taken: str | None = None  # an existing domain (--vm) now running from the export
    mounted = False  # a VM's disks mounted as file systems on the host
    also: list[Host] = []
    try:
        if app.kind in BLOCK_KINDS:
            manifest = load_manifest(site.pool, base_id)
            if not isinstance(manifest, VolumeManifest):
                raise InvalidInput(detail=f"image {base.id} is not a volume image")
            if site.presenter is None:
                raise NbdNotServed(image=base.id)
            overlay = Overlay.create(site.overlays_dir / image_id, site.pool, manifest, base_id)
            uri = site.presenter.add_export(
                export_name(image_id),
                overlay,
                read_only=not writable,
                secret=secrets.token_urlsafe(18),
            )
            site.overlays[image_id] = overlay
            ctx.log(f"exported {image_id} over NBD")
        paths: list[str] = []
        vm: dict[str, Any] | None = None
        if new_vm is not None and new_vm.existing and uri is not None and overlay is not None:
            vm = _take_over(ctx, site, host, overlay.base, uri, new_vm, app, image_id)
            taken = new_vm.name
        elif new_vm is not None and uri is not None and overlay is not None:
            vm = _define_vm(ctx, site, host, overlay.base, uri, new_vm, app)
            defined = new_vm.name
            for other in vm_hosts or []:
                also.append(other)
                _define_vm(
                    ctx, site, other, overlay.base, uri, replace(new_vm, power_on=False), app
                )
        where_action = placement(action, mount_point)
        how = presentation(app, action)
        if app.kind is AppKind.VM and action == "specify" and uri is not None:
            mounted = True  # from the request on: the agent undoes a failure itself
            paths = _mount_disks(
                ctx, site, host, overlay, uri, image_id, mount_point, app, base.manifest
            )
        elif action != "map-only" and app.kind is not AppKind.VM:
            transfer, token = site.sessions.open(
                job_id=ctx.job.id,
                write=False,
                readable=[base_id],
                ttl=FUSE_SESSION_TTL if how == "fuse" else 24 * 3600,
            )
            if how == "fuse":
                transfer.meta["presented"] = image_id
            body = checked(
                MaterializeRequest,
                kind=storage_kind(app.kind),
                manifest=base.manifest,
                image=image_id,
                action=where_action,
                mount_point=mount_point,
                source_path=app.path,
                appliance=site.session_ref(transfer.id, token),
                presentation=how,
                layer="beside" if layer_beside and how == "fuse" else "agent",
                recovering=recovering,
            )
            ctx.set_message(f"presenting {base.id} on host {host.name}")
            reading = transfer
            t0 = time.monotonic()
            with agent_for(host) as agent:
                done = follow(
                    ctx, agent.materialize(body), host=host.name, moved=lambda: reading.bytes_sent
                )
            paths = [str(p) for p in done.get("paths", [])]
            if how == "fuse" and done.get("presentation") != "fuse":
                how = "copy"  # the host has no FUSE: it placed a full copy (its log says why)
            ctx.log(
                f"presented {base.id} on host {host.name} ({how}"
                f"{', what recovery reads' if recovering else ''}) in "
                f"{time.monotonic() - t0:.2f} s, {reading.bytes_sent:,} bytes read"
            )
        sent = transfer.bytes_sent if transfer is not None else 0
        where = (
            mount_point
            if where_action == "specify"
            else app.path
            if where_action != "map-only"
            else None
        )
        fingerprint = export_fingerprint(site, uri) if uri else None
        shown = how if action != "map-only" else None
        if app.kind is AppKind.VM and paths:
            where, shown = mount_point, "disks"
        elif app.kind is AppKind.VM:
            where, shown = None, ("copy" if new_vm is not None and new_vm.copy else None)
        if transfer is not None and how == "fuse":
            transfer = None  # the copy reads through it until withdrawn
        return Presented(
            uri,
            paths,
            where,
            sent,
            fingerprint,
            vm=vm,
            presentation=shown,
            vm_hosts=[h.name for h in also] or None,
        )
    except BaseException:
        if mounted:
            with contextlib.suppress(TandemError), agent_for(host) as agent:
                agent.unmaterialize(image_id)
        if taken is not None:
            with contextlib.suppress(TandemError), agent_for(host) as agent:
                agent.give_back_vm(taken)
        if defined is not None:
            for where_defined in (host, *also):
                with contextlib.suppress(TandemError), agent_for(where_defined) as agent:
                    agent.remove_vm(defined)
        _undo(site, image_id, uri, overlay)
        raise
    finally:
        if transfer is not None:
            site.sessions.close(transfer)


def _define_vm(
    ctx: JobContext,
    site: Site,
    host: Host,
    manifest: VolumeManifest | None,
    uri: str,
    new: NewVm,
    app: App,
) -> dict[str, Any]:
    """Define ``new`` at ``host`` from the VM image ``manifest``, its disks on ``uri``."""
    vm = manifest.meta.get("vm") if manifest is not None else None
    slots = vmimage.slots_of(manifest) if manifest is not None else None
    if not isinstance(vm, dict) or not slots or not isinstance(vm.get("xml"), str):
        raise ImageHoldsNoVm(image=ctx.job.image or app.name)
    if uri.startswith("nbds://") and not site.certificate:
        raise NbdCertificateMissing(host=host.name)
    body = checked(
        DefineRequest,
        name=new.name,
        xml=vm["xml"],
        disks=[s.as_dict() for s in slots],
        nbd_uri=uri,
        source_domain=str(vm.get("domain") or app.path),
        source_uuid=str(vm.get("uuid") or ""),
        keep_identity=new.keep_identity,
        network=new.network,
        power_on=new.power_on,
        pool=new.pool,
        copy_disks=new.copy,
        **_nbd_tls(site, uri),
    )
    with agent_for(host) as agent:
        if new.copy:
            ctx.set_message(f"copying the disks of {new.name} into pool {new.pool} on {host.name}")
            done = follow(ctx, agent.define_vm_copy(body), host=host.name, moved=lambda: 0)
            done.pop("event", None)
        else:
            done = agent.define_vm(body)
    ctx.log(
        f"defined VM {done.get('name')} ({done.get('uuid')}) on host {host.name}"
        + (f", disks copied into pool {new.pool}" if new.copy else "")
        + (f", datastore pool {new.pool}" if new.pool and not new.copy else "")
        + (", running" if done.get("running") else ", powered off")
    )
    if done.get("tls_dir"):
        ctx.log(
            f"host {host.name} trusts this appliance's certificate for its NBD disks over TLS "
            f"in {done['tls_dir']}; its libvirt reads it with qemu.conf "
            f'nbd_tls_x509_cert_dir = "{done["tls_dir"]}" (then restart libvirtd)'
        )
    return done


def _take_over(
    ctx: JobContext,
    site: Site,
    host: Host,
    manifest: VolumeManifest | None,
    uri: str,
    target: NewVm,
    app: App,
    image_id: str,
) -> dict[str, Any]:
    """Run the existing domain ``target`` of ``host`` from the VM image ``manifest`` on
    ``uri``: powered off, its disks replaced by the export's slices (``agent.vm.take_over``)."""
    vm = manifest.meta.get("vm") if manifest is not None else None
    slots = vmimage.slots_of(manifest) if manifest is not None else None
    if not isinstance(vm, dict) or not slots:
        raise ImageHoldsNoVm(image=image_id)
    if uri.startswith("nbds://") and not site.certificate:
        raise NbdCertificateMissing(host=host.name)
    body = checked(
        TakeOverRequest,
        name=target.name,
        image=image_id,
        disks=[s.as_dict() for s in slots],
        nbd_uri=uri,
        source_domain=str(vm.get("domain") or app.path),
        source_uuid=str(vm.get("uuid") or ""),
        power_on=target.power_on,
        shutdown_timeout=target.shutdown_timeout,
        **_nbd_tls(site, uri),
    )
    ctx.set_message(f"powering off domain {target.name} on {host.name} to replace its disks")
    with agent_for(host) as agent:
        done = agent.take_over_vm(body)
    ctx.log(
        f"existing VM {done.get('name')} ({done.get('uuid')}) on host {host.name}: "
        f"{done.get('power_off')}; its {len(slots)} disk(s) now on the export, its own "
        "definition kept until the image is withdrawn"
        + (", running" if done.get("running") else ", powered off")
    )
    return done


def _mount_disks(
    ctx: JobContext,
    site: Site,
    host: Host,
    overlay: Overlay | None,
    uri: str,
    image_id: str,
    mount_point: str | None,
    app: App,
    manifest: str,
) -> list[str]:
    """Mount the file system of each disk of the VM image on ``uri`` at ``mount_point``
    (one disk) or ``mount_point_1``, ``_2``… (several) on ``host`` (``agent.diskmount``)."""
    slots = vmimage.slots_of(overlay.base) if overlay is not None and overlay.base else None
    if not slots:
        raise ImageHoldsNoVm(image=image_id)
    body = checked(
        MaterializeRequest,
        kind="volume",
        manifest=manifest,
        image=image_id,
        action="specify",
        mount_point=mount_point,
        source_path=app.path,
        presentation="disks",
        nbd_uri=uri,
        disks=[s.as_dict() for s in slots],
        **_nbd_tls(site, uri),
    )
    ctx.set_message(f"mounting the {len(slots)} disk(s) of {image_id} on host {host.name}")
    with agent_for(host) as agent:
        done = follow(ctx, agent.materialize(body), host=host.name, moved=lambda: 0)
    for disk in done.get("disks") or []:
        if isinstance(disk, dict):
            ctx.log(
                f"disk {disk.get('target')}: {disk.get('type')} mounted at {disk.get('path')}"
                + (f" (partition {disk['partition']})" if disk.get("partition") else "")
            )
    return [str(p) for p in done.get("paths", [])]


def vm_kind(vm: Mapping[str, Any]) -> str:
    """``existing`` for a domain taken over (``--vm``), else ``new``: for job messages."""
    return "existing" if vm.get("existing") else "new"


def _release_vm(agent: AgentClient, name: str, existing: bool) -> str:
    """Withdraw the VM ``name`` an image ran as: an existing domain gets its own definition
    back (``give_back``), a new one is removed. What it did, for ``removed``."""
    if not existing:
        agent.remove_vm(name)
        return f"vm:{name}"
    done = agent.give_back_vm(name)
    if done.get("restored"):
        return f"vm:{name}:own-definition" + (":was-running" if done.get("was_running") else "")
    return f"vm:{name}:{done.get('reason', 'untouched')}"


def _undo(site: Site, image_id: str, uri: str | None, overlay: Overlay | None) -> None:
    if uri is not None and site.presenter is not None:
        with contextlib.suppress(TandemError):
            site.presenter.remove_export(export_name(image_id))
    site.overlays.pop(image_id, None)
    if overlay is not None:
        with contextlib.suppress(Exception):
            overlay.delete()


def withdraw(site: Site, image: Image, host: Host | None) -> dict[str, Any]:
    """Unpresent ``image``: its new VM, its export, what its agent placed, its overlay."""
    removed: list[str] = []
    if image.vm_name:
        for other in _hosts_named(site, image.vm_hosts or []):
            with agent_for(other) as agent:
                agent.remove_vm(image.vm_name)
            removed.append(f"vm:{image.vm_name}@{other.name}")
    if host is not None and image.vm_name:
        with agent_for(host) as agent:
            removed.append(_release_vm(agent, image.vm_name, image.vm_existing))
    if host is not None and image.mount_point is not None:
        # Before the export goes: a VM's disks are mounted through it, and their unmount
        # writes back what the file systems still hold (a refusal leaves the export too).
        with agent_for(host) as agent:
            removed = [str(p) for p in agent.unmaterialize(image.id).get("removed", [])]
    if image.nbd_export and site.presenter is not None:
        with contextlib.suppress(TandemError):
            site.presenter.remove_export(export_name(image.id))
    overlay = site.overlays.pop(image.id, None)
    if overlay is not None:
        overlay.delete()
    else:
        shutil.rmtree(site.overlays_dir / image.id, ignore_errors=True)
    site.sessions.close_matching(presented=image.id)
    return {"removed": removed}


def _hosts_named(site: Site, names: list[str]) -> list[Host]:
    """The registered hosts of ``names`` (one removed since is skipped: nothing to reach)."""
    found = []
    with site.catalog.read() as session:
        for name in names:
            with contextlib.suppress(TandemError):
                found.append(q.get_host(session, name=name))
    return found


def withdraw_unrecorded(
    site: Site, image_id: str, host: Host, shown: Presented | None = None
) -> None:
    """Undo a presentation whose row was never written (the step after it failed); with
    ``shown``, the new VM it defined too (on its host and its ``vm_hosts``)."""
    if shown is not None and shown.vm:
        for where in (host, *_hosts_named(site, shown.vm_hosts or [])):
            with contextlib.suppress(TandemError), agent_for(where) as agent:
                _release_vm(agent, str(shown.vm["name"]), bool(shown.vm.get("existing")))
    with contextlib.suppress(TandemError), agent_for(host) as agent:
        agent.unmaterialize(image_id)  # before the export its VM disks' mounts write through
    if site.presenter is not None:
        with contextlib.suppress(TandemError):
            site.presenter.remove_export(export_name(image_id))
    site.sessions.close_matching(presented=image_id)
    overlay = site.overlays.pop(image_id, None)
    if overlay is not None:
        with contextlib.suppress(Exception):
            overlay.delete()


def restore_exports(site: Site) -> list[str]:
    """At start-up: export again every presented volume image, with the URI it had."""
    if site.presenter is None:
        return []
    done = []
    with site.catalog.read() as session:
        rows = [
            (
                i.id,
                i.nbd_export,
                kind is ImageKind.FAILOVER and i.app.state is AppState.FAILBACK_PENDING,
            )
            for kind in (ImageKind.TEST_FAILOVER, ImageKind.FAILOVER, ImageKind.MOUNT)
            for i in q.list_images_of_kind(session, kind=kind)
            if i.nbd_export and i.state is ImageState.MOUNTED
        ]
    for image_id, uri, pending in rows:
        directory = site.overlays_dir / image_id
        if not directory.exists():
            continue
        overlay = Overlay.open(directory, site.pool)
        if pending:  # the DR copy of a pending replica-style failback stays read-only
            overlay.freeze()
        secret = urlsplit(uri).path.rsplit(".", 1)[-1]
        site.presenter.add_export(export_name(image_id), overlay, secret=secret)
        site.overlays[image_id] = overlay
        done.append(image_id)
    return done


def restore_tree_sessions(site: Site) -> list[str]:
    """At start-up: the read sessions of file trees presented through FUSE died with the
    previous process; open a new one for each presented tree image and give it to its
    host's agent (``refresh_layers``). A host that is not reachable, or that holds a full
    copy rather than a FUSE one, gets none (its session is closed again). Returns the
    images refreshed. Run it off the start-up path: it calls the hosts."""
    rows = []
    with site.catalog.read() as session:
        for kind in (ImageKind.TEST_FAILOVER, ImageKind.FAILOVER, ImageKind.MOUNT):
            for i in q.list_images_of_kind(session, kind=kind):
                if not (i.state is ImageState.MOUNTED and i.mount_point and i.mounted_host):
                    continue
                if i.app.kind is not AppKind.FILESYSTEM:
                    continue
                with contextlib.suppress(TandemError):
                    rows.append((i.id, i.manifest, q.get_host(session, name=i.mounted_host)))
    done = []
    for image_id, manifest, host in rows:
        transfer, token = site.sessions.open(
            job_id="", write=False, readable=[bytes.fromhex(manifest)], ttl=FUSE_SESSION_TTL
        )
        transfer.meta["presented"] = image_id
        refreshed = 0
        with contextlib.suppress(TandemError), agent_for(host) as agent:
            refreshed = agent.refresh_layers(image_id, site.session_ref(transfer.id, token))
        if refreshed:
            done.append(image_id)
        else:
            site.sessions.close(transfer)
    return done


def mounted_doc(image: Image) -> dict[str, Any]:
    return {"nbd_uri": image.nbd_export, "mount_point": image.mount_point}


def record(
    site: Site,
    *,
    image_id: str,
    app: App,
    base: Image,
    kind: ImageKind,
    host: Host,
    presented: Presented,
    label: str | None,
) -> Image:
    """Write the presented image's row (the last step of presenting)."""
    with site.catalog.begin() as session:
        row = q.add_image(
            session,
            app=app.name,
            kind=kind,
            manifest=base.manifest,
            size=base.size,
            label=label,
            parent_id=base.id,
            source_image_id=base.id,
            image_id=image_id,
            state=ImageState.MOUNTED,
        )
        q.set_image_state(
            session,
            image_id=image_id,
            state=ImageState.MOUNTED,
            mounted_host=host.name,
            mount_point=presented.mount_point if presented.paths else None,
            nbd_export=presented.nbd_uri,
            vm_name=str(presented.vm["name"]) if presented.vm else None,
            vm_hosts=presented.vm_hosts,
            vm_existing=bool(presented.vm and presented.vm.get("existing")),
        )
    return row
