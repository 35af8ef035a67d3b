"""Where a domain definition comes from: a site defines a VM only from its own capture of it,
and a definition captured at the other site is tamed before it is used.

The other site's images (a syncback at production, a replica at DR) carry that site's domain
XML, and a domain XML names binaries, devices and files of the host that defines it: an
``<emulator>``, ``qemu:commandline`` arguments or a host device in a syncback would be code
or access on a production host."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

from tandem.catalog import queries as q
from tandem.domain.images import ImageKind
from tandem.domain.lifecycle import AppKind
from tandem.domain.vms import tame_domain_xml
from tandem.operations.restore import own_domain_xml
from tandem.storage.manifest import VOLUME_CHUNK, VolumeManifest, encode_manifest
from tests.appliance.conftest import Booted

OWN = "<domain type='qemu'><name>web-01</name><devices/></domain>"
THEIRS = (
    "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
    "<name>web-01</name><devices><emulator>/tmp/evil</emulator></devices>"
    "<qemu:commandline><qemu:arg value='-evil'/></qemu:commandline></domain>"
)


def _image(booted: Booted, kind: ImageKind, xml: str, age: int, domain: str = "web-01") -> None:
    appliance = booted.appliance
    with appliance.site.pool.writer() as writer:
        digest = writer.put(f"{kind}-{age}".encode() * 64).digest
        manifest = VolumeManifest(
            size=VOLUME_CHUNK, chunks=[digest], meta={"vm": {"domain": domain, "xml": xml}}
        )
        mid = writer.commit_manifest(encode_manifest(manifest))
    with appliance.catalog.begin() as session:
        q.add_image(
            session,
            app="vm1",
            kind=kind,
            manifest=mid.hex(),
            size=VOLUME_CHUNK,
            created=datetime.now(UTC) - timedelta(minutes=age),
        )


def test_production_defines_a_vm_only_from_its_own_capture_never_a_syncback(
    booted: Booted,
) -> None:
    appliance = booted.appliance
    with appliance.catalog.begin() as session:
        q.add_host(session, name="h1", url="https://127.0.0.1:1", token="t", fingerprint="00" * 32)
        q.add_app(session, name="vm1", kind=AppKind.VM, host="h1", path="web-01")
        app = q.get_app(session, name="vm1")
    assert own_domain_xml(appliance.site, app) is None  # nothing captured here yet
    _image(booted, ImageKind.SNAPSHOT, OWN, age=30)
    # Newer images from the other site, and a snapshot of another domain, are not taken.
    _image(booted, ImageKind.SYNCBACK, THEIRS, age=5)
    _image(booted, ImageKind.REPLICA, THEIRS, age=4)
    _image(booted, ImageKind.SNAPSHOT, THEIRS.replace("web-01", "other"), age=3, domain="other")
    assert own_domain_xml(appliance.site, app) == OWN


def test_a_definition_from_the_other_site_loses_what_reaches_into_the_host() -> None:
    root = ET.fromstring(
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
        "<name>x</name><os><type>hvm</type><kernel>/boot/vmlinuz</kernel></os><devices>"
        "<emulator>/tmp/evil</emulator>"
        "<disk type='file' device='disk'><source file='/var/lib/x.qcow2'/>"
        "<target dev='vda'/></disk>"
        "<disk type='file' device='cdrom'><source file='/etc/shadow'/><target dev='sda'/></disk>"
        "<hostdev mode='subsystem' type='pci'/>"
        "<filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>"
        "<interface type='ethernet'><script path='/tmp/evil'/></interface>"
        "<interface type='network'><source network='default'/><script path='/tmp/evil'/>"
        "<mac address='52:54:00:00:00:01'/></interface>"
        "<serial type='file'><source path='/etc/passwd'/></serial>"
        "<serial type='pty'><target port='0'/></serial>"
        "<channel type='unix'><source mode='bind' path='/run/evil.sock'/></channel>"
        "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        "<tpm model='tpm-tis'><backend type='passthrough'/></tpm>"
        "</devices><qemu:commandline><qemu:arg value='-evil'/></qemu:commandline></domain>"
    )
    removed = tame_domain_xml(root)
    text = ET.tostring(root, encoding="unicode")
    for gone in ("/tmp/evil", "-evil", "/etc/shadow", "/etc/passwd", "/run/evil.sock"):
        assert gone not in text, gone
    for tag in ("hostdev", "filesystem", "tpm", "emulator"):
        assert root.find(f"devices/{tag}") is None, tag
    # What a guest needs stays: its disk, its network card and MAC, a console, the agent's
    # channel, its boot files.
    assert root.findall("devices/disk[@device='disk']/source")[0].get("file") == "/var/lib/x.qcow2"
    (nic,) = root.findall("devices/interface")
    assert nic.get("type") == "network" and nic.find("mac") is not None
    assert [s.get("type") for s in root.findall("devices/serial")] == ["pty"]
    assert len(root.findall("devices/channel")) == 1
    assert root.findtext("os/kernel") == "/boot/vmlinuz"
    assert "commandline" in removed and "hostdev (pci)" in removed


def test_a_new_vm_at_dr_is_defined_without_the_other_sites_host_reach() -> None:
    """The DR agent tames the replica's XML before it defines a new VM from it (a failover
    keeps the identity and NICs, never the emulator or pass-through arguments)."""
    from tandem.agent.vm import _new_domain_xml
    from tandem.transport.agent_api import DefineRequest

    xml = THEIRS.replace(
        "<devices>",
        "<devices><disk type='file' device='disk'><source file='/srv/web.qcow2'/>"
        "<target dev='vda'/></disk><interface type='network'><source network='default'/>"
        "<script path='/tmp/evil'/></interface>",
    )
    req = DefineRequest(
        name="web-01-dr",
        xml=xml,
        disks=[{"target": "vda", "offset": 0, "size": 1 << 20}],
        nbd_uri="nbd://127.0.0.1:10809/x.s",
        keep_identity=True,
    )
    out = _new_domain_xml(req, None, None)
    assert "/tmp/evil" not in out and "-evil" not in out and "emulator" not in out
    root = ET.fromstring(out)
    assert root.findall("devices/disk/source")[0].get("protocol") == "nbd"
    assert root.findall("devices/interface/source")[0].get("network") == "default"
