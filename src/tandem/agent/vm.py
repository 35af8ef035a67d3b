"""Hypervisor hosts: libvirt domains as applications (the agent side).

An agent is a hypervisor host when ``libvirt-python`` imports and ``qemu:///system``
answers; an agent without libvirt starts and serves every other kind of app, and says why
it is not a hypervisor (``hypervisor()``).

Capture (``capture``) of a running domain, all disks at one instant, the way the ecosystem
does it:
1. When the guest agent answers, the guest's file systems are frozen (``fsFreeze``) and
   thawed right after the checkpoint exists (``finally``, within ``THAW_TIMEOUT``); the image
   is then ``app-consistent``, else ``crash-consistent`` (with the reason). The agent has
   ``FREEZE_TIMEOUT`` to answer (libvirt's per-domain agent timeout, reset to its default
   after the thaw); one that does not is told to thaw, and the image is crash-consistent.
   A domain whose disks are all raw gets no checkpoint (it needs qcow2): the capture is a
   full compare with the previous image, and its reason says so.
2. ``virDomainBackupBegin`` in pull mode with a new checkpoint ``tandem-<job>``: qemu serves
   each disk's point-in-time view over NBD on a unix socket in a private folder; an
   incremental backup since the base image's checkpoint adds the context
   ``qemu:dirty-bitmap:backup-<disk>`` whose extents say what changed.
3. ``storage.vmimage.capture_disks`` reads only those extents (or every allocated extent on
   a first capture, after a lost checkpoint, or for a raw disk, which has no bitmap: the job
   log says which and why) into the appliance session; the domain XML rides in the
   manifest's meta.
4. The backup job is ended (``abortJob``) and older ``tandem-*`` checkpoints are deleted but
   the new one and the base's, so the next capture can be incremental from either.

Restore (``restore``) onto the production domain, in place: the image's disks must match the
domain's (targets and sizes) before anything is touched; the domain is shut down (then
destroyed after a timeout), every ``tandem-*`` checkpoint is deleted (the disks are about to
change under them), each disk is served by ``qemu-nbd`` in its own format on a private socket
and diff-restored (``storage.vmimage.restore_disks``), and a ``<restored/>`` element in the
domain's metadata (``MARK_URI``) tells the next capture to read everything and say why. The
domain keeps its definition (UUID, MACs); one that is gone is defined again from the image's
XML, only when its disk files are still there.

A failed capture leaves the domain running with at most one extra checkpoint, which the
next capture deletes; nothing becomes an image without the committed manifest.

New VMs (``define``): a domain defined from a captured XML whose disks are NBD network
disks (the appliance's export of a virtual copy, one slice per disk). A test VM gets a new
UUID, new MACs and no network interface unless a network is named; a failover VM keeps the
captured identity. A name that exists is refused; so is the domain the image came from.

The pool (``--pool P``) is the new VM's datastore, where its local files live; it must exist
and be active on the host. With NBD disks the domain's only local state is its UEFI
variables (``<nvram>``), which are placed in P (a directory-backed pool). With
``copy_disks`` (``--action copy``, ``define_copy``) every disk is copied from the export into
a new qcow2 volume ``NAME-<target>.qcow2`` of P and the domain runs from those volumes: a
plain, independent VM, like ``--action copy`` for a file tree, that costs a full read of
the disks first. The volumes are listed in the domain's ``<metadata>`` (namespace
``VM_NS``) so ``remove`` deletes them with the domain.

A failback ``--target new`` at production (``define_empty``) defines a powered-off domain
from a captured XML on new, empty qcow2 volumes ``NAME-<target>.qcow2`` of a file-backed
pool (file disks, which ``restore`` then writes in place), with a new UUID and the captured
NICs and MACs; its volumes are listed in the metadata as for ``define_copy``.

An existing domain as the target (``take_over``, ``--vm``): powered off, defined again with
its disks on the export and everything else (UUID, MACs) as it was, its own inactive XML kept
in its metadata (``TARGET_NS``) until ``give_back`` defines it from that again. Its disk
files are never opened.

An ``nbds://`` export (the appliance's NBD off loopback) makes TLS disks (``tls='yes'``).
libvirt 9 has no per-disk credentials (``tlsHostname`` only renames the host checked): QEMU
takes them from qemu.conf's ``nbd_tls_x509_cert_dir``, one folder per host. The request
carries the appliance's certificate, pinned by its fingerprint; ``trust_appliance`` checks
it and keeps it in the agent's ``DIR/nbd-tls`` (or ``$TANDEM_NBD_TLS_DIR``), whose
``ca-cert.pem`` trusts every appliance kept there. The operator points qemu.conf at that
folder once; the job log and a start that fails name the line.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tandem.domain.vms import FILE_POOLS, tame_domain_xml
from tandem.errors import (
    AlreadyExists,
    DomainGone,
    ImageHoldsNoVm,
    InvalidInput,
    LibvirtRefused,
    NbdCertificateInvalid,
    NbdTlsFolderMissing,
    NotFound,
    NotHypervisor,
    OptionsMissing,
    SourceUnreadable,
    VmDefinitionNotRestored,
    VmDiskNotFile,
    VmDisksDiffer,
    VmIdentityTaken,
    VmIsItsSource,
    VmPoolUnfit,
    VmTargetInUse,
)
from tandem.storage import vmimage
from tandem.storage.manifest import VolumeManifest
from tandem.storage.volume import ChunkSource
from tandem.transport.agent_api import (
    DefineRequest,
    EmptyDomainRequest,
    PowerRequest,
    TakeOverRequest,
)
from tandem.transport.nbd import DIRTY, NbdClient
from tandem.transport.tls import fingerprint_of_der

URI = "qemu:///system"
URI_ENV = "TANDEM_LIBVIRT_URI"
TLS_DIR_ENV = "TANDEM_NBD_TLS_DIR"
"""The folder QEMU takes the CA of NBD disks over TLS from: what the host's qemu.conf names
as ``nbd_tls_x509_cert_dir`` (libvirt 9 has no per-disk credentials: one folder per host)."""
TLS_DIR = "nbd-tls"
"""Its default, in the agent's DIR."""
_trust_lock = threading.Lock()
"""Overrides ``URI`` for an agent that manages another libvirt (``qemu:///session``, a
second hypervisor on a test machine; ``qemu+ssh://…`` for a remote one)."""
VM_NS = "https://tandem.dev/libvirt/vm/1"
"""The namespace of tandem's element in a new domain's ``<metadata>``: the pool volumes its
disks were copied into (``--action copy``), removed with it."""
PREFIX = "tandem-"
THAW_TIMEOUT = 60
FREEZE_TIMEOUT = 10
"""Seconds the guest agent has to answer a freeze (or thaw) before the capture goes on
without it, crash-consistent."""
STATES = {
    0: "no state",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutting down",
    5: "shut off",
    6: "crashed",
    7: "suspended",
}

Emit = Callable[[dict[str, Any]], None]


def _libvirt() -> Any:
    try:
        import libvirt  # optional: only hypervisor hosts have it
    except ImportError as exc:
        raise NotHypervisor(reason=f"libvirt-python is not installed ({exc})") from exc
    # Errors are raised as exceptions and reported by the caller; libvirt would also print
    # each one on stderr (a guest agent that is not configured is an ordinary answer).
    libvirt.registerErrorHandler(_quiet, None)
    return libvirt


