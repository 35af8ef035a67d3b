"""Virtual machines: names and rules that need no hypervisor (pure)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from tandem.errors import DomainNameInvalid

DOMAIN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
"""A libvirt domain name tandem accepts: safe in XML, paths and messages."""
FILE_POOLS = ("dir", "fs", "netfs")
"""Storage pool types whose volumes are files: a failback ``--target new`` makes a new VM's
disks as qcow2 files there, which a VM restore writes in place."""


def check_domain_name(name: str, what: str = "--domain") -> str:
    if not re.fullmatch(DOMAIN_NAME[1:-1], name):
        raise DomainNameInvalid(what=what, name=name)
    return name


QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
HOST_DEVICES = ("hostdev", "filesystem", "shmem", "redirdev", "smartcard", "emulator")
"""Devices of a domain XML that reach into the host that defines it (a PCI/USB device, a host
folder, host memory, a host smart card, the QEMU binary to run): never taken from an image
of the other site."""
NETWORK_TYPES = ("network", "bridge", "user")
"""NIC types that attach a guest to a named network or bridge of the host, or to QEMU's
user-mode stack; the others name host devices, sockets or scripts."""
CHAR_DEVICES = ("serial", "console", "parallel", "channel")


def tame_domain_xml(root: ET.Element) -> list[str]:
    """Strip from a domain XML captured at the *other* site what would let that site act on
    this host beyond running a guest: QEMU pass-through arguments (``qemu:commandline``), the
    emulator binary, host devices and folders, interface scripts and non-network NIC types,
    character devices writing to host files, sockets or ports, TPM pass-through, and the
    sources of CD-ROM/floppy drives (host files). Changes ``root`` in place and returns what
    it removed (for the job log). A domain defined from its own site's capture is used as
    captured. Kept: ``<seclabel>`` and the ``<os>`` boot files (kernel, initrd, firmware),
    which the host's libvirt confines (``qemu.conf``)."""
    removed: list[str] = []
    for parent in list(root.iter()):
        for child in list(parent):
            tag = child.tag if isinstance(child.tag, str) else ""
            if tag.startswith(f"{{{QEMU_NS}}}"):
                parent.remove(child)
                removed.append(tag.rsplit("}", 1)[-1])
    devices = root.find("devices")
    if devices is None:
        return removed
    for child in list(devices):
        kind = child.get("type", "")
        drop = child.tag in HOST_DEVICES
        if child.tag == "interface":
            drop = kind not in NETWORK_TYPES
            for script in child.findall("script") + child.findall("downscript"):
                child.remove(script)
                removed.append("interface script")
        elif child.tag in CHAR_DEVICES:
            source = child.find("source")
            auto = kind == "unix" and (source is None or not source.get("path"))
            drop = kind != "pty" and not auto
        elif child.tag == "tpm":
            backend = child.find("backend")
            drop = backend is None or backend.get("type") != "emulator"
        elif child.tag == "disk" and child.get("device", "disk") in ("cdrom", "floppy"):
            source = child.find("source")
            if source is not None:
                child.remove(source)
                removed.append(f"{child.get('device')} source")
        if drop:
            devices.remove(child)
            removed.append(f"{child.tag} ({kind})" if kind else child.tag)
    return removed