def _quiet(_ctx: object, _error: object) -> None:
    return None


def libvirt_uri() -> str:
    return os.environ.get(URI_ENV) or URI


@contextmanager
def connection() -> Iterator[Any]:
    lv = _libvirt()
    uri = libvirt_uri()
    try:
        conn = lv.open(uri)
    except lv.libvirtError as exc:
        raise NotHypervisor(reason=f"{uri} does not answer ({exc.get_error_message()})") from exc
    try:
        yield conn
    finally:
        with suppress(Exception):
            conn.close()


_shared: Any = None
_shared_lock = threading.Lock()


def _shared_connection() -> Any:
    """One connection kept for the agent's ``info`` (asked often), opened again when it
    died (libvirtd restarted); ``NotHypervisor`` when libvirt does not answer."""
    global _shared
    lv = _libvirt()
    with _shared_lock:
        if _shared is not None:
            try:
                if _shared.isAlive():
                    return _shared
            except lv.libvirtError:
                pass
            with suppress(Exception):
                _shared.close()
            _shared = None
        try:
            _shared = lv.open(libvirt_uri())
        except lv.libvirtError as exc:
            raise NotHypervisor(
                reason=f"{libvirt_uri()} does not answer ({exc.get_error_message()})"
            ) from exc
        return _shared


def hypervisor() -> dict[str, Any]:
    """``{"hypervisor": bool, "reason"|"libvirt"...}`` for the agent's info.

    A cached connection whose libvirtd restarted still looks alive (no event loop tells
    libvirt-python it closed) until a call fails: that first failure forgets it and asks
    once more on a new connection, so a restarted libvirtd is never reported as gone."""
    for attempt in (1, 2):
        try:
            conn = _shared_connection()
            return {
                "hypervisor": True,
                "libvirt": conn.getLibVersion(),
                "hypervisor_version": conn.getVersion(),
            }
        except NotHypervisor as exc:
            return {"hypervisor": False, "reason": exc.message}
        except Exception as exc:  # libvirtd went away (or restarted) since the open
            if not isinstance(exc, _libvirt().libvirtError):
                raise
            _forget_shared()
            if attempt == 2:
                reason = f"{libvirt_uri()} stopped answering ({exc})"
                return {"hypervisor": False, "reason": reason}
    raise AssertionError("unreachable")


def _forget_shared() -> None:
    global _shared
    with _shared_lock:
        if _shared is not None:
            with suppress(Exception):
                _shared.close()
        _shared = None


atexit.register(_forget_shared)  # closed before libvirt's module is torn down at exit


def _domain(conn: Any, name: str) -> Any:
    lv = _libvirt()
    try:
        return conn.lookupByName(name)
    except lv.libvirtError as exc:
        raise NotFound(what="Domain", name=name, listing="vms --host HOST") from exc


def _disks(xml: str) -> list[dict[str, str]]:
    """The domain's disks (device ``disk``): target, source path, driver type."""
    out = []
    for disk in ET.fromstring(xml).findall("./devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        target = disk.find("target")
        source = disk.find("source")
        driver = disk.find("driver")
        out.append(
            {
                "target": target.get("dev", "") if target is not None else "",
                "source": (source.get("file") or source.get("dev") or source.get("name") or "")
                if source is not None
                else "",
                "format": driver.get("type", "raw") if driver is not None else "raw",
                "type": disk.get("type", "file"),
            }
        )
    return out


def list_domains() -> list[dict[str, Any]]:
    """Every domain of this host: name, uuid, state, disks."""
    with connection() as conn:
        out = []
        for dom in conn.listAllDomains(0):
            state = dom.state()[0]
            out.append(
                {
                    "name": dom.name(),
                    "uuid": dom.UUIDString(),
                    "state": STATES.get(state, str(state)),
                    "disks": _disks(dom.XMLDesc(0)),
                }
            )
        return sorted(out, key=lambda d: d["name"])


# --- capture -----------------------------------------------------------------------------


class _Reader:
    """A disk's backup export, shared by the capture's threads (one request at a time)."""

    def __init__(self, client: NbdClient) -> None:
        self.client = client
        self.lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        with self.lock:
            return self.client.read(offset, length)


def _agent_timeout(dom: Any, seconds: int) -> None:
    """Bound libvirt's wait for the guest agent (by default it waits forever)."""
    with suppress(Exception):  # libvirt < 5.10 has no per-domain agent timeout
        dom.agentSetResponseTimeout(seconds, 0)


def _freeze(dom: Any, emit: Emit) -> tuple[bool, str]:
    """Freeze the guest's file systems through its agent; (frozen, why not).

    The agent gets ``FREEZE_TIMEOUT`` seconds to answer. One that does not answer in time
    (hung in the freeze, or a channel nobody serves) may still freeze the guest later, so
    it is told to thaw (for up to twice that) and the image is crash-consistent."""
    lv = _libvirt()
    _agent_timeout(dom, FREEZE_TIMEOUT)
    try:
        dom.fsFreeze(None, 0)
    except lv.libvirtError as exc:
        message = exc.get_error_message()
        default = getattr(lv, "VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT", -1)
        if exc.get_error_code() in (
            lv.VIR_ERR_OPERATION_UNSUPPORTED,
            lv.VIR_ERR_ARGUMENT_UNSUPPORTED,
        ):
            _agent_timeout(dom, default)
            return False, f"the guest has no guest agent ({message})"
        if "not configured" in message or "not connected" in message:
            _agent_timeout(dom, default)
            return False, f"the guest agent is not running ({message})"
        emit({"event": "log", "text": f"the guest agent did not freeze the guest: {message}"})
        _thaw(dom, emit, deadline=time.monotonic() + 2 * FREEZE_TIMEOUT)
        return False, (
            f"the guest agent did not freeze the guest within {FREEZE_TIMEOUT} s ({message}); "
            "it was told to thaw"
        )
    emit({"event": "log", "text": "guest file systems frozen by the guest agent"})
    return True, "the guest agent froze the file systems for the checkpoint"


def _thaw(dom: Any, emit: Emit, deadline: float | None = None) -> None:
    """Thaw the guest, retrying until ``deadline`` (``THAW_TIMEOUT`` from now)."""
    lv = _libvirt()
    deadline = deadline if deadline is not None else time.monotonic() + THAW_TIMEOUT
    try:
        while True:
            try:
                dom.fsThaw(None, 0)
                return
            except lv.libvirtError as exc:
                if time.monotonic() + 1 > deadline:
                    emit({"event": "log", "text": f"thaw failed: {exc.get_error_message()}"})
                    return
                time.sleep(1)
    finally:
        _agent_timeout(dom, getattr(lv, "VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT", -1))


def _base_checkpoint(
    dom: Any, base: VolumeManifest | None, slots: list[vmimage.Slot], restored: str | None = None
) -> tuple[str | None, str]:
    """The checkpoint an incremental backup can start from, or None and why not."""
    if base is None:
        return None, "first capture of this domain: reading every allocated extent"
    if restored:
        return None, (
            f"the VM was restored ({restored}) since the previous image: change tracking is "
            "lost after a restore, so every allocated extent is read and compared"
        )
    vm = base.meta.get("vm") if isinstance(base.meta, dict) else None
    name = vm.get("checkpoint") if isinstance(vm, dict) else None
    if not name:
        return None, "the previous image has no checkpoint: reading every allocated extent"
    if vmimage.slots_of(base) != slots:
        return None, "the disks changed since the previous image: reading every allocated extent"
    have = {c.getName() for c in dom.listAllCheckpoints(0)}
    if name not in have:
        return None, (
            f"checkpoint {name} of the previous image is gone (change tracking lost): "
            "reading every allocated extent"
        )
    return str(name), f"incremental since checkpoint {name}: reading changed extents only"


def _end_stale_backup(dom: Any, emit: Emit) -> None:
    """End a pull-mode backup an interrupted capture left running (libvirtd restarted
    under it, so its ``abortJob`` never arrived): one of ours, whose private folder is gone.
    Anyone else's backup is left alone (``backupBegin`` then says the domain is busy)."""
    lv = _libvirt()
    try:
        xml = dom.backupGetXMLDesc(0)
    except lv.libvirtError:
        return  # no backup job
    sock = re.search(r"socket='([^']+)'", xml)
    folder = os.path.dirname(sock.group(1)) if sock else ""
    if "tandem-backup-" not in folder or os.path.exists(folder):
        return
    with suppress(lv.libvirtError):
        dom.abortJob()
        emit({"event": "log", "text": "ended the backup job an interrupted capture left"})


def capture(
    domain: str,
    job: str,
    base: VolumeManifest | None,
    pool: Any,
    base_id: bytes | None,
    emit: Emit,
    progress: Callable[[int, int], None],
) -> dict[str, Any]:
    """Capture ``domain`` into ``pool`` (module docstring); returns the done event's fields.
    libvirt failing under it (libvirtd restarted) fails the capture with the reason; the
    next capture ends a backup left running and starts from the previous image's
    checkpoint, or reads everything when that is gone."""
    lv = _libvirt()
    try:
        return _capture(domain, job, base, pool, base_id, emit, progress)
    except lv.libvirtError as exc:
        raise SourceUnreadable(
            path=f"domain {domain}",
            reason=f"libvirt failed during the capture ({exc.get_error_message()}); nothing "
            "became an image. Capture again once `virsh list` answers: the next capture ends "
            "a backup left running and reads from the previous checkpoint, or everything",
        ) from exc


def _capture(
    domain: str,
    job: str,
    base: VolumeManifest | None,
    pool: Any,
    base_id: bytes | None,
    emit: Emit,
    progress: Callable[[int, int], None],
) -> dict[str, Any]:
    lv = _libvirt()
    with connection() as conn:
        dom = _domain(conn, domain)
        if not dom.isActive():
            raise SourceUnreadable(
                path=f"domain {domain}",
                reason="it is not running; a pull-mode backup needs the running domain. "
                "Start it (`virsh start`) and capture again",
            )
        restored = _take_restored_mark(dom)
        xml = dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE | lv.VIR_DOMAIN_XML_SECURE)
        disks = [d for d in _disks(dom.XMLDesc(0)) if d["target"]]
        if not disks:
            raise SourceUnreadable(path=f"domain {domain}", reason="it has no disk")
        sizes = {d["target"]: int(dom.blockInfo(d["target"], 0)[0]) for d in disks}
        slots = vmimage.layout(
            [(d["target"], sizes[d["target"]], d["format"], d["source"]) for d in disks]
        )
        since, why = _base_checkpoint(dom, base, slots, restored)
        checkpoint = PREFIX + re.sub(r"[^A-Za-z0-9_-]", "-", job or uuid.uuid4().hex[:12])
        bitmap = [d for d in disks if d["format"] == "qcow2"]
        raw = [f"{d['target']} ({d['format']})" for d in disks if d["format"] != "qcow2"]
        if raw and not bitmap:
            why = (
                f"full compare: disk {', '.join(raw)} is not qcow2 and a checkpoint (the "
                "dirty bitmap) needs qcow2, so every allocated extent is read and compared "
                "with the previous image"
            )
        elif raw:
            why += f"; disk {', '.join(raw)} is not qcow2: read in full and compared"
        emit({"event": "log", "text": why})
        for d in disks:
            if d["format"] != "qcow2":
                emit(
                    {
                        "event": "log",
                        "text": f"disk {d['target']} is {d['format']}, not qcow2: it has no "
                        "dirty bitmap, so it is read in full and compared with the base",
                    }
                )
        folder = tempfile.mkdtemp(prefix="tandem-backup-")
        sock = os.path.join(folder, "nbd.sock")
        disk_xml = "".join(
            f"<disk name='{d['target']}' backup='yes' type='file'"
            + (" backupmode='full'" if since and d["format"] != "qcow2" else "")
            + f"><scratch file='{folder}/scratch-{d['target']}.qcow2'/></disk>"
            for d in disks
        )
        backup_xml = (
            "<domainbackup mode='pull'>"
            + (f"<incremental>{since}</incremental>" if since else "")
            + f"<server transport='unix' socket='{sock}'/><disks>{disk_xml}</disks></domainbackup>"
        )
        cp_disks = "".join(
            f"<disk name='{d['target']}' checkpoint='{'bitmap' if d in bitmap else 'no'}'/>"
            for d in disks
        )
        checkpoint_xml = (
            f"<domaincheckpoint><name>{checkpoint}</name><disks>{cp_disks}</disks>"
            "</domaincheckpoint>"
        )
        _end_stale_backup(dom, emit)
        frozen, reason = _freeze(dom, emit)
        began = False
        try:
            try:
                dom.backupBegin(backup_xml, checkpoint_xml if bitmap else None, 0)
                began = True
            finally:
                if frozen:
                    _thaw(dom, emit)
            clients: list[NbdClient] = []
            try:
                sources = []
                for d, slot in zip(disks, slots, strict=True):
                    dirty_ctx = f"qemu:dirty-bitmap:backup-{d['target']}"
                    tracked = since is not None and d["format"] == "qcow2"
                    client = NbdClient(
                        export=d["target"],
                        unix=sock,
                        contexts=["base:allocation", *([dirty_ctx] if tracked else [])],
                    )
                    clients.append(client)
                    allocated = [
                        (o, n) for o, n, f in client.extents("base:allocation") if not f & 1
                    ]
                    dirty = (
                        [(o, n) for o, n, f in client.extents(dirty_ctx) if f & DIRTY]
                        if tracked
                        else None
                    )
                    sources.append(vmimage.DiskSource(slot, _Reader(client), allocated, dirty))
                meta = {
                    "source": f"vm:{domain}",
                    "host": os.uname().nodename,
                    "consistency": "app-consistent" if frozen else "crash-consistent",
                    "vm": {
                        "format": vmimage.FORMAT,
                        "domain": domain,
                        "uuid": dom.UUIDString(),
                        "xml": xml,
                        "checkpoint": checkpoint if bitmap else None,
                        "disks": [s.as_dict() for s in slots],
                    },
                }
                mid, manifest, stats = vmimage.capture_disks(
                    pool, sources, base=base, base_id=base_id, meta=meta, progress=progress
                )
            finally:
                for client in clients:
                    client.close()
        finally:
            if began:
                with suppress(lv.libvirtError):
                    dom.abortJob()
            shutil.rmtree(folder, ignore_errors=True)
        _drop_checkpoints(dom, keep={checkpoint, since or ""})
    return {
        "manifest": mid.hex(),
        "size": manifest.size,
        "stats": stats.as_dict(),
        "incremental": since is not None,
        "read_reason": why,
        "consistency": "app-consistent" if frozen else "crash-consistent",
        "consistency_reason": reason,
    }


def _drop_checkpoints(dom: Any, keep: set[str]) -> None:
    lv = _libvirt()
    for cp in dom.listAllCheckpoints(0):
        name = cp.getName()
        if name.startswith(PREFIX) and name not in keep:
            with suppress(lv.libvirtError):
                cp.delete(0)


# --- restore -----------------------------------------------------------------------------

MARK_URI = "https://tandem.invalid/xmlns/restored"
"""The namespace of the domain metadata a restore leaves (``<restored image=… at=…/>``): the
next capture reads it, reads every extent saying why, and removes it."""
SHUTDOWN_POLL = 0.5


def _mark_restored(dom: Any, image: str) -> None:
    lv = _libvirt()
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    flags = lv.VIR_DOMAIN_AFFECT_CONFIG
    with suppress(lv.libvirtError):
        dom.setMetadata(
            lv.VIR_DOMAIN_METADATA_ELEMENT,
            f"<restored image='{image}' at='{when}'/>",
            "tandem",
            MARK_URI,
            flags,
        )


def _take_restored_mark(dom: Any) -> str | None:
    """What the restore mark says ("image X at T"), removing it; None without one."""
    lv = _libvirt()
    try:
        text = dom.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, MARK_URI, lv.VIR_DOMAIN_AFFECT_CONFIG)
    except lv.libvirtError:
        return None
    flags = lv.VIR_DOMAIN_AFFECT_CONFIG | (lv.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
    with suppress(lv.libvirtError):
        dom.setMetadata(lv.VIR_DOMAIN_METADATA_ELEMENT, None, None, MARK_URI, flags)
    try:
        node = ET.fromstring(text)
    except ET.ParseError:
        return "by tandem"
    return f"from image {node.get('image', '?')} at {node.get('at', '?')}"


def _power_off(dom: Any, timeout: float, emit: Emit) -> str:
    """Shut the domain down gracefully, destroying it after ``timeout`` s; how it went."""
    lv = _libvirt()
    if not dom.isActive():
        return "it was off"
    emit({"event": "log", "text": f"shutting the VM down (up to {timeout:g} s, then power off)"})
    with suppress(lv.libvirtError):
        dom.shutdown()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not dom.isActive():
            return "it shut down"
        time.sleep(SHUTDOWN_POLL)
    if dom.isActive():
        try:
            dom.destroy()
        except lv.libvirtError as exc:
            if dom.isActive():
                raise SourceUnreadable(
                    path=f"domain {dom.name()}",
                    reason=f"it did not power off ({exc.get_error_message()}); nothing was "
                    "restored. Power it off (`virsh destroy`) and restore again",
                ) from exc
        return f"it did not shut down within {timeout:g} s and was powered off"
    return "it shut down"


def _drop_all_checkpoints(dom: Any, emit: Emit) -> int:
    """Delete every tandem checkpoint of the (powered-off) domain: the restore rewrites the
    disks, so none of them describes what changed since any more."""
    lv = _libvirt()
    dropped = 0
    for cp in dom.listAllCheckpoints(0):
        if not cp.getName().startswith(PREFIX):
            continue
        try:
            cp.delete(0)
        except lv.libvirtError as exc:
            emit(
                {
                    "event": "log",
                    "text": f"checkpoint {cp.getName()}: {exc.get_error_message()}; "
                    "forgetting its metadata",
                }
            )
            cp.delete(lv.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        dropped += 1
    return dropped


class ServedDisk:
    """A powered-off disk served by ``qemu-nbd`` on a private unix socket, as a
    ``vmimage.DiskTarget`` (one request at a time)."""

    def __init__(self, path: str, fmt: str, folder: str, target: str) -> None:
        sock = os.path.join(folder, f"{target}.sock")
        self.proc = subprocess.Popen(
            [
                "qemu-nbd",
                "--format",
                fmt,
                "--socket",
                sock,
                "--export-name",
                target,
                "--cache",
                "none",
                "--aio",
                "threads",
                path,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.lock = threading.Lock()
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() if self.proc.stderr else b"").decode(
                    errors="replace"
                )
                raise SourceUnreadable(
                    path=path, reason=f"qemu-nbd could not open it ({err.strip() or 'no reason'})"
                )
            if os.path.exists(sock):
                try:
                    self.client = NbdClient(export=target, unix=sock)
                    break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.close()
                raise SourceUnreadable(path=path, reason="qemu-nbd did not start within 60 s")
            time.sleep(0.05)

    def read(self, offset: int, length: int) -> bytes:
        with self.lock:
            return self.client.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            self.client.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        with self.lock:
            self.client.write_zeroes(offset, length)

    def flush(self) -> None:
        with self.lock:
            self.client.flush()

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


def _redefine(conn: Any, domain: str, definition: str | None) -> Any:
    """The domain is gone: define it again from ``definition`` (this site's own capture of
    it), keeping its identity, when every disk file it names is still there; else refuse,
    touching nothing."""
    lv = _libvirt()
    if definition is None:
        raise NotFound(
            what="Domain",
            name=domain,
            listing="vms --host HOST (no image captured at this site holds its definition: "
            "define it again with `virsh define`, then restore)",
        )
    try:
        root = ET.fromstring(definition)
    except ET.ParseError as exc:
        raise InvalidInput(detail=f"the definition of domain {domain} is not XML: {exc}") from exc
    if root.findtext("name") != domain:
        raise NotFound(what="Domain", name=domain, listing="vms --host HOST")
    sources = [d["source"] for d in _disks(definition)]
    missing = [path for path in sources if not path or not os.path.isfile(path)]
    if missing:
        raise DomainGone(domain=domain, disk=missing[0] or "(unnamed)")
    try:
        return conn.defineXML(definition)
    except lv.libvirtError as exc:
        raise LibvirtRefused(
            what=f"the captured definition of domain {domain}, which is gone",
            reason=exc.get_error_message(),
            state="; nothing was restored",
        ) from exc


def restore(
    domain: str,
    image: str,
    manifest: VolumeManifest,
    source: ChunkSource,
    emit: Emit,
    progress: Callable[[int, int], None],
    *,
    power_on: bool = False,
    shutdown_timeout: float = 120.0,
    definition: str | None = None,
) -> dict[str, Any]:
    """Restore the VM image ``manifest`` onto ``domain`` in place: check the disks fit, power
    the domain off (graceful, then destroy), drop its checkpoints, diff-restore each disk,
    mark it restored (the next capture reads everything), power on if asked. Identity (UUID,
    MACs, the definition) is kept; a domain that is gone is defined again from
    ``definition`` (the appliance's own capture of it, never the image's XML, which may be
    the other site's) when its disks are there."""
    lv = _libvirt()
    try:
        return _restore(
            domain,
            image,
            manifest,
            source,
            emit,
            progress,
            power_on=power_on,
            shutdown_timeout=shutdown_timeout,
            definition=definition,
        )
    except lv.libvirtError as exc:
        raise SourceUnreadable(
            path=f"domain {domain}",
            reason=f"libvirt failed during the restore ({exc.get_error_message()}). Restore "
            "again once `virsh list` answers",
        ) from exc


def _restore(
    domain: str,
    image: str,
    manifest: VolumeManifest,
    source: ChunkSource,
    emit: Emit,
    progress: Callable[[int, int], None],
    *,
    power_on: bool,
    shutdown_timeout: float,
    definition: str | None,
) -> dict[str, Any]:
    lv = _libvirt()
    vm_meta = manifest.meta.get("vm") if isinstance(manifest.meta, dict) else None
    slots = vmimage.slots_of(manifest)
    if not isinstance(vm_meta, dict) or not slots:
        raise ImageHoldsNoVm(image=image)
    with connection() as conn:
        redefined = False
        try:
            dom = conn.lookupByName(domain)
        except lv.libvirtError:
            dom = _redefine(conn, domain, definition)
            redefined = True
            emit({"event": "log", "text": f"domain {domain} was gone: defined again from {image}"})
        disks = {d["target"]: d for d in _disks(dom.XMLDesc(0)) if d["target"]}
        for slot in slots:
            d = disks.get(slot.target)
            if d is not None and (d["type"] != "file" or not d["source"]):
                raise VmDiskNotFile(disk=slot.target, domain=domain, type=d["type"])
        try:
            sizes = {t: int(dom.blockInfo(t, 0)[0]) for t in disks}
        except lv.libvirtError as exc:
            raise SourceUnreadable(
                path=f"domain {domain}", reason=f"its disks are unreadable ({exc})"
            ) from exc
        vmimage.check_targets(manifest, sizes, f"domain {domain}")
        how = _power_off(dom, shutdown_timeout, emit)
        emit({"event": "log", "text": f"domain {domain}: {how}"})
        dropped = _drop_all_checkpoints(dom, emit)
        if dropped:
            emit(
                {
                    "event": "log",
                    "text": f"dropped {dropped} checkpoint(s): change tracking is lost after a "
                    "restore, the next capture reads everything",
                }
            )
        folder = tempfile.mkdtemp(prefix="tandem-restore-")
        served: dict[str, ServedDisk] = {}
        try:
            for slot in slots:
                d = disks[slot.target]
                served[slot.target] = ServedDisk(d["source"], d["format"], folder, slot.target)
            stats = vmimage.restore_disks(source, manifest, dict(served), progress=progress)
            for disk in served.values():
                disk.flush()
        finally:
            for disk in served.values():
                disk.close()
            shutil.rmtree(folder, ignore_errors=True)
        _mark_restored(dom, image)
        running = False
        if power_on:
            try:
                dom.create()
            except lv.libvirtError as exc:
                raise SourceUnreadable(
                    path=f"domain {domain}",
                    reason=f"image {image} was restored but the VM did not start "
                    f"({exc.get_error_message()}); start it with `virsh start {domain}`",
                ) from exc
            running = True
        return {
            "event": "done",
            "size": sum(s.size for s in slots),
            "stats": stats.as_dict(),
            "power": how,
            "redefined": redefined,
            "checkpoints_dropped": dropped,
            "running": running,
            "uuid": dom.UUIDString(),
        }


# --- new VMs -----------------------------------------------------------------------------


def resources() -> dict[str, Any]:
    """The storage pools and networks of this host, for a new VM's ``--pool``/``--network``:
    ``{"pools": [{name, active, type, path}], "networks": [{name, active}]}``."""
    with connection() as conn:
        pools = []
        for pool in conn.listAllStoragePools(0):
            root = ET.fromstring(pool.XMLDesc(0))
            pools.append(
                {
                    "name": pool.name(),
                    "active": bool(pool.isActive()),
                    "type": root.get("type", ""),
                    "path": root.findtext("target/path") or "",
                }
            )
        networks = [
            {"name": n.name(), "active": bool(n.isActive())} for n in conn.listAllNetworks(0)
        ]
    return {
        "pools": sorted(pools, key=lambda p: p["name"]),
        "networks": sorted(networks, key=lambda n: n["name"]),
    }


def _active_pool(conn: Any, name: str) -> Any:
    lv = _libvirt()
    try:
        pool = conn.storagePoolLookupByName(name)
    except lv.libvirtError as exc:
        raise NotFound(what="Storage pool", name=name, listing="vms --host HOST") from exc
    if not pool.isActive():
        raise VmPoolUnfit(
            pool=name,
            problem="is inactive on this host",
            fix=f"Start it (`virsh pool-start {name}`) or name an active one",
        )
    return pool


def _check_define(conn: Any, req: DefineRequest) -> Any:
    """Refuse what cannot be defined; returns the pool named (or None)."""
    lv = _libvirt()
    if req.name == req.source_domain:
        raise VmIsItsSource(
            what="a failed-over VM", domain=req.name, fix="Name a new VM with --new-vm"
        )
    domains = conn.listAllDomains(0)
    if req.name in {d.name() for d in domains}:
        raise AlreadyExists(what="Domain", name=req.name)
    if req.keep_identity and req.source_uuid in {d.UUIDString() for d in domains}:
        raise VmIdentityTaken(uuid=req.source_uuid)
    if req.network is not None:
        try:
            conn.networkLookupByName(req.network)
        except lv.libvirtError as exc:
            raise NotFound(what="Network", name=req.network, listing="vms --host HOST") from exc
    if req.copy_disks and req.pool is None:
        raise OptionsMissing(
            what="copying a VM's disks", options="--pool", why=" (the pool to copy them into)"
        )
    return _active_pool(conn, req.pool) if req.pool is not None else None


def _new_domain_xml(
    req: DefineRequest, pool: Any, volumes: dict[str, tuple[str, str]] | None
) -> str:
    """The new domain's XML: the captured one renamed, its disks on the export (or on the
    pool ``volumes`` target -> (pool, volume)), identity and NICs as the request says."""
    uri = urlsplit(req.nbd_uri)
    if not uri.hostname or not uri.port:
        raise InvalidInput(detail=f"{req.nbd_uri!r} is not an nbd[s]://HOST:PORT/EXPORT URI")
    export = uri.path.lstrip("/")
    slots = {str(d.get("target")): d for d in req.disks}
    root = ET.fromstring(req.xml)
    tame_domain_xml(root)  # captured at the other site
    _set(root, "name", req.name)
    if not req.keep_identity:
        _set(root, "uuid", str(uuid.uuid4()))
    devices = root.find("devices")
    if devices is None:
        raise InvalidInput(detail="the captured domain XML has no <devices>")
    for disk in list(devices.findall("disk")):
        if disk.get("device", "disk") != "disk":
            continue
        target = disk.find("target")
        dev = target.get("dev", "") if target is not None else ""
        slot = slots.get(dev)
        if slot is None:
            devices.remove(disk)
        elif volumes is not None:
            _volume_disk(disk, *volumes[dev])
        else:
            _nbd_disk(disk, uri.hostname, uri.port, export, int(slot["offset"]), int(slot["size"]))
            if uri.scheme == "nbds":
                source = disk.find("source")
                if source is not None:
                    source.set("tls", "yes")
    for iface in list(devices.findall("interface")):
        if req.keep_identity:
            continue
        devices.remove(iface)
    if req.network is not None and not req.keep_identity:
        iface = ET.SubElement(devices, "interface", {"type": "network"})
        ET.SubElement(iface, "source", {"network": req.network})
        ET.SubElement(iface, "model", {"type": "virtio"})
    nvram = root.find("os/nvram")
    if pool is not None and nvram is not None:
        # The domain's local state (UEFI variables) lives in the pool named as its datastore.
        path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
        if path:
            nvram.text = os.path.join(path, f"{req.name}_VARS.fd")
    if volumes:
        metadata = root.find("metadata")
        if metadata is None:
            metadata = ET.SubElement(root, "metadata")
        mine = ET.SubElement(metadata, f"{{{VM_NS}}}vm")
        for pool_name, volume in volumes.values():
            ET.SubElement(mine, f"{{{VM_NS}}}volume", {"pool": pool_name, "name": volume})
    ET.register_namespace("tandem", VM_NS)
    return ET.tostring(root, encoding="unicode")


def _define_and_start(conn: Any, req: DefineRequest, xml: str, tls: Path | None) -> dict[str, Any]:
    lv = _libvirt()
    try:
        dom = conn.defineXML(xml)
    except lv.libvirtError as exc:
        raise LibvirtRefused(
            what=f"the new domain {req.name}", reason=exc.get_error_message(), state=""
        ) from exc
    if req.power_on:
        try:
            dom.create()
        except lv.libvirtError as exc:
            with suppress(lv.libvirtError):
                dom.undefineFlags(0)
            hint = (
                f"; its disks are NBD over TLS: this host's qemu.conf needs "
                f'nbd_tls_x509_cert_dir = "{tls}" (then restart libvirtd)'
                if tls is not None
                else ""
            )
            raise LibvirtRefused(
                what=f"the new domain {req.name}, which did not start",
                reason=exc.get_error_message(),
                state=hint,
            ) from exc
    return {
        "name": dom.name(),
        "uuid": dom.UUIDString(),
        "running": bool(dom.isActive()),
        "pool": req.pool,
        "disks": "copy" if req.copy_disks else "nbd",
        **({"tls_dir": str(tls)} if tls is not None else {}),
    }


def tls_folder(directory: Path | None) -> Path:
    """Where this host keeps the certificates of the appliances whose NBD exports over TLS
    its domains' disks use: ``$TANDEM_NBD_TLS_DIR``, else ``DIR/nbd-tls``."""
    named = os.environ.get(TLS_DIR_ENV)
    if named:
        return Path(named)
    if directory is None:
        raise NbdTlsFolderMissing(env=TLS_DIR_ENV)
    return directory / TLS_DIR


def trust_appliance(folder: Path, pem: str, fingerprint: str) -> Path:
    """Trust the appliance certificate ``pem`` (pinned: its SHA-256 must be ``fingerprint``)
    for NBD over TLS: write it as ``folder/appliance-FINGERPRINT.pem`` (0644, QEMU reads it)
    and ``folder/ca-cert.pem`` as every appliance's certificate kept there (the file QEMU's
    x509 credentials read, several appliances sharing the host's one folder). Returns the
    folder."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError as exc:
        raise NbdCertificateInvalid(problem=f"is not a PEM certificate ({exc})") from exc
    if fingerprint_of_der(cert.public_bytes(Encoding.DER)) != fingerprint:
        raise NbdCertificateInvalid(
            problem=f"does not match the fingerprint pinned with it ({fingerprint})"
        )
    with _trust_lock:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o755)
        _write_public(folder / f"appliance-{fingerprint}.pem", cert.public_bytes(Encoding.PEM))
        bundle = b"".join(p.read_bytes() for p in sorted(folder.glob("appliance-*.pem")))
        _write_public(folder / "ca-cert.pem", bundle)
    return folder


def _write_public(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` at once, mode 0644."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def _trust(req: DefineRequest, directory: Path | None) -> Path | None:
    """For an ``nbds://`` export, the folder now trusting the appliance (else None)."""
    if req.nbd_ca is None or req.nbd_fingerprint is None:
        return None
    return trust_appliance(tls_folder(directory), req.nbd_ca, req.nbd_fingerprint)


def define(req: DefineRequest, directory: Path | None = None) -> dict[str, Any]:
    """Define (and with ``power_on`` start) the new domain over the export; returns its
    name, uuid and whether it runs. ``copy_disks`` requests go to ``define_copy``. An
    ``nbds://`` export's certificate is trusted first (``trust_appliance``), in the folder
    of ``directory`` (the agent's DIR)."""
    if req.copy_disks:
        return define_copy(req, lambda _event: None, directory)
    with connection() as conn:
        pool = _check_define(conn, req)
        tls = _trust(req, directory)
        return _define_and_start(conn, req, _new_domain_xml(req, pool, None), tls)


def _new_volume(pool: Any, pool_name: str, name: str, size: int) -> Any:
    """A new qcow2 volume ``name`` of ``size`` bytes in ``pool``, as compat 1.1 (qcow2 v3):
    libvirt's default v2 cannot keep the persistent dirty bitmaps the VM's next captures
    need. A refusal (the name taken, no room) is an InvalidInput naming the volume."""
    vol_xml = (
        f"<volume><name>{name}</name><capacity unit='bytes'>{size}</capacity>"
        "<target><format type='qcow2'/><compat>1.1</compat></target></volume>"
    )
    try:
        return pool.createXML(vol_xml, 0)
    except _libvirt().libvirtError as exc:
        raise LibvirtRefused(
            what=f"volume {name} in pool {pool_name!r}", reason=exc.get_error_message(), state=""
        ) from exc


def define_copy(req: DefineRequest, emit: Emit, directory: Path | None = None) -> dict[str, Any]:
    """Copy each disk's slice of the export into a new qcow2 volume of ``req.pool``
    (``qemu-img convert``, zeros skipped), then define the domain on those volumes. The
    volumes are named in the domain's metadata, so ``remove`` deletes them; a failure
    deletes those made so far."""
    lv = _libvirt()
    uri = urlsplit(req.nbd_uri)
    if not uri.hostname or not uri.port:
        raise InvalidInput(detail=f"{req.nbd_uri!r} is not an nbd[s]://HOST:PORT/EXPORT URI")
    with connection() as conn:
        pool = _check_define(conn, req)
        tls = _trust(req, directory)
        made: list[Any] = []
        volumes: dict[str, tuple[str, str]] = {}
        try:
            total = sum(int(d["size"]) for d in req.disks)
            done = 0
            for d in req.disks:
                target, size = str(d["target"]), int(d["size"])
                name = f"{req.name}-{target}.qcow2"
                vol = _new_volume(pool, str(req.pool), name, size)
                made.append(vol)
                volumes[target] = (str(req.pool), name)
                emit({"event": "log", "text": f"copying disk {target} into {req.pool}/{name}"})
                _convert(uri.hostname, uri.port, uri.path.lstrip("/"), d, vol.path(), tls)
                done += size
                emit({"event": "progress", "done": done, "total": total})
            xml = _new_domain_xml(req, pool, volumes)
            return _define_and_start(conn, req, xml, None)
        except BaseException:
            for vol in made:
                with suppress(lv.libvirtError):
                    vol.delete(0)
            raise


def define_empty(req: EmptyDomainRequest) -> dict[str, Any]:
    """Define the powered-off domain ``req.name`` from a captured XML on new, empty qcow2
    volumes ``NAME-<target>.qcow2`` of the (file-backed, active) pool ``req.pool``, one per
    disk and of its size; a failback ``--target new`` then writes the image into them with
    a VM restore. It gets a new UUID (the domain the image came from may still be defined,
    and libvirt keeps UUIDs unique) and keeps the captured NICs and MACs (the guest's
    network settings follow its MACs). The volumes are named in its metadata, so ``remove``
    deletes them with it; a failure deletes those made so far. A name that exists, or the
    source domain's own, is refused before anything is made."""
    lv = _libvirt()
    if req.name == req.source_domain:
        raise VmIsItsSource(
            what="the new domain",
            domain=req.name,
            fix="Name a new one, or fail back with --target original",
        )
    with connection() as conn:
        if req.name in {d.name() for d in conn.listAllDomains(0)}:
            raise AlreadyExists(what="Domain", name=req.name)
        pool = _active_pool(conn, req.pool)
        kind = ET.fromstring(pool.XMLDesc(0)).get("type", "")
        if kind not in FILE_POOLS:
            raise VmPoolUnfit(
                pool=req.pool,
                problem=f"is a {kind} pool, and a new VM's disks are made as files",
                fix=f"Name a pool of type {', '.join(FILE_POOLS)}",
            )
        made: list[Any] = []
        files: dict[str, str] = {}
        try:
            for disk in req.disks:
                vol = _new_volume(pool, req.pool, f"{req.name}-{disk.target}.qcow2", disk.size)
                made.append(vol)
                files[disk.target] = vol.path()
            xml = _empty_domain_xml(req, pool, files)
            try:
                dom = conn.defineXML(xml)
            except lv.libvirtError as exc:
                raise LibvirtRefused(
                    what=f"the new domain {req.name}",
                    reason=exc.get_error_message(),
                    state="; its disks were deleted again",
                ) from exc
        except BaseException:
            for vol in made:
                with suppress(lv.libvirtError):
                    vol.delete(0)
            raise
        return {
            "name": dom.name(),
            "uuid": dom.UUIDString(),
            "pool": req.pool,
            "volumes": [f"{req.pool}/{req.name}-{d.target}.qcow2" for d in req.disks],
        }


def _empty_domain_xml(req: EmptyDomainRequest, pool: Any, files: dict[str, str]) -> str:
    """The captured XML renamed, with a new UUID, each disk of the image a qcow2 file of
    ``files`` (target -> path; other disks dropped), NICs kept, UEFI variables in the pool,
    and the volumes listed in tandem's metadata."""
    root = ET.fromstring(req.xml)
    _set(root, "name", req.name)
    _set(root, "uuid", str(uuid.uuid4()))
    devices = root.find("devices")
    if devices is None:
        raise InvalidInput(detail="the captured domain XML has no <devices>")
    for disk in list(devices.findall("disk")):
        if disk.get("device", "disk") != "disk":
            continue
        target = disk.find("target")
        path = files.get(target.get("dev", "") if target is not None else "")
        if path is None:
            devices.remove(disk)
            continue
        for child in list(disk):
            if child.tag in ("source", "driver", "backingStore"):
                disk.remove(child)
        disk.set("type", "file")
        disk.insert(0, ET.Element("source", {"file": path}))
        disk.insert(0, ET.Element("driver", {"name": "qemu", "type": "qcow2"}))
    folder = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
    nvram = root.find("os/nvram")
    if nvram is not None and folder:
        nvram.text = os.path.join(folder, f"{req.name}_VARS.fd")
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(root, "metadata")
    for theirs in metadata.findall(f"{{{VM_NS}}}vm"):  # the source's volumes are not its own
        metadata.remove(theirs)
    mine = ET.SubElement(metadata, f"{{{VM_NS}}}vm")
    for dev in files:
        ET.SubElement(
            mine, f"{{{VM_NS}}}volume", {"pool": req.pool, "name": f"{req.name}-{dev}.qcow2"}
        )
    ET.register_namespace("tandem", VM_NS)
    return ET.tostring(root, encoding="unicode")


def _convert(
    host: str, port: int, export: str, slot: dict[str, Any], out: str, tls: Path | None
) -> None:
    """``qemu-img convert`` of one disk's slice of the export into the volume at ``out``
    (over TLS trusting the certificates of folder ``tls``, when given)."""
    nbd: dict[str, Any] = {
        "driver": "nbd",
        "server": {"type": "inet", "host": host, "port": str(port)},
        "export": export,
    }
    cmd = ["qemu-img", "convert", "-n", "--target-is-zero", "-O", "qcow2"]
    if tls is not None:
        nbd["tls-creds"] = "tls0"
        cmd += ["--object", f"tls-creds-x509,id=tls0,dir={tls},endpoint=client"]
    source = {"driver": "raw", "offset": int(slot["offset"]), "size": int(slot["size"])}
    cmd += ["json:" + json.dumps({**source, "file": nbd}), out]
    try:
        subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=24 * 3600)
    except FileNotFoundError as exc:
        raise NotHypervisor(reason="qemu-img is not installed (qemu-utils)") from exc
    except subprocess.CalledProcessError as exc:
        raise SourceUnreadable(
            path=f"the appliance's export {export.split('.')[0]}",
            reason=(exc.stderr or exc.stdout or "").strip() or f"qemu-img exited {exc.returncode}",
        ) from exc


def _set(root: ET.Element, tag: str, text: str) -> None:
    node = root.find(tag)
    if node is None:
        node = ET.SubElement(root, tag)
    node.text = text


def _nbd_disk(disk: ET.Element, host: str, port: int, export: str, offset: int, size: int) -> None:
    """Turn ``disk`` into a slice of the NBD export (raw: the slice is the guest's disk)."""
    for child in list(disk):
        if child.tag in ("source", "driver", "backingStore"):
            disk.remove(child)
    disk.set("type", "network")
    driver = ET.Element("driver", {"name": "qemu", "type": "raw"})
    source = ET.Element("source", {"protocol": "nbd", "name": export})
    ET.SubElement(source, "host", {"name": host, "port": str(port)})
    slices = ET.SubElement(source, "slices")
    ET.SubElement(slices, "slice", {"type": "storage", "offset": str(offset), "size": str(size)})
    disk.insert(0, source)
    disk.insert(0, driver)


def power(req: PowerRequest) -> dict[str, Any]:
    """Start or stop domain ``req.name``; ``{"name", "running", "how"}``. Already in the
    state asked for is fine; a domain that is gone is ``NotFound``."""
    lv = _libvirt()
    with connection() as conn:
        dom = _domain(conn, req.name)
        if req.on:
            how = "it was running"
            if not dom.isActive():
                try:
                    dom.create()
                except lv.libvirtError as exc:
                    raise SourceUnreadable(
                        path=f"domain {req.name}",
                        reason=f"it did not start ({exc.get_error_message()}); start it with "
                        f"`virsh start {req.name}` and read its log",
                    ) from exc
                how = "it was started"
        else:
            how = _power_off(dom, req.timeout, lambda _event: None)
        return {"name": req.name, "running": bool(dom.isActive()), "how": how}


def _volume_disk(disk: ET.Element, pool: str, volume: str) -> None:
    """Turn ``disk`` into a qcow2 volume of a storage pool (a copied disk)."""
    for child in list(disk):
        if child.tag in ("source", "driver", "backingStore"):
            disk.remove(child)
    disk.set("type", "volume")
    disk.insert(0, ET.Element("source", {"pool": pool, "volume": volume}))
    disk.insert(0, ET.Element("driver", {"name": "qemu", "type": "qcow2"}))


def remove(name: str) -> dict[str, Any]:
    """Destroy and undefine domain ``name`` (a test VM being withdrawn), with the pool
    volumes tandem copied its disks into; gone is fine."""
    lv = _libvirt()
    with connection() as conn:
        try:
            dom = conn.lookupByName(name)
        except lv.libvirtError:
            return {"removed": False}
        volumes = [
            (v.get("pool", ""), v.get("name", ""))
            for v in ET.fromstring(dom.XMLDesc(0)).iter(f"{{{VM_NS}}}volume")
        ]
        if dom.isActive():
            with suppress(lv.libvirtError):
                dom.destroy()
        flags = getattr(lv, "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0)
        flags |= getattr(lv, "VIR_DOMAIN_UNDEFINE_NVRAM", 0)
        dom.undefineFlags(flags)
        for pool_name, volume in volumes:
            with suppress(lv.libvirtError):
                conn.storagePoolLookupByName(pool_name).storageVolLookupByName(volume).delete(0)
        return {"removed": True, "volumes": [f"{p}/{v}" for p, v in volumes]}


# --- an existing domain as the target ----------------------------------------------------

TARGET_NS = "https://tandem.dev/libvirt/target/1"
"""The namespace of the ``<target image=… was=…>`` element an existing domain carries in its
``<metadata>`` while it is the target of a presented VM image: its own definition (inactive
XML, base64) that ``give_back`` puts back."""


def _taken_by(root: ET.Element) -> ET.Element | None:
    """The target element of a domain's XML (None: the domain has its own definition)."""
    return root.find(f"metadata/{{{TARGET_NS}}}target")


def take_over(req: TakeOverRequest, directory: Path | None = None) -> dict[str, Any]:
    """Make the existing domain ``req.name`` run from a VM image: refuse the domain the
    image came from (by name or UUID), one already taken over, and one whose disk count
    differs from the image's; power it off (graceful within ``req.shutdown_timeout``, then
    destroy); define it again with each disk (device ``disk``, in order) a slice of the
    export, keeping its UUID, MACs and everything else, its own definition in its metadata
    (``TARGET_NS``); start it with ``power_on``. Its disk files are never opened."""
    lv = _libvirt()
    uri = urlsplit(req.nbd_uri)
    if not uri.hostname or not uri.port:
        raise InvalidInput(detail=f"{req.nbd_uri!r} is not an nbd[s]://HOST:PORT/EXPORT URI")
    export = uri.path.lstrip("/")
    with connection() as conn:
        dom = _domain(conn, req.name)
        if req.name == req.source_domain or (
            req.source_uuid and dom.UUIDString() == req.source_uuid
        ):
            raise VmIsItsSource(
                what="a failed-over VM's domain",
                domain=req.name,
                fix="Name another domain with --vm, or a new one with --new-vm",
            )
        original = dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE | lv.VIR_DOMAIN_XML_SECURE)
        root = ET.fromstring(original)
        mark = _taken_by(root)
        if mark is not None:
            raise VmTargetInUse(
                domain=req.name, host=os.uname().nodename, image=mark.get("image", "?")
            )
        disks = [d for d in root.findall("./devices/disk") if d.get("device", "disk") == "disk"]
        if len(disks) != len(req.disks):
            raise VmDisksDiffer(
                domain=req.name,
                host=os.uname().nodename,
                have=len(disks),
                app=req.source_domain,
                want=len(req.disks),
            )
        tls = (
            trust_appliance(tls_folder(directory), req.nbd_ca, req.nbd_fingerprint)
            if req.nbd_ca is not None and req.nbd_fingerprint is not None
            else None
        )
        for disk, slot in zip(disks, req.disks, strict=True):
            _nbd_disk(disk, uri.hostname, uri.port, export, int(slot["offset"]), int(slot["size"]))
            source = disk.find("source")
            if tls is not None and source is not None:
                source.set("tls", "yes")
        was_running = bool(dom.isActive())
        metadata = root.find("metadata")
        if metadata is None:
            metadata = ET.SubElement(root, "metadata")
        keep = ET.SubElement(
            metadata,
            f"{{{TARGET_NS}}}target",
            {"image": req.image, "was": "running" if was_running else "off"},
        )
        keep.text = base64.b64encode(original.encode()).decode()
        ET.register_namespace("tandemtarget", TARGET_NS)
        xml = ET.tostring(root, encoding="unicode")
        how = _power_off(dom, req.shutdown_timeout, lambda _event: None)
        try:
            dom = conn.defineXML(xml)
        except lv.libvirtError as exc:
            raise LibvirtRefused(
                what=f"domain {req.name} with its disks on the export",
                reason=exc.get_error_message(),
                state=f"; it keeps its own definition ({how})",
            ) from exc
        if req.power_on:
            try:
                dom.create()
            except lv.libvirtError as exc:
                with suppress(lv.libvirtError):
                    conn.defineXML(original)
                raise LibvirtRefused(
                    what=f"domain {req.name}, which did not start on the export",
                    reason=exc.get_error_message(),
                    state="; it has its own definition back, powered off",
                ) from exc
        return {
            "name": dom.name(),
            "uuid": dom.UUIDString(),
            "running": bool(dom.isActive()),
            "disks": "nbd",
            "existing": True,
            "was_running": was_running,
            "power_off": how,
            **({"tls_dir": str(tls)} if tls is not None else {}),
        }


def give_back(name: str) -> dict[str, Any]:
    """Give domain ``name`` its own definition back (``take_over`` kept it): destroyed if it
    runs (it ran from the image being withdrawn), then defined from the kept XML. A domain
    that is gone, or that carries no kept definition, is left as it is."""
    lv = _libvirt()
    with connection() as conn:
        try:
            dom = conn.lookupByName(name)
        except lv.libvirtError:
            return {"restored": False, "reason": "the domain is gone"}
        mark = _taken_by(ET.fromstring(dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE)))
        if mark is None or not mark.text:
            return {"restored": False, "reason": "it has its own definition"}
        original = base64.b64decode(mark.text.encode()).decode()
        if dom.isActive():
            with suppress(lv.libvirtError):
                dom.destroy()
        try:
            conn.defineXML(original)
        except lv.libvirtError as exc:
            raise VmDefinitionNotRestored(
                domain=name, reason=exc.get_error_message(), namespace=TARGET_NS
            ) from exc
        return {"restored": True, "was_running": mark.get("was") == "running"}
